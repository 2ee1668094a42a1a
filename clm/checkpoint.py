"""Training checkpoints: save, commit atomically, prune, find the latest, restore exactly.

Layout: `${save_dir}/step_00000025/` holds the model and optimizer state written with
`torch.distributed.checkpoint` (one shard per rank, resharding on load) and `trainer.pt` (step,
tokens seen, data position, scheduler, RNG, eval history: tensors and plain values only, loaded
with `weights_only=True`). A save is first written to `step_XXXXXXXX.partial/` and renamed when
complete: a rename is atomic, so a crash mid-save leaves the previous checkpoint as the latest
committed one and the partial directory ignored (and replaced by the next save of that step).
Old checkpoints are pruned only after the new one is committed.

`save_dir` and `checkpoint_manager_path` may also be fsspec URLs (`gs://bucket/run/checkpoints`
through gcsfs; the tests use `memory://`, `file://`, and `gs://` on a GCS API emulator). Object
stores have no rename, so there a checkpoint counts as committed only once its last object,
`COMMITTED`, exists: the model, optimizer and trainer state are written first (directly into
`step_XXXXXXXX/`), the marker last; pruning deletes a checkpoint's marker before its data.
Saving a step that is already committed (a run resumed from its last step saves it again at its
end) writes to `step_XXXXXXXX.partial/` first and copies it over, so only that copy leaves the
step uncommitted for a moment. Local saves write the same marker (so an uploaded save_dir is
usable from the bucket) but still commit by rename, and decide "committed" by the name alone, as
before.

Several processes (the FSDP backend's ranks; the XLA backend's hosts, one process each) save
and load together over a process group: the default one, or the `process_group` a backend
passes, with a DCP `planner` of its own (the XLA backend's SPMD planners: each host writes and
reads only the shards its devices hold, never a whole tensor; `Backend.checkpoint_options`).
Every process writes its part into the same directory, so `save_dir` must be storage that all
of them share (a bucket, or a filesystem mounted on every host). The main process removes a
stale partial directory before any process writes (a barrier), commits after `dcp.save`'s
collectives (which return only once every process has written its files), and every process
leaves `save` only after that commit, having learned whether it succeeded (`_outcome`): no
process looks for the latest checkpoint, or saves the same step again, before it is committed,
and a failure on any process raises `OutputWriteError` on all of them.

Asynchronous saves (`async_checkpointing`, on by default for backend=xla; `AsyncSaver`): the
training thread copies the state of the save step to host memory (`Backend.stage_checkpoint`: on
XLA, after waiting for the queued device work, only this host's shards, torch_xla's
`_sharded_cpu_state_dict` as in its CheckpointManager.save_async; elsewhere a copy of each tensor)
and serializes trainer.pt, then goes on training while a background thread writes, commits and
prunes exactly as above, with the same layout, over a gloo process group of its own (the
training thread's `barrier`/`any_process` use the backend's; concurrent collectives on one group
deadlock). What still waits: the copy itself, which needs the step to be finished on the device
(a save step reads its loss anyway) and host memory for a second copy of this host's model and
optimizer state. One save is in flight at a time: the next save waits for it and raises its
`OutputWriteError` (the previous committed checkpoint untouched), and the final save, the one on
SIGTERM and the end of the run (also on an error) wait until it is committed. The files are those
of a synchronous save, bitwise (tests/test_async_checkpoint.py); tested on the CPU backend and
the XLA CPU runtime (4 virtual devices, one host) only, not on a TPU nor across hosts. We do not
use CheckpointManager itself: it has its own layout (no partial/rename, no COMMITTED marker, no
trainer.pt, pruning by its own list), torch_xla's flattened keys (no loading on the CPU backend)
and a pickled `.manager_metadata`.

`.metadata` (DCP's, a pickle) is read with an unpickler that admits only the classes DCP
metadata holds (`_METADATA_GLOBALS`); anything else is a `CheckpointError` naming the file and
the global, and nothing in it runs. The optimizer's non-tensor values inside the shards are read
with `torch.load(weights_only=True)` (`_LoadPlanner`: DCP's default planner passes False;
torch_xla's SPMDLoadPlanner calls `torch.load` with torch 2.9's default, True).

Why this module is long: the checkpoint format in one place: save, commit (rename or marker),
prune, latest, restore, for local paths and fsspec URLs alike, the background saver and the safe
`.metadata` unpickler all depend on the same layout rules; the trainer's policy around it is
clm/checkpointer.py.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import pickle
import re
import shutil
import threading
import warnings
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from clm.errors import OutputWriteError, describe, say

COMMITTED = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.pt"
COMMIT_MARKER = "COMMITTED"

Location = Path | str  # a local Path, or an fsspec URL kept as a string (Path folds its "//")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def is_url(where: Location) -> bool:
    return "://" in str(where)


def location(where: str | os.PathLike) -> Location:
    """`where` as a local Path, or as a URL string without a trailing slash."""
    return str(where).rstrip("/") if is_url(where) else Path(where)


def join(where: Location, name: str) -> Location:
    return f"{where}/{name}" if isinstance(where, str) else where / name


def _name(where: Location) -> str:
    return str(where).rstrip("/").rsplit("/", 1)[-1]


def _fs(url: str):
    """(filesystem, path within it) of an fsspec URL; a clear error for a missing extra."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise CheckpointError(
            f"{url}: cannot open ({e}); gs:// needs the optional 'gcs' extra (pip install gcsfs)"
        ) from e


def _exists(where: Location) -> bool:
    if isinstance(where, Path):
        return where.exists()
    fs, path = _fs(where)
    return fs.exists(path)


def _remove(where: Location) -> None:
    """Delete a checkpoint directory (a URL's commit marker first); nothing if absent."""
    if isinstance(where, Path):
        shutil.rmtree(where, ignore_errors=True)
        return
    fs, path = _fs(where)
    marker = f"{path}/{COMMIT_MARKER}"
    if fs.exists(marker):
        fs.rm(marker)  # from here on the directory is ignored, whatever else remains
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_tree(where: str | os.PathLike, keep: tuple[str, ...] = ()) -> None:
    """Delete a save_dir and every checkpoint in it (overwrite_output_dir); the entries named
    in `keep` stay (the run's own lease, clm.lease, which must outlive the deletion)."""
    where = location(where)
    if isinstance(where, Path):
        if not where.is_dir():
            return
        if not keep:
            shutil.rmtree(where)
            return
        for entry in where.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    for ckpt in committed(where):
        _remove(ckpt)
    if not keep:
        _remove(where)
        return
    fs, root = _fs(where)
    fs.invalidate_cache(root)
    if fs.isdir(root):
        for entry in fs.ls(root, detail=False):
            if _name(entry) not in keep:
                fs.rm(entry, recursive=True)


def step_dir(save_dir: Location, step: int) -> Location:
    return join(location(save_dir), f"step_{step:08d}")


def committed(save_dir: str | os.PathLike) -> list[Location]:
    """Committed checkpoints, oldest first (on a URL: those with a COMMITTED marker)."""
    save_dir = location(save_dir)
    if isinstance(save_dir, Path):
        if not save_dir.is_dir():
            return []
        found = [p for p in save_dir.iterdir() if p.is_dir() and COMMITTED.match(p.name)]
        return sorted(found, key=lambda p: int(COMMITTED.match(p.name).group(1)))
    fs, root = _fs(save_dir)
    fs.invalidate_cache(root)  # gcsfs caches listings; another process may have saved
    if not fs.isdir(root):
        return []
    names = [_name(entry) for entry in fs.ls(root, detail=False)]
    found = [
        name
        for name in names
        if COMMITTED.match(name) and fs.exists(f"{root}/{name}/{COMMIT_MARKER}")
    ]
    found.sort(key=lambda name: int(COMMITTED.match(name).group(1)))
    return [join(save_dir, name) for name in found]


def latest(save_dir: str | os.PathLike) -> Location | None:
    found = committed(save_dir)
    return found[-1] if found else None


def _ignore_dcp_warnings() -> None:
    warnings.filterwarnings("ignore", module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=r".*TypedStorage.*")


@contextlib.contextmanager
def _quiet():
    """DCP warns that no process group exists when one process saves; that is intended.

    `catch_warnings` is not thread-safe: AsyncSaver's thread relies on the same filters set
    for the whole process instead (AsyncSaver.__init__).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        _ignore_dcp_warnings()
        yield


def _collective(process_group) -> bool:
    """Whether several processes checkpoint together (a process group exists)."""
    return process_group is not None or (dist.is_available() and dist.is_initialized())


def _barrier(process_group) -> None:
    if _collective(process_group):
        cpu_barrier(process_group)


def cpu_barrier(process_group=None) -> None:
    """Wait for every process of a CPU (gloo) group: an all-reduce of one number.

    Not `dist.barrier`: torch 2.9's looks the machine's accelerator up first, and once
    torchax is imported (torch_xla imports the copy its wheel carries in `mark_sharding`; the
    XLA backend needs it for `call_jax`) that lookup raises "Please register
    PrivateUse1HooksInterface", as torchax names the PrivateUse1 backend without its hooks."""
    dist.all_reduce(torch.zeros(1), group=process_group)


def _outcome(error: BaseException | None, process_group) -> BaseException | None:
    """This process's error, else the first other process's (main's commit included), else None.

    Every process of the group must call it: it is also the barrier after the commit.
    """
    if not _collective(process_group):
        return error
    reasons = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(reasons, None if error is None else _url_reason(error), process_group)
    if error is not None:
        return error
    for rank, reason in enumerate(reasons):
        if reason is not None:
            return RuntimeError(f"process {rank} failed: {reason}")
    return None


def save(
    save_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep_last_n: int = 0,
    is_main: bool = True,
    planner=None,
    process_group=None,
) -> Location:
    """Write, commit (rename, or the marker on a URL) and prune; returns the committed directory.

    `planner` (a DCP SavePlanner) and `process_group`: the backend's (None: DCP's defaults).
    """
    state = _state(model, optimizer)
    data = _trainer_bytes(trainer_state)
    return _save(
        location(save_dir), step, state, data, keep_last_n, is_main, planner, process_group
    )


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _save(
    save_dir: Location,
    step: int,
    state: dict,
    trainer_bytes: bytes,
    keep_last_n: int,
    is_main: bool,
    planner,
    process_group,
) -> Location:
    """save() of a state dict and serialized trainer state (on AsyncSaver's thread: staged)."""
    if isinstance(save_dir, str):
        return _save_url(
            save_dir, step, state, trainer_bytes, keep_last_n, is_main, planner, process_group
        )
    final = step_dir(save_dir, step)
    partial = final.with_name(final.name + ".partial")
    if is_main and partial.exists():
        shutil.rmtree(partial)  # a leftover of a crash during an earlier save of this step
    _barrier(process_group)  # no process writes into the partial directory before that
    error = None
    try:
        _write_state(partial, state, planner, process_group)
        if is_main:  # dcp.save returned: every process has written its files
            (partial / TRAINER_FILE).write_bytes(trainer_bytes)
            (partial / COMMIT_MARKER).write_text(_marker(step))
            _fsync_dir(partial)
            if final.exists():  # the same step saved again (e.g. the final save): replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(final.parent)
    except (OSError, RuntimeError, CheckpointException) as e:  # disk full, quota, size limit
        error = e
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back; never loaded
    _raise_on_failure(
        _outcome(error, process_group), save_dir, final, describe, "free space and rerun"
    )
    if is_main:
        if keep_last_n > 0:
            for old in committed(save_dir)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(where: Location, state: dict, planner, process_group) -> None:
    """Model and optimizer state into `where` with DCP (every process writes its shards)."""
    with _quiet():
        dcp.save(
            state,
            storage_writer=_writer(where),
            planner=planner,
            process_group=process_group,
        )


def _raise_on_failure(error, save_dir: Location, final: Location, reason, advice: str) -> None:
    """A failed save (on any process): OutputWriteError saying which checkpoint is still there."""
    if error is None:
        return
    previous = committed(save_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "none kept"
    raise OutputWriteError(
        f"{final}: could not write the checkpoint ({reason(error, save_dir)}); {kept}; "
        f"{advice} the same command to resume"
    ) from error


def _marker(step: int | None) -> str:
    return json.dumps({"step": step}) + "\n"


def _write_bytes(url: str, data: bytes) -> None:
    fs, path = _fs(url)
    with fs.open(path, "wb") as f:
        f.write(data)


def _trainer_bytes(trainer_state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    return buffer.getvalue()


def _url_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _save_url(
    save_dir: str,
    step: int,
    state: dict,
    trainer_bytes: bytes,
    keep_last_n: int,
    is_main: bool,
    planner=None,
    process_group=None,
) -> str:
    """save() on an object store: data first, the COMMITTED marker last (no rename there).

    Every process decides from the same marker whether the step is already committed before
    the main one changes anything (it changes nothing until dcp.save's collectives are done).
    """
    final = step_dir(save_dir, step)
    resave = _exists(join(final, COMMIT_MARKER))
    target = f"{final}.partial" if resave else final  # never write into a committed step
    if is_main:
        _remove(target)  # a leftover of a crash during an earlier save of this step
    _barrier(process_group)  # no process writes into the target before that
    error = None
    try:
        _write_state(target, state, planner, process_group)
        if is_main:
            _write_bytes(join(target, TRAINER_FILE), trainer_bytes)
            if resave:
                _remove(final)  # marker first: the step is uncommitted during the copy
                _copy_tree(target, final)
            _write_bytes(join(final, COMMIT_MARKER), _marker(step).encode())
    except (OSError, RuntimeError, CheckpointException, CheckpointError) as e:
        error = e
        if is_main:
            with contextlib.suppress(Exception):
                _remove(target)
    _raise_on_failure(
        _outcome(error, process_group), save_dir, final, lambda e, _: _url_reason(e), "rerun"
    )
    if is_main:
        if resave:
            _remove(target)
        if keep_last_n > 0:
            for old in committed(save_dir)[:-keep_last_n]:
                _remove(old)
    return final


class AsyncSaver:
    """save() whose writing runs on a background thread; at most one save in flight.

    `save` waits for the previous save (raising its error, if any), copies the state of this
    step to host memory on the calling thread (`stage`: the backend's `stage_checkpoint`; it
    returns the copy and the DCP planner to write it with), serializes the trainer state, and
    returns; the thread then writes, commits and prunes exactly as `save` does, over a gloo
    process group of its own (collectives of two threads on one group would deadlock).
    `wait` blocks until the save in flight is committed and raises its `OutputWriteError`
    (or any other error) there; every process learns the outcome, as with `save`.
    """

    def __init__(self, timeout: datetime.timedelta | None = None) -> None:
        # every process creates it at the same point (new_group is collective); none alone.
        # `timeout`: what one of its collectives may wait (the run's, clm.watchdog)
        self.process_group = None
        if _collective(None):
            self.process_group = dist.new_group(backend="gloo", timeout=timeout)
        self._thread: threading.Thread | None = None
        self._result: Location | None = None
        self._error: BaseException | None = None
        _ignore_dcp_warnings()  # for the thread (see _quiet)

    def save(
        self,
        save_dir: str | os.PathLike,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict,
        keep_last_n: int = 0,
        is_main: bool = True,
        stage=None,
    ) -> Location:
        """Start saving `step`; returns the directory it will be committed to."""
        self.wait()
        state = _state(model, optimizer)
        staged, planner = stage(state) if stage is not None else (host_copy(state), None)
        args = (location(save_dir), step, staged, _trainer_bytes(trainer_state), keep_last_n)
        args += (is_main, planner, self.process_group)
        self._thread = threading.Thread(target=self._write, args=args, name=f"save-{step}")
        self._thread.start()
        return step_dir(location(save_dir), step)

    def _write(self, *args) -> None:
        try:
            self._result = _save(*args)
        except BaseException as e:  # raised by wait(), on the training thread
            self._error = e

    def wait(self) -> Location | None:
        """The directory the save in flight committed (None: none in flight), or its error."""
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result

    def finish(self, failing: bool) -> None:
        """Wait for the save in flight before the process ends. While another error is already
        on its way out (`failing`), this one's is printed instead of raised."""
        try:
            self.wait()
        except Exception as e:
            if not failing:
                raise
            say(f"error: {e}")


def host_copy(state: dict) -> dict:
    """A copy of a state dict's tensors as they are now, in host memory (a DTensor's local
    shard is cloned where it lives); other values are immutable (numbers, strings) or rebuilt."""

    def copy(value):
        if not isinstance(value, torch.Tensor):
            return value
        if isinstance(value, DTensor):
            return value.detach().clone()
        return value.detach().to("cpu", copy=True)

    return tree_map(copy, state)


def _copy_tree(source: str, dest: str) -> None:
    fs, src = _fs(source)
    _, dst = _fs(dest)
    for path in fs.find(src):
        target = dst + path[len(src) :]
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
        fs.copy(path, target)


def save_model(directory: str | os.PathLike, model: torch.nn.Module) -> Location:
    """Model weights alone, as a checkpoint that `checkpoint_manager_path` can start from."""
    directory = location(directory)
    if _exists(directory):
        raise CheckpointError(f"{directory}: already exists; choose a new output directory")
    if isinstance(directory, str):
        with _quiet():
            dcp.save(
                {"model": get_model_state_dict(model)},
                storage_writer=FsspecWriter(directory, sync_files=False),
            )
        _write_bytes(join(directory, COMMIT_MARKER), _marker(None).encode())
        return directory
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    with _quiet():
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(partial))
    (partial / COMMIT_MARKER).write_text(_marker(None))
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
    if failures:  # rank -> (exception, traceback)
        errors = [w[0] if isinstance(w, tuple) else w for w in failures.values()]
        if any(str(e).startswith("Weights only load failed") for e in errors):  # _LoadPlanner
            return "a shard holds a pickled value other than plain data (refused, not run)"
        causes = {type(e).__name__ for e in errors}
        return f"a shard is truncated or corrupt: {', '.join(sorted(causes))}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# What a DCP `.metadata` pickle may name (the set found in the checkpoints of the CPU, FSDP and
# XLA SPMD backends, local and fsspec, torch 2.9), plus torch dtypes. It is unpickled with these
# alone: a crafted file naming anything else (os.system, builtins.eval) is refused unrun.
_METADATA_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co. by name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id of a local save
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.path}: refused to load {module}.{name} (a DCP .metadata holds only DCP's "
            "metadata classes; this file was not written by a checkpoint save)"
        )


class _SafeMetadata:
    """DCP's reader, unpickling `.metadata` with `_MetadataUnpickler` (torch 2.9's
    FileSystemReader.read_metadata otherwise, which FsspecReader inherits)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank", None))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, path).load()
            except CheckpointError:
                raise
            except Exception as e:  # truncated, not a pickle, a refused argument
                raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _FileSystemReader(_SafeMetadata, dcp.FileSystemReader):
    pass


class _FsspecReader(_SafeMetadata, FsspecReader):
    pass


class _LoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values (the optimizer's hyperparameters)
    with `weights_only=True`: its own `load_bytes` unpickles them with `weights_only=False`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _reader(path: Location):
    return _FsspecReader(path) if isinstance(path, str) else _FileSystemReader(str(path))


def _writer(path: Location):
    """DCP's writer for a URL (no fsync: object stores have none) or a local directory."""
    if isinstance(path, str):
        return FsspecWriter(path, sync_files=False)
    return dcp.FileSystemWriter(str(path))


def has_optimizer_state(path: str | os.PathLike) -> bool:
    metadata = _reader(location(path)).read_metadata()
    return any(key.startswith("optim") for key in metadata.state_dict_metadata)


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state of a checkpoint ({} when it has none), without touching the model."""
    trainer_file = join(location(path), TRAINER_FILE)
    try:
        if isinstance(trainer_file, Path):
            if not trainer_file.is_file():
                return {}
            return torch.load(trainer_file, weights_only=True)
        fs, file_path = _fs(trainer_file)
        if not fs.isfile(file_path):
            return {}
        with fs.open(file_path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{trainer_file}: unreadable ({type(e).__name__}: {e})") from e


def restore(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    planner=None,
    process_group=None,
) -> dict:
    """Load model (and optimizer when given) in place; returns the trainer state (or {}).

    `planner` (a DCP LoadPlanner) and `process_group`: the backend's (None: DCP's defaults).
    """
    path = location(path)
    metadata = join(path, ".metadata")
    if not (metadata.is_file() if isinstance(metadata, Path) else _exists(metadata)):
        raise CheckpointError(f"{path}: not a checkpoint (no .metadata)")
    try:
        if not has_optimizer_state(path):  # reads .metadata safely (_MetadataUnpickler)
            optimizer = None  # e.g. converted pretrained weights: model only
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(model)}
        with _quiet():
            dcp.load(
                state,
                storage_reader=_reader(path),
                planner=_LoadPlanner() if planner is None else planner,
                process_group=process_group,
            )
    except CheckpointError:  # a refused or unreadable .metadata: its own message
        raise
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise CheckpointError(f"{path}: unreadable checkpoint ({_cause(e)})") from e
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        set_model_state_dict(model, state["model"])
    return read_trainer_state(path)
