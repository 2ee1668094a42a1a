"""Expert parallelism for the torchrun (FSDP2) backend: experts sharded over an `ep` mesh axis.

Layout. The backend's 2-D mesh is (dp_shard, ep). `shard_experts` turns each experts tensor
(`gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]) into a DTensor sharded `Shard(0)` over "ep":
ep rank r owns experts [r * E/ep, (r + 1) * E/ep). FSDP2 then shards those local experts again
over "dp_shard" (on dim 1). Every rank reads its own rows of the batch (ep splits the data too),
so all other parameters are FSDP-sharded over the whole world, and the router runs on each
rank's own tokens.

Dispatch (the simplest exact scheme; an all-to-all of only the routed tokens is the faster one):
in every MoE layer the ep ranks of a group
  1. all-gather their tokens x [T, D], top-k expert ids and routing weights (G = ep x T rows),
  2. each computes the assignments that route to its own experts: dropless, sorted by expert
     and run as a grouped GEMM (`clm.moe._grouped_matmul`), weighted by the routing weights;
     rows of other ranks' experts stay exactly 0, giving a partial output [G, D],
  3. reduce-scatter (sum) the partial outputs: each rank gets back its own T rows, summed over
     all top-k experts wherever they live.
Autograd mirrors it: the all-gather's backward is a reduce-scatter and the reduce-scatter's an
all-gather, so each expert's gradient covers every token of its ep group that chose it; FSDP
then sums it over dp_shard. The top-k sum of two partial outputs is the same addition as on one
device, so losses match the unsharded model to fp32 rounding (tests/test_distributed.py).

Cost: per MoE layer each rank sends and receives ~2 x (ep - 1) x T x D activations in the
forward (and again in the backward), versus ~2 x K x T x D x (ep - 1)/ep for all-to-all; the
expert FLOPs are split ep ways. Dropless only (the capacity of `dropping` would be per gathered
group, a different rule): `model.capacity_factor > 0` with expert_parallelism > 1 is refused.
The number of local assignments is data-dependent (one host sync per layer, as the dropless
`torch._grouped_mm` path has anyway).

Shape legend as in clm/moe.py: T tokens, G = ep x T gathered tokens, D hidden, F ffn, E experts,
L = E / ep local experts, K top-k, S = G x K assignments, N the local ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from clm import moe
from clm.config import ConfigError

REGISTRY_KEY = "clm_dropless_ep"


# --------------------------------------------------------------------------- collectives


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


class AllGather(torch.autograd.Function):
    """Rows of every rank of `group`, in rank order; backward: reduce-scatter of the grads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class ReduceScatter(torch.autograd.Function):
    """Sum over `group`, each rank keeping its slice of rows; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


# --------------------------------------------------------------------------- setup


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The fused experts modules (HF Mixtral's `MixtralExperts`: gate_up_proj, down_proj)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(m, "down_proj", None), torch.Tensor)
        and m.gate_up_proj.ndim == 3
    ]


def shard_experts(model: torch.nn.Module, ep_mesh) -> list[torch.nn.Module]:
    """Shard every experts tensor Shard(0) over `ep_mesh`; route the layers to `forward`.

    The model is on the meta device (`FsdpBackend.build_model` fills each rank's slice
    afterwards); a model with weights works too: each rank holds the same full weights (same
    seed), so its shard is a slice, with no communication. Returns the experts modules (the backend gives each its own FSDP unit).
    """
    from torch.distributed.tensor import DTensor, Shard

    ep = ep_mesh.size()
    modules = experts_modules(model)
    if not modules:
        raise ConfigError(
            f"expert_parallelism={ep}: the model has no experts (a MoE model such as "
            "mixtral_small.json is needed)"
        )
    rank = ep_mesh.get_local_rank()
    for experts in modules:
        implementation = getattr(experts.config, "_experts_implementation", None)
        spec = moe.spec_of(experts)
        if implementation != REGISTRY_KEY and (spec is None or spec.implementation != "dropless"):
            name = "hf" if spec is None else spec.implementation
            raise ConfigError(
                f"expert_parallelism={ep} runs the dropless experts; model.moe_implementation="
                f"{name!r} is not supported with it (set model.capacity_factor=0 and "
                "model.moe_implementation=null)"
            )
        if experts.num_experts % ep:
            raise ConfigError(
                f"expert_parallelism={ep} does not divide the {experts.num_experts} experts"
            )
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = full.detach().chunk(ep, dim=0)[rank].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, torch.nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.config._experts_implementation = REGISTRY_KEY
    ALL_EXPERTS_FUNCTIONS.register(REGISTRY_KEY, forward)
    return modules


# --------------------------------------------------------------------------- forward


def _local_weights_LIO(experts) -> tuple[torch.Tensor, torch.Tensor, int, object]:
    """(gate_up as [L, D, 2F], down as [L, F, D], first local expert, ep process group)."""
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    mesh = w_gate_up.device_mesh
    local_gate_up, local_down = w_gate_up.to_local(), w_down.to_local()
    first = mesh.get_local_rank() * local_gate_up.shape[0]
    if not getattr(experts, "is_transposed", False):
        local_gate_up, local_down = local_gate_up.transpose(1, 2), local_down.transpose(1, 2)
    return local_gate_up, local_down, first, mesh.get_group()


def forward(experts, x_TD, top_k_index_TK, top_k_weights_TK):
    """Gather the group's tokens, run this rank's experts (dropless), reduce-scatter back."""
    moe._check_layout(experts)
    w_gate_up_LDF2, w_down_LFD, first, group = _local_weights_LIO(experts)
    num_local = w_gate_up_LDF2.shape[0]
    x_GD = AllGather.apply(x_TD, group)
    index_GK = _all_gather(top_k_index_TK, group)  # integers: no gradient
    weights_GK = AllGather.apply(top_k_weights_TK, group)
    top_k = index_GK.shape[1]
    expert_S = index_GK.reshape(-1)
    mine_S = (expert_S >= first) & (expert_S < first + num_local)
    assignment_N = mine_S.nonzero().squeeze(1)  # host sync: the count is data-dependent
    local_N = expert_S[assignment_N] - first
    order_N = torch.argsort(local_N, stable=True)  # grouped by expert, (token, k) order within
    counts_L = torch.bincount(local_N, minlength=num_local)
    sorted_N = assignment_N[order_N]
    x_sorted_ND = x_GD.to(w_gate_up_LDF2.dtype).index_select(0, sorted_N // top_k)
    h_NF = experts._apply_gate(moe._grouped_matmul(x_sorted_ND, w_gate_up_LDF2, counts_L))
    y_sorted_ND = moe._grouped_matmul(h_NF, w_down_LFD, counts_L)
    # back to (token, k) rows; other ranks' assignments stay exactly 0
    y_SD = moe._scatter_rows(y_sorted_ND, sorted_N, expert_S.numel())
    out_GD = moe._weighted_sum_over_k(y_SD, weights_GK, x_TD.dtype)
    load_E = moe._onehot_SE(index_GK, experts.num_experts).sum(0)
    moe._record_stats(experts, load_E, None, expert_S.numel())
    return ReduceScatter.apply(out_GD, group)
