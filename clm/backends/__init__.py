"""Backends: the one interface the trainer uses to touch devices.

The trainer never imports torch_xla or torch.distributed; a backend owns device placement,
model wrapping (sharding), cross-device reductions and host/device synchronization. A new
backend is one module here plus one entry in `select_backend`.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from omegaconf import DictConfig

from clm import config as config_lib
from clm.config import ConfigError
from clm.spec import ModelSpec


class Backend:
    """Single-device defaults; subclasses override what they shard or synchronize."""

    name = "base"
    # True where the device runs queued work asynchronously and reading any device value (a
    # float() of the loss) stalls the host until all of it is done (XLA). The trainer then reads
    # the logged values back only at the steps that need them (Trainer.train_step).
    async_steps = False
    # what the forward and backward wait for, in the step watchdog's words (clm/watchdog.py)
    compute_phase = "device"

    def __init__(self, device: torch.device):
        self.device = device
        self.rank = 0
        self.world_size = 1
        # devices the batch is split over (clm.config.finalize: global batch = per_device x this)
        self.data_parallel_size = 1
        # data-parallel devices whose rows this process loads: 1 when each process drives one
        # device; all of a host's devices under SPMD, where one process feeds them all
        self.local_data_parallel_size = 1
        # where the model's weights are created and initialized before `wrap_model`
        self.init_device = device

    # saves written by a background thread when `async_checkpointing=auto`: where a save's
    # write is long next to a step (XLA; clm/checkpoint.py, AsyncSaver)
    async_saves_by_default = False
    # what a compile after warm-up does (`xla_recompile` on XLA): warn, error or ignore; nothing
    # compiles elsewhere (compile_count is None)
    recompile_policy = "ignore"

    def build_model(self, spec: ModelSpec, seed: int) -> torch.nn.Module:
        """The model of `spec` (random with `seed`, or its pretrained weights) ready to train
        on this backend: here made whole on `init_device`, then `wrap_model`. Sharded backends
        override it to build on the meta device, shard, then fill a piece at a time."""
        from clm import model as model_lib

        return self.wrap_model(model_lib.build_model(spec, self.init_device, seed))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallelism(self) -> dict[str, int]:
        """The model parallelism this backend runs (the MLPerf log records it): one device."""
        return {"tensor": 1, "expert": 1, "pipeline": 1, "context": 1}

    def use_full_precision(self) -> None:
        """`full_precision=true`: float32 matmuls at full float32 precision (no TF32)."""
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def local_rows(
        self, batch: dict[str, torch.Tensor], micro_batches: int = 1
    ) -> dict[str, torch.Tensor]:
        """This process's rows of `micro_batches` consecutive global micro-batches.

        Every process reads the same deterministic stream, a whole global batch per step; a
        multi-process backend keeps its data-parallel rank's rows of each micro-batch, in
        order. Here (one device, or XLA SPMD where `to_device` shards the rows): all of them.
        """
        return batch

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def after_gradients(self, batch: dict, model: torch.nn.Module) -> dict:
        """The next micro-batch (on the device), ordered after the gradients accumulated so
        far; eager backends run in order anyway."""
        return batch

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def optimizer_class(self, name: str) -> type[torch.optim.Optimizer]:
        """The AdamW class for `optimizer` (both names: torch.optim.AdamW off XLA)."""
        return torch.optim.AdamW

    def profile(self, step: int):
        """A context that captures a device profile of optimizer step `step` (off: no-op)."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient L2 norm to `max_norm` (inf: no clipping); returns the norm.

        The norm is the square root of per-tensor fp32 sums of squares, not torch's
        `clip_grad_norm_`: on CPU its fp32 `vector_norm` drifts (5.7e-4 relative on the
        [32000, 128] LM-head gradient of mixtral_small; `square().sum()` agrees with fp64), and
        the multi-process backend sums the same squares over its shards.
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.stack([g.detach().float().square().sum() for g in grads]).sum().sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
        return total

    def step_boundary(self) -> None:
        """The end of one unit of device work (an optimizer step, an eval batch).

        Lazy backends (XLA) cut and launch their traced graph here, so every step runs the
        same compiled program; eager backends have nothing to do.
        """

    def sync(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def compile_count(self) -> int | None:
        """Programs compiled so far (XLA); None where nothing is compiled."""
        return None

    def checkpoint_options(self, load: bool) -> dict:
        """Keyword arguments for `clm.checkpoint.restore` (load) or `save`: a fresh DCP
        `planner` and the `process_group` to checkpoint over; {}: DCP's defaults."""
        return {}

    def stage_checkpoint(self, state: dict) -> tuple[dict, object]:
        """For an asynchronous save (`clm.checkpoint.AsyncSaver`): a copy of the model and
        optimizer `state` as it is now, in host memory, and the DCP planner to write it with
        (None: DCP's default). The background writer touches nothing else."""
        from clm.checkpoint import host_copy

        return host_copy(state), None

    def barrier(self) -> None:
        """Wait for every process."""

    def any_process(self, flag: bool) -> bool:
        """True when `flag` is True on any process (so that all take the same branch)."""
        return flag

    def device_description(self) -> str:
        return str(self.device)

    def close(self) -> None:
        pass


def select_backend(cfg: DictConfig) -> Backend:
    """backend=auto: XLA when PJRT_DEVICE=TPU is set, else CUDA when visible, else CPU.

    Under torchrun (WORLD_SIZE > 1) cpu and cuda mean one process per device with FSDP2
    (clm/backends/fsdp_backend.py: gloo on CPU, NCCL on CUDA).
    """
    backend = _select(cfg)
    if cfg.get("full_precision"):
        backend.use_full_precision()
    return backend


def _select(cfg: DictConfig) -> Backend:
    from clm.backends.torch_backend import TorchBackend

    on_xla, torchrun = config_lib.runs_on_xla(cfg), config_lib.under_torchrun()
    config_lib.refuse_unimplemented(cfg, on_xla, torchrun)
    if on_xla:
        return _xla_backend(cfg)
    if int(cfg.get("num_slices", 1)) > 1:
        raise ConfigError(
            f"num_slices={cfg.num_slices}: multi-slice runs need backend=xla (TPU slices); "
            "set num_slices=1 for backend=cpu|cuda"
        )
    if cfg.backend == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend=cuda: no CUDA device is visible (torch.cuda.is_available())")
    if torchrun:  # one process per device
        from clm.backends.fsdp_backend import FsdpBackend

        use_cuda = cfg.backend == "cuda" or (cfg.backend == "auto" and torch.cuda.is_available())
        return FsdpBackend(cfg, "cuda" if use_cuda else "cpu")
    if cfg.backend == "cuda" or (cfg.backend == "auto" and torch.cuda.is_available()):
        return TorchBackend(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    return TorchBackend(torch.device("cpu"))


def _xla_backend(cfg: DictConfig) -> Backend:
    from clm.watchdog import collective_timeout

    try:
        from clm.backends.xla_backend import XlaBackend
    except ImportError as e:
        raise ConfigError(
            f"backend=xla: torch_xla is not importable ({e}); install torch-xla matching torch "
            "(e.g. torch==2.9.0 torch-xla==2.9.0) or choose backend=cpu|cuda"
        ) from e
    return XlaBackend(
        int(cfg.tensor_parallelism),
        int(cfg.expert_parallelism),
        num_slices=int(cfg.get("num_slices", 1)),
        attention=str(cfg.get("xla_attention", "auto")),
        scan_layers=bool(cfg.get("xla_scan_layers", False)),
        compile_cache_dir=cfg.get("local_compile_cache_dir"),
        recompile_policy=str(cfg.get("xla_recompile", "warn")),
        profile_step=int(cfg.get("xla_profile_step", -1)),
        profile_dir=os.path.join(str(cfg.run_dir), "profile"),
        collective_timeout=collective_timeout(cfg),
    )
