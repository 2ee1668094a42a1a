"""Mixture-of-experts layer implementations, plugged into transformers' experts interface.

transformers 5 routes every `@use_experts_implementation` experts module (Mixtral's
`MixtralExperts`) through `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`, called as
`fn(experts_module, hidden_states_TD, top_k_index_TK, top_k_weights_TK) -> out_TD`; the router
stays HF's. `configure_moe(hf_config, spec.moe)` registers ours, each bound to the run's
`clm.spec.MoESpec` (implementation, capacity factor, capacity group), and points the config at
it by HF's own `_experts_implementation`:

- ``hf``: transformers' own default (`grouped_mm` for Mixtral). Data-dependent shapes: on XLA
  `grouped_mm` fails (`torch.histc`) and `eager` recompiles every step. Records no metrics.
- ``dense``: every expert on every token, combined with a [T, E] weight matrix that is zero
  off the top-k. Static, E/K times the FLOPs; the simplest reference.
- ``dropping``: GShard/Switch capacity dispatch, per group of tokens. The tokens of a forward
  call are cut into G groups of T/G consecutive tokens: one sequence each
  (`MoESpec.group_tokens`: the trainer's `max_length`), or one group of all T when no group
  size is set. In each group every expert owns C slots,
  ``C = min(T/G, ceil(T/G * K / E * capacity_factor))``. Each (token, k) assignment gets its
  rank in its expert's queue within its group from a cumulative sum over the routing mask;
  ranks >= C are dropped. Kept assignments are copied into an [E, G, C, D] buffer, the experts
  run as two batched matmuls, and each filled slot is copied back to its (token, k) row,
  which dropped assignments never get (exactly 0). Both moves are indexed copies (`index_put`
  without accumulation) whose backward is a gather: no scatter-add either way. Every shape
  depends only on (T, G, K, E, C): zero recompiles on XLA.
- ``dropless``: exact. Assignments sorted by expert, then a grouped GEMM: `torch._grouped_mm`
  on CUDA (bf16, sm80+) and CPU (torch >= 2.9 has a CPU kernel), else a per-expert loop. On
  XLA (TPU included) it runs as ``dropping`` with C = the capacity group's tokens, which is
  exact (an expert receives at most one assignment per token) and static, and keeps each
  sequence on its own device. Not torch_xla's Pallas `gmm` (megablox): its sort and grouped
  matmul span all the tokens of the call, which under SPMD is the whole global batch, and XLA
  cannot partition a Pallas call: it would replicate the batch's tokens on every device.
  Running it per device needs a manual-sharding region with the weights gathered in and their
  gradients reduce-scattered out by hand, as torchprime's Mixtral does: not done yet.

Drop order (``dropping``): queue position follows the flattened (token, k) order: token
position first, then the token's k-th choice (k = 0 is its highest-probability expert). So a
token is dropped from an expert when C earlier (token, k) assignments already took it. Why
position and not routing probability: (1) it is causal, whether a token is dropped depends
only on tokens before it in its group, so no information leaks from later positions of a
causal LM through the capacity limit, as it would when ranking by probability across the
whole batch; (2) it is the order of the MLPerf reference implementations (MaxText
`generate_masks`, the torch_xla Mixtral reference), so drop statistics are comparable; (3) it
needs only a cumulative sum: no sort, static shapes.

Why groups of one sequence: the references count capacity per sequence, and so does the
trainer here. Then which tokens are dropped depends on the sequence alone, not on how many
sequences one forward call sees: the same on one CPU, under torchrun (each rank sees its rows)
and under XLA SPMD (one program sees the global micro-batch). And on a pod the dispatch stays
on the device that holds the sequence: the group index of every indexed copy is an iota, which
XLA's SPMD partitioner recognizes as a parallel dimension, so no device ever holds the whole
batch's [E, C, D] buffer (a single group over the 8.4M tokens of the benchmark's global batch
made the TPU compiler ask for a 1.3 TB buffer per device; docs/PERFORMANCE.md, TPU section).

Aux loss: HF computes Mixtral's load-balancing loss from the router's full softmax (captured
router logits), independent of the experts implementation. Its `torch.histc` counts fail on
XLA; `use_static_load_balancing_loss()` swaps in `load_balancing_loss`, equal and static.

Metrics: each of our implementations leaves a detached [2] tensor (dropped fraction of the
T*K assignments, max expert load / mean expert load, load counted before dropping) on the
experts module; `moe_metrics` reads them. No `.item()` in the forward: on XLA they stay lazy
and are materialized by the step's own sync.

Shape legend: T tokens, D hidden, F ffn, E experts, K top-k, C capacity, S = T * K
(token, k) assignments. Suffixes name the dimensions: `x_TD`, `w_EDF`, `slot_S`.

Why this module is long: the four experts implementations, their registration with transformers
and the MoE statistics share the routing and the spec binding; the dropping experts' slot copies
are clm/expert_slots.py.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from clm.expert_slots import from_slots, to_slots
from clm.spec import MoESpec

# logical dims of the buffers (`use_sharding`): [E, G*C, D] expert-major, [G, M, D] and
# [E, G, C, D] group-major
EXPERT_BUFFER_DIMS = ("experts", "expert_slots", None)
GROUPS = ("groups", None, None)
BUFFER_DIMS = (None, "groups", None, None)
_STATS_ATTR = "_clm_moe_stats"
# Dropless on CPU: "grouped_mm" (torch's CPU kernel) or "loop"; see docs/PERFORMANCE.md.
CPU_DROPLESS_BACKEND = "grouped_mm"


# --------------------------------------------------------------------------- config


class ExpertsFunction:
    """One of our experts functions bound to a MoESpec: what HF's experts module calls as
    `fn(experts, x_TD, top_k_index_TK, top_k_weights_TK)`. The settings travel with the
    function, not on the HF config: the config only names it (`_experts_implementation`)."""

    def __init__(self, spec: MoESpec):
        self.spec = spec
        self.forward = _EXPERTS_FUNCTIONS[spec.implementation]

    def __call__(self, experts, x_TD, top_k_index_TK, top_k_weights_TK):
        return self.forward(experts, self.spec, x_TD, top_k_index_TK, top_k_weights_TK)


def experts_key(spec: MoESpec) -> str | None:
    """Register `spec`'s experts function in transformers' global registry (idempotent) and
    return its key; None for "hf" (transformers picks its default at model init).

    The key spells the spec out, so models of different specs in one process (tests, a
    planner) each find their own; prefixed so it never shadows one of transformers' keys."""
    if spec.implementation == "hf":
        return None
    settings = ",".join(
        f"{f.name}={getattr(spec, f.name)!r}" for f in fields(spec) if f.name != "implementation"
    )
    key = f"clm_{spec.implementation}({settings})"
    if key not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(key, ExpertsFunction(spec))
    return key


def configure_moe(hf_config, spec: MoESpec | None) -> None:
    """Make models built from `hf_config` afterwards run their experts as `spec` says; None
    (a dense model) leaves the config alone."""
    if spec is None:
        return
    hf_config._experts_implementation = experts_key(spec)


def spec_of(experts) -> MoESpec | None:
    """The MoESpec an experts module runs with; None when it runs transformers' own."""
    key = getattr(experts.config, "_experts_implementation", None)
    function = ALL_EXPERTS_FUNCTIONS.get(key) if key is not None else None
    return function.spec if isinstance(function, ExpertsFunction) else None


# --------------------------------------------------------------------------- metrics


def moe_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Layer means of the statistics our experts functions recorded in the last forward."""
    stats = [getattr(m, _STATS_ATTR) for m in model.modules() if hasattr(m, _STATS_ATTR)]
    if not stats:
        return {}
    if len({s.device for s in stats}) == 1:
        stats_L2 = torch.stack(stats).cpu()  # one device-to-host transfer
    else:
        stats_L2 = torch.stack([s.cpu() for s in stats])
    drop, load = stats_L2.double().mean(0).tolist()
    return {"moe/drop_fraction": drop, "moe/load_max_over_mean": load}


def _record_stats(experts, load_E: torch.Tensor, kept: torch.Tensor | None, num_assignments: int):
    """Stash [dropped fraction, max/mean load] as a detached tensor; no host sync."""
    with torch.no_grad():
        load_E = load_E.float()
        load_ratio = load_E.max() / load_E.mean()
        if kept is None:
            drop = torch.zeros_like(load_ratio)
        else:
            drop = 1.0 - kept.sum().float() / num_assignments
        setattr(experts, _STATS_ATTR, torch.stack([drop, load_ratio]).detach())


@torch.no_grad()
def record_stats_from_router(experts, router_logits_TE: torch.Tensor) -> None:
    """Record on `experts` the statistics its experts function records in a forward, from the
    router logits of that forward alone: the top-k as HF's Mixtral router takes them, then the
    same load and, for `dropping`, the same capacity groups and drops. For a forward whose
    statistics cannot leave it (the body of a scanned loop, clm/backends/xla_scan.py)."""
    spec = spec_of(experts)
    if spec is None:  # "hf": records nothing
        return
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    top_k_index_TK = torch.topk(probs_TE, spec.top_k, dim=-1).indices
    num_tokens = top_k_index_TK.shape[0]
    if spec.implementation != "dropping":
        load_E = _onehot_SE(top_k_index_TK, experts.num_experts).sum(0)
        _record_stats(experts, load_E, None, top_k_index_TK.numel())
        return
    group_tokens, groups = _capacity_groups(spec, num_tokens)
    capacity_ = spec.capacity(group_tokens)
    _, kept_S, load_E = dispatch_plan(top_k_index_TK, experts.num_experts, capacity_, groups)
    _record_stats(experts, load_E, kept_S, kept_S.numel())


# --------------------------------------------------------------------------- aux loss


def load_balancing_loss(gate_logits, num_experts=None, top_k=2, attention_mask=None):
    """HF Mixtral's `load_balancing_loss_func` (same signature and value), static shapes.

    HF counts expert assignments with `torch.histc`, which XLA does not lower: it falls back
    to CPU, and for the int32 counts HF uses off CPU it raises "histogram_cpu" not implemented
    for 'Int'. Here the counts are one-hot sums; the loss is still the Switch loss over the
    router's full softmax probabilities.
    """
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    device = gate_logits[0].device
    experts_E = torch.arange(num_experts, device=device)
    tokens_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    mask_T1 = None
    if attention_mask is not None:
        mask_T1 = attention_mask.reshape(-1, 1).to(device=device, dtype=torch.float32)
    for logits_TE in gate_logits:
        probs_TE = torch.softmax(logits_TE.to(device), dim=-1)
        _, index_TK = torch.topk(probs_TE, top_k, dim=-1)
        counts_TE = (index_TK.unsqueeze(-1) == experts_E).sum(1).float()
        probs_TE = probs_TE.float()
        if mask_T1 is None:
            rows = rows + probs_TE.shape[0]
        else:
            counts_TE, probs_TE = counts_TE * mask_T1, probs_TE * mask_T1
            rows = rows + mask_T1.sum()
        tokens_E = tokens_E + counts_TE.sum(0)
        probs_E = probs_E + probs_TE.sum(0)
    return torch.sum((tokens_E / rows) * (probs_E / rows)) * num_experts


def use_static_load_balancing_loss() -> None:
    """Make HF Mixtral compute its aux loss with `load_balancing_loss` (needed on XLA)."""
    from transformers.models.mixtral import modeling_mixtral

    modeling_mixtral.load_balancing_loss_func = load_balancing_loss


# --------------------------------------------------------------------------- sharding

# Set by a backend that partitions one program over devices (XLA SPMD: `wrap_model`), as
# `clm.backends.xla_spmd.ActivationSharding`; None (eager backends): every tensor is whole.
_SHARDING = None


def use_sharding(sharding) -> None:
    """Lay out the experts' buffers with `sharding` (its `constrain(tensor, dims)`)."""
    global _SHARDING
    _SHARDING = sharding


def _constrain(tensor: torch.Tensor, dims: tuple) -> torch.Tensor:
    """Lay a buffer out by logical dims: groups (sequences) on the data axes; the experts'
    [E, G*C, D] with experts on the expert-parallel axis and slots on the data axes. XLA's
    partitioner does not infer the latter: the experts' matmul contracts D, which FSDP shards
    too, and without it the slots stayed whole (a 1.3 TB buffer per device)."""
    if _SHARDING is None or tensor.device.type != "xla":
        return tensor
    return _SHARDING.constrain(tensor, dims)


# --------------------------------------------------------------------------- shared pieces


def _check_layout(experts, spec: MoESpec | None = None, top_k: int | None = None) -> None:
    """Our kernels assume Mixtral's layout: gated, no bias, no post-norm, no expert parallel;
    and, with `spec`, the experts and top-k it was made for."""
    if spec is not None and (experts.num_experts, top_k) != (spec.num_experts, spec.top_k):
        raise ValueError(
            f"experts module of {experts.num_experts} experts, top-{top_k} routing: its spec "
            f"is for {spec.num_experts} experts, top-{spec.top_k}"
        )
    unsupported = {
        "has_gate": not getattr(experts, "has_gate", True),
        "has_bias": getattr(experts, "has_bias", False),
        "has_post_expert_norm": getattr(experts, "has_post_expert_norm", False),
        "expert parallel": getattr(experts, "_is_expert_parallel", False),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise NotImplementedError(f"clm.moe experts functions do not support {', '.join(bad)}")


def _weights_EIO(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up as [E, D, 2F], down as [E, F, D]): views in (in, out) order for x @ w."""
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        return w_gate_up, w_down
    return w_gate_up.transpose(1, 2), w_down.transpose(1, 2)


def _weights_EOI(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up as [E, 2F, D], down as [E, D, F]): the (out, in) layout HF stores by default."""
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        return w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    return w_gate_up, w_down


def _onehot_SE(top_k_index_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[S, E] one-hot of the flattened assignments; by comparison, so XLA sees no checks."""
    experts_E = torch.arange(num_experts, device=top_k_index_TK.device)
    return (top_k_index_TK.reshape(-1, 1) == experts_E).to(torch.int32)


def _scatter_rows(src_ND: torch.Tensor, index_N: torch.Tensor, rows: int) -> torch.Tensor:
    """out[index[n]] = src[n] in a [rows, D] zero tensor.

    Built on index_copy, whose backward is a gather: no scatter-add (slow on CPU, atomics
    on GPU) in either direction, unlike indexing whose backward accumulates.
    """
    out_RD = src_ND.new_zeros(rows, src_ND.shape[1])
    return out_RD.index_copy(0, index_N, src_ND)


def _weighted_sum_over_k(y_SD: torch.Tensor, weights_TK: torch.Tensor, dtype) -> torch.Tensor:
    """sum_k w[t, k] * y[t, k]: a reshape + sum (deterministic, fp32 weights as HF does)."""
    num_tokens, top_k = weights_TK.shape
    weighted_SD = y_SD * weights_TK.reshape(-1, 1)
    return weighted_SD.view(num_tokens, top_k, -1).sum(1).to(dtype)


# --------------------------------------------------------------------------- dense


def dense_experts_forward(experts, spec: MoESpec, x_TD, top_k_index_TK, top_k_weights_TK):
    """Every expert on every token; a [T, E] combine matrix keeps only the top-k outputs."""
    _check_layout(experts, spec, top_k_index_TK.shape[1])
    num_experts = experts.num_experts
    w_gate_up_EDF2, w_down_EFD = _weights_EIO(experts)
    h_ETF2 = torch.matmul(x_TD.to(w_gate_up_EDF2.dtype).unsqueeze(0), w_gate_up_EDF2)
    y_ETD = torch.matmul(experts._apply_gate(h_ETF2), w_down_EFD)
    combine_TE = torch.zeros(
        x_TD.shape[0], num_experts, dtype=top_k_weights_TK.dtype, device=x_TD.device
    ).scatter_add(1, top_k_index_TK, top_k_weights_TK)
    out_TD = torch.einsum("etd,te->td", y_ETD.to(combine_TE.dtype), combine_TE)
    load_E = _onehot_SE(top_k_index_TK, num_experts).sum(0)
    _record_stats(experts, load_E, None, top_k_index_TK.numel())
    return out_TD.to(x_TD.dtype)


# --------------------------------------------------------------------------- dropping


def dispatch_plan(
    top_k_index_TK: torch.Tensor, num_experts: int, capacity: int, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (token, k) assignment's rank in its expert's queue within its group.

    The T tokens are `groups` groups of T / groups consecutive tokens. Returns (rank_S, kept_S,
    load_E), flattened in (token, k) order: rank = the number of earlier assignments of the same
    group, in (token, k) order, to the same expert; kept = rank < capacity; load_E counts every
    assignment (before dropping).
    """
    onehot_GME = _onehot_SE(top_k_index_TK, num_experts).view(groups, -1, num_experts)
    rank_GM = (onehot_GME.cumsum(1) * onehot_GME).sum(2) - 1
    rank_S = rank_GM.reshape(-1)
    return rank_S, rank_S < capacity, onehot_GME.sum((0, 1))


def _run_experts_ECD(experts, x_ECD: torch.Tensor) -> torch.Tensor:
    """The SwiGLU experts as two batched matmuls over [E, C, D], weight-major.

    Computed as h^T = W x^T rather than h = x W^T: the same products, but autograd's weight
    gradient dW = dh^T x then comes out in the parameter's own [E, out, in] layout. The x W^T
    form yields it transposed, and AccumulateGrad copies every expert weight gradient into
    the parameter's layout (measured on CPU at 4096 x 1024 x 3584 x 8: fwd+bwd of dropping
    went from 1.43x to 1.24x the time of dropless; outputs and gradients equal within 1e-5).
    """
    w_gate_up_EF2D, w_down_EDF = _weights_EOI(experts)
    h_EF2C = torch.bmm(w_gate_up_EF2D, x_ECD.transpose(1, 2))
    h_ECF = experts._apply_gate(h_EF2C.transpose(1, 2))
    return torch.bmm(w_down_EDF, h_ECF.transpose(1, 2)).transpose(1, 2)


def _capacity_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK, capacity_: int, groups):
    """Static-shape dispatch -> batched experts -> combine: in each of `groups` groups of
    tokens every expert has `capacity_` slots (module docstring)."""
    num_tokens, dim = x_TD.shape
    num_experts, top_k = experts.num_experts, top_k_index_TK.shape[1]
    per_group = num_tokens * top_k // groups  # assignments per group, M
    rank_S, kept_S, load_E = dispatch_plan(top_k_index_TK, num_experts, capacity_, groups)
    # Kept assignments to their slot (expert, rank) in their group; dropped ones name the
    # expert E, out of range (clm.expert_slots)
    expert_GM = torch.where(kept_S, top_k_index_TK.reshape(-1), num_experts).view(groups, -1)
    slot_GM = torch.where(kept_S, rank_S, 0).view(groups, -1)
    x_GMD = x_TD.to(experts.gate_up_proj.dtype).repeat_interleave(top_k, dim=0)
    x_GMD = _constrain(x_GMD.view(groups, per_group, dim), GROUPS)
    x_EGCD = _constrain(to_slots(x_GMD, expert_GM, slot_GM, num_experts, capacity_), BUFFER_DIMS)
    x_ECD = _constrain(x_EGCD.view(num_experts, groups * capacity_, dim), EXPERT_BUFFER_DIMS)
    y_ECD = _constrain(_run_experts_ECD(experts, x_ECD), EXPERT_BUFFER_DIMS)
    y_EGCD = _constrain(y_ECD.view(num_experts, groups, capacity_, dim), BUFFER_DIMS)
    y_GMD = _constrain(from_slots(y_EGCD, expert_GM, slot_GM), GROUPS)
    _record_stats(experts, load_E, kept_S, kept_S.numel())
    return _weighted_sum_over_k(y_GMD.reshape(-1, dim), top_k_weights_TK, x_TD.dtype)


def dropping_experts_forward(experts, spec: MoESpec, x_TD, top_k_index_TK, top_k_weights_TK):
    """Capacity-factor dropping (see module docstring for the groups, capacity and drop order);
    `spec` (checked when it was made) has a capacity factor > 0."""
    _check_layout(experts, spec, top_k_index_TK.shape[1])
    group_tokens, groups = _capacity_groups(spec, top_k_index_TK.shape[0])
    capacity_ = spec.capacity(group_tokens)
    return _capacity_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK, capacity_, groups)


def _capacity_groups(spec: MoESpec, num_tokens: int) -> tuple[int, int]:
    """(tokens per capacity group, groups) for a forward call of `num_tokens` tokens."""
    group_tokens = spec.group_tokens or num_tokens
    if num_tokens % group_tokens:
        raise ValueError(
            f"{num_tokens} tokens do not split into capacity groups of {group_tokens} "
            "(one sequence each)"
        )
    return group_tokens, num_tokens // group_tokens


# --------------------------------------------------------------------------- dropless


def dropless_experts_forward(experts, spec: MoESpec, x_TD, top_k_index_TK, top_k_weights_TK):
    """Exact: sort assignments by expert, grouped GEMM, unsort, weighted sum over k."""
    _check_layout(experts, spec, top_k_index_TK.shape[1])
    if x_TD.device.type == "xla":
        # C = the group's tokens never drops (a token's top-k experts are distinct): exact, static
        group_tokens, groups = _capacity_groups(spec, x_TD.shape[0])
        return _capacity_forward(
            experts, x_TD, top_k_index_TK, top_k_weights_TK, group_tokens, groups
        )
    num_experts, top_k = experts.num_experts, top_k_index_TK.shape[1]
    expert_S = top_k_index_TK.reshape(-1)
    order_S = torch.argsort(expert_S, stable=True)  # grouped by expert, (token, k) order within
    load_E = _onehot_SE(top_k_index_TK, num_experts).sum(0)
    assignment_S = torch.arange(len(order_S), device=order_S.device)
    position_S = torch.empty_like(order_S).index_copy(0, order_S, assignment_S)  # inverse
    w_gate_up_EDF2, w_down_EFD = _weights_EIO(experts)
    x_SD = x_TD.to(w_gate_up_EDF2.dtype).repeat_interleave(top_k, dim=0)
    x_sorted_SD = _scatter_rows(x_SD, position_S, len(order_S))
    h_SF = experts._apply_gate(_grouped_matmul(x_sorted_SD, w_gate_up_EDF2, load_E))
    y_sorted_SD = _grouped_matmul(h_SF, w_down_EFD, load_E)
    y_SD = _scatter_rows(y_sorted_SD, order_S, len(order_S))  # unsort
    _record_stats(experts, load_E, None, expert_S.numel())
    return _weighted_sum_over_k(y_SD, top_k_weights_TK, x_TD.dtype)


def _grouped_matmul(x_SI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor):
    """Rows of x grouped by expert (counts_E rows each, in order) times their expert's w."""
    device = x_SI.device.type
    use_kernel = device == "cuda" or CPU_DROPLESS_BACKEND == "grouped_mm"
    if use_kernel and _grouped_mm_supported(x_SI, w_EIO):
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x_SI, w_EIO, offs=offsets_E)
    return _looped_matmul(x_SI, w_EIO, counts_E)


def _grouped_mm_supported(x_SI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """torch._grouped_mm's constraints: bf16 on sm80+ CUDA; 16-byte strides and pointers."""
    if not hasattr(torch, "_grouped_mm") or x_SI.dtype != w_EIO.dtype:
        return False
    if x_SI.device.type == "cuda":
        major_minor = torch.cuda.get_device_capability(x_SI.device)
        if x_SI.dtype != torch.bfloat16 or major_minor < (8, 0):
            return False
    elif x_SI.device.type != "cpu" or x_SI.dtype not in (torch.float32, torch.bfloat16):
        return False
    # The backward multiplies by the [S, O] output gradient too, so O must align as well.
    size = x_SI.element_size()
    strides = [s for t in (x_SI, w_EIO) for s in t.stride() if s != 1] + list(w_EIO.shape[1:])
    pointers = (x_SI.data_ptr(), w_EIO.data_ptr())
    return all(s * size % 16 == 0 for s in strides) and all(p % 16 == 0 for p in pointers)


def _looped_matmul(x_SI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor):
    """One matmul per expert over its contiguous rows; one host sync for the counts."""
    chunks = x_SI.split(counts_E.tolist())
    return torch.cat([chunk @ w_EIO[e] for e, chunk in enumerate(chunks)])


_EXPERTS_FUNCTIONS = {
    "dense": dense_experts_forward,
    "dropping": dropping_experts_forward,
    "dropless": dropless_experts_forward,
}
