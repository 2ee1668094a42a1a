"""Training checkpoints: save, commit atomically, prune, find the latest, restore exactly.

Layout: `${save_dir}/step_00000025/` holds the model and optimizer state written with
`torch.distributed.checkpoint` (one shard per rank, resharding on load) and `trainer.pt` (step,
tokens seen, data position, scheduler, RNG, eval history: tensors and plain values only, loaded
with `weights_only=True`). A save is first written to `step_XXXXXXXX.partial/` and renamed when
complete: a rename is atomic, so a crash mid-save leaves the previous checkpoint as the latest
committed one and the partial directory ignored (and replaced by the next save of that step).
Old checkpoints are pruned only after the new one is committed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from clm.errors import OutputWriteError, describe

COMMITTED = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def step_dir(save_dir: Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:08d}"


def committed(save_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and COMMITTED.match(p.name)]
    return sorted(found, key=lambda p: int(COMMITTED.match(p.name).group(1)))


def latest(save_dir: Path) -> Path | None:
    found = committed(save_dir)
    return found[-1] if found else None


@contextlib.contextmanager
def _quiet():
    """DCP warns that no process group exists when one process saves; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.distributed\..*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage.*")
        yield


def save(
    save_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep_last_n: int = 0,
    is_main: bool = True,
) -> Path:
    """Write, commit (rename) and prune; returns the committed directory."""
    final = step_dir(save_dir, step)
    partial = final.with_name(final.name + ".partial")
    if is_main and partial.exists():
        shutil.rmtree(partial)  # a leftover of a crash during an earlier save of this step
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with _quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
        if is_main:
            torch.save(trainer_state, partial / TRAINER_FILE)
            _fsync_dir(partial)
    except (OSError, RuntimeError, CheckpointException) as e:  # disk full, quota, size limit
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back; never loaded
        previous = committed(save_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "none kept"
        raise OutputWriteError(
            f"{final}: could not write the checkpoint ({describe(e, save_dir)}); {kept}; "
            "free space and rerun the same command to resume"
        ) from e
    if is_main:
        if final.exists():  # the same step saved again (e.g. the final save): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        if keep_last_n > 0:
            for old in committed(save_dir)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    return final


def save_model(directory: Path, model: torch.nn.Module) -> Path:
    """Model weights alone, as a checkpoint that `checkpoint_manager_path` can start from."""
    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"{directory}: already exists; choose a new output directory")
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    with _quiet():
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(partial))
    _fsync_dir(partial)
    os.replace(partial, directory)
    return directory


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cause(error: BaseException) -> str:
    """One line for DCP's per-rank failures (their tracebacks are in the chained exception)."""
    failures = getattr(error, "failures", None)
    if failures:
        causes = {type(getattr(w, "exc", w)).__name__ for w in failures.values()}
        return f"a shard is truncated or corrupt: {', '.join(sorted(causes))}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def has_optimizer_state(path: Path) -> bool:
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return any(key.startswith("optim") for key in metadata.state_dict_metadata)


def read_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint ({} when it has none), without touching the model."""
    trainer_file = Path(path) / TRAINER_FILE
    if not trainer_file.is_file():
        return {}
    try:
        return torch.load(trainer_file, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{trainer_file}: unreadable ({type(e).__name__}: {e})") from e


def restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (and optimizer when given) in place; returns the trainer state (or {})."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no .metadata)")
    try:
        if optimizer is not None and not has_optimizer_state(path):
            optimizer = None  # e.g. converted pretrained weights: model only
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(model)}
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise CheckpointError(f"{path}: unreadable checkpoint ({_cause(e)})") from e
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        set_model_state_dict(model, state["model"])
    return read_trainer_state(path)
