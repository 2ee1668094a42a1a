"""torch_xla SPMD: one process per host sees the global batch and every parameter whole.

`xr.use_spmd()` makes the XLA compiler (GSPMD) partition one program over all devices of a
device mesh; we only annotate tensors with `xs.mark_sharding`, and the math stays the
single-device math (so losses match the CPU backend, and `all_reduce_sum` is the identity).

Mesh: axes ("fsdp", "tensor", "expert") of sizes
  fsdp = devices / (tensor_parallelism * expert_parallelism), tensor_parallelism,
  expert_parallelism.
The batch is sharded on its rows over "fsdp" and "expert" together (MaxText's convention: the
expert axis also splits data outside the MoE layers), so
  data_parallel_size = fsdp * expert_parallelism,
which `clm.config.finalize` uses for the global batch. The "tensor" axis replicates the batch.

Parameters are sharded by `SHARDING_RULES`, data rather than code: the first rule whose pattern
matches a parameter's name gives one entry per dimension (a mesh axis, a tuple of axes, or
None). Axes of size 1 are no-ops, so with tensor_parallelism = expert_parallelism = 1 the table
is plain FSDP (ZeRO-3-like: each device holds 1/fsdp of every matrix and XLA all-gathers it
where it is used). A dimension that its axes do not divide is left unsharded. A >= 2-D parameter
no rule names gets its largest dimension that fsdp divides sharded on "fsdp"; 1-D parameters
(norms) are replicated.

Correctness does not depend on the rules (GSPMD inserts the collectives any layout needs, and
the tests check tensor x expert = 2 x 2 losses against CPU); speed does, and the tp/ep layouts
are not tuned yet: the MoE dispatch buffers carry no annotation, so there is no explicit
all-to-all. One host only for now (ConfigError on a multi-host slice).

XLA traces lazily: `step_boundary()` (`torch_xla.sync()`) cuts the graph after each optimizer
step and each eval batch, so every step runs the same compiled program. `compile_count()`
reads torch_xla's `CompileTime` metric for the trainer's recompile watch.
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

from clm.backends import Backend
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
            f"does not divide the {num_devices} XLA devices (fsdp = devices / (tensor x expert))"
        )
    return num_devices // (tensor * expert), tensor, expert


def partition_spec(name: str, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> tuple:
    """The sharding of one parameter: one entry (axis name, tuple of names, None) per dim."""

    def size(entry) -> int:
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(axis_sizes[n] for n in names if n is not None)

    if len(shape) < 2:
        return (None,) * len(shape)
    for pattern, spec in SHARDING_RULES:
        if re.search(pattern, name) and len(spec) == len(shape):
            # an axis that does not divide its dim (or has size 1) shards nothing: leave it out
            return tuple(
                e if e is not None and size(e) > 1 and dim % size(e) == 0 else None
                for e, dim in zip(spec, shape, strict=True)
            )
    fsdp = axis_sizes["fsdp"]
    spec = [None] * len(shape)
    divisible = [i for i, dim in enumerate(shape) if fsdp > 1 and dim % fsdp == 0]
    if divisible:
        spec[max(divisible, key=lambda i: shape[i])] = "fsdp"
    return tuple(spec)


class XlaBackend(Backend):
    name = "xla"

    def __init__(self, tensor_parallelism: int = 1, expert_parallelism: int = 1):
        xr.use_spmd()  # before any XLA tensor exists
        if xr.process_count() > 1:
            raise ConfigError(
                f"backend=xla: {xr.process_count()} hosts: multi-host SPMD is not supported yet; "
                "run on one host (one TPU VM), with gradient_accumulation_steps for a larger batch"
            )
        super().__init__(torch_xla.device())
        num_devices = xr.global_runtime_device_count()
        shape = mesh_shape(num_devices, int(tensor_parallelism), int(expert_parallelism))
        self.axis_sizes = dict(zip(MESH_AXES, shape, strict=True))
        self.mesh = xs.Mesh(list(range(num_devices)), shape, MESH_AXES)
        self.rank = 0
        self.world_size = num_devices
        self.data_parallel_size = self.axis_sizes["fsdp"] * self.axis_sizes["expert"]
        # the one process loads the whole global batch; to_device shards its rows
        self.local_data_parallel_size = self.data_parallel_size
        # Weights are initialized by the CPU generator, then moved: the same seed gives the
        # same model as backend=cpu (XLA's RNG draws other numbers). Not yet: a sharded init
        # from the meta device for models larger than host memory.
        self.init_device = torch.device("cpu")
        self.specs: dict[str, tuple] = {}

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from clm import moe

        # HF's aux loss uses torch.histc, which XLA cannot lower; ours is equal and static
        moe.use_static_load_balancing_loss()
        model = model.to(self.device)
        for name, param in model.named_parameters():
            spec = partition_spec(name, tuple(param.shape), self.axis_sizes)
            self.specs[name] = spec
            if any(e is not None for e in spec):
                xs.mark_sharding(param, self.mesh, spec)
        return model

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in batch.items():
            value = value.to(self.device)
            if value.shape[0] % self.data_parallel_size == 0:
                xs.mark_sharding(value, self.mesh, (BATCH_AXES,) + (None,) * (value.ndim - 1))
            out[key] = value
        return out

    def step_boundary(self) -> None:
        torch_xla.sync()  # cut the lazy graph here and launch it (xm.mark_step)

    def sync(self) -> None:
        torch_xla.sync()
        xm.wait_device_ops()

    def compile_count(self) -> int:
        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def device_description(self) -> str:
        sizes = " x ".join(f"{k}={v}" for k, v in self.axis_sizes.items())
        kind = xr.device_type() or os.environ.get("PJRT_DEVICE", "?")
        return f"{self.world_size} XLA {kind} devices (SPMD mesh {sizes})"
