"""MLPerf events of a Megatron-Bridge run: the same MLLOG lines, in the same order, as clm.trainer.

`MLPerfEvents` is the run's logic on plain numbers (step, loss) over `clm.mlperf.MLPerfLogger`,
so the lifecycle is tested without NeMo and the log passes the same checker rules.
`bridge_callback(events)` adapts it to Megatron-Bridge 0.3.0's `Callback` hooks; it is the only
part that imports Megatron.

    launcher        init_start, log_hparams (submission keys and every hyperparameter)
    on_train_start  init_stop, run_start, block_start
    each logged step  train_loss (informational)
    each eval       block_stop, eval_start, eval_stop, eval_accuracy, then run_stop("success")
                    when loss <= target, run_stop("aborted") at max_steps, else block_start
    last step without an eval, or the end of training: run_stop("aborted")

`samples_count` is step x global batch (sequences), as in clm.trainer. Megatron evaluates after
step s when s % eval_interval == 0, the cadence our trainer uses.

Stopping at the target: Megatron-Bridge 0.3.0 gives callbacks no stop flag; its loop runs
`while train_state.step < cfg.train.train_iters`, so the callback lowers `train_iters` to the
current step (the step counter stays true) and clears `do_valid`/`do_test`, so `pretrain()` adds
no validation pass after the loop.
"""

from __future__ import annotations

from clm.mlperf import MLPerfLogger


class MLPerfEvents:
    """The MLPerf lifecycle of one training run; every method is safe on every rank.

    `logger` is enabled on global rank 0 only. Methods that may end the run return True when
    training must stop.
    """

    def __init__(
        self,
        logger: MLPerfLogger,
        *,
        global_batch_size: int,
        max_steps: int,
        eval_interval: int,
        target_eval_loss: float,
        log_interval: int = 1,
    ):
        self.logger = logger
        self.gbs = int(global_batch_size)
        self.max_steps = int(max_steps)
        self.eval_interval = int(eval_interval)
        self.target = float(target_eval_loss)
        self.log_interval = max(1, int(log_interval))
        self.stopped = False
        self.status: str | None = None
        self.step = 0  # the last completed optimizer step seen
        self.eval_losses: list[tuple[int, float]] = []

    def samples(self, step: int) -> int:
        return int(step) * self.gbs

    def _stop(self, status: str, step: int) -> bool:
        self.logger.run_stop(status, self.samples(step))
        self.stopped, self.status = True, status
        return True

    def train_start(self, step: int) -> None:
        """Everything is built; the timed run starts with the next step."""
        self.logger.init_stop()
        self.logger.run_start()
        self.logger.block_start(self.samples(step))

    def train_step_end(self, step: int, loss: float | None) -> bool:
        """After optimizer step `step` (1-based). True: stop (max_steps, no eval due)."""
        self.step = int(step)
        if self.stopped:
            return True
        if loss is not None and (step % self.log_interval == 0 or step == self.max_steps):
            self.logger.train_loss(loss, self.samples(step))
        if step >= self.max_steps and step % self.eval_interval != 0:
            return self._stop("aborted", step)
        return False

    def eval_start(self, step: int) -> None:
        if self.stopped:
            return
        self.logger.block_stop(self.samples(step))
        self.logger.eval_start(self.samples(step))

    def eval_end(self, step: int, loss: float | None) -> bool:
        """The eval after step `step`. True: stop (target reached, or max_steps)."""
        self.step = int(step)
        if self.stopped:
            return True
        if loss is None:  # Megatron's eval hit its time limit: no result
            return self._stop("aborted", step)
        samples = self.samples(step)
        self.logger.eval_stop(samples)
        self.logger.eval_accuracy(loss, samples)
        self.eval_losses.append((int(step), float(loss)))
        if self.target > 0 and loss <= self.target:
            return self._stop("success", step)
        if step >= self.max_steps:
            return self._stop("aborted", step)
        self.logger.block_start(samples)
        return False

    def train_end(self, step: int | None = None) -> None:
        """The loop ended (or failed): a run that did not stop yet is aborted."""
        if not self.stopped:
            self._stop("aborted", self.step if step is None else step)


def bridge_callback(events: MLPerfEvents):
    """A Megatron-Bridge `Callback` driving `events` (imports Megatron: NeMo container only)."""
    import torch
    from megatron.bridge.training.callbacks import Callback
    from megatron.core import parallel_state

    def last_stage_loss(losses: dict | None) -> float | None:
        """`lm loss` from the last pipeline stage, on every rank (a collective on all ranks)."""
        have = losses is not None and "lm loss" in losses
        value = float(losses["lm loss"]) if have else 0.0
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return value if have else None
        buffer = torch.tensor([value, float(have)], dtype=torch.float64, device="cuda")
        torch.distributed.broadcast(
            buffer,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return float(buffer[0]) if buffer[1] > 0 else None

    def stop_training(state, step: int) -> None:
        state.cfg.train.train_iters = min(state.cfg.train.train_iters, step)
        state.train_state.do_valid = False
        state.train_state.do_test = False

    class MLPerfCallback(Callback):
        def on_train_start(self, context) -> None:
            events.train_start(context.state.train_state.step)

        def on_train_step_end(self, context) -> None:
            # fired before the loop increments train_state.step
            step = context.state.train_state.step + 1
            logged = step % events.log_interval == 0 or step == events.max_steps
            loss = last_stage_loss(context.loss_dict) if logged else None
            if events.train_step_end(step, loss):
                stop_training(context.state, step)

        def on_eval_start(self, context) -> None:
            events.eval_start(context.state.train_state.step)

        def on_eval_end(self, context) -> None:
            step = context.state.train_state.step
            if events.eval_end(step, last_stage_loss(context.total_loss_dict)):
                stop_training(context.state, step)

        def on_train_end(self, context) -> None:
            events.train_end(context.state.train_state.step)

    return MLPerfCallback()
