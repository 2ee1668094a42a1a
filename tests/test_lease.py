"""clm.lease: one run per run directory, decided on real files and real processes.

A live holder is a Python child that takes the lease with clm.lease (no torch: it starts in a
fraction of a second) and sleeps; a dead one is a child that has exited and was reaped. Records
of another host or pod are written as such a process would write them: this machine has no other.
Whole runs: two run_clm.py processes on one directory in
test_run_clm.py::test_embedded_default_few_steps_writes_the_run_directory, kill -9 then the same
command in test_checkpoint.py::test_sigkill_then_same_command_resumes_exactly, two torchrun ranks
refused together in
test_distributed.py::test_sigterm_to_one_rank_then_the_same_command_resumes_exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import ROOT

from clm import checkpoint
from clm import lease as lease_module
from clm.lease import (
    LEASE_NAME,
    FileLease,
    GcsLease,
    Keeper,
    LeaseHeld,
    Process,
    leases_for,
    new_record,
    process_start,
)

HOLDER = """
import sys, time
from pathlib import Path
from clm.lease import FileLease
FileLease(Path(sys.argv[1]), 60, "run_dir=x").acquire()
print("held", flush=True)
time.sleep(300)
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_holder(directory) -> subprocess.Popen:
    """A live process holding `directory`'s lease (it prints "held" once it does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def dead_process() -> Process:
    """The identity of a process of this machine that ran and has exited."""
    proc = subprocess.Popen(["sleep", "60"])
    start = process_start(proc.pid)
    proc.kill()
    proc.wait()
    me = Process.this()
    return Process(me.host, me.boot_id, me.pid_ns, proc.pid, start)


def write_record(directory, record: dict) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record).encode()
    (directory / LEASE_NAME).write_bytes(data)
    return data


def lease(directory, lease_s: float = 60) -> FileLease:
    return FileLease(directory, lease_s, f"run_dir={directory}")


def test_a_live_run_holds_the_lease_and_a_killed_one_is_taken_over_at_once(tmp_path):
    """Same machine: live while the holder's process runs (exit 2's line names it); once it is
    killed (kill -9), taken over at once with one warning line; released: nothing left."""
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    path = run_dir / LEASE_NAME
    before = path.read_bytes()
    started = json.loads(before)["started"]
    second = lease(run_dir)
    with pytest.raises(LeaseHeld) as held:
        second.acquire()
    host = socket.gethostname()
    assert str(held.value) == (
        f"run_dir={run_dir} is in use: the run of host {host} pid {holder.pid} (started "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))}, its process is running) "
        f"holds {path}; wait for it to end, stop it (kill {holder.pid}), or choose another "
        "exp_name"
    )
    assert path.read_bytes() == before  # the refused run changed nothing

    holder.kill()
    holder.wait()
    warning = second.acquire()
    assert warning.startswith(
        f"warning: {path}: took over the lease of a run that is gone (host {host} pid "
        f"{holder.pid}, started "
    )
    assert warning.endswith(f": process {holder.pid} has exited)")
    record = json.loads(path.read_bytes())
    assert (record["token"], record["pid"]) == (second.token, os.getpid())
    assert record["pid_start"] == process_start(os.getpid())
    second.release()
    assert list(run_dir.iterdir()) == []  # no scratch or aside files either


def test_a_reused_pid_or_a_new_pod_is_never_taken_for_the_dead_holder(tmp_path):
    """A dead holder's pid may name another process now (a reused pid, or pid 1 of the pod that
    replaced it, with the same host name): its start time, and the pid namespace, tell them
    apart, so it is neither taken for live nor for this process."""
    me = Process.this()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        reused = {**new_record("a", 60), "pid": sleeper.pid}
        reused["pid_start"] = process_start(sleeper.pid) - 1  # the pid's earlier owner
        write_record(tmp_path / "reused", reused)
        warning = lease(tmp_path / "reused").acquire()
        assert warning.endswith(
            f"process {sleeper.pid} has exited (its pid now names another process))"
        )
    finally:
        sleeper.kill()
        sleeper.wait()

    # our own pid and start time but a token no lease of ours holds: left by this process
    write_record(tmp_path / "ours", new_record("left-behind", 60))
    assert lease(tmp_path / "ours").acquire().endswith(": left by this process)")

    # pid 1 of this pid namespace, with another start time: the holder was an earlier pid 1
    pid1 = {**new_record("b", 60), "pid": 1, "pid_start": process_start(1) + 1}
    write_record(tmp_path / "pid1", pid1)
    assert lease(tmp_path / "pid1").acquire().endswith("(its pid now names another process))")

    # a pod replaced on this node: same host name, pid 1, another pid namespace. Its pid means
    # nothing here, so only its renewals count: live while renewed within its lease time...
    pod = {**new_record("c", 60), "pid": 1, "pid_ns": "pid:[4026530000]"}
    write_record(tmp_path / "pod", pod)
    with pytest.raises(LeaseHeld, match=r"pid 1 \(started .*, renewed 0 s ago\)"):
        lease(tmp_path / "pod").acquire()
    # ...stale once not renewed for that long
    write_record(tmp_path / "pod", {**pod, "renewed": time.time() - 61})
    warning = lease(tmp_path / "pod").acquire()
    assert warning.endswith("not renewed for 61 s (its lease time: 60 s))")
    assert me.pid_ns is not None and me.boot_id is not None  # Linux: both were compared


LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(300)
"""


def test_a_holder_frozen_inside_its_lease_lock_is_not_waited_for(tmp_path, monkeypatch):
    """A process that holds the lease's lock (a run frozen, SIGSTOP, in the milliseconds of a
    renewal) is waited for LOCK_WAIT_S (10 s; 0.3 here), then the taker exits 2 saying so."""
    monkeypatch.setattr(lease_module, "LOCK_WAIT_S", 0.3)
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / f"{LEASE_NAME}.lock"
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline() == "locked\n"
        with pytest.raises(LeaseHeld) as held:
            lease(tmp_path).acquire()
    finally:
        locker.kill()
        locker.wait()
    assert str(held.value) == (
        f"run_dir={tmp_path} is in use: {lock} has been locked for 0.3 s by another process (a "
        f"run stopped or hung while it renewed its lease); find it with `fuser {lock}`, or "
        "choose another exp_name"
    )
    assert lease(tmp_path).acquire() is None  # its lock went with it


def test_another_hosts_lease_is_live_until_it_expires(tmp_path):
    """Another host's pid cannot be looked at: live while renewed within its lease time (the
    line says when it expires), then taken over."""
    other = {**new_record("d", 60), "host": "other-host", "boot_id": "x", "pid": 4242}
    other["renewed"] = time.time() - 5
    write_record(tmp_path, other)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(other["renewed"] + 60))
    with pytest.raises(LeaseHeld) as held:
        lease(tmp_path).acquire()
    assert "the run of host other-host pid 4242 (started " in str(held.value)
    assert str(held.value).endswith(
        "renewed 5 s ago) holds "
        f"{tmp_path / LEASE_NAME}; wait for it to end, stop it (kill 4242 on other-host), or "
        f"choose another exp_name; if it is gone, its lease expires at {expires} and the same "
        "command then takes it over"
    )
    write_record(tmp_path, {**other, "renewed": time.time() - 90})
    warning = lease(tmp_path).acquire()
    assert "(host other-host pid 4242, started " in warning
    assert warning.endswith("not renewed for 90 s (its lease time: 60 s))")


def take_at_once(leases) -> list:
    """Each lease's acquire() on a thread of its own, all released at one moment: what each
    returned ("created", a warning) or raised (LeaseHeld)."""
    gate = threading.Barrier(len(leases))
    outcome: list = [None] * len(leases)

    def take(i):
        gate.wait()
        try:
            outcome[i] = leases[i].acquire() or "created"
        except LeaseHeld as e:
            outcome[i] = e

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def race(make, start_stale, rounds: int, width: int = 8) -> None:
    """Rounds of `width` threads taking one lease at once (from nothing, or a dead run's): one
    wins, the others are told it is held (by this process: a lease it holds is live to it)."""
    for round_ in range(rounds):
        leases = [make() for _ in range(width)]
        if round_ % 2:
            start_stale()
        outcome = take_at_once(leases)
        winners = [i for i, o in enumerate(outcome) if not isinstance(o, LeaseHeld)]
        assert len(winners) == 1, (round_, outcome)
        for o in outcome:
            assert not isinstance(o, LeaseHeld) or "taken by this process" in str(o), o
        leases[winners[0]].release()


def test_racing_takers_never_both_win(tmp_path):
    """8 threads at once on a new directory or on a dead run's lease: exactly one takes it, the
    others are told it is held (by this process: a lease it holds is live to it), 20 rounds."""
    dead = dead_process()
    stale = new_record("dead", 60, dead)
    race(lambda: lease(tmp_path), lambda: write_record(tmp_path, stale), rounds=20)
    assert list(tmp_path.iterdir()) == []


RACER = """
import sys, time
from pathlib import Path
from clm.lease import FileLease, LeaseHeld
directory, gate = Path(sys.argv[1]), Path(sys.argv[2])
lease = FileLease(directory, 60, "run_dir=x")
while not gate.exists():
    time.sleep(0.001)
try:
    print("took" if lease.acquire() else "created", flush=True)
    time.sleep(1)  # holding it while the others look
    lease.release()
except LeaseHeld as e:
    print("held:", e, flush=True)
"""


def test_racing_processes_take_a_dead_runs_lease_once(tmp_path):
    """4 processes released at once on a dead run's lease: one takes it over, the others exit
    as a second run does, naming it."""
    write_record(tmp_path / "run", new_record("dead", 60, dead_process()))
    gate = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "run"), str(gate)],
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # all started (python + clm.lease take ~0.2 s here)
    gate.touch()
    said = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    winner = [i for i, line in enumerate(said) if line == "took"]
    assert len(winner) == 1, said
    for i, line in enumerate(said):
        if i != winner[0]:
            assert line.startswith("held: run_dir=x is in use: the run of host "), said
            assert f" pid {racers[winner[0]].pid} (started " in line, said


def test_renewal_keeps_the_lease_fresh_and_reports_a_takeover(tmp_path):
    """The keeper renews every lease_s/4 (here 0.25 s); every read meanwhile sees a whole
    record. A lease another run took (it judged this one dead) is reported to `on_lost` and
    the release leaves that run's record alone."""
    ours = lease(tmp_path, lease_s=1)
    ours.acquire()
    lost = []
    keeper = Keeper([ours], on_lost=lambda lease, taker: lost.append(taker)).start()
    path = tmp_path / LEASE_NAME
    renewed = set()
    deadline = time.time() + 1.2
    while time.time() < deadline:
        record = json.loads(path.read_bytes())  # never half a record
        assert record["token"] == ours.token
        renewed.add(record["renewed"])
    assert len(renewed) >= 3

    taker = {**new_record("taker", 60), "host": "other-host", "pid": 7}
    data = json.dumps(taker).encode()
    scratch = tmp_path / "scratch"
    scratch.write_bytes(data)
    with ours._exclusive():  # as a taker writes: under the lock, not inside a renewal's round
        os.replace(scratch, path)
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    keeper.stop()
    assert lost and lost[0]["token"] == "taker" and lost[0]["host"] == "other-host"
    ours.release()
    assert path.read_bytes() == data


def test_a_run_leases_its_run_dir_and_a_save_dir_it_may_write_elsewhere(tmp_path, gcs_bucket):
    """Which leases a run takes (clm.lease.leases_for): its run_dir's always; save_dir's where
    it lies outside run_dir and the run may write or delete there, as an object on gs://, a
    file locally and on file://; none on other URLs. (gs:// on the emulator: a real bucket's
    client would first look for credentials, 15 s without any here.)"""
    from omegaconf import OmegaConf

    def leases(**keys):
        cfg = OmegaConf.create(
            {"run_dir": str(tmp_path / "run"), "save_dir": str(tmp_path / "run" / "checkpoints")}
            | {"save_frequency": 25, "overwrite_output_dir": False, "run_lease_s": 30}
            | keys
        )
        return [(type(lease).__name__, lease.where, lease.lease_s) for lease in leases_for(cfg)]

    run_dir = ("FileLease", str(tmp_path / "run" / LEASE_NAME), 30.0)
    assert leases() == [run_dir]
    assert leases(save_dir=str(tmp_path / "run")) == [run_dir]
    assert leases(save_dir=str(tmp_path / "shared")) == [
        run_dir,
        ("FileLease", str(tmp_path / "shared" / LEASE_NAME), 30.0),
    ]
    assert leases(save_dir=f"file://{tmp_path}/shared") == leases(save_dir=str(tmp_path / "shared"))
    assert leases(save_dir=f"{gcs_bucket}/x/ckpt/") == [
        run_dir,
        ("GcsLease", f"{gcs_bucket}/x/ckpt/{LEASE_NAME}", 30.0),
    ]
    assert leases(save_dir="memory://x") == [run_dir]
    # nothing to write there and nothing to delete: no lease (nor a directory made for one)
    assert leases(save_dir=str(tmp_path / "shared"), save_frequency=0) == [run_dir]
    assert len(leases(save_dir=gcs_bucket, save_frequency=0, overwrite_output_dir=True)) == 2


def test_overwrite_keeps_the_lease_of_a_save_dir(tmp_path, gcs_bucket):
    """overwrite_output_dir deletes a save_dir's checkpoints but not the lease the run holds
    there (locally and on gs://)."""
    local = tmp_path / "save"
    (local / "step_00000002").mkdir(parents=True)
    (local / "step_00000002" / "COMMITTED").touch()
    write_record(local, new_record("x", 60))
    checkpoint.remove_tree(local, keep=(LEASE_NAME,))
    assert [p.name for p in local.iterdir()] == [LEASE_NAME]

    import fsspec

    url = f"{gcs_bucket}/keep-{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe({f"{root}/step_00000002/COMMITTED": b"", f"{root}/{LEASE_NAME}": b"{}"})
    checkpoint.remove_tree(url, keep=(LEASE_NAME,))
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)] == [LEASE_NAME]


def test_a_gs_lease_is_decided_by_generation_preconditions(gcs_bucket):
    """On gs:// (the GCS API emulator, with the preconditions the fixture adds): created with
    ifGenerationMatch=0, renewed and taken over with ifGenerationMatch=<generation>, so of
    racing takers one wins; released only while the generation is still ours."""
    url = f"{gcs_bucket}/run-{uuid.uuid4().hex}/checkpoints"
    first = GcsLease(url, 60, f"save_dir={url}")
    assert first.acquire() is None
    created = first.generation
    with pytest.raises(LeaseHeld, match=r"save_dir=.* is in use: .*taken by this process"):
        GcsLease(url, 60, f"save_dir={url}").acquire()
    assert first.renew() is None and first.generation != created
    # a write that names the old generation is refused, as GCS refuses it
    with pytest.raises(FileExistsError):
        first.fs.call("DELETE", "b/{}/o/{}", first.bucket, first.key, ifGenerationMatch=created)
    first.release()
    assert not first.fs.exists(f"{first.bucket}/{first.key}")

    # a dead run's lease object: taken over by exactly one of 4 racing threads, 10 rounds (the
    # emulator serves one request at a time and queues 5: more would wait for gcsfs's retries)
    stale = json.dumps(new_record("dead", 60, dead_process())).encode()
    probe = GcsLease(url, 60, "x")

    def start_stale():
        probe.fs.pipe_file(f"{probe.bucket}/{probe.key}", stale)

    race(lambda: GcsLease(url, 60, f"save_dir={url}"), start_stale, rounds=10, width=4)

    # a lease object deleted under its holder (gsutil rm -r): written again at the renewal
    holder = GcsLease(url, 60, f"save_dir={url}")
    holder.acquire()
    probe.fs.rm_file(f"{probe.bucket}/{probe.key}")
    assert holder.renew() is None
    assert json.loads(probe.fs.cat_file(f"{probe.bucket}/{probe.key}"))["token"] == holder.token
    # a takeover record replaced under a renewing holder: the holder learns it lost
    taker = json.dumps({**new_record("taker", 60), "host": "other-host"}).encode()
    probe.fs.pipe_file(f"{probe.bucket}/{probe.key}", taker)
    assert holder.renew()["token"] == "taker"
    holder.release()  # not ours any more: left in place
    assert json.loads(probe.fs.cat_file(f"{probe.bucket}/{probe.key}"))["token"] == "taker"
