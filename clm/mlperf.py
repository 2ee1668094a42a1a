"""MLPerf compliance logging (MLLOG lines) and a checker wrapper with our own rules.

The trainer drives one `MLPerfLogger` per run; only the main process has it enabled. Every
event goes through `mlperf_logging.mllog`, so the lines are exactly what MLCommons' compliance
checker parses. `samples_count` is always in sequences of `max_length` tokens consumed so far.

mlperf-logging 4.1.68 ships no rules for this benchmark (its checker crashes with
FileNotFoundError for an unknown `submission_benchmark`), so `clm/mlperf_rules/` holds a
complete set in the checker's format; `check_log` runs the real checker on it:

    python -m clm.mlperf check runs/convergence_exp/mlperf_compliance.log [--division open]

See docs/MLPERF.md for what is logged when and what the rules constrain.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mlperf_logging.mllog import constants as C
from mlperf_logging.mllog.mllog import MLLogger
from omegaconf import DictConfig

from clm import config as config_lib
from clm.spec import ModelSpec

BENCHMARK = "mixtral_8x22b"
RULES_DIR = Path(__file__).resolve().parent / "mlperf_rules"
# --ruleset only picks the checker's log parser (identical from 4.1.0 to 6.1.0); the rules
# themselves come from RULES_DIR via --config.
CHECKER_RULESET = "6.1.0"
DIVISIONS = (C.CLOSED, C.OPEN)
STATUSES = (C.ONPREM, C.CLOUD, C.RESEARCH, "preview")
RUN_STATUSES = (C.SUCCESS, C.ABORTED)
# model.dtype -> the names the v6.1 rules accept for lowest_numerical_precision_in_*
PRECISIONS = {"float32": "fp32", "bfloat16": "bfloat16", "float16": "fp16"}
# keys mllog.constants does not define
CAPACITY_FACTOR = "capacity_factor"
TRAIN_LOSS = "train_loss"
# mllog reports the caller's file:line; this many frames up from MLLogger.event is the
# trainer's call of our public method (event <- _emit <- method <- trainer).
_STACK_OFFSET = 3


def compliance_path(run_dir: str | Path) -> Path:
    """Where the log goes: $COMPLIANCE_FILE when set (MLPerf harnesses set it), else the run dir."""
    env = os.environ.get("COMPLIANCE_FILE")
    return Path(env) if env else Path(run_dir) / "mlperf_compliance.log"


def submission_info(cfg: DictConfig) -> dict[str, str]:
    """The submission_* keys from the optional `mlperf` config block, checked before any work."""
    block = cfg.get("mlperf") or {}
    info = {
        C.SUBMISSION_BENCHMARK: BENCHMARK,
        C.SUBMISSION_ORG: str(block.get("org") or "reference"),
        C.SUBMISSION_DIVISION: str(block.get("division") or C.CLOSED),
        C.SUBMISSION_STATUS: str(block.get("status") or C.ONPREM),
        C.SUBMISSION_PLATFORM: str(block.get("platform") or "reference"),
    }
    for name, allowed in (("division", DIVISIONS), ("status", STATUSES)):
        value = info[f"submission_{name}"]
        if value not in allowed:
            raise config_lib.ConfigError(
                f"mlperf.{name}={value}: must be one of {', '.join(allowed)}"
            )
    return info


def hyperparameters(
    cfg: DictConfig,
    spec: ModelSpec,
    *,
    eval_samples: int,
    train_samples: int | None,
    warmup_steps: int,
    parallelism: dict[str, int] | None = None,
) -> dict[str, object]:
    """Every hyperparameter key the rules require, from a finalized config and the model spec
    (the aux loss coefficient and capacity factor the run trains with; 0 for a dense model).

    `train_samples` None (a streamed train set of unknown size) logs the most the schedule can
    consume, max_steps x global batch. `parallelism` is what the backend ran (tensor, expert,
    pipeline, context: `Backend.parallelism`); None, the config's (the NeMo path runs it as
    configured).
    """
    if parallelism is None:
        parallelism = {
            axis: int(cfg[f"{axis}_parallelism"])
            for axis in ("tensor", "expert", "pipeline", "context")
        }
    gbs = int(cfg.global_train_batch_size)
    if train_samples is None:
        train_samples = int(cfg.max_steps) * gbs
    return {
        C.SEED: int(cfg.seed),
        C.GLOBAL_BATCH_SIZE: gbs,
        C.TRAIN_SAMPLES: int(train_samples),
        C.EVAL_SAMPLES: int(eval_samples),
        C.MAX_SEQUENCE_LENGTH: int(cfg.max_length),
        C.GRADIENT_ACCUMULATION_STEPS: int(cfg.gradient_accumulation_steps),
        # both optimizer choices (ADAMW_TORCH, ADAMW_TORCH_XLA) are the same AdamW update
        C.OPT_NAME: C.ADAMW,
        C.OPT_BASE_LR: float(cfg.lr),
        C.OPT_ADAMW_BETA_1: float(cfg.adam_beta1),
        C.OPT_ADAMW_BETA_2: float(cfg.adam_beta2),
        C.OPT_ADAMW_EPSILON: float(cfg.adam_epsilon),
        C.OPT_ADAMW_WEIGHT_DECAY: float(cfg.weight_decay),
        C.OPT_GRADIENT_CLIP_NORM: float(cfg.max_grad_norm or 0.0),  # 0: no clipping
        C.OPT_LR_WARMUP_STEPS: int(warmup_steps),
        C.OPT_LR_TRAINING_STEPS: int(cfg.sched.max_steps),
        C.OPT_LR_DECAY_SCHEDULE: str(cfg.sched.name),
        C.MICRO_BATCH_SIZE: int(cfg.per_device_train_batch_size),
        C.TENSOR_PARALLELISM: int(parallelism["tensor"]),
        C.PIPELINE_PARALLELISM: int(parallelism["pipeline"]),
        C.CONTEXT_PARALLELISM: int(parallelism["context"]),
        C.EXPERT_PARALLELISM: int(parallelism["expert"]),
        # parameters, attention and gradient reductions all run in model.dtype
        C.LOWEST_NUMERICAL_PRECISION_IN_LINEAR: PRECISIONS[cfg.model.dtype],
        C.LOWEST_NUMERICAL_PRECISION_IN_ATTN: PRECISIONS[cfg.model.dtype],
        C.LOWEST_NUMERICAL_PRECISION_IN_COMM: PRECISIONS[cfg.model.dtype],
        C.CONFIG_FILENAME: str(Path(cfg.run_dir) / "config.yaml"),
        C.MOE_AUX_LOSS_COEFF: spec.aux_loss_coef,
        CAPACITY_FACTOR: spec.capacity_factor,
    }


class MLPerfLogger:
    """MLLOG events of one run, written to `path`; with enabled=False every method is a no-op.

    Each instance owns a private `logging.Logger` with one file handler rather than configuring
    mllog's process-wide shared logger: `mllog.config(filename=...)` only ever adds handlers and
    the shared logger also prints to stdout, so a second logger in one process (tests, or a
    rerun) would duplicate every line.
    """

    def __init__(self, cfg: DictConfig, path: str | Path | None, enabled: bool = True):
        self.cfg = cfg
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        self.submission = submission_info(cfg)  # on every rank, so a bad value fails everywhere
        self._run_stopped = False
        self._stop_lock = threading.Lock()
        self._handler: logging.Handler | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "w": the file holds exactly one run, as the checker requires (EXACTLY_ONE run_start)
        self._handler = logging.FileHandler(self.path, mode="w", encoding="utf-8")
        logger = logging.Logger(f"clm.mlperf:{self.path}", level=logging.INFO)
        logger.propagate = False
        logger.addHandler(self._handler)
        root = re.escape(str(config_lib.CLM_DIR.parent))
        self._mllog = MLLogger(logger=logger, default_stack_offset=_STACK_OFFSET, root_dir=root)

    # ---- emission -------------------------------------------------------------------------
    def _emit(self, kind: str, key: str, value=None, metadata: dict | None = None) -> None:
        if self._handler is None:
            return
        getattr(self._mllog, kind)(key=key, value=value, metadata=metadata)

    # ---- lifecycle, in the order the trainer calls them ----------------------------------------
    def init_start(self) -> None:
        """Start of initialization; the rules require a cache_clear record before it."""
        self._emit("event", C.CACHE_CLEAR, True)
        self._emit("start", C.INIT_START)

    def init_stop(self) -> None:
        """Everything built (model, data, compilation warm-up): the timed run may start."""
        self._emit("end", C.INIT_STOP)

    def log_hparams(
        self,
        cfg: DictConfig,
        spec: ModelSpec,
        *,
        eval_samples: int,
        train_samples: int | None,
        warmup_steps: int,
        parallelism: dict[str, int] | None = None,
    ) -> None:
        """Submission keys then every hyperparameter; log between init_start and init_stop."""
        for key, value in self.submission.items():
            self._emit("event", key, value)
        values = hyperparameters(
            cfg,
            spec,
            eval_samples=eval_samples,
            train_samples=train_samples,
            warmup_steps=warmup_steps,
            parallelism=parallelism,
        )
        for key, value in values.items():
            self._emit("event", key, value)

    def run_start(self) -> None:
        """The clock starts: first touch of training data follows."""
        self._emit("start", C.RUN_START)

    def block_start(self, samples_count: int, epoch_count: int | None = None) -> None:
        """Start of the training between two evals; epoch_count only for epoch-counting callers."""
        metadata = {C.SAMPLES_COUNT: int(samples_count)}
        if epoch_count is not None:
            metadata[C.EPOCH_COUNT] = int(epoch_count)
        self._emit("start", C.BLOCK_START, metadata=metadata)

    def block_stop(self, samples_count: int) -> None:
        self._emit("end", C.BLOCK_STOP, metadata={C.SAMPLES_COUNT: int(samples_count)})

    def eval_start(self, samples_count: int) -> None:
        self._emit("start", C.EVAL_START, metadata={C.SAMPLES_COUNT: int(samples_count)})

    def eval_stop(self, samples_count: int) -> None:
        self._emit("end", C.EVAL_STOP, metadata={C.SAMPLES_COUNT: int(samples_count)})

    def eval_accuracy(self, loss: float, samples_count: int) -> None:
        """The eval loss (lower is better; the closed target is <= 1.8)."""
        self._emit(
            "event", C.EVAL_ACCURACY, float(loss), metadata={C.SAMPLES_COUNT: int(samples_count)}
        )

    def train_loss(self, loss: float, samples_count: int) -> None:
        """Informational; the checker ignores keys its rules do not name."""
        self._emit("event", TRAIN_LOSS, float(loss), metadata={C.SAMPLES_COUNT: int(samples_count)})

    def run_stop(self, status: str, samples_count: int) -> None:
        """End of the timed run, "success" or "aborted"; only the first call is logged, also when
        two threads call it at once."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run_stop status={status!r}: must be one of {RUN_STATUSES}")
        with self._stop_lock:  # the watchdog's thread may stop the run (clm.watchdog)
            if self._run_stopped:
                return
            self._run_stopped = True
            metadata = {C.SAMPLES_COUNT: int(samples_count), C.STATUS: status}
            self._emit("end", C.RUN_STOP, metadata=metadata)

    def close(self) -> None:
        """Flush and close the file; safe to call twice. Does not log run_stop."""
        if self._handler is not None:
            self._handler.close()
            self._handler = None


# ---- checking a log -------------------------------------------------------------------------
def declared_division(log_path: Path) -> str | None:
    """The submission_division a log declares (None if it declares none)."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            _, sep, payload = line.partition(":::MLLOG ")
            if not sep:
                continue
            try:
                record = json.loads(payload)
            except json.JSONDecodeError:
                continue
            if record.get("key") == C.SUBMISSION_DIVISION:
                return record.get("value")
    return None


def check_log(log_path: str | Path, division: str = C.CLOSED) -> tuple[bool, str]:
    """Run MLCommons' compliance checker on a log with our rules; returns (ok, its output).

    The rules pick the division file from the log's own submission_division; `division` is what
    the caller expects it to be, so a laptop run logged as open is not mistaken for a closed one.
    Warnings are errors (--werror): e.g. a second, identical run_stop line.
    """
    if division not in DIVISIONS:
        raise ValueError(f"division={division}: must be one of {', '.join(DIVISIONS)}")
    log_path = Path(log_path)
    if not log_path.is_file():
        return False, f"{log_path}: no such file"
    declared = declared_division(log_path)
    if declared is not None and declared != division:
        return False, (
            f"{log_path} declares submission_division={declared}, expected {division} "
            f"(pass --division {declared} to check it against those rules)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "mlperf_logging.compliance_checker",
            "--usage",
            "training",
            "--ruleset",
            CHECKER_RULESET,
            # absolute: the checker joins relative config paths to its own package directory
            "--config",
            str(RULES_DIR / "common.yaml"),
            "--werror",
            "--log_output",
            str(Path(tmp) / "checker.log"),
            str(log_path.resolve()),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    output = (proc.stdout + proc.stderr).strip()
    output = "\n".join(x for x in output.splitlines() if "Logging output also at" not in x)
    return proc.returncode == 0, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clm.mlperf", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the compliance checker on an MLLOG file")
    check.add_argument("log", type=Path)
    check.add_argument("--division", choices=DIVISIONS, default=C.CLOSED)
    args = parser.parse_args(argv)
    ok, output = check_log(args.log, args.division)
    print(output)
    print(f"{args.log}: {'PASSED' if ok else 'FAILED'} ({args.division} rules for {BENCHMARK})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
