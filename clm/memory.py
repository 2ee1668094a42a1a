"""Refuse a run that cannot fit in memory before the model is built (`check_memory`).

A model too big for the machine otherwise fails late and badly: the reference's mixtral80 dry
run on a laptop CPU (1.7B parameters, fp32 AdamW) swaps or is killed minutes in, before its
first step. `check` estimates the peak memory per device with the capacity planner's model
(`clm.plan.memory_per_device`: parameters, gradients, AdamW state and the activations of one
training step) and compares it with what the device has free: on a CPU the host's available
memory (shared by the processes of this host under torchrun), on a GPU `torch.cuda.mem_get_info`.
Like the planner, it keeps `clm.plan.DEFAULT_HBM_RESERVE` (10%) for the runtime and
fragmentation. When the estimate does not fit it raises a ConfigError naming the estimate, the
free memory and the overrides that would fit; `check_memory=false` starts anyway, with a
warning.

Not checked: XLA devices (size a TPU run with `python -m clm.plan`), and models the planner does
not know (anything but Mixtral, e.g. the GPT-2 dry run's tiny model).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from clm import plan
from clm.config import ConfigError
from clm.spec import ModelSpec

GIB = 2**30


def check(cfg: DictConfig, backend, spec: ModelSpec) -> None:
    """ConfigError when clm.plan's estimate for this run (of the model `spec`) exceeds the
    device's usable memory; with check_memory=false a warning on stderr instead."""
    free = free_bytes(backend)
    if free is None:
        return
    try:
        plan.check_plannable(spec)
    except ConfigError:  # not a Mixtral: the planner has no model of it
        return
    usable = free * (1 - plan.DEFAULT_HBM_RESERVE)
    batch = int(cfg.per_device_train_batch_size)
    memory = _estimate(spec, backend, batch, int(cfg.max_length))
    if memory.peak <= usable:
        return
    where = f"{backend.device_description()} has {free / GIB:.1f} GiB free"
    if _processes_per_host(backend) > 1:
        where += f" per process (its {_processes_per_host(backend)} processes share the host)"
    message = (
        f"memory: this run needs about {memory.peak / GIB:.1f} GiB per device by clm.plan's "
        f"estimate (parameters, gradients and AdamW state {memory.state / GIB:.1f} GiB in "
        f"{cfg.model.dtype}) but {where} ({usable / GIB:.1f} GiB usable)"
    )
    if not cfg.get("check_memory", True):
        if backend.is_main:
            print(f"warning: {message}; check_memory=false: starting anyway", file=sys.stderr)
        return
    fits = _what_fits(cfg, spec, backend, usable)
    raise ConfigError(f"{message}; {fits}; check_memory=false starts anyway")


def _estimate(spec: ModelSpec, backend, rows: int, seq_len: int) -> plan.Memory:
    """Bytes per device of one training step: FSDP shards the model state over the ranks
    (expert parallelism splits the experts first), one device holds all of it otherwise."""
    axis_sizes = {}
    if backend.name == "fsdp":
        expert = int(getattr(backend, "ep", 1))
        axis_sizes = {"fsdp": backend.world_size // expert, "expert": expert}
    return plan.memory_per_device(spec, axis_sizes, rows, seq_len, "flash")


def _what_fits(cfg: DictConfig, spec: ModelSpec, backend, usable: float) -> str:
    """The least change that fits: gradient checkpointing, then smaller micro-batches with the
    same global batch (more accumulation), then bfloat16 (single process: FSDP keeps fp32
    master weights), each alone before combined. Or what to do when nothing does."""
    batch, accumulation = int(cfg.per_device_train_batch_size), int(cfg.gradient_accumulation_steps)
    batches = [batch // 2**k for k in range(batch.bit_length()) if batch % 2**k == 0]
    checkpointing = [False] if cfg.model.gradient_checkpointing else [False, True]
    dtypes = [cfg.model.dtype]
    if cfg.model.dtype == "float32" and backend.name != "fsdp":
        dtypes.append("bfloat16")
    last = ""
    for dtype in dtypes:
        for rows in batches:
            for recompute in checkpointing:
                changes = {}
                if recompute:
                    changes["model.gradient_checkpointing"] = "true"
                if rows != batch:
                    changes["per_device_train_batch_size"] = rows
                    changes["gradient_accumulation_steps"] = accumulation * batch // rows
                if dtype != cfg.model.dtype:
                    changes["model.dtype"] = dtype
                if not changes:
                    continue
                recompute = recompute or bool(cfg.model.gradient_checkpointing)
                changed = replace(spec, dtype=dtype, gradient_checkpointing=recompute)
                peak = _estimate(changed, backend, rows, int(cfg.max_length)).peak
                overrides = " ".join(f"{k}={v}" for k, v in changes.items())
                if peak <= usable:
                    return f"these overrides would fit: {overrides} ({peak / GIB:.1f} GiB)"
                last = f"{overrides} needs {peak / GIB:.1f} GiB"
    return (
        f"nothing smaller fits here{f' (even {last})' if last else ''}: use a smaller model, e.g. "
        "model.config_path=mixtral_small.json, or more memory (python -m clm.plan sizes slices)"
    )


def _processes_per_host(backend) -> int:
    if backend.name == "fsdp" and backend.device.type == "cpu":
        return int(os.environ.get("LOCAL_WORLD_SIZE", backend.world_size))
    return 1


def free_bytes(backend) -> float | None:
    """Memory this process may use on its device; None where unknown or not checked (XLA)."""
    device = backend.device
    if backend.name not in ("torch", "fsdp"):
        return None
    if device.type == "cuda":
        import torch

        return float(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    available = host_available_bytes()
    return None if available is None else available / _processes_per_host(backend)


def host_available_bytes() -> float | None:
    """The host's available memory (Linux MemAvailable), capped by this cgroup's limit (a
    container's memory limit is not in /proc/meminfo)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            available = float(line.split()[1]) * 1024
    if available is None:
        return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = float(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            available = min(available, float(limit) - usage)
        break
    return available
