"""The dropping experts' two indexed copies, per group of tokens: into expert slots and back.

    to_slots(x_GMD, expert_GM, slot_GM, E, C) -> buffer_EGCD
        buffer[e, g, c] = x[g, m] for each assignment m of group g kept at (e, c); zeros in
        empty slots. A dropped assignment has e == E (out of range) and is not copied.
    from_slots(buffer_EGCD, expert_GM, slot_GM) -> y_GMD
        y[g, m] = buffer[e, g, c] for each kept assignment; exactly 0 for dropped ones.

Each is the other's adjoint, and its backward: copies (with each slot filled at most once), so
no scatter-add either way. They are torch custom operators (shape functions, gradients), so
torch_xla's scan, which traces a layer with AOTAutograd on fake tensors, can trace them.

On XLA they are jax functions (one scatter and one gather, in `jax.lax`), run by torch_xla's
`call_jax` (through the torchax package inside torch_xla's wheel): the group is a batching dimension of the scatter
and of the gather, which XLA's SPMD partitioner splits like the batch, so each device copies
only its own sequences' tokens. torch_xla's own lowering of the same
indexed copies hides the group index behind a negative-index wrap, and the partitioner then
replicated the whole batch's buffers (200 GB per device on the benchmark;
docs/PERFORMANCE.md, TPU section). Elsewhere they are torch's `index_put` and indexing.
"""

from __future__ import annotations

import torch

from clm.backends import pallas


@torch.library.custom_op("clm::to_slots", mutates_args=())
def to_slots(
    x_GMD: torch.Tensor,
    expert_GM: torch.Tensor,
    slot_GM: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> torch.Tensor:
    if x_GMD.device.type == "xla":
        import torch_xla.core.xla_builder as xb

        pallas.jax_for_this_runtime()
        indices = (expert_GM.to(torch.int32), slot_GM.to(torch.int32))  # jax: 32-bit ints
        return xb.call_jax(_jax_to_slots, (x_GMD, *indices, num_experts, capacity))
    groups, _, dim = x_GMD.shape
    group_GM = torch.arange(groups, device=x_GMD.device).view(groups, 1).expand_as(expert_GM)
    # dropped assignments go to a spare expert row E, cut off
    buffer_EGCD = x_GMD.new_zeros(num_experts + 1, groups, capacity, dim)
    return buffer_EGCD.index_put((expert_GM, group_GM, slot_GM), x_GMD)[:num_experts]


@to_slots.register_fake
def _(x_GMD, expert_GM, slot_GM, num_experts, capacity):
    groups, _, dim = x_GMD.shape
    return x_GMD.new_empty(num_experts, groups, capacity, dim)


@torch.library.custom_op("clm::from_slots", mutates_args=())
def from_slots(
    buffer_EGCD: torch.Tensor, expert_GM: torch.Tensor, slot_GM: torch.Tensor
) -> torch.Tensor:
    if buffer_EGCD.device.type == "xla":
        import torch_xla.core.xla_builder as xb

        pallas.jax_for_this_runtime()
        indices = (expert_GM.to(torch.int32), slot_GM.to(torch.int32))
        return xb.call_jax(_jax_from_slots, (buffer_EGCD, *indices))
    num_experts, groups = buffer_EGCD.shape[:2]
    group_GM = torch.arange(groups, device=buffer_EGCD.device).view(groups, 1)
    kept_GM = expert_GM < num_experts
    y_GMD = buffer_EGCD[expert_GM.clamp(max=num_experts - 1), group_GM, slot_GM]
    return torch.where(kept_GM.unsqueeze(-1), y_GMD, torch.zeros_like(y_GMD))


@from_slots.register_fake
def _(buffer_EGCD, expert_GM, slot_GM):
    return buffer_EGCD.new_empty(*expert_GM.shape, buffer_EGCD.shape[-1])


def _to_slots_context(ctx, inputs, output):
    _, ctx.expert_GM, ctx.slot_GM, _, _ = inputs


def _to_slots_backward(ctx, grad_EGCD):
    return from_slots(grad_EGCD, ctx.expert_GM, ctx.slot_GM), None, None, None, None


def _from_slots_context(ctx, inputs, output):
    buffer_EGCD, ctx.expert_GM, ctx.slot_GM = inputs
    ctx.num_experts, _, ctx.capacity, _ = buffer_EGCD.shape


def _from_slots_backward(ctx, grad_GMD):
    grad = to_slots(grad_GMD, ctx.expert_GM, ctx.slot_GM, ctx.num_experts, ctx.capacity)
    return grad, None, None


to_slots.register_autograd(_to_slots_backward, setup_context=_to_slots_context)
from_slots.register_autograd(_from_slots_backward, setup_context=_from_slots_context)


# --------------------------------------------------------------------------- jax (XLA)
# One scatter and one gather whose group dimension is a batching dimension of both the buffer
# (dim 1 of [E, G, C, D]) and the indices (dim 0 of [G, M, 2]): XLA's SPMD partitioner splits
# it like the batch. Written with lax's dimension numbers rather than `jax.vmap`, which puts
# the batching dimension first and transposes the whole buffer into place (measured: a
# 64 GiB copy on a small model's eval batch).


def _jax_to_slots(x_GMD, expert_GM, slot_GM, num_experts, capacity):
    import jax.numpy as jnp
    from jax import lax

    groups, _, dim = x_GMD.shape
    buffer_EGCD = jnp.zeros((num_experts, groups, capacity, dim), x_GMD.dtype)
    numbers = lax.ScatterDimensionNumbers(
        update_window_dims=(2,),
        inserted_window_dims=(0, 2),
        scatter_dims_to_operand_dims=(0, 2),
        operand_batching_dims=(1,),
        scatter_indices_batching_dims=(0,),
    )
    index_GM2 = jnp.stack([expert_GM, slot_GM], axis=-1)
    return lax.scatter(
        buffer_EGCD, index_GM2, x_GMD, numbers, mode=lax.GatherScatterMode.FILL_OR_DROP
    )  # e == E is out of range: dropped assignments are not copied


def _jax_from_slots(buffer_EGCD, expert_GM, slot_GM):
    import jax.numpy as jnp
    from jax import lax

    numbers = lax.GatherDimensionNumbers(
        offset_dims=(2,),
        collapsed_slice_dims=(0, 2),
        start_index_map=(0, 2),
        operand_batching_dims=(1,),
        start_indices_batching_dims=(0,),
    )
    index_GM2 = jnp.stack([expert_GM, slot_GM], axis=-1)
    dim = buffer_EGCD.shape[-1]
    return lax.gather(
        buffer_EGCD,
        index_GM2,
        numbers,
        slice_sizes=(1, 1, 1, dim),
        mode=lax.GatherScatterMode.FILL_OR_DROP,
        fill_value=0,
    )  # e == E is out of range: dropped assignments read 0
