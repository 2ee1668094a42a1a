"""One run per run directory: a lease that names the run holding it, renewed while it runs.

Why: `make run` passes overwrite_output_dir=true, and a second run started on a directory whose
run is still alive (the command typed twice, a Kubernetes pod replaced while the old one is still
terminating, a workload resubmitted) would delete the live run's logs and checkpoints, and then
both would write the same files. So the main process takes a lease on the run directory before
`prepare_run_dir` looks at anything, and a second run exits 2 naming the holder; a run that is
gone (kill -9, a power cut) leaves a stale lease that the same command takes over with a warning.

The lease is `<run_dir>/.lease.json` (and `<save_dir>/.lease.json` where save_dir lies outside
run_dir: another directory, or a gs:// prefix, where it is an object written with generation
preconditions). It names the host, pid and the process's start time (clock ticks since boot from
/proc/<pid>/stat: a reused pid has another), the boot id and pid namespace, a random token, when
it was taken and when last renewed. A daemon thread renews it every `renew_every(lease_s)`
seconds; the run removes it when it ends, normally or with an error, if the token is still its.

Live or stale (`judge`):
- on the same machine and pid namespace (host name, /proc/sys/kernel/random/boot_id and
  /proc/self/ns/pid all equal): live iff that pid exists, is not a zombie and has the recorded
  start time. A run killed with kill -9 is stale at once, so the same command resumes at once. A
  record with this very process's pid and start time is live only while a lease object of this
  process holds its token (two in one process: the tests' racing threads).
- otherwise (another host; another container or pod, which Kubernetes may give the same host
  name and the same pid, 1): live iff renewed within the holder's lease_s, its clock read with
  ours (clocks must agree to well within lease_s; NTP keeps them within milliseconds).

Two takers of one stale lease never both win. Locally each round of look, judge and write runs
under an flock of `.lease.json.lock` (FileLease: the kernel arbitrates, and the lock goes with a
killed process), a takeover moves the stale file aside under a name of the taker's own, checks
it is byte for byte the record judged stale, and hard-links the taker's record in, which fails
if any file is there. On GCS the taker's record is written with ifGenerationMatch=<the stale
generation> and a first lease with ifGenerationMatch=0, so the service decides; releases and
renewals name the generation they expect too.

What this cannot do: keep apart two runs that both believe they hold a lease because one of
them was frozen (SIGSTOP, a paused VM) on another host for longer than lease_s, so that a second
run took its lease over, and then resumed: the resumed one finds at its next renewal (within
5 s) that the lease is another's and stops at once (exit 1, `exit_lost`), but it may have
written until then.

Why this module is long: one concept, kept whole: the lease record, its liveness rules (pid,
process start time, boot id, pid namespace, renewal age) and takeover are shared by its two
stores (a file with flock rounds, a gs:// object with generation preconditions) and the renewing
thread; split by store, each half would import the rules from a third module that only they
read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from clm.config import ConfigError
from clm.errors import OutputWriteError, say

LEASE_NAME = ".lease.json"
ATTEMPTS = 8  # acquire's rounds of look, judge, take; each lost race costs one
LOCK_WAIT_S = 10.0  # a lease round takes milliseconds; a lock held this long is a frozen holder


class LeaseHeld(ConfigError):
    """Another run holds the lease: one line naming it and what to do (run_clm exits 2)."""


def renew_every(lease_s: float) -> float:
    """Seconds between renewals: a few within every lease time, at most 5 s apart."""
    return min(5.0, lease_s / 4)


# ---- process identity ---------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat's 22nd field),
    None when no such process runs here (or it is a zombie: it has exited)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Process:
    """Where a process runs and which one it is; equal pid and start time: the same process."""

    host: str
    boot_id: str | None
    pid_ns: str | None
    pid: int
    start: int | None

    @classmethod
    def this(cls) -> Process:
        pid = os.getpid()
        boot = _read("/proc/sys/kernel/random/boot_id")
        return cls(socket.gethostname(), boot, _pid_namespace(), pid, process_start(pid))

    def same_machine(self, other: Process) -> bool:
        """Whether `other`'s pid means a process here: the same host name, boot and pid
        namespace (a pod's replacement, on this node or another, has another namespace). False
        where /proc does not say (not Linux): then only renewals count."""
        if self.boot_id is None or self.pid_ns is None:
            return False
        return (self.host, self.boot_id, self.pid_ns) == (other.host, other.boot_id, other.pid_ns)


# tokens of the leases this process holds or is taking (see `judge`)
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


def _holding(token: str, held: bool) -> None:
    with _HELD_LOCK:
        (_HELD.add if held else _HELD.discard)(token)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ---- the record and its judgement ---------------------------------------------------------
def new_record(token: str, lease_s: float, me: Process | None = None) -> dict:
    me = me or Process.this()
    now = time.time()
    return {
        "host": me.host,
        "pid": me.pid,
        "pid_start": me.start,
        "boot_id": me.boot_id,
        "pid_ns": me.pid_ns,
        "token": token,
        "started": now,
        "renewed": now,
        "lease_s": lease_s,
    }


def _holder(record: dict) -> Process:
    return Process(
        str(record["host"]),
        record.get("boot_id"),
        record.get("pid_ns"),
        int(record["pid"]),
        record.get("pid_start"),
    )


def judge(
    record: dict | None, age_s: float, lease_s: float, me: Process | None = None
) -> tuple[bool, str]:
    """(live, why) for a lease record; `age_s`: seconds since its file or object was last
    written, which decides only for a record that cannot be read (a hand-edited file)."""
    me = me or Process.this()
    if record is None:
        return age_s < lease_s, f"unreadable, last written {age_s:.0f} s ago"
    try:
        holder = _holder(record)
        renewed = float(record["renewed"])
        token = str(record["token"])
        lease_s = float(record.get("lease_s") or lease_s)
    except (KeyError, TypeError, ValueError):
        return age_s < lease_s, f"unreadable, last written {age_s:.0f} s ago"
    if me.same_machine(holder):
        if (holder.pid, holder.start) == (me.pid, me.start):
            with _HELD_LOCK:
                live = token in _HELD
            return live, "taken by this process" if live else "left by this process"
        start = process_start(holder.pid)
        if start is None:
            return False, f"process {holder.pid} has exited"
        if holder.start is not None and start != holder.start:
            return False, f"process {holder.pid} has exited (its pid now names another process)"
        return True, "its process is running"
    age = time.time() - renewed
    if age < lease_s:
        return True, f"renewed {max(age, 0):.0f} s ago"
    return False, f"not renewed for {age:.0f} s (its lease time: {lease_s:g} s)"


@dataclass
class Snapshot:
    """A lease as read: its bytes, the record they hold (None: unreadable), a version that a
    conditional replace names (the bytes locally, the generation on GCS) and its age."""

    raw: bytes
    record: dict | None
    version: object
    age_s: float


def _parse(raw: bytes) -> dict | None:
    """The record in a lease's bytes; None for anything that is not a whole record."""
    try:
        record = json.loads(raw)
        _holder(record)
        float(record["started"]), float(record["renewed"]), str(record["token"])
    except (ValueError, KeyError, TypeError):
        return None
    return record


# ---- one lease: the protocol over a storage's primitives ----------------------------------
class Lease:
    """Acquire, renew and release one lease; subclasses provide the storage's primitives:
    `_create` (only if absent), `_read`, `_replace` (only if still `snapshot`), `_renew` and
    `_delete` (only if still ours)."""

    where = ""  # the lease's path or URL, for messages

    def __init__(self, lease_s: float, label: str, instead: str = "exp_name"):
        self.lease_s = float(lease_s)
        self.label = label  # "run_dir=runs/x" or "save_dir=gs://...": what a message names
        self.instead = instead  # the key that gives a run a directory of its own
        self.token = secrets.token_hex(16)
        self.record: dict | None = None

    def _data(self) -> bytes:
        return (json.dumps(self.record, indent=1) + "\n").encode()

    def acquire(self) -> str | None:
        """Take the lease. Returns a warning line when a stale one was taken over; raises
        LeaseHeld (one line naming the holder) while another run holds it."""
        _holding(self.token, True)  # before our record can be seen: it is live to this process
        try:
            self.record = new_record(self.token, self.lease_s)
            for _ in range(ATTEMPTS):
                with self._exclusive():
                    done, warning = self._attempt()
                if done:
                    return warning
            raise LeaseHeld(
                f"{self.label}: could not take {self.where} in {ATTEMPTS} attempts: other runs "
                "are taking it at the same time; run one of them"
            )
        except BaseException:
            _holding(self.token, False)
            raise

    def _attempt(self) -> tuple[bool, str | None]:
        """One round of create, or look, judge and take over: (taken, warning)."""
        if self._create(self._data()):
            return True, None
        seen = self._read()
        if seen is None:  # released meanwhile: look again
            return False, None
        if seen.record is not None and seen.record.get("token") == self.token:
            self._adopt(seen)  # a retried request of ours had written it
            return True, None
        live, why = judge(seen.record, seen.age_s, self.lease_s)
        if live:
            raise LeaseHeld(self._held_message(seen, why))
        self.record["renewed"] = time.time()
        if self._replace(seen, self._data()):
            return True, self._takeover_message(seen, why)
        return False, None

    def renew(self) -> dict | None:
        """Renew the lease; returns the record of the run that took it from us (an empty dict:
        a record that cannot be read), or None while it is still ours."""
        self.record["renewed"] = time.time()
        with self._exclusive():
            return self._renew(self._data())

    def release(self) -> None:
        """Remove the lease if it is still ours (the end of the run, normal or not)."""
        try:
            with self._exclusive():
                self._delete()
        finally:
            _holding(self.token, False)

    def _exclusive(self) -> contextlib.AbstractContextManager:
        """Where the storage needs it, a lock that makes a round of look-judge-write one step
        among the processes that share the storage."""
        return contextlib.nullcontext()

    def _adopt(self, seen: Snapshot) -> None:
        pass

    def _held_message(self, seen: Snapshot, why: str) -> str:
        record = seen.record
        if record is None:
            return (
                f"{self.label} is in use: {self.where} cannot be read and was written "
                f"{seen.age_s:.0f} s ago (less than run_lease_s={self.lease_s:g}); if no run "
                "uses it, delete it"
            )
        holder = _holder(record)
        ran = (
            f"the run of host {holder.host} pid {holder.pid} (started "
            f"{_utc(float(record['started']))}, {why}) holds {self.where}"
        )
        if Process.this().same_machine(holder):
            return (
                f"{self.label} is in use: {ran}; wait for it to end, stop it (kill {holder.pid}), "
                f"or choose another {self.instead}"
            )
        expires = float(record["renewed"]) + float(record.get("lease_s") or self.lease_s)
        return (
            f"{self.label} is in use: {ran}; wait for it to end, stop it (kill {holder.pid} on "
            f"{holder.host}), or choose another {self.instead}; if it is gone, its lease "
            f"expires at {_utc(expires)} and the same command then takes it over"
        )

    def _takeover_message(self, seen: Snapshot, why: str) -> str:
        record = seen.record
        if record is None:
            return f"warning: {self.where}: took over a lease that could not be read ({why})"
        holder = _holder(record)
        return (
            f"warning: {self.where}: took over the lease of a run that is gone (host "
            f"{holder.host} pid {holder.pid}, started {_utc(float(record['started']))}: {why})"
        )

    # the storage's primitives
    def _create(self, data: bytes) -> bool:
        raise NotImplementedError

    def _read(self) -> Snapshot | None:
        raise NotImplementedError

    def _replace(self, seen: Snapshot, data: bytes) -> bool:
        raise NotImplementedError

    def _renew(self, data: bytes) -> dict | None:
        raise NotImplementedError

    def _delete(self) -> None:
        raise NotImplementedError


# errors of filesystems without hard links (some FUSE and SMB mounts): O_EXCL instead
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
# errors of flock on filesystems without locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def _flock(fd: int, wait_s: float) -> bool:
    """An exclusive flock on `fd` within `wait_s` seconds: False if another process held it
    all that time (a holder frozen inside its few milliseconds of lease work: SIGSTOP)."""
    deadline = time.monotonic() + wait_s
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class FileLease(Lease):
    """`<directory>/.lease.json` on a POSIX filesystem. A record is written to a file of its
    own first and then linked or renamed into place, so no reader ever sees half of one.

    Each round of look, judge and write runs under an exclusive flock of
    `<directory>/.lease.json.lock` (the kernel arbitrates; on NFS, Linux maps flock to NFS byte
    range locks), so two takers of a stale lease run one after the other and the second sees
    the first's live record. A process killed while holding it loses it with its file
    descriptors; one frozen there (SIGSTOP) keeps it, and after LOCK_WAIT_S a taker gives up
    with exit 2 rather than wait for it. The holder removes the lock file at the end of each
    round: a waiter that then gets the lock on the removed file sees that the path names
    another file (or none) and locks again, so nothing is left in the directory.

    Where the filesystem has no locks (flock fails: some FUSE mounts, Lustre without -o flock)
    the rounds run unlocked, and the takeover's rename aside (`_replace`) is what keeps two
    takers apart; it leaves the path empty for a moment, in which a run that finds no lease at
    all could create one, so there two runs starting within the same milliseconds may both go
    on (the second one's renewal then finds the lease another's and stops it: `on_lost`)."""

    def __init__(self, directory: Path, lease_s: float, label: str, instead: str = "exp_name"):
        super().__init__(lease_s, label, instead)
        self.directory = Path(directory)
        self.path = self.directory / LEASE_NAME
        self.where = str(self.path)

    @contextlib.contextmanager
    def _exclusive(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(f"{LEASE_NAME}.lock")
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _flock(fd, LOCK_WAIT_S)
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_LOCKS:
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                yield  # no locks on this filesystem: unlocked (see the class docstring)
                return
            if not locked:
                os.close(fd)
                raise LeaseHeld(
                    f"{self.label} is in use: {lock} has been locked for {LOCK_WAIT_S:g} s by "
                    "another process (a run stopped or hung while it renewed its lease); find "
                    f"it with `fuser {lock}`, or choose another {self.instead}"
                )
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder before us removed it: lock the file that is there now
        try:
            yield
        finally:
            try:
                os.unlink(lock)  # still holding it: the next locker makes a new one
            finally:
                os.close(fd)

    def _scratch(self, data: bytes, kind: str) -> Path:
        scratch = self.path.with_name(f"{LEASE_NAME}.{kind}-{self.token}")
        with open(scratch, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return scratch

    def _create(self, data: bytes) -> bool:
        """Write the lease if no file is there (hard link: atomic, and all-or-nothing)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        scratch = self._scratch(data, "new")
        try:
            os.link(scratch, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
        finally:
            scratch.unlink(missing_ok=True)
        try:  # no hard links here: a reader may see the file empty for a moment
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> Snapshot | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Snapshot(raw, _parse(raw), raw, time.time() - modified)

    def _replace(self, seen: Snapshot, data: bytes) -> bool:
        """Take over the stale lease `seen`: move whatever is there aside (of unlocked takers
        one gets it), check it is `seen` (else put it back: another taker won first), link ours
        in (which fails if anything is there)."""
        aside = self.path.with_name(f"{LEASE_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            grabbed = aside.read_bytes()
            if grabbed != seen.raw:
                self._create(grabbed)  # someone's newer lease, back in place (if still free)
                return False
            return self._create(data)
        finally:
            aside.unlink(missing_ok=True)

    def _renew(self, data: bytes) -> dict | None:
        seen = self._read()
        if seen is None:  # moved aside by a taker that then gave it back, or deleted
            if self._create(data):
                return None
            seen = self._read()
            if seen is None:
                return None  # next time
        if seen.record is None or seen.record.get("token") != self.token:
            return seen.record or {}
        scratch = self._scratch(data, "renew")
        os.replace(scratch, self.path)
        return None

    def _delete(self) -> None:
        seen = self._read()
        if seen is not None and seen.record is not None:
            if seen.record.get("token") == self.token:
                self.path.unlink(missing_ok=True)


class GcsLease(Lease):
    """`<save_dir>/.lease.json` as a GCS object, written through gcsfs's authenticated session
    with generation preconditions: ifGenerationMatch=0 creates it only if absent,
    ifGenerationMatch=<generation> replaces or deletes only the version that was read. gcsfs's
    own `pipe_file(mode="create")` sends the first; nothing in gcsfs sends the second, so the
    JSON API's media upload and delete are called directly. A 412 (gcsfs: FileExistsError)
    means another writer came first."""

    def __init__(self, url: str, lease_s: float, label: str, instead: str = "save_dir"):
        import fsspec

        super().__init__(lease_s, label, instead)
        self.where = f"{url.rstrip('/')}/{LEASE_NAME}"
        try:
            self.fs, path = fsspec.core.url_to_fs(self.where)
        except (ImportError, ValueError) as e:
            raise ConfigError(
                f"{label}: cannot open ({e}); gs:// needs the optional 'gcs' extra (pip install "
                "gcsfs)"
            ) from e
        self.bucket, self.key = path.split("/", 1)
        self.generation: str | None = None

    def _upload(self, data: bytes, if_generation: str) -> bool:
        try:
            done = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
                uploadType="media",
                name=self.key,
                ifGenerationMatch=if_generation,
                data=data,
                headers={"Content-Type": "text/plain"},
                json_out=True,
            )
        except (FileExistsError, FileNotFoundError):  # 412 (or the bucket is gone)
            return False
        self.generation = str(done["generation"])
        return True

    def _create(self, data: bytes) -> bool:
        return self._upload(data, "0")

    def _read(self) -> Snapshot | None:
        try:
            meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            generation = str(meta["generation"])
            _, raw = self.fs.call(
                "GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=generation
            )
        except FileNotFoundError:
            return None
        updated = meta.get("updated")
        age = time.time() - _rfc3339(updated) if updated else 0.0
        return Snapshot(raw, _parse(raw), generation, age)

    def _adopt(self, seen: Snapshot) -> None:
        self.generation = seen.version

    def _replace(self, seen: Snapshot, data: bytes) -> bool:
        return self._upload(data, seen.version)

    def _renew(self, data: bytes) -> dict | None:
        if self._upload(data, self.generation):
            return None
        seen = self._read()  # 412: someone else's, our own retried write, or deleted
        if seen is None:
            if self._upload(data, "0"):
                return None
            seen = self._read()
            if seen is None:
                return None  # next time
        if seen.record is not None and seen.record.get("token") == self.token:
            self.generation = seen.version
            return None
        return seen.record or {}

    def _delete(self) -> None:
        if self.generation is None:
            return
        with contextlib.suppress(FileExistsError, FileNotFoundError):  # no longer ours
            self.fs.call(
                "DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=self.generation
            )


def describe_os(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0)
    return (
        f"{name}: {error.strerror}"
        if name and error.strerror
        else f"{type(error).__name__}: {error}"
    )


def _rfc3339(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---- a run's leases -----------------------------------------------------------------------
def _local(where: str) -> Path | None:
    """A save_dir as a local path (file:// URLs included); None for other URLs."""
    if where.startswith("file://"):
        return Path(where[len("file://") :])
    return None if "://" in where else Path(where)


def leases_for(cfg) -> list[Lease]:
    """The leases a run takes: its run_dir's, and save_dir's where it lies outside run_dir and
    the run may write or delete there (save_frequency > 0, or overwrite_output_dir). gs:// gets
    an object lease; other URLs (memory://, s3://, ...) none."""
    lease_s = float(cfg.get("run_lease_s", 60))
    run_dir = Path(cfg.run_dir)
    leases: list[Lease] = [FileLease(run_dir, lease_s, f"run_dir={run_dir}")]
    if not (int(cfg.save_frequency) > 0 or cfg.overwrite_output_dir):
        return leases
    save_dir = str(cfg.save_dir).rstrip("/")
    label = f"save_dir={save_dir}"
    local = _local(save_dir)
    if local is not None:
        inside = local.resolve().is_relative_to(run_dir.resolve())
        if not inside:
            leases.append(FileLease(local, lease_s, label, "save_dir"))
    elif save_dir.startswith("gs://"):
        leases.append(GcsLease(save_dir, lease_s, label))
    return leases


def exit_lost(lease: Lease, taker: dict) -> None:
    """What a run does when its lease was taken over (it was taken for dead): stop at once,
    writing nothing more into files that are now another run's."""
    who = f"host {taker.get('host')} pid {taker.get('pid')}" if taker else "another run"
    say(
        f"error: {lease.where}: the lease was taken over by {who} (this run was taken for "
        f"dead: not renewed for run_lease_s={lease.lease_s:g}); stopping at once"
    )
    os._exit(1)


class Keeper:
    """The daemon thread that renews leases until `stop`; a lease taken over calls
    `on_lost(lease, taker's record)`; a renewal that fails (a network error) warns once and is
    tried again at the next turn."""

    def __init__(self, leases: list[Lease], on_lost: Callable[[Lease, dict], None] = exit_lost):
        self.leases = leases
        self.on_lost = on_lost
        self.stopping = threading.Event()
        self.warned: set[str] = set()
        every = min((lease.lease_s for lease in leases), default=60.0)
        self.every = renew_every(every)
        self.thread = threading.Thread(target=self._loop, name="clm-lease", daemon=True)

    def start(self) -> Keeper:
        if self.leases:
            self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            for lease in self.leases:
                try:
                    taker = lease.renew()
                except Exception as e:  # noqa: BLE001 - a renewal failing must not end the run
                    if lease.where not in self.warned:
                        self.warned.add(lease.where)
                        say(f"warning: {lease.where}: could not renew the lease ({e}); retrying")
                    continue
                if taker is not None and not self.stopping.is_set():
                    self.on_lost(lease, taker)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=60)


def acquire_all(leases: list[Lease]) -> list[Lease]:
    """Take every lease (printing a warning for each stale one taken over), or none: the
    ones taken are released when a later one is held."""
    taken: list[Lease] = []
    try:
        for lease in leases:
            try:
                warning = lease.acquire()
            except OSError as e:  # a directory or bucket this run cannot write
                raise OutputWriteError(
                    f"{lease.where}: could not write the run's lease ({describe_os(e)})"
                ) from e
            taken.append(lease)
            if warning:
                say(warning)
    except BaseException:
        release_all(taken)
        raise
    return taken


def release_all(leases: list[Lease]) -> None:
    for lease in reversed(leases):
        try:
            lease.release()
        except Exception as e:  # noqa: BLE001 - the run's own outcome matters more
            say(f"warning: {lease.where}: could not release the lease ({e})")


@contextlib.contextmanager
def hold(cfg, backend):
    """The run's leases, held for the `with` block: the main process takes them and every
    process learns whether it did (`backend.any_process`), so a refused run exits 2 on every
    process together instead of waiting at prepare_run_dir's barrier. Yields `release`, which
    the block's end calls anyway."""
    taken: list[Lease] = []
    error: BaseException | None = None
    if backend.is_main:
        try:
            taken = acquire_all(leases_for(cfg))
        except Exception as e:  # noqa: BLE001 - every process must learn of it, then it raises
            error = e
    if backend.any_process(error is not None):
        if error is not None:
            raise error
        raise LeaseHeld(
            f"run_dir={cfg.run_dir}: the main process did not take the run directory's lease "
            "(its error says why: the holder, or what could not be written)"
        )
    keeper = Keeper(taken).start()
    released = threading.Event()

    def release() -> None:
        """Stop renewing and remove the leases (once); also what the step watchdog does before
        it ends a stuck process, so that the same command starts without a takeover."""
        if not released.is_set():
            released.set()
            keeper.stop()
            release_all(taken)

    try:
        yield release
    finally:
        release()
