"""The trainer's checkpointer: when a run saves, how, what a stop signal saves, what a run
resumes from, and what its run directory may hold.

Why a component: these rules decide together whether a run can be stopped at any moment and
rerun with the same command without losing or repeating a step, and they were spread through
the training loop (a cadence test beside the evals, signal handlers and the background saver in
the loop's `finally`, the restore beside `run`). `clm.checkpoint` is the storage underneath
(layout, atomic commit, DCP, the `AsyncSaver` thread); this module is the policy on top, and
the trainer calls it at fixed points:

  run directory  `prepare_run_dir`, before anything is written: resume an unfinished run, refuse
                 (or, with overwrite_output_dir, clear) a finished one.
  resume         `Checkpointer.load`, once the model and optimizer exist: the run's own latest
                 checkpoint, else `checkpoint_manager_path`.
  stop signals   `listen` before the loop: SIGTERM (a preemption on GKE or Slurm) or Ctrl-C is
                 noted and acted on between steps, never inside one (`StopSignals`).
  each step      `save_if_due` (every `save_frequency` steps, except the last, whose save is the
                 final one: written once, not twice), then `stop_if_signalled` (all processes
                 agree; the step is saved, or its periodic save's commit waited for, then
                 `Preempted`).
  the end        `save_final` (committed before the run ends, also when async), and however the
                 loop ended `finish`: a save in flight ends first, the signal handlers go back.

Async saves (`async_checkpointing`, auto = on XLA only): the state is staged to host memory on
the training thread and written by `clm.checkpoint.AsyncSaver`'s thread; one save in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from clm import checkpoint
from clm import config as config_lib
from clm import lease as lease_lib
from clm.backends import Backend
from clm.errors import Preempted
from clm.metrics import MetricsWriter
from clm.watchdog import Watchdog, collective_timeout

RUN_DIR_OUTPUTS = (
    "metrics.jsonl",
    "tensorboard",
    "config.yaml",
    "mlperf_compliance.log",
    "profile",
    "wandb",
)

# the signals that stop a run after the current step, with a checkpoint when saving is on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def prepare_run_dir(cfg: DictConfig, backend: Backend) -> tuple[Path, Path | None, int]:
    """Create the run directory; returns it, the checkpoint to resume from (if any) and its step.

    An unfinished run with a committed checkpoint in `save_dir` is resumed (`auto_resume`): its
    metrics after that checkpoint are dropped (the resumed run writes them again, identically),
    its MLPerf log is kept aside and its `wandb/` kept (clm.wandb_log reads what W&B holds).
    Otherwise a directory that already holds a run (a metrics record, or a finished run's
    checkpoints) is refused unless `overwrite_output_dir=true`, which deletes that run's logs
    and checkpoints first. A run stopped before it logged a step (an empty metrics.jsonl, no
    checkpoint) holds nothing to keep: its files are replaced.

    With several processes every one decides from the same files, then (after a barrier) only
    the main one changes them, and the others wait for it. run() calls it holding the run's
    lease (clm.lease), so no other live run uses these files.
    """
    run_dir = Path(cfg.run_dir)
    save_dir = checkpoint.location(cfg.save_dir)  # a local path or an fsspec URL (gs://)
    last = checkpoint.latest(save_dir) if cfg.auto_resume else None
    state = checkpoint.read_trainer_state(last) if last is not None else {}
    resume = last is not None and not state.get("finished", False)
    metrics = run_dir / "metrics.jsonl"
    logged = metrics.exists() and any(line.strip() for line in metrics.open(encoding="utf-8"))
    clear = not resume and (logged or last is not None)
    empty = not resume and not clear and metrics.exists()  # stopped before its first record
    if clear and not cfg.overwrite_output_dir:
        raise config_lib.ConfigError(
            f"run_dir={run_dir} already holds a run (metrics.jsonl); choose another "
            "exp_name or pass overwrite_output_dir=true"
        )
    backend.barrier()  # every process has looked before the main one changes anything
    step = int(state.get("step", 0)) if resume else 0
    if backend.is_main:
        _apply_run_dir_decision(run_dir, save_dir, step, resume, clear, empty)
    backend.barrier()
    return run_dir, last if resume else None, step


def _apply_run_dir_decision(
    run_dir: Path,
    save_dir: checkpoint.Location,
    step: int,
    resume: bool,
    clear: bool,
    empty: bool = False,
) -> None:
    """prepare_run_dir's changes to the files (the main process only)."""
    if resume:
        _drop_metrics_after(run_dir / "metrics.jsonl", step)
        log = run_dir / "mlperf_compliance.log"
        if log.exists():
            os.replace(log, log.with_name(f"{log.name}.before-resume-at-step-{step}"))
        return
    if clear or empty:
        for name in RUN_DIR_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if clear:  # the lease stays: this run holds it (a save_dir elsewhere has its own)
        checkpoint.remove_tree(save_dir, keep=(lease_lib.LEASE_NAME,))
    run_dir.mkdir(parents=True, exist_ok=True)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep the records up to `step` (atomically: a crash here loses nothing)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(True) if json.loads(line)["step"] <= step]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


class StopSignals:
    """SIGTERM and SIGINT noted by a handler and acted on between steps: a handler may run in
    the middle of a step or a collective, where nothing can be saved. A second SIGINT raises
    KeyboardInterrupt at once (stop now, without saving)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict = {}

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def restore(self) -> None:
        """The handlers from before `install` (nothing if it was not called)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)


class Checkpointer:
    """Saves, the stop signals and the resume of one run; see the module docstring."""

    def __init__(
        self,
        *,
        cfg: DictConfig,
        backend: Backend,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: Callable[[bool], dict],
        metrics: MetricsWriter,
        watch: Watchdog,
    ):
        """`train_state(finished)`: everything besides model and optimizer that an exact resume
        needs (the trainer's state_dict); `metrics` is made durable before each save commits; `watch`
        bounds each save (clm/watchdog.py)."""
        self.cfg = cfg
        self.backend = backend
        self.model = model
        self.optimizer = optimizer
        self.train_state = train_state
        self.metrics = metrics
        self.watch = watch
        self.frequency = int(cfg.save_frequency or 0)  # 0: no saves at all
        self.signals = StopSignals()
        # async_checkpointing: saves written by a background thread (clm.checkpoint.AsyncSaver)
        value = cfg.get("async_checkpointing", "auto")
        self.async_saves = backend.async_saves_by_default if value == "auto" else bool(value)
        self.saver: checkpoint.AsyncSaver | None = None
        # the step of the latest save this process started, and where it goes
        self.saved_step: int | None = None
        self.saved_at: checkpoint.Location | None = None

    # ---- resume ---------------------------------------------------------------------------
    def load(
        self, resume_from: checkpoint.Location | None
    ) -> tuple[checkpoint.Location, dict] | None:
        """Load model and optimizer from `resume_from` (an interrupted run's latest checkpoint,
        from prepare_run_dir), else from `checkpoint_manager_path` (a save_dir: its latest, or
        one checkpoint); returns where from and the trainer state it holds ({}: none), or None
        when there is nothing to load. Either may be a local path or an fsspec URL (gs:// with
        the 'gcs' extra)."""
        source = resume_from
        if source is None and self.cfg.checkpoint_manager_path:
            path = checkpoint.location(self.cfg.checkpoint_manager_path)
            source = checkpoint.latest(path) or path  # a save_dir or one checkpoint
        if source is None:
            return None
        options = self.backend.checkpoint_options(load=True)
        return source, checkpoint.restore(source, self.model, self.optimizer, **options)

    # ---- saves ----------------------------------------------------------------------------
    def is_save_step(self, step: int) -> bool:
        """Whether `step` is on the save cadence."""
        return bool(self.frequency and step % self.frequency == 0)

    def save_if_due(self, step: int, last: bool) -> None:
        """The periodic save of `step`; not on the `last` step, whose save is `save_final`."""
        if self.is_save_step(step) and not last:
            self.save(step, finished=False)

    def save_final(self, step: int) -> None:
        """The run's last save (with saving on), committed before the run ends, also when
        async; marked finished, so a rerun starts afresh instead of resuming it."""
        if self.frequency:
            self.save(step, finished=True, wait=True)

    def save(self, step: int, finished: bool, wait: bool = False) -> checkpoint.Location:
        """Save `step`; returns its directory. Synchronous, or with `async_saves` staged to host
        memory here and written by the saver's thread (committed on return with `wait`;
        otherwise the next save, or the end of the run, waits for it and raises its error)."""
        self.watch.begin("save", f"the save at step {step}", "checkpoint")
        self.metrics.sync()  # the records up to this step are on disk before it commits
        args = (checkpoint.location(self.cfg.save_dir), step, self.model, self.optimizer)
        args += (self.train_state(finished),)
        kwargs = {"keep_last_n": int(self.cfg.keep_last_n), "is_main": self.backend.is_main}
        self.saved_step = step
        if not self.async_saves:
            options = self.backend.checkpoint_options(load=False)
            self.saved_at = checkpoint.save(*args, **kwargs, **options)
            self.watch.end()
            return self.saved_at
        if self.saver is None:  # on every process at the same save (it creates a gloo group)
            self.saver = checkpoint.AsyncSaver(collective_timeout(self.cfg))
        self.saved_at = self.saver.save(*args, **kwargs, stage=self.backend.stage_checkpoint)
        saved = self.saver.wait() if wait else self.saved_at
        self.watch.end()
        return saved

    # ---- stop signals ---------------------------------------------------------------------
    def listen(self) -> None:
        """From now until `finish`, SIGTERM or Ctrl-C stops the run after the current step."""
        self.signals.install()

    def stop_if_signalled(self, step: int, reached: bool) -> None:
        """After `step`: raise `Preempted` once any process got a stop signal (a signal may
        reach the processes between different steps: they stop together), with `step` saved.
        A run that has just `reached` its target ends normally instead."""
        self.watch.begin("step", f"the stop-signal check after step {step}", "collective", False)
        stopping = self.backend.any_process(bool(self.signals.received))
        self.watch.end()
        if stopping and not reached:
            received = self.signals.received
            signum = received[0] if received else signal.SIGTERM  # another rank's
            raise Preempted(self._stop_message(step, signum), signum)

    def _stop_message(self, step: int, signum: int) -> str:
        name = signal.Signals(signum).name
        if not self.frequency:
            return f"{name}: stopped after step {step} without a checkpoint (save_frequency=0)"
        if self.saved_step == step:  # this step's periodic save: only wait for its commit
            self.watch.begin("save", f"the save at step {step}", "checkpoint", False)
            saved = self.saver.wait() if self.saver is not None else self.saved_at
            self.watch.end()
        else:
            saved = self.save(step, finished=False, wait=True)
        return f"{name}: stopped after step {step}; saved {saved}; rerun the same command to resume"

    def finish(self, failing: bool) -> None:
        """However the loop ended: a save in flight ends first (`failing`: the run is ending
        with an error), then the signal handlers from before `listen` are back."""
        if self.saver is not None:
            self.saver.finish(failing)
        self.signals.restore()
