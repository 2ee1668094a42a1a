"""The errors that end a run with one line: outputs that could not be written (disk full,
quota, file-size limit), training that cannot go on, and a stop signal.

`run_clm.py` turns `OutputWriteError` and `TrainingError` into one line and exit code 1, and
`Preempted` into one line and 128 + the signal. They live here, not in the trainer, so that the
trainer's components (clm.checkpointer, clm.metrics_processor) raise them without importing it.

After an `OutputWriteError` whatever was written before stays as it was (the metrics file is
cut back to its last whole record, a checkpoint that failed mid-write stays a `.partial`
directory that nothing loads).
"""

from __future__ import annotations

import errno
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path


class OutputWriteError(RuntimeError):
    """A run output (metrics, checkpoint) could not be written; the message names the path."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where and why."""


class Preempted(RuntimeError):
    """SIGTERM (a preemption on GKE or Slurm) or SIGINT (Ctrl-C) stopped the run after a step;
    `signum` is the signal (run_clm exits with 128 + it)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


def say(line: str) -> None:
    """Write `line` and its newline to stderr in one write: processes sharing one stderr pipe
    (torchrun's ranks) then never splice their lines together (print writes the newline apart,
    and with PYTHONUNBUFFERED each write is its own system call)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception behind it, each once: its cause, its context, and a DCP
    CheckpointException's per-rank failures (an (exception, traceback) pair, or an object with
    `exc`), depth first."""
    seen: set[int] = set()
    stack: list = [error]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # DCP: one per rank
            if isinstance(failure, tuple):
                stack.append(failure[0])
            else:
                stack += [failure, getattr(failure, "exc", None)]


def describe(error: BaseException, path: Path) -> str:
    """The OS reason behind `error` (walking its causes) and the free space where `path` is."""
    reason = None
    for e in causes(error):
        if isinstance(e, OSError) and e.errno is not None:
            reason = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
            break
    if reason is None:
        text = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {text[0] if text else ''}"
    try:
        free = shutil.disk_usage(_existing_parent(path)).free
        return f"{reason}; {free / 2**30:.2f} GiB free there"
    except OSError:
        return reason


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
