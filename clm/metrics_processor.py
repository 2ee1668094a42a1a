"""The trainer's metrics processor: what each step and eval reports, and where.

Why a component: the loop's reporting was interleaved with its control flow (a perf window kept
in loop variables, compile counts threaded through it, closures that mutated the progress bar);
here it is one object the trainer hands each finished step and eval to, and the loop reads as
train, eval, save, stop. What it owns:

  perf window    the tokens and seconds since the last logged step; at a log step (every
                 `log_frequency` steps and the last one) tokens/s, TFLOP/s per device and MFU
                 over that window. On a backend with `async_steps` (XLA) a step that does not
                 read its values only launches, and its time lands in the next reading step's:
                 a window, not one step's time, is what measures the throughput.
  MFU            TFLOP/s per device over the device's peak (`clm.metrics.peak_tflops`: known
                 devices, or `peak_tflops_per_device`); absent when neither knows it.
  compile watch  on backends that count compiles (XLA): after warm-up (this process's first 3
                 steps, its first eval) a new compile means a shape or a traced Python value
                 changed, which on a TPU pod costs minutes each time: warn, stop
                 (`TrainingError`) or ignore, by `xla_recompile`. The count is logged as
                 `perf/compiles`.
  progress bar   tqdm on the main process (`progress_bar`), with the latest loss, tokens/s and
                 eval loss.

Sinks: `clm.metrics.MetricsWriter` (metrics.jsonl, TensorBoard, W&B) and the MLPerf log's
`train_loss`. The trainer keeps the counters a checkpoint holds (step, tokens seen, training
seconds); this object holds nothing a resume needs.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from tqdm import tqdm

from clm.backends import Backend
from clm.errors import TrainingError
from clm.metrics import MetricsWriter, peak_tflops
from clm.mlperf import MLPerfLogger

# the first steps of a process that may compile (the AdamW state appears in the first ones)
WARMUP_STEPS = 3


class MetricsProcessor:
    """The step and eval reports of one process; see the module docstring."""

    def __init__(
        self,
        *,
        cfg: DictConfig,
        backend: Backend,
        metrics: MetricsWriter,
        mlperf: MLPerfLogger,
        tokens_per_step: int,
        flops_per_token: float,
    ):
        self.cfg = cfg
        self.backend = backend
        self.metrics = metrics
        self.mlperf = mlperf
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops(backend.device_description(), cfg.peak_tflops_per_device)
        self.steps_done = 0  # in this process: the first WARMUP_STEPS may compile
        self.evals_done = 0  # in this process: the first eval compiles, later ones must not
        self.window_tokens, self.window_seconds = 0, 0.0
        self.postfix: dict[str, str] = {}
        self.bar: tqdm | None = None

    def start(self, step: int) -> None:
        """The loop starts at `step` (a resumed run's): the progress bar from there."""
        self.bar = tqdm(
            total=self.cfg.max_steps,
            initial=step,
            desc="train",
            unit="step",
            disable=not (self.cfg.progress_bar and self.backend.is_main),
            dynamic_ncols=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ---- steps ----------------------------------------------------------------------------
    def step_compiles(self, step: int, before: int | None, values: dict) -> None:
        """After optimizer step `step`: the compile watch (`before`: the count before it), and
        the count into the step's `values` as `perf/compiles`."""
        self.steps_done += 1
        now = self.watch_compiles(f"step {step}", self.steps_done > WARMUP_STEPS, before)
        if now is not None:
            values["perf/compiles"] = now

    def log_step(self, step: int, values: dict, seconds: float, totals: dict) -> None:
        """Optimizer step `step` took `seconds`; at a log step its `values`, the perf window's
        numbers and the run's `totals` (tokens seen, skipped records) are written: one record,
        the MLPerf train loss, the progress bar's line."""
        cfg = self.cfg
        self.window_tokens += self.tokens_per_step
        self.window_seconds += seconds
        if step % cfg.log_frequency == 0 or step == cfg.max_steps:
            values.update(self._perf(self.window_tokens, self.window_seconds))
            values.update(totals)
            self.metrics.log(step, values)
            self.mlperf.train_loss(values["train/loss"], step * cfg.global_train_batch_size)
            self.postfix.update(
                loss=f"{values['train/loss']:.3f}",
                tok_s=f"{values['perf/tokens_per_sec']:.0f}",
            )
            self.bar.set_postfix(self.postfix)
            self.window_tokens, self.window_seconds = 0, 0.0
        self.bar.update(1)

    def _perf(self, tokens: int, seconds: float) -> dict[str, float]:
        tokens_per_sec = tokens / max(seconds, 1e-9)
        per_device = tokens_per_sec / self.backend.world_size
        tflops = per_device * self.flops_per_token / 1e12
        values = {"perf/tokens_per_sec": tokens_per_sec, "perf/tflops_per_device": tflops}
        if self.peak_tflops:
            values["perf/mfu"] = tflops / self.peak_tflops
        return values

    # ---- evals ----------------------------------------------------------------------------
    def eval_compiles(self, step: int, before: int | None) -> None:
        """After the eval at `step`: the compile watch (the first eval of a process compiles)."""
        self.watch_compiles(f"the eval at step {step}", self.evals_done >= 1, before)
        self.evals_done += 1

    def log_eval(self, step: int, loss: float, tokens_seen: int) -> None:
        self.metrics.log(step, {"eval/loss": loss, "train/tokens_seen": tokens_seen})
        self.postfix["eval"] = f"{loss:.3f}"
        self.bar.set_postfix(self.postfix)

    # ---- the compile watch ----------------------------------------------------------------
    def watch_compiles(self, what: str, warm: bool, before: int | None) -> int | None:
        """The compile count now; after warm-up a new compile warns or stops the run.

        A recompile means a shape or a traced Python value changed between steps, which on a
        TPU pod costs minutes each time; `xla_recompile` says what to do about it.
        """
        now = self.backend.compile_count()
        if now is None or before is None or not warm or now == before:
            return now
        message = (
            f"XLA compiled {now - before} new program(s) during {what}, after warm-up: a "
            "tensor shape or a traced Python value changed (xla_recompile=warn|error|ignore)"
        )
        policy = self.backend.recompile_policy
        if policy == "error":
            raise TrainingError(message)
        if policy == "warn" and self.backend.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        return now
