"""The device mesh and the parameter sharding rules, as plain data (no torch, no torch_xla).

One home for the XLA backend, which applies them with `mark_sharding`, and the capacity planner
(`clm.plan`), which sizes per-device memory from them on a machine without an accelerator.

Mesh axes ("fsdp", "tensor", "expert"): fsdp = devices / (tensor_parallelism *
expert_parallelism). Batch rows are split over "fsdp" and "expert" together (MaxText's
convention: the expert axis also splits data outside the MoE layers).

`SHARDING_RULES`: the first rule whose pattern matches a parameter's name gives one entry per
dimension (a mesh axis, a tuple of axes, or None). Axes of size 1 are no-ops, so with
tensor_parallelism = expert_parallelism = 1 the table is plain FSDP. A dimension its axes do not
divide is left unsharded. A >= 2-D parameter no rule names gets its largest dimension that fsdp
divides sharded on "fsdp"; 1-D parameters (norms) are replicated.
"""

from __future__ import annotations

import math
import re

from clm.config import ConfigError

MESH_AXES = ("fsdp", "tensor", "expert")
# data rows are split over these mesh axes together
BATCH_AXES = ("fsdp", "expert")

# (regex on the parameter name, one mesh-axis entry per dimension); first match wins.
# HF layouts: Linear weights are [out, in]; Mixtral experts are gate_up_proj [E, 2F, D] and
# down_proj [E, D, F]. Megatron-style tensor parallelism: column-parallel q/k/v and gate_up
# (output dim on "tensor"), row-parallel o and down (input dim on "tensor"); fsdp on the other.
SHARDING_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens\.weight$", ("tensor", "fsdp")),
    (r"self_attn\.(q|k|v)_proj\.weight$", ("tensor", "fsdp")),
    (r"self_attn\.o_proj\.weight$", ("fsdp", "tensor")),
    (r"experts\.gate_up_proj$", ("expert", "tensor", "fsdp")),
    (r"experts\.down_proj$", ("expert", "fsdp", "tensor")),
    (r"mlp\.gate\.weight$", (None, "fsdp")),  # the router [E, D]
    (r"lm_head\.weight$", ("tensor", "fsdp")),
)


def mesh_shape(num_devices: int, tensor: int, expert: int) -> tuple[int, int, int]:
    """(fsdp, tensor, expert) sizes; ConfigError when tensor * expert does not divide devices."""
    if num_devices % (tensor * expert):
        raise ConfigError(
            f"tensor_parallelism={tensor} x expert_parallelism={expert} = {tensor * expert} "
            f"does not divide the {num_devices} devices (fsdp = devices / (tensor x expert))"
        )
    return num_devices // (tensor * expert), tensor, expert


def axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of one spec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def partition_spec(name: str, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> tuple:
    """The sharding of one parameter: one entry (axis name, tuple of names, None) per dim."""

    def size(entry) -> int:
        return math.prod(axis_sizes.get(n, 1) for n in axes_of(entry))

    if len(shape) < 2:
        return (None,) * len(shape)
    for pattern, spec in SHARDING_RULES:
        if re.search(pattern, name) and len(spec) == len(shape):
            # an axis that does not divide its dim (or has size 1) shards nothing: leave it out
            return tuple(
                e if e is not None and size(e) > 1 and dim % size(e) == 0 else None
                for e, dim in zip(spec, shape, strict=True)
            )
    fsdp = axis_sizes.get("fsdp", 1)
    spec = [None] * len(shape)
    divisible = [i for i, dim in enumerate(shape) if fsdp > 1 and dim % fsdp == 0]
    if divisible:
        spec[max(divisible, key=lambda i: shape[i])] = "fsdp"
    return tuple(spec)
