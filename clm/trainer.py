"""The training lifecycle: build everything in a fixed order, then train until a stop rule.

Build order (`run`; each step may fail with a one-line error before the next costs anything):
  1. validate config -> model spec (clm.spec) -> backend (devices) -> the step watchdog
     (clm.watchdog) -> derived sizes -> memory estimate (clm.memory)
  2. the run directory's lease (clm.lease) -> run directory (clm.checkpointer.prepare_run_dir)
     -> config.yaml, MLPerf init
  3. tokenizer -> eval set and train stream (data errors surface here)
  4. model (`backend.build_model`: meta -> shard -> fill, each backend its way) -> optimizer
     and schedule -> metrics writer
  5. the Trainer, which builds its components in this order: the checkpointer
     (clm.checkpointer: save cadence, async saver, stop signals, resume), then the metrics
     processor (clm.metrics_processor: perf window, compile watch, MFU, progress bar)
  6. restore (`Trainer.restore`) -> W&B (main process, optional; never fails the run) -> the loop
     (`Trainer.train`).
Tests build a Trainer directly, with keyword arguments (`Trainer(cfg=..., backend=..., ...)`),
and drive `train_step`, `evaluate` or the whole `train` in process.

The loop (`Trainer.train`), each iteration in this order: one optimizer step (its record through
the metrics processor), the eval if due (every `eval_frequency` steps, and the last), the save if
due (the checkpointer), the stop-signal check; it stops at `target_eval_loss` or `max_steps`, or
raises `Preempted` after a stop signal. The step (`Trainer.train_step`): accumulate
`gradient_accumulation_steps` micro-batches, normalizing by the token count of the whole global
batch so the step's loss is the exact token-mean; clip; step; schedule.

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

Why this module is long: `run()`'s build order (one function per stage, in the order above) sits
beside the `Trainer` it ends in, so the order reads in one file; the checkpoint policy and the
reports are components of their own (clm/checkpointer.py, clm/metrics_processor.py), the model
build the backend's.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clm import checkpoint, memory, optim, wandb_log
from clm import config as config_lib
from clm import data as data_lib
from clm import lease as lease_lib
from clm import model as model_lib
from clm.backends import Backend, select_backend
from clm.checkpointer import Checkpointer, prepare_run_dir
from clm.errors import Preempted, TrainingError
from clm.metrics import MetricsWriter, training_flops_per_token
from clm.metrics_processor import MetricsProcessor
from clm.mlperf import MLPerfLogger, compliance_path
from clm.spec import ModelSpec, load_spec
from clm.tokenizer import load_tokenizer
from clm.watchdog import Watchdog


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


class Trainer:
    """One run's training state and loop; see the module docstring for the build order."""

    def __init__(
        self,
        *,
        cfg: DictConfig,
        backend: Backend,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        train_stream: data_lib.TrainStream | None = None,
        eval_set: data_lib.EvalSet | None = None,
        metrics: MetricsWriter | None = None,
        mlperf: MLPerfLogger | None = None,
        watchdog: Watchdog | None = None,
        spec: ModelSpec,
    ):
        """`train_step` needs the first five and `spec`; `evaluate` also `eval_set`, `train` also
        `train_stream`. Without `metrics`, `mlperf` or `watchdog` nothing is written to
        metrics.jsonl or the MLPerf log and nothing is bounded (what tests and tools want)."""
        self.cfg = cfg
        self.backend = backend
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_stream = train_stream
        self.eval_set = eval_set
        self.metrics = MetricsWriter(None, enabled=False) if metrics is None else metrics
        self.mlperf = MLPerfLogger(cfg, None, enabled=False) if mlperf is None else mlperf
        # bounds each step, eval and save (clm/watchdog.py); a bare one does nothing
        self.watch = watchdog or Watchdog()
        # what a checkpoint holds besides model and optimizer (state_dict)
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
        self.local_devices = backend.local_data_parallel_size  # devices whose rows we compute
        # processes that each compute their own load-balancing loss on their own rows; their
        # gradients are summed, so each adds 1/aux_groups of its aux loss (the mean over ranks)
        self.aux_groups = backend.data_parallel_size // backend.local_data_parallel_size
        # async_steps: steps since the last read whose loss or gradient norm was not finite
        self.nonfinite_steps = torch.zeros((), dtype=torch.int32, device=backend.device)
        self.checked_step = 0  # the last step whose values were read and checked
        # the components, in this order, each built from what is set above it: the checkpointer
        # (saves, stop signals, resume), then the metrics processor (perf window, compile
        # watch, MFU, progress bar)
        self.checkpointer = Checkpointer(
            cfg=cfg,
            backend=backend,
            model=model,
            optimizer=optimizer,
            train_state=self.state_dict,
            metrics=self.metrics,
            watch=self.watch,
        )
        self.metrics_processor = MetricsProcessor(
            cfg=cfg,
            backend=backend,
            metrics=self.metrics,
            mlperf=self.mlperf,
            tokens_per_step=self.tokens_per_step,
            flops_per_token=self.flops_per_token,
        )

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
            or self.checkpointer.is_save_step(step)
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
        """Train until the target eval loss or `max_steps` (or a stop signal: `Preempted`).

        Every process reads the whole global batch of each step from the same stream and
        computes its rows of it (backend.local_rows); a resumed run continues from the saved
        stream position (or, for a checkpoint without one, replays the blocks the checkpointed
        steps consumed): no block twice, none skipped.
        """
        cfg, start, resumed_at = self.cfg, time.perf_counter(), self.step
        rows = cfg.global_train_batch_size
        batches = self.train_stream.batches(
            rows, skip_blocks=self.step * rows, position=self.data_position
        )
        self.metrics_processor.start(self.step)  # the progress bar
        self.checkpointer.listen()  # SIGTERM or Ctrl-C: stop after the step, saved
        self.backend.barrier()
        self.mlperf.run_start()
        # a step, eval or save that stops making progress ends the process (clm/watchdog.py),
        # after writing the metrics so far and an aborted run_stop
        self.watch.attach(self.metrics, self.mlperf, self.samples)
        failing, reached = True, False  # failing: until the loop and the final save are done
        try:
            reached = cfg.do_first_eval and self._eval()
            if not reached:
                self.mlperf.block_start(self.samples())
            while not reached and self.step < cfg.max_steps:
                self._step(batches)
                reached = self._eval_if_due()
                # the last step's checkpoint is the final save below: written once, not twice
                self.checkpointer.save_if_due(self.step, reached or self.step >= cfg.max_steps)
                self.checkpointer.stop_if_signalled(self.step, reached)
            self.checkpointer.save_final(self.step)
            failing = False
            if reached:
                self._stop_at_target()
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
            self.checkpointer.finish(failing)  # a save in flight ends first; handlers back
            # max_steps without the target, or any exception: the run is aborted
            self.mlperf.run_stop("aborted", self.samples())
            self.metrics_processor.close()
        return self._summary(
            "target reached" if reached else "max_steps reached", start, resumed_at
        )

    def samples(self) -> int:
        """MLPerf's samples_count: the sequences trained on so far."""
        return self.step * self.cfg.global_train_batch_size

    def _step(self, batches) -> None:
        """One optimizer step of the loop, watched from reading its batch to its record."""
        self.watch.begin("step", f"step {self.step + 1}", "data")
        batch = self.backend.local_rows(next(batches), self.cfg.gradient_accumulation_steps)
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
        self.metrics_processor.step_compiles(self.step, compiles, values)
        self.tokens_seen += self.tokens_per_step
        self.train_seconds += dt
        totals = {"train/tokens_seen": self.tokens_seen}
        if self.train_stream.skip_bad_records:
            totals["data/skipped_records"] = self.train_stream.skipped_records
        self.metrics_processor.log_step(self.step, values, dt, totals)
        self.watch.end()

    def _eval_if_due(self) -> bool:
        """MLPerf evals only at the cadence (an off-cadence eval would not count), each closing
        a block; the last step is evaluated too, for metrics and the summary only
        (docs/MLPERF.md). True when the target is reached."""
        if self.step % self.cfg.eval_frequency == 0:
            self.mlperf.block_stop(self.samples())
            reached = self._eval()
            if not reached and self.step < self.cfg.max_steps:
                self.mlperf.block_start(self.samples())
            return reached
        if self.step == self.cfg.max_steps:
            self._eval(benchmark=False)
        return False

    def _eval(self, benchmark: bool = True) -> bool:
        """Evaluate now; True when that reaches the target. `benchmark=False` (the last step,
        off the cadence): the loss goes to metrics and the summary but not to the MLPerf log,
        and never counts as reaching the target."""
        if benchmark:
            self.mlperf.eval_start(self.samples())
        compiles = self.backend.compile_count()
        self.watch.begin("eval", f"the eval at step {self.step}", self.backend.compute_phase)
        loss = self.evaluate()
        self.watch.end()
        self.metrics_processor.eval_compiles(self.step, compiles)
        self.eval_losses.append((self.step, loss))
        self.metrics_processor.log_eval(self.step, loss, self.tokens_seen)
        if not benchmark:
            return False
        self.mlperf.eval_stop(self.samples())
        self.mlperf.eval_accuracy(loss, self.samples())
        target = float(self.cfg.target_eval_loss)
        return target > 0 and loss <= target

    def _stop_at_target(self) -> None:
        """The target reached and the final save committed: every process here, then MLPerf's
        run_stop with success."""
        self.watch.begin("save", f"the barrier after step {self.step}", "collective", False)
        self.backend.barrier()
        self.watch.end()
        self.mlperf.run_stop("success", self.samples())

    def _summary(self, status: str, start: float, resumed_at: int) -> Summary:
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

    def restore(self, resume_from: checkpoint.Location | None = None) -> None:
        """Resume an interrupted run (`resume_from`: prepare_run_dir's), or start from
        `checkpoint_manager_path` when given (clm.checkpointer.Checkpointer.load)."""
        loaded = self.checkpointer.load(resume_from)
        if loaded is None:
            return
        source, state = loaded
        if state:
            self.load_state_dict(state)
        if resume_from is None:  # started from another run's checkpoint: a W&B run of its own
            self.wandb_run_id = None
        if self.backend.is_main:
            print(f"restored {source} (step {self.step})", flush=True)
            if state:
                print(f"data stream: {data_lib.describe_position(self.data_position)}", flush=True)


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
    with lease_lib.hold(cfg, backend) as release_leases:
        watch.before_exit(release_leases)  # a stuck run's exit frees its run directory too
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
    model = backend.build_model(spec, cfg.seed)  # meta -> shard -> fill, each backend its way
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
        cfg=cfg,
        backend=backend,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_stream=train_stream,
        eval_set=eval_set,
        metrics=metrics,
        mlperf=mlperf,
        watchdog=watch,
        spec=spec,
    )
    trainer.restore(resume_from)
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


def _check_vocab(cfg: DictConfig, model: torch.nn.Module, tokenizer) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise config_lib.ConfigError(
            f"model vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tokenizer.path})"
        )
    if not 0 <= cfg.pad_token_id < vocab:
        raise config_lib.ConfigError(f"pad_token_id={cfg.pad_token_id}: must be in [0, {vocab})")
