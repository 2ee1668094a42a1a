"""The device mesh and the parameter sharding rules, as plain data (no torch, no torch_xla).

One home for the XLA backend, which applies them with `mark_sharding`, and the capacity planner
(`clm.plan`), which sizes per-device memory from them on a machine without an accelerator.

Mesh axes ("fsdp", "tensor", "expert"): fsdp = devices / (tensor_parallelism *
expert_parallelism). Batch rows are split over "fsdp" and "expert" together (MaxText's
convention: the expert axis also splits data outside the MoE layers).

Multi-slice (`num_slices` > 1, TPU slices joined by the data-center network, DCN): the fsdp axis
spans the slices and its outer factor is the slice (`mesh_device_ids`), so every tensor and
expert group, and each slice's share of the fsdp gathers, stays on one slice's fast
interconnect (ICI); only the data-parallel part of the gradient reduction crosses DCN.

Which rows of a batch each device holds, and so which rows each host transfers under
multi-host SPMD, is `rows_by_device` / `host_rows`; of a parameter, `blocks_by_device` /
`host_box` (a host reads only that box of each tensor from a checkpoint). torch_xla's sharded
transfer cuts them the same way; tests/test_xla.py checks both on real device shards.

`SHARDING_RULES`: the first rule whose pattern matches a parameter's name gives one entry per
dimension (a mesh axis, a tuple of axes, or None). Axes of size 1 are no-ops, so with
tensor_parallelism = expert_parallelism = 1 the table is plain FSDP. A dimension its axes do not
divide is left unsharded. A >= 2-D parameter no rule names gets its largest dimension that fsdp
divides sharded on "fsdp"; 1-D parameters (norms) are replicated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from clm.config import ConfigError

MESH_AXES = ("fsdp", "tensor", "expert")
# data rows are split over these mesh axes together
BATCH_AXES = ("fsdp", "expert")

# Logical activation dimensions -> mesh axes: batch rows and clm.moe's capacity groups
# (sequences) on the data axes; grouped by expert, experts on the expert axis and their slots
# on the remaining data axis.
ACTIVATION_AXES = {
    "batch": BATCH_AXES,
    "groups": BATCH_AXES,
    "experts": "expert",
    "expert_slots": "fsdp",
}

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


def mesh_shape(
    num_devices: int, tensor: int, expert: int, num_slices: int = 1
) -> tuple[int, int, int]:
    """(fsdp, tensor, expert) sizes; ConfigError when tensor * expert does not divide devices,
    or when num_slices does not divide fsdp (a tensor or expert group would span two slices)."""
    if num_devices % (tensor * expert):
        raise ConfigError(
            f"tensor_parallelism={tensor} x expert_parallelism={expert} = {tensor * expert} "
            f"does not divide the {num_devices} devices (fsdp = devices / (tensor x expert))"
        )
    fsdp = num_devices // (tensor * expert)
    if num_slices < 1 or num_devices % num_slices or fsdp % num_slices:
        raise ConfigError(
            f"num_slices={num_slices}: must divide the {num_devices} devices and fsdp={fsdp} "
            f"(devices / (tensor_parallelism x expert_parallelism)), so that each slice holds "
            "whole tensor and expert groups"
        )
    return fsdp, tensor, expert


def mesh_device_ids(
    slice_of_device: Sequence[int], shape: tuple[int, int, int], num_slices: int = 1
) -> list[int]:
    """Device ids in the mesh's row-major order, for a mesh of `shape` (fsdp, tensor, expert).

    `slice_of_device[d]` is device d's slice (TPU: its `slice_index` attribute; the CPU runtime
    has none, and callers pass d // devices_per_slice). Slices are laid out along fsdp, in order
    of slice index, each slice's devices in id order: the fsdp axis's outer factor is the slice,
    so (fsdp index) // (fsdp / num_slices) is the slice of every device at that fsdp index, and
    tensor and expert groups never cross slices. This is the device order of torch_xla's
    `HybridMesh(ici_mesh_shape=(fsdp / num_slices, tensor, expert), dcn_mesh_shape=(num_slices,
    1, 1))` up to the placement inside a slice (HybridMesh follows the TPU torus there).
    """
    devices = len(slice_of_device)
    if math.prod(shape) != devices:
        raise ConfigError(
            f"mesh {shape} needs {math.prod(shape)} devices, the runtime has {devices}"
        )
    slices = sorted(set(slice_of_device))
    if len(slices) != num_slices:
        raise ConfigError(
            f"num_slices={num_slices}: the runtime's {devices} devices are in {len(slices)} "
            f"slice(s); set num_slices={len(slices)}"
        )
    per_slice = devices // num_slices
    groups = [[d for d in range(devices) if slice_of_device[d] == s] for s in slices]
    uneven = [len(g) for g in groups if len(g) != per_slice]
    if uneven:
        raise ConfigError(f"slices of unequal size ({[len(g) for g in groups]} devices)")
    return [d for group in groups for d in group]


def slices_are_outermost(
    device_ids: Sequence[int],
    shape: tuple[int, int, int],
    slice_of_device: Sequence[int],
    num_slices: int,
) -> bool:
    """Whether the mesh `device_ids` (row-major over `shape`) puts slice k, in slice-index
    order, at fsdp indices [k * fsdp / num_slices, (k + 1) * fsdp / num_slices): the layout
    `mesh_device_ids` builds, checked on the mesh torch_xla's HybridMesh builds on TPU."""
    fsdp, tensor, expert = shape
    slices = sorted(set(slice_of_device))
    if len(slices) != num_slices or fsdp % num_slices:
        return False
    per_slice = fsdp // num_slices
    return all(
        slice_of_device[device] == slices[(position // (tensor * expert)) // per_slice]
        for position, device in enumerate(device_ids)
    )


def blocks_by_device(
    device_ids: Sequence[int], shape: tuple[int, int, int], spec: tuple, tensor_shape
) -> dict[int, tuple[slice, ...]]:
    """{device id: the block of a tensor it holds} for a tensor sharded by `spec` (one entry per
    dim: None, an axis, or a tuple of axes; the dims divisible, as `partition_spec` ensures).

    `device_ids` is the mesh's row-major device order (`mesh_device_ids`). A dim sharded over
    axes (a, b) is cut into a x b equal blocks, block index = a index x b size + b index (the
    order of the tuple; torch_xla's tile assignment); axes not in the spec hold replicas.
    """
    sizes = dict(zip(MESH_AXES, shape, strict=True))
    out = {}
    for position, device in enumerate(device_ids):
        coords, rest = {}, position
        for axis in reversed(MESH_AXES):
            rest, coords[axis] = divmod(rest, sizes[axis])
        box = []
        for entry, n in zip(spec, tensor_shape, strict=True):
            index, blocks = 0, 1
            for axis in axes_of(entry):
                index, blocks = index * sizes[axis] + coords[axis], blocks * sizes[axis]
            size = n // blocks
            box.append(slice(index * size, (index + 1) * size))
        out[device] = tuple(box)
    return out


def host_box(
    device_ids: Sequence[int],
    shape: tuple[int, int, int],
    spec: tuple,
    tensor_shape,
    local_ids: Sequence[int],
) -> tuple[slice, ...]:
    """The smallest box of a tensor that holds every block of a host's devices `local_ids`:
    what that host must read of it (the sharded transfer cuts only their blocks)."""
    blocks = blocks_by_device(device_ids, shape, spec, tensor_shape)
    mine = [blocks[d] for d in local_ids]
    return tuple(
        slice(min(b[i].start for b in mine), max(b[i].stop for b in mine))
        for i in range(len(tensor_shape))
    )


def rows_by_device(device_ids: Sequence[int], shape: tuple[int, int, int], rows: int) -> dict:
    """{device id: range of batch rows it holds} for a batch split on BATCH_AXES (the tensor
    axis holds replicas)."""
    fsdp, tensor, expert = shape
    if rows % (fsdp * expert):
        raise ConfigError(f"{rows} rows do not split over {fsdp * expert} data-parallel devices")
    blocks = blocks_by_device(device_ids, shape, (BATCH_AXES,), (rows,))
    return {device: range(box[0].start, box[0].stop) for device, box in blocks.items()}


def host_rows(
    device_ids: Sequence[int], shape: tuple[int, int, int], rows: int, local_ids: Sequence[int]
) -> list[int]:
    """The sorted batch rows held by a host's addressable devices `local_ids`: what that host
    transfers to its devices under multi-host SPMD (every host holds the whole global batch)."""
    by_device = rows_by_device(device_ids, shape, rows)
    return sorted({r for d in local_ids for r in by_device[d]})


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
