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

Parameters are sharded by the rules table in `clm/sharding.py` (data, shared with the capacity
planner); with tensor_parallelism = expert_parallelism = 1 it is plain FSDP (ZeRO-3-like: each
device holds 1/fsdp of every matrix and XLA all-gathers it where it is used).

Correctness does not depend on the rules (GSPMD inserts the collectives any layout needs, and
the tests check the losses of four meshes against CPU); speed does, and the tp/ep layouts
are not tuned yet: the MoE dispatch buffers carry no annotation, so there is no explicit
all-to-all. One host only for now (ConfigError on a multi-host slice).

Decoder layers get what torch_xla's FSDPv2 (`SpmdFullyShardedDataParallel`) adds per wrapped
layer, applied in place: the layer's output hidden states are constrained to the data sharding
(rows on `BATCH_AXES`; transformers 5 layers return a plain Tensor, older ones a tuple), and a
backward optimization barrier keeps each layer's gradient sync from fusing into one gigantic
buffer. We do not wrap in the FSDPv2 class itself: it renames every parameter
(`..._orig_module...`), and checkpoints would no longer move between backends; its parameter
sharding is the fsdp column of the rules table.

`model.gradient_checkpointing` keeps HF's non-reentrant per-layer checkpointing. torch_xla's
own `checkpoint_module` is reentrant: its first forward runs without autograd, so the router
logits HF records there for the load-balancing loss carry no gradient, and the router would
silently stop learning from that loss (measured: losses drift from the CPU run by 3e-3 by step
3). The price: torch_xla puts an optimization barrier before its recompute so that XLA cannot
merge it back into the forward; the non-reentrant path has none, and how much memory it saves
on a TPU is not measured yet.

XLA traces lazily: `step_boundary()` (`torch_xla.sync()`) cuts the graph after each optimizer
step and each eval batch, so every step runs the same compiled program. `compile_count()`
reads torch_xla's `CompileTime` metric for the trainer's recompile watch. `profile(step)` captures
an XLA profile of one step (`xla_profile_step`) into `${run_dir}/profile` for TensorBoard's
profile plugin; `local_compile_cache_dir` holds the persistent compilation cache on TPU.
"""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

from clm.backends import Backend
from clm.config import ConfigError
from clm.sharding import BATCH_AXES, MESH_AXES, mesh_shape, partition_spec


class XlaBackend(Backend):
    name = "xla"

    def __init__(
        self,
        tensor_parallelism: int = 1,
        expert_parallelism: int = 1,
        compile_cache_dir: str | None = None,
        profile_step: int = -1,
        profile_dir: str | None = None,
    ):
        # The persistent compile cache must exist before the first computation. Only on TPU:
        # on the CPU runtime the cached programs fail to deserialize.
        if compile_cache_dir and os.environ.get("PJRT_DEVICE") == "TPU":
            Path(compile_cache_dir).mkdir(parents=True, exist_ok=True)
            xr.initialize_cache(compile_cache_dir, readonly=False)
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
        self.profile_step = int(profile_step)
        self.profile_dir = profile_dir

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
        self._prepare_layers(model)
        return model

    def _prepare_layers(self, model: torch.nn.Module) -> None:
        """FSDPv2's per-layer treatment, in place (see the module docstring)."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            return
        for layer in layers:
            layer.register_forward_hook(self._shard_layer_output)
            xs.apply_backward_optimization_barrier(layer)
        if getattr(model, "is_activation_checkpointing", False):
            # HF's non-reentrant torch.utils.checkpoint looks up `torch.xla` (a device module
            # torch_xla does not register); it needs it only to stash RNG states, which we turn
            # off: our layers draw no random numbers (no dropout).
            if not hasattr(torch, "xla"):
                torch._register_device_module("xla", types.ModuleType("torch.xla"))
            model.activation_checkpointing_disable()
            model.activation_checkpointing_enable(
                {"use_reentrant": False, "preserve_rng_state": False}
            )

    def _shard_layer_output(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.shape[0] % self.data_parallel_size == 0:
            xs.mark_sharding(hidden, self.mesh, (BATCH_AXES,) + (None,) * (hidden.ndim - 1))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in batch.items():
            value = value.to(self.device)
            if value.shape[0] % self.data_parallel_size == 0:
                xs.mark_sharding(value, self.mesh, (BATCH_AXES,) + (None,) * (value.ndim - 1))
            out[key] = value
        return out

    def optimizer_class(self, name: str) -> type[torch.optim.Optimizer]:
        """ADAMW_TORCH_XLA: torch_xla's syncfree AdamW (the same update, no host sync)."""
        if name == "ADAMW_TORCH_XLA":
            from torch_xla.amp.syncfree import AdamW

            return AdamW
        return super().optimizer_class(name)

    def profile(self, step: int):
        """Capture step `xla_profile_step` into profile_dir (TensorBoard's profile plugin)."""
        if step != self.profile_step or not self.profile_dir:
            return contextlib.nullcontext()
        return _trace(self.profile_dir)

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


@contextlib.contextmanager
def _trace(log_dir: str):
    import torch_xla.debug.profiler as xp

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    xp.start_trace(log_dir)
    try:
        yield
    finally:
        xp.stop_trace()
