"""The step watchdog: a step, eval or save that stops making progress ends the process, in
bounded time, with one line saying what it was waiting for and which peer is gone.

Why: on a pod the expensive failures are a peer that dies or hangs. A dead peer makes the next
collective fail at once (gloo: "Connection reset by peer"), a hung one (SIGSTOP, a wedged device,
a host that stopped scheduling) makes every other process wait in its next collective for the
process group's timeout, and a hang outside any collective (a data read from a stuck bucket, a
device sync) waits forever. Each way 256 chips idle for hours. torchtitan bounds steps after the
first with a collective timeout, NCCL has its watchdog; this is ours, on every backend.

What it watches: the training thread says what it is doing, with plain attribute writes (cheap
enough for every step): `begin(kind, label, phase)` starts a step, an eval or a save (`kind`),
`phase(...)` or `waiting(...)` says what it waits for now:
  data        the next batch
  device      the step's compute, or a sync with the device
  collective  an all-reduce, barrier or agreement between processes
  checkpoint  writing or committing a save
and `end()` records how long it took. A thread compares the time spent with the activity's bound:

  the first `warmup` steps of this process (1; 3 on backends that compile, as the recompile
  watch counts them), its first eval and its first save: `first_step_timeout_s` (they compile);
  later ones: max(`step_timeout_s`, GROWTH x the longest of that kind after its warm-up), so a
  10-minute floor grows with the measured step, eval or save time and never falls below it.

Both are config keys; `step_timeout_s=0` turns the watchdog off (no thread, no heartbeat, torch's
default collective timeouts). Process groups are created with `collective_timeout` (what any one
collective may wait: `first_step_timeout_s`, the time a peer may spend compiling), so a hang
inside a collective after warm-up is the watchdog's to report, not gloo's or NCCL's (the
sub-groups DeviceMesh makes for expert parallelism keep torch's default: the watchdog bounds
them all the same).

Peers: with several processes each one's heartbeat thread rewrites its key in the default process
group's store (TCPStore: rank 0's on env:// and xla://, torchrun's agent under torchrun) every
`heartbeat_s` (step_timeout_s / 10, within 0.5..5 s). When the bound expires, or a collective raises on the training thread, the process
reads every heartbeat twice, `2.5 x heartbeat_s` apart, and names the ranks whose heartbeat did not
move (dead, or stopped: neither thread of theirs runs), with the pid and host they reported; if
the store does not answer, its host (rank 0) is the one gone. Comparing two reads, not timestamps,
needs no clock agreement between hosts.

The end: one line on stderr (`error: step N: no progress for X s (bound Y s) while waiting for
collective; rank 1 (pid P on H) sent no heartbeat for Z s: lost or hung`), then what can be
written is (metrics.jsonl flushed and fsynced, the MLPerf log's aborted `run_stop`, once, W&B
finished), within `WRITE_OUT_S`, and the process exits 1 with `os._exit`: the training thread is
stuck, so nothing may wait for it. From the moment it decides to end until its line, stderr is
muted: c10d prints a C++ backtrace for every store or collective call of any thread that meets a
closed connection. A checkpoint is never left half-committed: a save commits by
an atomic rename (a `COMMITTED` marker written last on object stores), so an exit mid-save leaves
the previous checkpoint the latest (clm/checkpoint.py), and the same command resumes from it.

Why this module is long: the bound, what the main thread waits for, the heartbeats that name a
lost rank and the one-line exit that writes the logs first are one mechanism, tested together.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from clm.errors import causes

KINDS = ("step", "eval", "save")
PHASES = ("data", "device", "collective", "checkpoint")
# a later step, eval or save may take this many times the longest of its kind (after warm-up)
GROWTH = 10.0
# what an expired process may spend writing metrics and the MLPerf log before it exits anyway
WRITE_OUT_S = 30.0
# a store operation of the heartbeat client waits at most this long (a hung store host)
STORE_TIMEOUT_S = 5.0
# a heartbeat must move within this many heartbeat periods, or its process is lost
HEARTBEAT_WINDOW = 2.5

# in an exception's text: the marks of a failed collective or store (gloo, NCCL, TCPStore)
COMMUNICATION_MARKS = (
    "gloo",
    "nccl",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "socket timeout",
    "tcpstore",
)


def collective_timeout(cfg) -> datetime.timedelta | None:
    """The timeout of the run's process groups: `first_step_timeout_s` while the watchdog is on
    (what one collective may wait: a peer compiling), else None (torch's default)."""
    if not float(cfg.get("step_timeout_s", 0) or 0):
        return None
    return datetime.timedelta(seconds=float(cfg.get("first_step_timeout_s", 3600)))


class _Activity:
    """What the training thread is doing: replaced whole by `begin`, its phase set in place."""

    __slots__ = ("kind", "label", "phase", "start", "bound", "warm", "record")

    def __init__(self, kind, label, phase, start, bound, warm, record):
        self.kind, self.label, self.phase = kind, label, phase
        self.start, self.bound, self.warm, self.record = start, bound, warm, record


class _Waiting:
    """`Watchdog.waiting(phase)`: the phase for a block, the previous one restored after it."""

    __slots__ = ("watch", "phase", "previous")

    def __init__(self, watch: Watchdog, phase: str):
        self.watch, self.phase = watch, phase

    def __enter__(self):
        self.previous = self.watch.phase(self.phase)

    def __exit__(self, *exc):
        self.watch.phase(self.previous)


class Watchdog:
    """Bounds a process's steps, evals and saves; see the module docstring. Without
    `step_timeout_s` (0, the default of a bare instance) every method is a cheap no-op."""

    def __init__(
        self,
        step_timeout_s: float = 0.0,
        first_timeout_s: float = 3600.0,
        warmup_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        store=None,
        peer: str = "rank",
        heartbeat_s: float | None = None,
        hint: str = "",
        exit: Callable[[int], None] = os._exit,
    ):
        self.enabled = float(step_timeout_s) > 0
        self.step_timeout_s = float(step_timeout_s)
        self.first_timeout_s = float(first_timeout_s)
        self.warmup = {"step": max(1, int(warmup_steps)), "eval": 1, "save": 1}
        self.rank, self.world_size, self.peer = int(rank), int(world_size), peer
        self.hint = hint  # appended to the line, e.g. how to resume
        self._exit = exit  # os._exit; tests pass their own
        self._counts = dict.fromkeys(KINDS, 0)
        self._longest = dict.fromkeys(KINDS, 0.0)
        self._activity: _Activity | None = None
        self._outputs: tuple | None = None
        self._before_exit: list[Callable[[], None]] = []
        self._claimed = threading.Lock()  # held by the one thread that ends the process
        self._stderr: int | None = None  # the real fd 2 once muted (_mute)
        self._stopped = threading.Event()
        if heartbeat_s is None:
            heartbeat_s = min(5.0, max(0.5, self.step_timeout_s / 10))
        self.heartbeat_s = float(heartbeat_s)
        self.heartbeats = None
        if not self.enabled:
            return
        if self.world_size > 1 and store is not None:
            self.heartbeats = Heartbeats(store, self.rank, self.world_size, self.heartbeat_s)
        self._tick = min(1.0, max(0.05, self.step_timeout_s / 20))
        threading.Thread(target=self._watch, name="clm-watchdog", daemon=True).start()

    @classmethod
    def for_run(cls, cfg, backend) -> Watchdog:
        """The watchdog of a run on `backend`: its config keys, and the default process group's
        store for the heartbeats when there are several processes."""
        rank, world, store = 0, 1, None
        if float(cfg.get("step_timeout_s", 0) or 0) > 0:
            rank, world, store = _process_group()
        return cls(
            step_timeout_s=float(cfg.get("step_timeout_s", 0) or 0),
            first_timeout_s=float(cfg.get("first_step_timeout_s", 3600)),
            # backends that compile (XLA) may compile during their first 3 steps (Trainer.train)
            warmup_steps=3 if backend.compile_count() is not None else 1,
            rank=rank,
            world_size=world,
            store=store,
            peer="host" if backend.name == "xla" else "rank",
            hint=(
                f" (rerun the same command{' on every process' if world > 1 else ''} to resume "
                "from the latest checkpoint)"
                if cfg.get("save_frequency")
                else ""
            ),
        )

    # ---- what the training thread says ----------------------------------------------------
    def bound(self, kind: str) -> float:
        """The seconds the next activity of `kind` may take."""
        if self._counts[kind] < self.warmup[kind]:
            return self.first_timeout_s
        return max(self.step_timeout_s, GROWTH * self._longest[kind])

    def begin(self, kind: str, label: str, phase: str, record: bool = True) -> None:
        """Start watching `label` (e.g. "step 5"), a `kind` activity now waiting for `phase`.
        `record=False`: a short wait between activities (a stop-signal check), bounded like
        the next one of its kind but neither counted nor measured."""
        if not self.enabled:
            return
        warm = self._counts[kind] < self.warmup[kind]
        self._activity = _Activity(
            kind, label, phase, time.monotonic(), self.bound(kind), warm, record
        )

    def phase(self, phase: str) -> str | None:
        """What the current activity waits for now; returns what it waited for before."""
        activity = self._activity
        if activity is None:
            return None
        previous, activity.phase = activity.phase, phase
        return previous

    def waiting(self, phase: str) -> _Waiting:
        """`with watch.waiting("collective"): ...`: `phase` for the block."""
        return _Waiting(self, phase)

    def end(self) -> None:
        """The current activity finished: count it and, after warm-up, measure it."""
        activity, self._activity = self._activity, None
        if activity is None or not activity.record:
            return
        self._counts[activity.kind] += 1
        if not activity.warm:
            elapsed = time.monotonic() - activity.start
            self._longest[activity.kind] = max(self._longest[activity.kind], elapsed)

    def idle(self) -> None:
        """Stop watching without measuring (the activity ended with an error)."""
        self._activity = None

    def attach(self, metrics, mlperf, samples: Callable[[], int]) -> None:
        """What to write out before exiting: the MetricsWriter, the MLPerfLogger (its aborted
        run_stop at `samples()`); set once the timed run has started."""
        self._outputs = (metrics, mlperf, samples)

    def before_exit(self, action: Callable[[], None]) -> None:
        """Also run `action` when the watchdog ends the process, after the logs are written
        (the run directory's lease is released there)."""
        self._before_exit.append(action)

    def stop(self) -> None:
        """The run is over: no more deadlines or heartbeats."""
        self._activity = None
        self._stopped.set()
        if self.heartbeats is not None:
            self.heartbeats.stop()

    # ---- the end ------------------------------------------------------------------------
    def on_error(self, error: BaseException, where: str | None = None) -> None:
        """An exception on the training thread. A failed collective with several processes
        ends the process here (one line naming the lost peers, exit 1) instead of a traceback
        on every survivor; anything else returns (to be raised as before)."""
        activity = self._activity
        if not self.enabled or self.world_size == 1:
            self.idle()
            return
        cause = communication_error(error)
        if cause is None:
            self.idle()
            return
        self._claim()
        label = where or (activity.label if activity else "outside the training loop")
        waiting = f" while waiting for {activity.phase}" if activity else ""
        self._end(
            f"error: {label}: a collective failed{waiting} ({_one_line(cause)})"
            + self._peers()
            + self.hint
        )

    def _watch(self) -> None:
        while not self._stopped.wait(self._tick):
            activity = self._activity
            if activity is None:
                continue
            elapsed = time.monotonic() - activity.start
            if elapsed <= activity.bound:
                continue
            if not self._claimed.acquire(blocking=False):
                return  # the training thread is already ending the process (on_error)
            if activity is not self._activity:  # it finished just now
                self._claimed.release()
                continue
            self._mute()
            elapsed = time.monotonic() - activity.start
            self._end(
                f"error: {activity.label}: no progress for {_seconds(elapsed)} s (bound "
                f"{_seconds(activity.bound)} s) while waiting for {activity.phase}"
                + self._peers()
                + self.hint
            )
            return

    def _claim(self) -> None:
        """Become the one thread that ends the process; any other waits for the exit."""
        if not self._claimed.acquire(blocking=False):
            while True:
                time.sleep(3600)
        self._mute()

    def _mute(self) -> None:
        """From here until the exit stderr (fd 2) goes nowhere but to our one line: c10d logs a
        C++ backtrace for each store or collective call that meets a closed connection, and
        every thread still running may meet one now."""
        self._stopped.set()
        if self.heartbeats is not None:
            self.heartbeats.stop()
        try:
            sys.stderr.flush()
            self._stderr = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:  # no fd 2: nothing to keep clean
            self._stderr = None

    def _peers(self) -> str:
        if self.heartbeats is None:
            return ""
        return "; " + self.heartbeats.lost(self.peer)

    def _end(self, line: str) -> None:
        """Print `line` (to the real stderr), write out what can be (within WRITE_OUT_S), exit 1."""
        data = (line + "\n").encode()
        try:
            os.write(self._stderr if self._stderr is not None else 2, data)
        except OSError:
            pass
        done = threading.Event()
        threading.Thread(target=self._write_out, args=(done,), daemon=True).start()
        done.wait(WRITE_OUT_S)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
                pass
        self._exit(1)
        if self._stderr is not None:  # an `exit` that returns (tests): stderr back as it was
            os.dup2(self._stderr, 2)
            os.close(self._stderr)
            self._stderr = None

    def _write_out(self, done: threading.Event) -> None:
        try:
            steps = []
            if self._outputs is not None:
                metrics, mlperf, samples = self._outputs
                steps = [
                    getattr(metrics, "sync", None),  # metrics.jsonl flushed and fsynced
                    lambda: mlperf.run_stop("aborted", samples()),
                    getattr(mlperf, "close", None),
                    lambda: metrics.close(1),  # W&B finished with exit code 1
                ]
            for step in steps + self._before_exit:
                try:
                    if step is not None:
                        step()
                except Exception:  # noqa: BLE001 - write what can be written
                    pass
        finally:
            done.set()


class Heartbeats:
    """Every process's heartbeat, `<seq> <unix time> <host> <pid>` under `clm/heartbeat/<rank>` in
    the process group's store, rewritten every `interval` s by a thread of its own; `lost` says
    whose did not move. Its own client of the store (a TCPStore clone with STORE_TIMEOUT_S), so a
    hung store host never blocks it for the process group's long timeout."""

    def __init__(self, store, rank: int, world_size: int, interval: float):
        self.rank, self.world_size, self.interval = rank, world_size, float(interval)
        self.store = _own_client(store)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stopped = threading.Event()
        if self.store is not None:
            threading.Thread(target=self._beat, name="clm-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        seq = 0
        while not self._stopped.is_set():
            seq += 1
            try:
                self.store.set(str(self.rank), f"{seq} {time.time():.3f} {self.host} {self.pid}")
            except Exception:  # noqa: BLE001 - the store's host is gone: no more heartbeats
                return  # (and no more of c10d's backtraces for them)
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        self._stopped.set()

    def read(self) -> dict[int, str | None]:
        """Every rank's heartbeat (None: none yet); raises when the store does not answer."""
        keys = [str(rank) for rank in range(self.world_size)]
        if self.store.check(keys):  # one round trip for all (thousands of ranks)
            return {rank: value.decode() for rank, value in enumerate(self.store.multi_get(keys))}
        return {
            rank: self.store.get(key).decode() if self.store.check([key]) else None
            for rank, key in enumerate(keys)
        }

    def lost(self, peer: str = "rank") -> str:
        """Which other processes sent no heartbeat over HEARTBEAT_WINDOW periods, in words; or
        that the store does not answer, naming its host, rank 0. Takes at most the window plus
        2 x STORE_TIMEOUT_S: a store call to a stopped host may block for good (a TCPStore
        client's timeout does not bound `set`), so the reads run on a thread of their own."""
        if self.store is None:
            return f"the other {peer}s were not checked (no TCP store to read heartbeats from)"
        inner = self.store.underlying_store
        reason = _unreachable(inner.host, inner.port)  # a dead host: say so, no store call
        if reason is None:
            found: dict = {}
            reader = threading.Thread(target=self._read_twice, args=(found,), daemon=True)
            reader.start()
            reader.join(HEARTBEAT_WINDOW * self.interval + 2 * STORE_TIMEOUT_S)
            if "second" in found:
                return self._stale(found["first"], found["second"], peer)
            reason = found.get("error", f"no answer within {_seconds(2 * STORE_TIMEOUT_S)} s")
        return (
            f"the heartbeat store at {inner.host}:{inner.port}, hosted by {peer} 0, does not "
            f"answer ({reason}): {peer} 0 is lost or hung"
        )

    def _read_twice(self, found: dict) -> None:
        try:
            found["first"] = self.read()
            time.sleep(HEARTBEAT_WINDOW * self.interval)
            found["second"] = self.read()
        except Exception as e:  # noqa: BLE001 - refused, reset, timed out: the host is gone
            found["error"] = _one_line(e)

    def _stale(self, first: dict, second: dict, peer: str) -> str:
        now = time.time()
        stale = []
        for rank in range(self.world_size):
            if rank == self.rank or (second[rank] is not None and second[rank] != first[rank]):
                continue
            if second[rank] is None:
                stale.append(f"{peer} {rank} never sent a heartbeat")
                continue
            _, sent, host, pid = second[rank].split(" ", 3)
            age = max(now - float(sent), HEARTBEAT_WINDOW * self.interval)
            stale.append(
                f"{peer} {rank} (pid {pid} on {host}) sent no heartbeat for {_seconds(age)} s"
            )
        if not stale:
            return f"every other {peer} still sends heartbeats (a slow peer or a network fault?)"
        return ", ".join(stale) + ": lost or hung"


def communication_error(error: BaseException) -> BaseException | None:
    """The failed collective or store operation behind `error` (its causes, its context and a
    DCP CheckpointException's per-rank failures searched), or None."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch without distributed
        DistError = ()  # noqa: N806
    for e in causes(error):
        if isinstance(e, DistError):
            return e
        if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in COMMUNICATION_MARKS):
            return e
    return None


def _process_group() -> tuple[int, int, object]:
    """(rank, world size, store) of the default process group; (0, 1, None) without one."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store
    except ImportError:  # pragma: no cover
        return 0, 1, None
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), _get_default_store()


def _own_client(store):
    """A client of `store`'s TCPStore of our own with STORE_TIMEOUT_S, under `clm/heartbeat/`;
    None when the store is not a TCPStore (a FileStore, a HashStore: not across hosts)."""
    import torch.distributed as dist

    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    client = store.clone()
    client.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
    return dist.PrefixStore("clm/heartbeat", client)


def _unreachable(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port fails at once (its process is gone), or None."""
    try:
        with socket.create_connection((host, port), timeout=STORE_TIMEOUT_S):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"
