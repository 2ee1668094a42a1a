"""Mixture-of-experts layer implementations, plugged into transformers' experts interface.

transformers 5 routes every `@use_experts_implementation` experts module (Mixtral's
`MixtralExperts`) through `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`, called as
`fn(experts_module, hidden_states_TD, top_k_index_TK, top_k_weights_TK) -> out_TD`; the router
stays HF's. `configure_moe` registers ours and points the config at one of them:

- ``hf``: transformers' own default (`grouped_mm` for Mixtral). Data-dependent shapes: on XLA
  `grouped_mm` fails (`torch.histc`) and `eager` recompiles every step. Records no metrics.
- ``dense``: every expert on every token, combined with a [T, E] weight matrix that is zero
  off the top-k. Static, E/K times the FLOPs; the simplest reference.
- ``dropping``: GShard/Switch capacity dispatch. Each expert owns C slots,
  ``C = min(T, ceil(T * K / E * capacity_factor))`` with T the tokens of this forward call
  (the flattened micro-batch). Each (token, k) assignment gets its rank in its expert's queue
  from a cumulative sum over the routing mask; ranks >= C are dropped. Kept assignments are
  copied into an [E, C, D] buffer, the experts run as two batched matmuls, and each filled
  slot is copied back to its (token, k) row, which dropped assignments never get (exactly 0).
  Both moves are `index_copy`, whose backward is a gather: no scatter-add either way. Every
  shape depends only on (T, K, E, C): zero recompiles on XLA.
- ``dropless``: exact. Assignments sorted by expert, then a grouped GEMM: `torch._grouped_mm`
  on CUDA (bf16, sm80+) and CPU (torch >= 2.9 has a CPU kernel), the Pallas `gmm` kernel on
  TPU when torch_xla and jax are importable, else a per-expert loop. On XLA without Pallas it
  falls back to ``dropping`` with C = T, which is exact (an expert receives at most T
  assignments) and static.

Drop order (``dropping``): queue position follows the flattened (token, k) order: token
position first, then the token's k-th choice (k = 0 is its highest-probability expert). So a
token is dropped from an expert when C earlier (token, k) assignments already took it. Why
position and not routing probability: (1) it is causal, whether a token is dropped depends
only on tokens before it in the batch, so no information leaks from later positions of a
causal LM through the capacity limit, as it would when ranking by probability across the
whole batch; (2) it is the order of the MLPerf reference implementations (MaxText
`generate_masks`, the torch_xla Mixtral reference), so drop statistics are comparable; (3) it
needs only a cumulative sum: no sort, static shapes. The references count capacity per
sequence; the experts interface sees only the flattened micro-batch, so here T is that.

Aux loss: HF computes Mixtral's load-balancing loss from the router's full softmax (captured
router logits), independent of the experts implementation. Its `torch.histc` counts fail on
XLA; `use_static_load_balancing_loss()` swaps in `load_balancing_loss`, equal and static.

Metrics: each of our implementations leaves a detached [2] tensor (dropped fraction of the
T*K assignments, max expert load / mean expert load, load counted before dropping) on the
experts module; `moe_metrics` reads them. No `.item()` in the forward: on XLA they stay lazy
and are materialized by the step's own sync.

Shape legend: T tokens, D hidden, F ffn, E experts, K top-k, C capacity, S = T * K
(token, k) assignments. Suffixes name the dimensions: `x_TD`, `w_EDF`, `slot_S`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from clm.model_math import capacity

IMPLEMENTATIONS = ("hf", "dense", "dropping", "dropless")

# Keys in ALL_EXPERTS_FUNCTIONS, prefixed so they never shadow one of transformers' own.
REGISTRY_KEYS = {"dense": "clm_dense", "dropping": "clm_dropping", "dropless": "clm_dropless"}
# Set on the HF config by `configure_moe`, read by the experts functions through `self.config`.
CAPACITY_FACTOR_ATTR = "clm_moe_capacity_factor"
_STATS_ATTR = "_clm_moe_stats"
# Experts-count attributes that mark a config as MoE (Mixtral, Qwen-MoE, DeepSeek, ...).
_NUM_EXPERTS_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# Dropless on CPU: "grouped_mm" (torch's CPU kernel) or "loop"; see docs/PERFORMANCE.md.
CPU_DROPLESS_BACKEND = "grouped_mm"


# --------------------------------------------------------------------------- config


def resolve_implementation(name: str | None, capacity_factor: float) -> str:
    """Map `model.moe_implementation` (None/"auto" allowed) to one of IMPLEMENTATIONS."""
    allowed = ", ".join(("auto",) + IMPLEMENTATIONS)
    if name is not None and name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"model.moe_implementation={name!r}: must be null or one of {allowed}")
    if not float(capacity_factor) >= 0:  # also rejects NaN
        raise ValueError(f"model.capacity_factor={capacity_factor}: must be >= 0 (0: dropless)")
    if name is None or name == "auto":
        return "dropping" if capacity_factor > 0 else "dropless"
    if name == "dropping" and capacity_factor == 0:
        raise ValueError(
            "model.moe_implementation='dropping' needs model.capacity_factor > 0 "
            "(0 means dropless), e.g. 1.25"
        )
    return name


def register_experts_functions() -> None:
    """Add our implementations to transformers' global experts registry (idempotent)."""
    for name, key in REGISTRY_KEYS.items():
        ALL_EXPERTS_FUNCTIONS.register(key, _EXPERTS_FUNCTIONS[name])


def configure_moe(hf_config, implementation: str, capacity_factor: float) -> None:
    """Make models built from `hf_config` afterwards use `implementation`; no-op for dense LMs."""
    implementation = resolve_implementation(implementation, capacity_factor)
    register_experts_functions()
    for config in _config_tree(hf_config):
        if not _is_moe_config(config):
            continue
        # "hf": None lets transformers pick its default at model init, as with no override.
        config._experts_implementation = REGISTRY_KEYS.get(implementation)
        setattr(config, CAPACITY_FACTOR_ATTR, float(capacity_factor))


def _config_tree(hf_config) -> list:
    """The config and its sub-configs (a multimodal config nests its text model's)."""
    subs = [getattr(hf_config, key, None) for key in getattr(hf_config, "sub_configs", {}) or {}]
    return [hf_config] + [sub for sub in subs if sub is not None]


def _is_moe_config(config) -> bool:
    return any((getattr(config, attr, None) or 0) > 0 for attr in _NUM_EXPERTS_ATTRS)


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


# --------------------------------------------------------------------------- shared pieces


def _check_layout(experts) -> None:
    """Our kernels assume Mixtral's layout: gated, no bias, no post-norm, no expert parallel."""
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


def _weighted_sum_over_k(y_SD: torch.Tensor, weights_TK: torch.Tensor, dtype) -> torch.Tensor:
    """sum_k w[t, k] * y[t, k]: a reshape + sum (deterministic, fp32 weights as HF does)."""
    num_tokens, top_k = weights_TK.shape
    weighted_SD = y_SD * weights_TK.reshape(-1, 1)
    return weighted_SD.view(num_tokens, top_k, -1).sum(1).to(dtype)


# --------------------------------------------------------------------------- dense


def dense_experts_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK):
    """Every expert on every token; a [T, E] combine matrix keeps only the top-k outputs."""
    _check_layout(experts)
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


def dispatch_plan(top_k_index_TK: torch.Tensor, num_experts: int, capacity: int):
    """Where each (token, k) assignment goes in the flattened [E * C] expert buffer.

    Returns (slot_S, kept_S, load_E). Rank in the expert's queue = number of earlier
    assignments, in flattened (token, k) order, to the same expert. Dropped ones get slot
    E * C, one spare row that is never computed.
    """
    expert_S = top_k_index_TK.reshape(-1)
    onehot_SE = _onehot_SE(top_k_index_TK, num_experts)
    rank_S = (onehot_SE.cumsum(0) * onehot_SE).sum(1) - 1
    kept_S = rank_S < capacity
    spare = torch.full_like(expert_S, num_experts * capacity)
    slot_S = torch.where(kept_S, expert_S * capacity + rank_S, spare)
    return slot_S, kept_S, onehot_SE.sum(0)


def _scatter_rows(src_ND: torch.Tensor, index_N: torch.Tensor, rows: int) -> torch.Tensor:
    """out[index[n]] = src[n] in a [rows, D] zero tensor.

    Built on index_copy, whose backward is a gather: no scatter-add (slow on CPU, atomics
    on GPU) in either direction, unlike indexing whose backward accumulates.
    """
    out_RD = src_ND.new_zeros(rows, src_ND.shape[1])
    return out_RD.index_copy(0, index_N, src_ND)


def _run_experts_ECD(experts, x_ECD: torch.Tensor) -> torch.Tensor:
    """The SwiGLU experts as two batched matmuls over [E, C, D], weight-major.

    Computed as h^T = W x^T rather than h = x W^T: the same products, but autograd's weight
    gradient dW = dh^T x then comes out in the parameter's own [E, out, in] layout. The x W^T
    form yields it transposed, and AccumulateGrad copies every expert weight gradient into
    the parameter's layout (measured on CPU at 4096 x 1024 x 3584 x 8: fwd+bwd of dropping
    went from 1.43x to 1.24x the time of dropless; outputs and gradients bitwise equal).
    """
    w_gate_up_EF2D, w_down_EDF = _weights_EOI(experts)
    h_EF2C = torch.bmm(w_gate_up_EF2D, x_ECD.transpose(1, 2))
    h_ECF = experts._apply_gate(h_EF2C.transpose(1, 2))
    return torch.bmm(w_down_EDF, h_ECF.transpose(1, 2)).transpose(1, 2)


def _capacity_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK, capacity_: int):
    """Static-shape dispatch -> batched experts -> combine, with `capacity_` slots per expert."""
    _check_layout(experts)
    dim = x_TD.shape[1]
    num_experts, top_k = experts.num_experts, top_k_index_TK.shape[1]
    slot_S, kept_S, load_E = dispatch_plan(top_k_index_TK, num_experts, capacity_)
    num_slots, num_assignments = num_experts * capacity_, slot_S.numel()
    # Kept assignments to their slots; all dropped ones to the spare last row, cut off.
    x_SD = x_TD.to(experts.gate_up_proj.dtype).repeat_interleave(top_k, dim=0)
    x_ECD = _scatter_rows(x_SD, slot_S, num_slots + 1)[:-1].view(num_experts, capacity_, dim)
    y_ECD = _run_experts_ECD(experts, x_ECD)
    # Which assignment fills each slot (empty slots: the spare assignment row S).
    assignment_S = torch.arange(num_assignments, device=slot_S.device)
    filler_EC = slot_S.new_full((num_slots + 1,), num_assignments)
    filler_EC = filler_EC.index_copy(0, slot_S, assignment_S)[:-1]
    # Dropped assignments are never written: they add exactly 0.
    y_SD = _scatter_rows(y_ECD.reshape(num_slots, dim), filler_EC, num_assignments + 1)[:-1]
    _record_stats(experts, load_E, kept_S, slot_S.numel())
    return _weighted_sum_over_k(y_SD, top_k_weights_TK, x_TD.dtype)


def dropping_experts_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK):
    """Capacity-factor dropping (see module docstring for the capacity and the drop order)."""
    capacity_factor = getattr(experts.config, CAPACITY_FACTOR_ATTR, None)
    if not capacity_factor or capacity_factor <= 0:
        raise ValueError(
            f"dropping experts need config.{CAPACITY_FACTOR_ATTR} > 0: call clm.moe.configure_moe"
        )
    num_tokens, top_k = top_k_index_TK.shape
    capacity_ = capacity(num_tokens, top_k, experts.num_experts, capacity_factor)
    return _capacity_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK, capacity_)


# --------------------------------------------------------------------------- dropless


def dropless_experts_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK):
    """Exact: sort assignments by expert, grouped GEMM, unsort, weighted sum over k."""
    if x_TD.device.type == "xla" and not _pallas_gmm_available():
        num_tokens = x_TD.shape[0]  # C = T never drops: exact and static
        return _capacity_forward(experts, x_TD, top_k_index_TK, top_k_weights_TK, num_tokens)
    _check_layout(experts)
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
    if device == "xla":
        return _pallas_gmm(x_SI, w_EIO, counts_E)
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


_PALLAS_GMM: Callable | None = None
_PALLAS_CHECKED = False


def _pallas_gmm_available() -> bool:
    """True on TPU with torch_xla's Pallas megablox `gmm` importable (needs jax)."""
    global _PALLAS_GMM, _PALLAS_CHECKED
    if not _PALLAS_CHECKED:
        _PALLAS_CHECKED = True
        try:
            import torch_xla.runtime as xr

            if xr.device_type() == "TPU" and importlib.util.find_spec("jax") is not None:
                from torch_xla.experimental.custom_kernel import GMM

                _PALLAS_GMM = GMM.apply
        except (ImportError, RuntimeError):
            _PALLAS_GMM = None
    return _PALLAS_GMM is not None


def _pallas_gmm(x_SI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor):
    """Pallas grouped matmul (TPU). Static shapes: group sizes are data, not shape."""
    if not _pallas_gmm_available():
        raise RuntimeError("Pallas gmm needs a TPU and jax; use the dropping fallback")
    return _PALLAS_GMM(x_SI, w_EIO, counts_E.to(torch.int32))


_EXPERTS_FUNCTIONS = {
    "dense": dense_experts_forward,
    "dropping": dropping_experts_forward,
    "dropless": dropless_experts_forward,
}
