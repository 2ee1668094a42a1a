"""The training lifecycle: build everything in a fixed order, then train until a stop rule.

Order (each step may fail with a one-line error before the next costs anything):
  validate config -> model spec (clm.spec) -> backend (devices) -> derived sizes ->
  memory estimate (clm.memory) ->
  the run directory's lease (clm.lease) -> run directory -> tokenizer -> eval set and train stream (data errors surface here) ->
  model (meta -> device -> init) -> optimizer and schedule -> restore -> W&B (main process,
  optional; never fails the run) -> loop.

The loop: accumulate `gradient_accumulation_steps` micro-batches into one optimizer step,
normalizing by the token count of the whole global batch so the step's loss is the exact
token-mean; clip; step; schedule; evaluate every `eval_frequency` steps; stop at
`target_eval_loss` or `max_steps`.

Batches: every process reads the whole global batch of each step from the same deterministic
stream; `backend.local_rows` keeps the rows this process computes (its data-parallel rank's rows
of each micro-batch with one process per device under torchrun; all of them under XLA SPMD,
where one process per host drives its devices and the backend transfers each host's rows). So
this process runs micro-batches of `per_device_*_batch_size x backend.local_data_parallel_size`
rows.

Host reads: on a backend with `async_steps` (XLA) reading a device value waits for all queued
device work, so the loop reads the logged values back only at the steps that use them (log,
eval, save and the last step; `Trainer.reads_values`) and otherwise only launches the step: the
host prepares step k+1 while the device runs step k. Elsewhere every step reads them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clm import checkpoint, memory, optim, wandb_log
from clm import config as config_lib
from clm import data as data_lib
from clm import lease as lease_lib
from clm import model as model_lib
from clm.backends import Backend, select_backend
from clm.metrics import MetricsWriter, peak_tflops, training_flops_per_token
from clm.mlperf import MLPerfLogger, compliance_path
from clm.spec import ModelSpec, load_spec
from clm.tokenizer import load_tokenizer
from clm.watchdog import Watchdog, collective_timeout

RUN_DIR_OUTPUTS = (
    "metrics.jsonl",
    "tensorboard",
    "config.yaml",
    "mlperf_compliance.log",
    "profile",
    "wandb",
)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where and why."""


class Preempted(RuntimeError):
    """SIGTERM (a preemption on GKE or Slurm) or SIGINT (Ctrl-C) stopped the run after a step;
    `signum` is the signal (run_clm exits with 128 + it)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


# the signals that stop a run after the current step, with a checkpoint when saving is on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Summary:
    status: str  # "target reached" or "max_steps reached"
    steps: int
    tokens: int
    seconds: float
    train_seconds: float
    final_eval_loss: float | None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_at: int = 0  # the step a resumed run started from (0: not resumed)
    final_eval_step: int | None = None  # the step final_eval_loss was measured at

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


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


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        backend: Backend,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        train_stream: data_lib.TrainStream,
        eval_set: data_lib.EvalSet,
        metrics: MetricsWriter,
        mlperf: MLPerfLogger,
        watchdog: Watchdog | None = None,
        *,
        spec: ModelSpec,
    ):
        self.cfg = cfg
        self.backend = backend
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_stream = train_stream
        self.eval_set = eval_set
        self.metrics = metrics
        self.mlperf = mlperf
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.eval_losses: list[tuple[int, float]] = []
        self.data_position: dict | None = None  # the stream's saved position (from a checkpoint)
        self.wandb_run_id: str | None = None  # saved in checkpoints: a resume continues the run
        self.is_moe = spec.moe is not None
        self.aux_coef = spec.aux_loss_coef
        self.tokens_per_step = cfg.global_train_batch_size * cfg.max_length
        _, active = model_lib.count_parameters(model)
        self.flops_per_token = training_flops_per_token(spec, active, cfg.max_length)
        self.peak_tflops = peak_tflops(backend.device_description(), cfg.peak_tflops_per_device)
        self.local_devices = backend.local_data_parallel_size  # devices whose rows we compute
        # processes that each compute their own load-balancing loss on their own rows; their
        # gradients are summed, so each adds 1/aux_groups of its aux loss (the mean over ranks)
        self.aux_groups = backend.data_parallel_size // backend.local_data_parallel_size
        self.evals_done = 0  # in this process: the first eval compiles, later ones must not
        # async_steps: steps since the last read whose loss or gradient norm was not finite
        self.nonfinite_steps = torch.zeros((), dtype=torch.int32, device=backend.device)
        self.checked_step = 0  # the last step whose values were read and checked
        # async_checkpointing: saves written by a background thread (clm.checkpoint.AsyncSaver)
        self.async_saves = config_lib.async_checkpointing(cfg, backend.name)
        self.saver: checkpoint.AsyncSaver | None = None
        # the step of the latest save this process started, and where it goes
        self.saved_step: int | None = None
        self.saved_at: checkpoint.Location | None = None
        # bounds each step, eval and save (clm/watchdog.py); a bare one does nothing
        self.watch = watchdog or Watchdog()

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-mean NLL over the whole eval set: sums across batches, one division."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.backend.device)
        count = torch.zeros((), dtype=torch.int64, device=self.backend.device)
        for batch in self.eval_set.batches(self.cfg.global_eval_batch_size):
            self.eval_step(batch, total, count)
            self.backend.step_boundary()  # XLA: one graph per eval batch, compiled once
        with self.watch.waiting("collective"):
            total = self.backend.all_reduce_sum(total)
            count = self.backend.all_reduce_sum(count)
        self.model.train()
        return float(total / count)

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor], total, count) -> None:
        """Add one global eval batch's NLL sum and target count to `total` and `count`, in place
        (device tensors: nothing is read back)."""
        batch = self.backend.local_rows(batch)  # every process reads the same eval batches
        nll, n, _ = model_lib.forward(self.model, self.backend.to_device(batch), False)
        total += nll.double()
        count += n

    # ---- one optimizer step ---------------------------------------------------------------
    def reads_values(self, step: int) -> bool:
        """Whether optimizer step `step` reads its logged values back from the device.

        Always, unless the backend has `async_steps`; then only at log, eval, save and last
        steps (each of them syncs anyway: eval and save read the device, the log writes values).
        """
        cfg = self.cfg
        return (
            not self.backend.async_steps
            or step % cfg.log_frequency == 0
            or step == cfg.max_steps
            or step % cfg.eval_frequency == 0
            or bool(cfg.save_frequency and step % cfg.save_frequency == 0)
        )

    def train_step(self, batch: dict[str, torch.Tensor], read: bool = True) -> dict[str, float]:
        """One optimizer step on this process's rows of a global batch (host tensors).

        Returns the logged values; with `read=False` only `train/lr`, and nothing waits for the
        device. The non-finite check: with `read` the step's loss and gradient norm, as floats,
        as ever. On an `async_steps` backend each step also adds "loss or norm not finite" to a
        device counter inside its own graph, and a reading step checks that counter too: a
        non-finite step between two reads is caught at the next read, which names the range of
        steps (the price of not syncing every step; log_frequency=1 names the exact step).
        """
        cfg = self.cfg
        micro = cfg.per_device_train_batch_size * self.local_devices
        accum = cfg.gradient_accumulation_steps
        # the step's loss is sum(NLL) / (target tokens in the whole global batch)
        targets = (batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()
        with self.watch.waiting("collective"):
            targets = self.backend.all_reduce_sum(targets.to(self.backend.device)).clamp(min=1)
        nll_total = torch.zeros((), device=self.backend.device)
        aux_total = torch.zeros((), device=self.backend.device)
        for i in range(accum):
            part = self.backend.to_device(
                {k: v[i * micro : (i + 1) * micro] for k, v in batch.items()}
            )
            if i:  # XLA: this micro-batch after the last one's backward, not beside it
                part = self.backend.after_gradients(part, self.model)
            nll, _, aux = model_lib.forward(self.model, part, True)
            loss = nll / targets
            if aux is not None:
                loss = loss + self.aux_coef * aux / (accum * self.aux_groups)
                aux_total += aux.detach() / accum
            loss.backward()
            nll_total += nll.detach()
        max_norm = float(cfg.max_grad_norm) if cfg.max_grad_norm else math.inf
        with self.watch.waiting("collective"):  # the norm's sum over the processes' shards
            grad_norm = self.backend.clip_grad_norm_(self.model, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.backend.async_steps:  # in the step's own graph: the same program every step
            finite = torch.isfinite(nll_total) & torch.isfinite(grad_norm)
            self.nonfinite_steps = self.nonfinite_steps + (~finite).int()
        # XLA: cut the traced graph after the optimizer update, so each step is one program
        self.backend.step_boundary()
        if not read:
            return {"train/lr": lr}
        # the one host<->device sync of the step: read the scalars we log
        with self.watch.waiting("collective"):
            nll_total = self.backend.all_reduce_sum(nll_total)
            if self.is_moe:
                aux_total = self.backend.all_reduce_sum(aux_total) / self.aux_groups
        values = {
            "train/loss": float(nll_total / targets),
            "train/grad_norm": float(grad_norm),
            "train/lr": lr,
        }
        if self.is_moe:
            values["train/aux_loss"] = float(aux_total)
            from clm.moe import moe_metrics

            values.update(moe_metrics(self.model))
        if not math.isfinite(values["train/loss"]) or not math.isfinite(values["train/grad_norm"]):
            raise TrainingError(
                f"non-finite loss or gradient norm at step {self.step + 1}: "
                f"loss={values['train/loss']}, grad_norm={values['train/grad_norm']}"
            )
        if self.backend.async_steps:
            bad = int(self.nonfinite_steps)
            if bad:
                raise TrainingError(
                    f"non-finite loss or gradient norm in {bad} of steps "
                    f"{self.checked_step + 1}..{self.step + 1} (read back every log_frequency "
                    "steps; log_frequency=1 names the step)"
                )
        self.checked_step = self.step + 1
        return values

    # ---- the loop -------------------------------------------------------------------------
    def train(self) -> Summary:
        cfg = self.cfg
        start = time.perf_counter()
        resumed_at = self.step
        target = float(cfg.target_eval_loss)
        status = "max_steps reached"
        # every process reads the whole global batch of each step from the same stream and
        # computes its rows of it (backend.local_rows); a resumed run continues from the saved
        # stream position (or, for a checkpoint without one, replays the blocks the checkpointed
        # steps consumed): no block twice, none skipped
        rows = cfg.global_train_batch_size
        batches = self.train_stream.batches(
            rows, skip_blocks=self.step * rows, position=self.data_position
        )
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (cfg.progress_bar and self.backend.is_main),
            dynamic_ncols=True,
        )
        postfix: dict[str, str] = {}

        def samples() -> int:
            return self.step * cfg.global_train_batch_size

        def run_eval(benchmark: bool = True) -> bool:
            """Evaluate now; True when that reaches the target. `benchmark=False` (the last
            step, off the cadence): the loss goes to metrics and the summary but not to the
            MLPerf log, and never counts as reaching the target."""
            if benchmark:
                self.mlperf.eval_start(samples())
            compiles = self.backend.compile_count()
            self.watch.begin("eval", f"the eval at step {self.step}", self.backend.compute_phase)
            loss = self.evaluate()
            self.watch.end()
            self._watch_compiles(f"the eval at step {self.step}", self.evals_done >= 1, compiles)
            self.evals_done += 1
            self.eval_losses.append((self.step, loss))
            self.metrics.log(self.step, {"eval/loss": loss, "train/tokens_seen": self.tokens_seen})
            postfix["eval"] = f"{loss:.3f}"
            bar.set_postfix(postfix)
            if not benchmark:
                return False
            self.mlperf.eval_stop(samples())
            self.mlperf.eval_accuracy(loss, samples())
            return target > 0 and loss <= target

        # SIGTERM or Ctrl-C: finish the current step, save, and stop (checked between steps); a
        # second Ctrl-C stops at once (KeyboardInterrupt), without saving
        stop_signal: list[int] = []

        def on_signal(signum, _frame) -> None:
            if signum == signal.SIGINT and signal.SIGINT in stop_signal:
                raise KeyboardInterrupt
            stop_signal.append(signum)

        previous_handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        self.backend.barrier()
        self.mlperf.run_start()
        # a step, eval or save that stops making progress ends the process (clm/watchdog.py),
        # after writing the metrics so far and an aborted run_stop
        self.watch.attach(self.metrics, self.mlperf, samples)
        failing = True  # until the loop and the final save are done
        try:
            reached = cfg.do_first_eval and run_eval()
            window_tokens, window_seconds = 0, 0.0
            if not reached:
                self.mlperf.block_start(samples())
            while not reached and self.step < cfg.max_steps:
                self.watch.begin("step", f"step {self.step + 1}", "data")
                batch = self.backend.local_rows(next(batches), cfg.gradient_accumulation_steps)
                self.watch.phase(self.backend.compute_phase)
                compiles = self.backend.compile_count()
                read = self.reads_values(self.step + 1)
                t0 = time.perf_counter()
                with self.backend.profile(self.step + 1):
                    values = self.train_step(batch, read)
                    if read:  # else launched only: the wait lands in the next reading step's dt
                        self.backend.sync()
                dt = time.perf_counter() - t0
                self.step += 1
                # warm-up: the first 3 steps of this process may compile (AdamW state appears)
                compiles = self._watch_compiles(
                    f"step {self.step}", self.step - resumed_at > 3, compiles
                )
                if compiles is not None:
                    values["perf/compiles"] = compiles
                self.tokens_seen += self.tokens_per_step
                self.train_seconds += dt
                window_tokens += self.tokens_per_step
                window_seconds += dt
                if self.step % cfg.log_frequency == 0 or self.step == cfg.max_steps:
                    values.update(self._perf(window_tokens, window_seconds))
                    values["train/tokens_seen"] = self.tokens_seen
                    if self.train_stream.skip_bad_records:
                        values["data/skipped_records"] = self.train_stream.skipped_records
                    self.metrics.log(self.step, values)
                    self.mlperf.train_loss(values["train/loss"], samples())
                    postfix.update(
                        loss=f"{values['train/loss']:.3f}",
                        tok_s=f"{values['perf/tokens_per_sec']:.0f}",
                    )
                    bar.set_postfix(postfix)
                    window_tokens, window_seconds = 0, 0.0
                bar.update(1)
                self.watch.end()
                # MLPerf evals only at the cadence (an off-cadence eval would not count); the
                # last step is evaluated too, for metrics and the summary only (docs/MLPERF.md)
                if self.step % cfg.eval_frequency == 0:
                    self.mlperf.block_stop(samples())
                    reached = run_eval()
                    if not reached and self.step < cfg.max_steps:
                        self.mlperf.block_start(samples())
                elif self.step == cfg.max_steps:
                    run_eval(benchmark=False)
                # the last step's checkpoint is the final save below: written once, not twice
                last = reached or self.step >= cfg.max_steps
                if cfg.save_frequency and self.step % cfg.save_frequency == 0 and not last:
                    self.save_checkpoint(finished=False)
                # a signal may reach the processes between different steps: stop all together
                self.watch.begin(
                    "step", f"the stop-signal check after step {self.step}", "collective", False
                )
                stopping = self.backend.any_process(bool(stop_signal))
                self.watch.end()
                if stopping and not reached:
                    signum = stop_signal[0] if stop_signal else signal.SIGTERM  # another rank's
                    raise Preempted(self._preempted_message(signum), signum)
            if cfg.save_frequency:  # committed before the run ends, also when async
                self.save_checkpoint(finished=True, wait=True)
            failing = False
            if reached:
                self.watch.begin("save", f"the barrier after step {self.step}", "collective", False)
                self.backend.barrier()
                self.watch.end()
                self.mlperf.run_stop("success", samples())
        except KeyboardInterrupt:  # the second Ctrl-C
            raise Preempted(
                f"SIGINT twice: stopped at once after step {self.step}, without saving; rerun "
                "the same command to resume from the latest checkpoint",
                signal.SIGINT,
            ) from None
        except Exception as error:
            # a collective that failed (a peer is gone): one line naming it, exit 1
            self.watch.on_error(error)
            raise
        finally:
            self.watch.idle()  # what follows an error is not a step, eval or save
            if self.saver is not None:  # an error on its way out: a save in flight ends first
                self.saver.finish(failing)
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            # max_steps without the target, or any exception: the run is aborted
            self.mlperf.run_stop("aborted", samples())
            bar.close()
        if reached:
            status = "target reached"
        return Summary(
            status=status,
            steps=self.step,
            tokens=self.tokens_seen,
            seconds=time.perf_counter() - start,
            train_seconds=self.train_seconds,
            final_eval_loss=self.eval_losses[-1][1] if self.eval_losses else None,
            eval_losses=list(self.eval_losses),
            resumed_at=resumed_at,
            final_eval_step=self.eval_losses[-1][0] if self.eval_losses else None,
        )

    def _preempted_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if not self.cfg.save_frequency:
            return f"{name}: stopped after step {self.step} without a checkpoint (save_frequency=0)"
        if self.saved_step == self.step:  # this step's periodic save: only wait for its commit
            self.watch.begin("save", f"the save at step {self.step}", "checkpoint", False)
            saved = self.saver.wait() if self.saver is not None else self.saved_at
            self.watch.end()
        else:
            saved = self.save_checkpoint(finished=False, wait=True)
        return f"{name}: stopped after step {self.step}; saved {saved}; rerun the same command to resume"

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self, finished: bool) -> dict:
        """Everything besides model and optimizer that an exact resume needs."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "eval_losses": [[step, loss] for step, loss in self.eval_losses],
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "data": self.train_stream.state_dict(),  # the stream's position (data.TrainStream)
            "finished": finished,
            "wandb_run_id": self.wandb_run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.eval_losses = [(int(step), float(loss)) for step, loss in state["eval_losses"]]
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.data_position = state.get("data")  # None: an older checkpoint, replayed instead
        self.wandb_run_id = state.get("wandb_run_id")

    def save_checkpoint(self, finished: bool, wait: bool = False) -> checkpoint.Location:
        """Save this step; returns its directory. Synchronous, or with `async_saves` staged to
        host memory here and written by the saver's thread (committed on return with `wait`;
        otherwise the next save, or the end of the run, waits for it and raises its error)."""
        self.watch.begin("save", f"the save at step {self.step}", "checkpoint")
        self.metrics.sync()  # the records up to this step are on disk before it commits
        args = (checkpoint.location(self.cfg.save_dir), self.step, self.model, self.optimizer)
        args += (self.state_dict(finished),)
        kwargs = {"keep_last_n": int(self.cfg.keep_last_n), "is_main": self.backend.is_main}
        self.saved_step = self.step
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

    def _watch_compiles(self, what: str, warm: bool, before: int | None) -> int | None:
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
        policy = self.cfg.get("xla_recompile", "warn")
        if policy == "error":
            raise TrainingError(message)
        if policy == "warn" and self.backend.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        return now

    def _perf(self, tokens: int, seconds: float) -> dict[str, float]:
        tokens_per_sec = tokens / max(seconds, 1e-9)
        per_device = tokens_per_sec / self.backend.world_size
        tflops = per_device * self.flops_per_token / 1e12
        values = {"perf/tokens_per_sec": tokens_per_sec, "perf/tflops_per_device": tflops}
        if self.peak_tflops:
            values["perf/mfu"] = tflops / self.peak_tflops
        return values


def describe(summary: Summary, cfg: DictConfig, run_dir: Path) -> str:
    """The closing paragraph a person reads; the eval loss names its step (a resumed run's may
    come from before the resume), and whether it was an MLPerf eval (on the cadence)."""
    loss = "no eval"
    if summary.final_eval_loss is not None:
        step = summary.final_eval_step
        loss = f"{summary.final_eval_loss:.4f} (step {step}"
        if step % cfg.eval_frequency:
            loss += f", off the {cfg.eval_frequency}-step eval cadence: not an MLPerf eval"
        loss += ")"
    outcome = (
        f"Target eval loss {cfg.target_eval_loss} reached"
        if summary.status == "target reached"
        else f"Stopped at max_steps={cfg.max_steps}"
        + (f" without reaching target {cfg.target_eval_loss}" if cfg.target_eval_loss else "")
    )
    resumed = f" (resumed at step {summary.resumed_at})" if summary.resumed_at else ""
    return (
        f"{outcome}: {summary.steps} steps, {summary.tokens:,} tokens, {summary.seconds:.0f} s "
        f"in this process{resumed} ({summary.tokens_per_sec:,.0f} tokens/s while training), "
        f"final eval loss {loss}. Outputs in {run_dir}: config.yaml, metrics.jsonl, "
        "tensorboard/, mlperf_compliance.log"
        + (f", checkpoints in {cfg.save_dir}." if cfg.save_frequency else ".")
    )


def build_train_stream(cfg: DictConfig, tokenizer) -> data_lib.TrainStream:
    """The deterministic stream of packed training blocks the config asks for."""
    first, last = cfg.dataset.train_shards
    return data_lib.TrainStream(
        files=data_lib.train_files(cfg.dataset.train_dataset_path, first, last),
        tokenizer=tokenizer,
        max_length=cfg.max_length,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        streaming=cfg.dataset.streaming,
        shuffle_buffer_size=cfg.dataset.shuffle_buffer_size,
        skip_bad_records=cfg.dataset.skip_bad_records,
    )


def build_eval_set(cfg: DictConfig, tokenizer) -> data_lib.EvalSet:
    """The packed, padded eval set a finalized config asks for."""
    return data_lib.load_eval_set(
        data_lib.find_file(cfg.dataset.eval_dataset_path, data_lib.VALIDATION_FILE),
        tokenizer,
        cfg.max_length,
        cfg.global_eval_batch_size,
        cfg.pad_token_id,
        cfg.n_eval_examples,
    )


def run(cfg: DictConfig) -> Summary:
    """Build every component in order, then train. Returns the summary."""
    config_lib.validate(cfg)
    spec = load_spec(cfg.model, cfg.max_length)  # the model JSON, read and checked once
    backend = select_backend(cfg)
    # heartbeats from here on; the training loop's steps, evals and saves are bounded
    watch = Watchdog.for_run(cfg, backend)
    try:
        return _run(cfg, backend, watch, spec)
    except Exception as error:  # a collective that failed outside the loop: one line, exit 1
        watch.on_error(error, "start-up or shutdown")
        raise
    finally:
        watch.stop()


def _run(cfg: DictConfig, backend: Backend, watch: Watchdog, spec: ModelSpec) -> Summary:
    """run() once the backend (and its process group) exists."""
    config_lib.finalize(cfg, backend.data_parallel_size)
    memory.check(cfg, backend, spec)  # before anything is written or built
    # one run per run directory (clm.lease): taken before prepare_run_dir looks at the files,
    # held until the run ends however it ends; while another run holds it: exit 2 naming it
    with lease_lib.hold(cfg, backend):
        return _run_leased(cfg, backend, watch, spec)


def _run_leased(cfg: DictConfig, backend: Backend, watch: Watchdog, spec: ModelSpec) -> Summary:
    """run()'s work once the run directory is this run's."""
    run_dir, resume_from, resume_step = prepare_run_dir(cfg, backend)
    if backend.is_main:
        OmegaConf.save(OmegaConf.create(config_lib.redacted(cfg)), run_dir / "config.yaml")
    mlperf = MLPerfLogger(cfg, compliance_path(run_dir), enabled=backend.is_main)
    mlperf.init_start()
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.dataset.tokenizer_sha256)
    eval_set = build_eval_set(cfg, tokenizer)
    train_stream = build_train_stream(cfg, tokenizer)

    if cfg.model.config_path and cfg.model.name_or_path and backend.is_main:
        print(
            f"model.config_path={cfg.model.config_path} sets the architecture (random init); "
            f"model.name_or_path={cfg.model.name_or_path} only names the tokenizer "
            "(set model.config_path=null to load its weights)",
            flush=True,
        )
    if backend.shards_meta_model:
        model = model_lib.build_sharded_model(spec, backend.device, cfg.seed, backend.wrap_model)
    else:
        place, region = None, None
        if backend.places_weights:
            place, region = backend.place, backend.region
        model = model_lib.build_model(spec, backend.init_device, cfg.seed, place, region)
        model = backend.wrap_model(model)
    _check_vocab(cfg, model, tokenizer)
    optimizer = optim.build_optimizer(
        model, cfg, backend.device, backend.optimizer_class(cfg.optimizer)
    )
    scheduler = optim.build_scheduler(optimizer, cfg.sched, float(cfg.lr))
    # a resumed run hides TensorBoard's events after its checkpoint (metrics.jsonl's were
    # dropped by prepare_run_dir): each step is written again, once
    purge = resume_step + 1 if resume_from is not None else None
    metrics = MetricsWriter(run_dir, enabled=backend.is_main, purge_step=purge)
    total, active = model_lib.count_parameters(model)
    if backend.is_main:
        print(
            f"model: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active), "
            f"{cfg.model.dtype} on {backend.device_description()}; global batch "
            f"{cfg.global_train_batch_size} x {cfg.max_length} tokens; eval every "
            f"{cfg.eval_frequency} steps on {eval_set.num_documents} documents "
            f"({eval_set.num_target_tokens:,} tokens); tokenizer {tokenizer.path}",
            flush=True,
        )
    mlperf.log_hparams(
        cfg,
        spec,
        eval_samples=eval_set.num_real_rows,
        train_samples=None,
        warmup_steps=config_lib.warmup_steps(cfg.sched),
        parallelism=backend.parallelism,
    )
    trainer = Trainer(
        cfg,
        backend,
        model,
        optimizer,
        scheduler,
        train_stream,
        eval_set,
        metrics,
        mlperf,
        watch,
        spec=spec,
    )
    _restore(cfg, trainer, resume_from)
    exit_code = 1  # what W&B records if the run ends with an exception
    try:
        if backend.is_main and wandb_log.enabled(cfg):  # in the MLPerf init phase, not timed
            resumed = resume_from is not None
            metrics.wandb = wandb_log.WandbRun(cfg, run_dir, trainer.wandb_run_id, resumed)
            trainer.wandb_run_id = metrics.wandb.id  # kept even if W&B failed: a resume tries it
        mlperf.init_stop()
        summary = trainer.train()
        exit_code = 0
    except Preempted:
        exit_code = 143
        raise
    finally:
        metrics.close(exit_code)
        mlperf.close()
        backend.close()
    if backend.is_main:
        print(describe(summary, cfg, run_dir), flush=True)
    return summary


def _restore(cfg: DictConfig, trainer: Trainer, resume_from: checkpoint.Location | None) -> None:
    """Resume an interrupted run, or start from `checkpoint_manager_path` when given.

    Either may be a local path or an fsspec URL (gs:// with the 'gcs' extra).
    """
    source = resume_from
    if source is None and cfg.checkpoint_manager_path:
        path = checkpoint.location(cfg.checkpoint_manager_path)
        source = checkpoint.latest(path) or path  # a save_dir or one checkpoint
    if source is None:
        return
    state = checkpoint.restore(
        source, trainer.model, trainer.optimizer, **trainer.backend.checkpoint_options(load=True)
    )
    if state:
        trainer.load_state_dict(state)
    if resume_from is None:  # started from another run's checkpoint: a W&B run of its own
        trainer.wandb_run_id = None
    if trainer.backend.is_main:
        print(f"restored {source} (step {trainer.step})", flush=True)
        if state:
            print(f"data stream: {data_lib.describe_position(trainer.data_position)}", flush=True)


def _check_vocab(cfg: DictConfig, model: torch.nn.Module, tokenizer) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise config_lib.ConfigError(
            f"model vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tokenizer.path})"
        )
    if not 0 <= cfg.pad_token_id < vocab:
        raise config_lib.ConfigError(f"pad_token_id={cfg.pad_token_id}: must be in [0, {vocab})")
