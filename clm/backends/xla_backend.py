"""torch_xla SPMD: one process per host; each sees the global batch and every parameter whole.

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

The model is made a piece at a time on the host (`build_model`: `clm.model.materialize`, a
decoder layer at a time, randomly initialized by the CPU generator or read from safetensors), and
`place` transfers each tensor sharded (the same sharded transfer as the batches: each host sends
only its devices' shards), so no host ever holds the whole model. From a checkpoint each host
reads only the box of each tensor its devices hold (`region`, `clm.sharding.host_box`; on
one host that is all of it). Parameters are sharded by the
rules table in `clm/sharding.py` (data, shared with the capacity
planner); with tensor_parallelism = expert_parallelism = 1 it is plain FSDP (ZeRO-3-like: each
device holds 1/fsdp of every matrix and XLA all-gathers it where it is used).

Correctness does not depend on the rules (GSPMD inserts the collectives any layout needs, and
the tests check the losses of four meshes against CPU); speed and memory do. The MoE buffers
are laid out by logical dimensions (`clm.backends.xla_spmd`): each sequence's tokens on its
own devices, and grouped by expert, experts on the expert axis (with expert_parallelism > 1
the partitioner moves tokens there by all-to-all). The tp/ep layouts are not tuned yet; the
FSDP one is what `python -m clm.aot` compiles for the benchmark (docs/PERFORMANCE.md).

Several hosts (a TPU pod slice: v5p-128 is 16 hosts): the same command runs on every host, one
process each, and the mesh covers `xr.global_runtime_device_count()` devices. Every process reads
the same deterministic global batch (the stream is a function of config and seed) and hands it
whole to `to_device`, which transfers to this host's devices only the rows they hold: torch_xla's
sharded transfer (`xm.send_cpu_data_to_device` with a `ShardingSpec`, what `MpDeviceLoader` runs
per batch) cuts the host tensor by the sharding's tile assignment for the process's addressable
devices only (`clm.sharding.host_rows` says which rows; tests/test_xla.py checks real shards
against it). That works for every mesh, including a "tensor" axis that replicates rows and the
multi-slice order. `minibatch=True` (each host passing only its own rows) does not: by its
source (`GetShardIndicesForMinibatchTensor` in torch_xla 2.9) it cuts a host's rows over its
devices in local order with no replicas, so a tensor-parallel mesh would get out-of-range,
zero-padded shards.
We do not use `MpDeviceLoader` itself: its thread reads the stream ahead of the step being
trained, so the stream position a checkpoint saves would be ahead of the data consumed, and an
error in the data (a bad record) ends its reader thread and the loop as a bare StopIteration
(`ParallelLoader._loader_worker` has no except clause). The overlap it
exists for comes from `async_steps` instead: the trainer reads no device value on most steps, so
the host reads, tokenizes and transfers step k+1's batch while the device runs step k.
Rank 0 is `xr.process_index() == 0` (it alone writes metrics and the MLPerf log, and commits
checkpoints); `barrier` and `any_process` run on the hosts' gloo process group (below), on
their CPUs: agreeing on a SIGTERM every step never waits for the devices. Only the CPU runtime was available to test this: it
runs one process per machine (torch_xla's PJRT CPU client has no multi-process mode), so the
multi-host path is tested through its parts, not end to end (docs/BACKENDS.md, "Several hosts").

Checkpoints: clm/checkpoint.py's DCP save/load over a CPU gloo process group with one rank per
host (`init_process_group("gloo", init_method="xla://")`: torch_xla's rendezvous, rank =
`xr.process_index()`, the master host's address from the TPU metadata, port MASTER_PORT, 12355
by default), created always, also for one process (then on 127.0.0.1 and a free port unless
MASTER_ADDR/MASTER_PORT are set), so the tested path is the pod's. `checkpoint_options` hands
clm/checkpoint.py torch_xla's `SPMDSavePlanner` / `SPMDLoadPlanner`: each host writes only the
shards its devices hold (one DCP chunk per shard; the planner deduplicates replicas across
hosts) and loads into them in place, never gathering a whole parameter; replicated and host
tensors (unsharded parameters, AdamW's CPU `step`, hyperparameters) go through DCP's default
planner inside it. The state dict is flattened with DCP's own keys first (see
`_SpmdSavePlanner`). The files are
plain DCP: the CPU backend loads them and the SPMD planner loads CPU checkpoints (resharding
chunk by chunk). Both planners first wait for the queued device work: torch_xla reads a
tensor's shard layout from its device data, which fails while a step is still in flight.
`save_dir` must be shared by all hosts (a bucket, or one filesystem mounted on each).
Asynchronous saves (the default here, `async_checkpointing=auto`): `stage_checkpoint` copies
this host's shards to host memory at the save step, and clm/checkpoint.py's AsyncSaver writes
them on a thread with `_StagedSpmdSavePlanner` (the same files; it never touches the device).

Multi-slice (`num_slices` > 1): on TPU the mesh is torch_xla's
`HybridMesh(ici_mesh_shape=(fsdp / num_slices, tensor, expert), dcn_mesh_shape=(num_slices, 1,
1))`: fsdp spans the slices, its outer factor being the slice, so only the data-parallel part
of each gradient reduction crosses the data-center network. Off TPU there are no slice
attributes; `clm.sharding.mesh_device_ids` builds the same order with slice = device id //
devices per slice (the CPU tests' stand-in for slices).

Decoder layers get what torch_xla's FSDPv2 (`SpmdFullyShardedDataParallel`) adds per wrapped
layer, applied in place: the layer's output hidden states are constrained to the data sharding
(rows on `BATCH_AXES`; transformers 5 layers return a plain Tensor, older ones a tuple), and a
backward optimization barrier keeps each layer's gradient sync from fusing into one gigantic
buffer. We do not wrap in the FSDPv2 class itself: it renames every parameter
(`..._orig_module...`), and checkpoints would no longer move between backends; its parameter
sharding is the fsdp column of the rules table.

`model.gradient_checkpointing` keeps HF's non-reentrant per-layer checkpointing, with the
recomputation fenced by an optimization barrier as torch_xla's own checkpoint fences it
(`_checkpoint_with_barrier`): without one XLA merges the recomputation into the forward and
saves nothing. torch_xla's own `checkpoint_module` is reentrant: its first forward runs
without autograd, so the router logits HF records there for the load-balancing loss carry no
gradient, and the router would silently stop learning from that loss (measured: losses drift
from the CPU run by 3e-3 by step 3). With `xla_scan_layers` the layers are one scanned loop
instead, recomputed by the scan's partitioner (clm/backends/xla_scan.py).

XLA traces lazily: `step_boundary()` (`torch_xla.sync()`) cuts the graph after each optimizer
step and each eval batch, so every step runs the same compiled program, and launches it
without waiting (`async_steps`: the trainer reads losses back only at log, eval and save
steps). `compile_count()` reads torch_xla's `CompileTime` metric for the recompile watch.
`profile(step)` captures an XLA profile of one step (`xla_profile_step`, waiting for the device
at its end) into `${run_dir}/profile` for TensorBoard's profile plugin; `local_compile_cache_dir`
holds the persistent compilation cache on TPU.

Why this module is long: the one module that imports torch_xla's runtime: mesh, sharded build
and transfer, host rows, the hosts' gloo group and the SPMD checkpoint planners share the mesh
and the host's device ids; its pieces that need none of that are modules of their own (xla_spmd,
xla_scan, xla_attention, pallas).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint
from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner

from clm.backends import Backend, pallas
from clm.backends.xla_spmd import ActivationSharding
from clm.config import ConfigError
from clm.sharding import (
    BATCH_AXES,
    MESH_AXES,
    host_box,
    mesh_device_ids,
    mesh_shape,
    partition_spec,
    slices_are_outermost,
)
from clm.spec import ModelSpec


class XlaBackend(Backend):
    name = "xla"
    async_steps = True
    async_saves_by_default = True  # a save's write is long next to a step

    def __init__(
        self,
        tensor_parallelism: int = 1,
        expert_parallelism: int = 1,
        num_slices: int = 1,
        attention: str = "auto",
        scan_layers: bool = False,
        compile_cache_dir: str | None = None,
        recompile_policy: str = "warn",
        profile_step: int = -1,
        profile_dir: str | None = None,
        collective_timeout: datetime.timedelta | None = None,
    ):
        # The persistent compile cache must exist before the first computation. Only on TPU:
        # on the CPU runtime the cached programs fail to deserialize.
        if compile_cache_dir and os.environ.get("PJRT_DEVICE") == "TPU":
            Path(compile_cache_dir).mkdir(parents=True, exist_ok=True)
            xr.initialize_cache(compile_cache_dir, readonly=False)
        pallas.jax_for_this_runtime()
        pallas.tame_torchax()
        xr.use_spmd()  # before any XLA tensor exists
        super().__init__(torch_xla.device())
        shape = mesh_shape(
            xr.global_runtime_device_count(),
            int(tensor_parallelism),
            int(expert_parallelism),
            int(num_slices),
        )
        self._use_mesh(_build_mesh(shape, int(num_slices)), shape, int(num_slices), attention)
        self.scan_layers = bool(scan_layers)
        self.recompile_policy = recompile_policy  # xla_recompile
        # one process per host: process 0 writes the run's files
        self.process_count = xr.process_count()
        self.rank = xr.process_index()
        self._batch_specs: dict[int, _ShardingSpec] = {}
        # this host's devices (global ordinals, as in the mesh): what the sharded transfer cuts
        self._local_ids = [
            int(d.split(":")[-1]) for d in torch_xla._XLAC._xla_get_runtime_devices()
        ]
        # Weights are made a piece at a time by the CPU generator (`build_model`), then
        # moved: the same seed gives the same model as backend=cpu (XLA's RNG draws other
        # numbers), and no host holds more than one decoder layer of it.
        self.init_device = torch.device("cpu")
        self.profile_step = int(profile_step)
        self.profile_dir = profile_dir
        self.process_group = _host_process_group(collective_timeout)

    def _use_mesh(self, mesh: xs.Mesh, shape: tuple, num_slices: int, attention: str) -> None:
        """The mesh and what follows from it (also for `clm.aot`'s target backend)."""
        self.mesh = mesh
        self.num_slices = num_slices
        self.axis_sizes = dict(zip(MESH_AXES, shape, strict=True))
        self.world_size = math.prod(shape)  # devices (per-device throughput and MFU divide by it)
        self.data_parallel_size = self.axis_sizes["fsdp"] * self.axis_sizes["expert"]
        # every process loads the whole global batch; to_device transfers each host's rows
        self.local_data_parallel_size = self.data_parallel_size
        self._mesh_ids = [int(d) for d in self.mesh.device_ids]
        self.attention = attention
        self.attention_kernel: str | None = None  # which one wrap_model chose (description)

    def checkpoint_options(self, load: bool) -> dict:
        """torch_xla's SPMD planners over the hosts' gloo group (module docstring)."""
        planner = _SpmdLoadPlanner() if load else _SpmdSavePlanner()
        return {"planner": planner, "process_group": self.process_group}

    def stage_checkpoint(self, state: dict) -> tuple[dict, SPMDSavePlanner]:
        """An asynchronous save's copy (clm.checkpoint.AsyncSaver): once the queued device work
        is done, this host's shards in host memory (torch_xla's `_sharded_cpu_state_dict`, as
        CheckpointManager.save_async stages them; host tensors cloned), and a planner that
        writes them without touching the device: the files `checkpoint_options`' planner
        writes, each host only its shards."""
        from torch_xla.experimental.distributed_checkpoint._helpers import (
            _sharded_cpu_state_dict,
        )

        _finish_device_work()
        flat, spec = tree_flatten(state)
        on_device = [
            i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.device.type == "xla"
        ]
        staged = iter(_sharded_cpu_state_dict([flat[i] for i in on_device]))
        on_device = set(on_device)
        flat = [
            next(staged) if i in on_device else x.clone() if isinstance(x, torch.Tensor) else x
            for i, x in enumerate(flat)
        ]
        return tree_unflatten(flat, spec), _StagedSpmdSavePlanner()

    def close(self) -> None:
        if self.process_group is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.process_group = None

    def build_model(self, spec: ModelSpec, seed: int) -> torch.nn.Module:
        """Made a piece at a time on the host, each tensor `place`d (sharded) as soon as it
        exists, so no host holds the whole model; from a checkpoint each host reads only its
        devices' box of each tensor (`region`). Then `wrap_model`."""
        from clm import model as model_lib

        model = model_lib.build_model(spec, self.init_device, seed, self.place, self.region)
        return self.wrap_model(model)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from clm import model as model_lib
        from clm import moe

        if model_lib.is_moe(model.config) and not pallas.call_jax_available():
            why = pallas.torchax_import_error() or "jax is not installed"
            raise ConfigError(
                "backend=xla runs the MoE layers' indexed copies through torch_xla's call_jax, "
                f"which needs jax and torchax ({why}): install the pinned requirements.lock"
            )
        # HF's aux loss uses torch.histc, which XLA cannot lower; ours is equal and static
        moe.use_static_load_balancing_loss()
        self.activations = ActivationSharding(self.mesh, self.axis_sizes)
        moe.use_sharding(self.activations)
        with torch.no_grad():  # what build_model did not place yet (a model made on the CPU)
            model_lib.place_all(model, self._place_if_on_host)
        self._use_flash_attention(model)
        self._prepare_layers(model)
        return model

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor to the devices, sharded by the rules table (`clm.sharding`): like a
        batch, each host transfers only the shards its devices hold."""
        spec = partition_spec(name, tuple(tensor.shape), self.axis_sizes)
        sharding = _ShardingSpec(self.mesh, spec) if any(e is not None for e in spec) else None
        [out] = xm.send_cpu_data_to_device(tensor, self.device, sharding)
        return out

    def region(self, name: str, shape: tuple) -> tuple[slice, ...] | None:
        """The box of the tensor this host's devices hold (`clm.sharding.host_box`): the only
        part `place` transfers, so the only part a host reads from a checkpoint. None on one
        host, whose devices hold all of it."""
        spec = partition_spec(name, tuple(shape), self.axis_sizes)
        box = host_box(
            self._mesh_ids, tuple(self.axis_sizes.values()), spec, shape, self._local_ids
        )
        whole = all(b.start == 0 and b.stop == n for b, n in zip(box, shape, strict=True))
        return None if whole else box

    def _place_if_on_host(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device.type == "xla" else self.place(name, tensor)

    def _use_flash_attention(self, model: torch.nn.Module) -> None:
        """xla_attention: the Pallas kernel per shard (rows on BATCH_AXES, heads on "tensor")."""
        from clm.backends import xla_attention as attention

        xs.set_global_mesh(self.mesh)  # the kernel's shard_map looks the mesh up here
        try:
            used = attention.use_flash_attention(
                model,
                self.attention,
                attention.pallas_flash_attention(),
                partition_spec=(BATCH_AXES, "tensor", None, None),
                mesh=self.mesh,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.attention_kernel = "Pallas flash attention" if used else "HF sdpa attention"

    def _prepare_layers(self, model: torch.nn.Module) -> None:
        """FSDPv2's per-layer treatment, in place (see the module docstring); or the layers
        as one scanned loop (`xla_scan_layers`, clm/backends/xla_scan.py)."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if self.scan_layers:
            from clm.backends.xla_scan import scan_decoder_layers

            try:
                scan_decoder_layers(model, self._constrain_rows)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            return
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
            for layer in layers:  # what HF's checkpointing wrapper calls, per layer
                if getattr(layer, "gradient_checkpointing", False):
                    layer._gradient_checkpointing_func = _checkpoint_with_barrier

    def _constrain_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activations.constrain(hidden, ("batch",) + (None,) * (hidden.ndim - 1))

    def _shard_layer_output(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.shape[0] % self.data_parallel_size == 0:
            xs.mark_sharding(hidden, self.mesh, (BATCH_AXES,) + (None,) * (hidden.ndim - 1))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows on BATCH_AXES; this host transfers only its devices' rows (module docstring)."""
        out = {}
        for key, value in batch.items():
            spec = None
            if value.ndim >= 1 and value.shape[0] % self.data_parallel_size == 0:
                spec = self._batch_specs.get(value.ndim)
                if spec is None:
                    partition = (BATCH_AXES,) + (None,) * (value.ndim - 1)
                    spec = self._batch_specs[value.ndim] = _ShardingSpec(self.mesh, partition)
            # a tensor the rows do not split (e.g. a scalar) is replicated: each host sends its copy
            [out[key]] = xm.send_cpu_data_to_device(value, self.device, spec)
        return out

    def after_gradients(self, batch: dict, model: torch.nn.Module) -> dict:
        """One optimization barrier over the micro-batch and the accumulated gradients: its
        forward cannot start before the last micro-batch's backward has ended. The step is one
        XLA program, and without it the compiler ran the micro-batches side by side, each
        holding its activations (Mixtral-8x22B on v5p-256, 2 micro-batches of 32K tokens per
        device: 130 GiB per device; docs/PERFORMANCE.md, TPU section)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        tensors = list(batch.values()) + grads
        xm.optimization_barrier_(tensors)
        return dict(zip(batch, tensors[: len(batch)], strict=True))

    def barrier(self) -> None:
        """Wait for every host (on the hosts' gloo group: the devices are not involved)."""
        from clm.checkpoint import cpu_barrier

        cpu_barrier(self.process_group)

    def any_process(self, flag: bool) -> bool:
        """True when `flag` is True on any host: one int all-reduced over the gloo group."""
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(value.item())

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

    @property
    def parallelism(self) -> dict[str, int]:
        """The mesh's model axes (its fsdp axis is data parallelism)."""
        axes = self.axis_sizes
        return {"tensor": axes["tensor"], "expert": axes["expert"], "pipeline": 1, "context": 1}

    def use_full_precision(self) -> None:
        """float32 matmuls at XLA's highest precision (a TPU's default runs them as bf16
        passes); the TPU program's bf16 matmuls are unchanged."""
        import torch_xla.backends

        torch_xla.backends.set_mat_mul_precision("highest")

    def sync(self) -> None:
        torch_xla.sync()
        xm.wait_device_ops()

    def compile_count(self) -> int:
        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def device_description(self) -> str:
        sizes = " x ".join(f"{k}={v}" for k, v in self.axis_sizes.items())
        kind = xr.device_type() or os.environ.get("PJRT_DEVICE", "?")
        if kind == "TPU":
            kind += _tpu_generation()  # e.g. "TPU v5p": perf/mfu looks the peak up by it
        where = [self.attention_kernel] if self.attention_kernel else []
        if self.num_slices > 1:
            where.append(f"fsdp over {self.num_slices} slices")
        if self.process_count > 1:
            where.append(f"{self.process_count} hosts, this one #{self.rank}")
        extra = f"; {', '.join(where)}" if where else ""
        return f"{self.world_size} XLA {kind} devices (SPMD mesh {sizes}{extra})"


def _checkpoint_with_barrier(function, *args):
    """A checkpointed layer (HF's `_gradient_checkpointing_func`): torch's non-reentrant
    checkpoint, whose recomputation starts from its inputs fenced together with the gradient
    of its output by an optimization barrier, as torch_xla's own checkpoint fences them.
    Without the barrier XLA sees the recomputation as the forward's own ops on the same values,
    merges the two and keeps every activation of every layer until the backward; with the
    inputs alone behind it, XLA may still start the recomputation during the forward (measured
    on Mixtral-8x22B at 32K tokens x 1 sequence per device: 23 GB per layer without a barrier,
    and two layers' experts alive at once with the inputs alone; docs/PERFORMANCE.md).

    Non-reentrant, not torch_xla's reentrant checkpoint: its first forward runs without
    autograd, so the router logits HF records there for the load-balancing loss would carry no
    gradient (measured: losses drift from the CPU run by 3e-3 by step 3). No RNG state is
    stashed: our layers draw no random numbers (no dropout)."""
    fenced: dict[str, list] = {}

    def run(*inputs):
        return function(*fenced.pop("inputs", inputs))  # the recomputation takes the fenced

    output = checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)
    return _FenceRecomputation.apply(output, fenced, *args)


class _FenceRecomputation(torch.autograd.Function):
    """Identity on a checkpointed layer's output; its backward, which runs just before the
    layer's own, puts the layer's inputs behind one optimization barrier with the output's
    gradient and leaves them for the recomputation."""

    @staticmethod
    def forward(ctx, output, fenced, *inputs):
        ctx.fenced = fenced
        ctx.save_for_backward(*inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        tensors = [grad.clone(), *(t.detach().clone() for t in ctx.saved_tensors)]
        xm.optimization_barrier_(tensors)
        ctx.fenced["inputs"] = [
            t.requires_grad_(s.requires_grad)
            for t, s in zip(tensors[1:], ctx.saved_tensors, strict=True)
        ]
        return (tensors[0], None) + (None,) * len(ctx.saved_tensors)


class _ShardingSpec(xs.ShardingSpec):
    """torch_xla's transfer sharding, with the arguments `mark_sharding` uses (the mesh's own).

    torch_xla 2.9's `ShardingSpec` labels a spec that leaves out a size-1 mesh axis (e.g.
    ("tensor", "fsdp") on a mesh whose "expert" axis is 1) as fully tiled while its tile
    assignment keeps that axis, and the transfer then fails with "too many indices for tensor
    of dimension 2"; the mesh marks it partially replicated over the missing axis, as
    `mark_sharding` does.
    """

    def __post_init__(self):
        (
            self._tile_assignment,
            self._group_assignment,
            self._replication_groups,
            self._sharding_type,
        ) = self.mesh._get_op_sharding_args(self.partition_spec)


def _host_process_group(timeout: datetime.timedelta | None = None):
    """A CPU gloo group, one rank per host (rank = xr.process_index()): checkpoints, barrier,
    any_process. `timeout`: what one of its collectives may wait (None: torch's default); its
    store (a TCPStore on host 0) also carries the watchdog's heartbeats (clm/watchdog.py)."""
    import torch_xla.distributed.xla_backend  # noqa: F401  registers the xla:// rendezvous

    if not dist.is_initialized():
        if xr.process_count() == 1:  # this host alone: no metadata query, no fixed port
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", init_method="xla://", timeout=timeout)
    return dist.group.WORLD


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish_device_work() -> None:
    torch_xla.sync()
    xm.wait_device_ops()


# torch_xla's planners flatten the state dict their own way: a collection without tensors stays
# one entry ("optim.param_groups"), where DCP's default planner writes each value
# ("optim.param_groups.0.lr"), and neither loads the other's optimizer state. Ours flatten with
# DCP's own function first, so the files carry DCP's keys and mappings (what the CPU and FSDP
# backends write and read), and the SPMD planner sees a flat dict that it keeps as it is.
class _StagedSpmdSavePlanner(SPMDSavePlanner):
    """DCP's keys for a state already in host memory (`stage_checkpoint`): no device work to
    wait for, and it may run on the saver's thread, which must not cut the lazy graph the
    training thread is tracing (torch_xla.sync)."""

    def set_up_planner(self, state_dict, is_coordinator):  # DCP's older signature, as the base
        flat, mappings = flatten_state_dict(state_dict)
        super().set_up_planner(flat, is_coordinator)
        self.mappings = mappings  # saved as the metadata's planner_data, as DCP's planner does


class _SpmdSavePlanner(_StagedSpmdSavePlanner):
    """The synchronous save's planner: first waits for the queued device work."""

    def set_up_planner(self, state_dict, is_coordinator):
        _finish_device_work()
        super().set_up_planner(state_dict, is_coordinator)


class _SpmdLoadPlanner(SPMDLoadPlanner):
    def set_up_planner(self, state_dict, metadata, is_coordinator):
        _finish_device_work()
        flat, mappings = flatten_state_dict(state_dict)
        super().set_up_planner(flat, metadata, is_coordinator)
        # non-tensor values (hyperparameters) are set into the caller's nested dict
        self.original_state_dict, self.mappings = state_dict, mappings


@functools.cache
def _tpu_generation() -> str:
    """The TPU generation with a leading space (" v5p" on a v5p-128), or "" when unknown."""
    try:
        from torch_xla._internal import tpu

        return f" {tpu.get_tpu_type()}"
    except Exception:  # metadata server unreachable, unknown format: MFU is then not reported
        return ""


def _build_mesh(shape: tuple[int, int, int], num_slices: int) -> xs.Mesh:
    """The (fsdp, tensor, expert) mesh; with num_slices > 1 fsdp spans the slices (outermost)."""
    devices = math.prod(shape)
    attributes = xr.global_runtime_device_attributes()
    attributes.sort(key=lambda a: int(str(a["name"]).rsplit(":", 1)[-1]))  # by device ordinal
    slice_of = [a.get("slice_index") for a in attributes]
    if None in slice_of:  # no slice attributes (one TPU slice, or the CPU runtime)
        if num_slices > 1 and xr.device_type() == "TPU":
            raise ConfigError(
                f"num_slices={num_slices}: this TPU runtime reports a single slice (no "
                "slice_index); start every slice's hosts as one multi-slice job, or set "
                "num_slices=1"
            )
        # off TPU: stand-in slices of consecutive device ids (the CPU tests)
        per_slice = devices // num_slices
        ids = mesh_device_ids([d // per_slice for d in range(devices)], shape, num_slices)
        return xs.Mesh(ids, shape, MESH_AXES)
    if num_slices == 1:  # one slice: device ids in order, as torch_xla's examples for a pod
        mesh_device_ids(slice_of, shape, 1)  # ConfigError naming the runtime's slice count
        return xs.Mesh(list(range(devices)), shape, MESH_AXES)
    fsdp, tensor, expert = shape
    try:
        mesh = xs.HybridMesh(
            ici_mesh_shape=(fsdp // num_slices, tensor, expert),
            dcn_mesh_shape=(num_slices, 1, 1),
            axis_names=MESH_AXES,
        )
    except ValueError as e:  # e.g. the runtime has another number of slices
        raise ConfigError(f"num_slices={num_slices}: {e}") from e
    ids = [int(d) for d in mesh.device_ids]
    assert slices_are_outermost(ids, shape, slice_of, num_slices), (ids, slice_of)
    return mesh


@contextlib.contextmanager
def _trace(log_dir: str):
    import torch_xla.debug.profiler as xp

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    xp.start_trace(log_dir)
    try:
        yield
    finally:
        # the step was only launched (async_steps): capture its execution too
        torch_xla.sync()
        xm.wait_device_ops()
        xp.stop_trace()
