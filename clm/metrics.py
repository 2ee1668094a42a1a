"""metrics.jsonl, TensorBoard, and the FLOP arithmetic behind TFLOP/s and MFU.

One JSON object per logged step goes to `${run_dir}/metrics.jsonl`, flushed at once so a crash
loses nothing already logged; the same scalars go to `${run_dir}/tensorboard/` and, with
`wandb.enabled=true`, the same records to a W&B run (`clm.wandb_log`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from clm.errors import OutputWriteError, describe
from clm.model_math import flops_per_token
from clm.spec import ModelSpec

# Dense bf16 peak TFLOP/s per device, matched on the device name (case-insensitive).
PEAK_TFLOPS = {
    "h200": 989.0,
    "h100": 989.0,
    "a100": 312.0,
    "v6e": 918.0,
    "v5p": 459.0,
    "v5e": 197.0,
    "v5litepod": 197.0,
    "v4": 275.0,
}


def peak_tflops(device_description: str, configured: float | None) -> float | None:
    if configured is not None:
        return float(configured)
    name = device_description.lower().replace(" ", "")
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def training_flops_per_token(spec: ModelSpec, active_params: int, seq_len: int) -> float:
    """`clm.model_math.flops_per_token` for the model of `spec` (`active_params`: counted on
    the built model, `clm.model.count_parameters`)."""
    return flops_per_token(
        active_params, spec.vocab * spec.hidden, spec.tied, spec.layers, spec.hidden, seq_len
    )


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard then hides the events the
        interrupted run wrote from that step on (its SummaryWriter purge_step)."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        self.wandb = None  # a clm.wandb_log.WandbRun, set once it has started (main process)
        if enabled:
            self.path = Path(run_dir) / "metrics.jsonl"
            self._file = open(self.path, "a", encoding="utf-8")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        record.update({k: _plain(v) for k, v in values.items()})
        end = self._file.tell()
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # disk full: cut back to the last whole record, then stop the run
            self._file = _reopen_truncated(self._file, self.path, end)
            raise OutputWriteError(
                f"{self.path}: could not append the step-{step} record ({describe(e, self.path)}); "
                "the records before it are intact"
            ) from e
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        if self.wandb is not None:  # exactly the record just written (it never raises)
            self.wandb.log(step, {k: v for k, v in record.items() if k != "step"})

    def sync(self) -> None:
        """Make every record logged so far durable (fsync): called before a checkpoint commits,
        so that a power cut after the commit loses no record the checkpoint covers (a resume
        keeps the records up to its step and replays none of them)."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._tb.flush()

    def close(self, exit_code: int = 0) -> None:
        """Close the writers (W&B's run with `exit_code`); a write error here (disk full) is
        reported, not raised, so that it never hides the error that ended the run."""
        if self.wandb is not None:
            self.wandb.finish(exit_code)
            self.wandb = None
        if self._file is None:
            return
        for handle in (self._file, self._tb):
            try:
                handle.close()
            except Exception as e:  # noqa: BLE001 - tensorboard raises several kinds
                print(f"warning: closing {self.path.parent}: {e}", file=sys.stderr, flush=True)
        self._file = self._tb = None


def _reopen_truncated(handle, path: Path, size: int):
    """Close the failed handle (dropping its buffer), then cut off the partly written line."""
    try:
        handle.close()
    except OSError:
        pass
    with open(path, "r+b") as f:
        f.truncate(size)
    return open(path, "a", encoding="utf-8")


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information as text
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl (for tests and reports)."""
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
