"""Backends: the one interface the trainer uses to touch devices.

The trainer never imports torch_xla or torch.distributed; a backend owns device placement,
model wrapping (sharding), cross-device reductions and host/device synchronization. A new
backend is one module here plus one entry in `select_backend`.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from clm.config import ConfigError


class Backend:
    """Single-device defaults; subclasses override what they shard or synchronize."""

    name = "base"

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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

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

    def barrier(self) -> None:
        """Wait for every process."""

    def device_description(self) -> str:
        return str(self.device)

    def close(self) -> None:
        pass


def select_backend(cfg: DictConfig) -> Backend:
    """backend=auto: XLA when PJRT_DEVICE=TPU is set, else CUDA when visible, else CPU."""
    from clm.backends.torch_backend import TorchBackend

    if cfg.backend == "xla" or (cfg.backend == "auto" and os.environ.get("PJRT_DEVICE") == "TPU"):
        return _xla_backend(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']}: multi-process runs are not supported yet; "
            "run a single process"
        )
    if cfg.backend == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend=cuda: no CUDA device is visible (torch.cuda.is_available())")
    if cfg.backend == "cuda" or (cfg.backend == "auto" and torch.cuda.is_available()):
        return TorchBackend(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    return TorchBackend(torch.device("cpu"))


def _xla_backend(cfg: DictConfig) -> Backend:
    try:
        from clm.backends.xla_backend import XlaBackend
    except ImportError as e:
        raise ConfigError(
            f"backend=xla: torch_xla is not importable ({e}); install torch-xla matching torch "
            "(e.g. torch==2.9.0 torch-xla==2.9.0) or choose backend=cpu|cuda"
        ) from e
    return XlaBackend(int(cfg.tensor_parallelism), int(cfg.expert_parallelism))
