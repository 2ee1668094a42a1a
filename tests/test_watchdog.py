"""The step watchdog (clm/watchdog.py): its bounds, its one line, what it writes before the exit,
the heartbeats that name a lost peer, and the XLA hosts' gloo group losing a host.

The end-to-end runs of two torchrun-style processes (kill -9 and SIGSTOP of a rank, then the
same command resuming exactly) are in tests/test_distributed.py, beside the uninterrupted
2-process run they compare with.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ROOT, clean_env
from omegaconf import OmegaConf

from clm import watchdog
from clm.errors import OutputWriteError
from clm.metrics import MetricsWriter, read_metrics
from clm.mlperf import MLPerfLogger
from clm.watchdog import Heartbeats, Watchdog, communication_error


def test_bounds_first_then_the_floor_then_growth_with_the_longest(monkeypatch):
    """Warm-up steps (3 here, as on XLA), the first eval and the first save get the first bound;
    later ones max(floor, 10 x the longest of their kind after warm-up); a stop-signal check
    (record=False) is bounded like a step and neither counted nor measured."""
    clock = [0.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    watch = Watchdog(step_timeout_s=10, first_timeout_s=100, warmup_steps=3, exit=pytest.fail)
    try:

        def run(kind, seconds, record=True):
            watch.begin(kind, f"a {kind}", "device", record)
            bound = watch._activity.bound
            clock[0] += seconds
            watch.end()
            return bound

        assert [run("step", 50) for _ in range(3)] == [100, 100, 100]  # warm-up: not measured
        assert run("step", 2) == 10  # the floor: no step measured yet
        assert run("step", 3) == 20  # 10 x 2 s
        assert run("step", 0.1, record=False) == 30  # 10 x 3 s, and not measured
        assert run("step", 1) == 30
        assert [run("eval", 4), run("eval", 4), run("eval", 1)] == [100, 10, 40]
        assert [run("save", 60), run("save", 1)] == [100, 10]
    finally:
        watch.stop()


def test_off_means_no_thread_and_torch_default_timeouts():
    before = threading.active_count()
    watch = Watchdog(step_timeout_s=0)
    watch.begin("step", "step 1", "data")
    assert watch._activity is None and threading.active_count() == before
    watch.on_error(RuntimeError("gloo: Connection reset by peer"))  # returns: raised as before
    assert watchdog.collective_timeout(OmegaConf.create({"step_timeout_s": 0})) is None
    on = OmegaConf.create({"step_timeout_s": 600, "first_step_timeout_s": 3600})
    assert watchdog.collective_timeout(on).total_seconds() == 3600


def test_a_stalled_data_read_ends_the_process_with_one_line_after_writing_the_logs(tmp_path, capfd):
    """A step blocked on a real read that never returns: one line naming the step and what it
    waited for, the metrics on disk, one aborted run_stop, then exit(1) (os._exit in a run)."""
    metrics = MetricsWriter(tmp_path)
    mlperf = MLPerfLogger(OmegaConf.create({}), tmp_path / "mlperf.log")
    mlperf.run_start()
    metrics.log(1, {"train/loss": 2.5})
    exits = []
    watch = Watchdog(step_timeout_s=0.2, first_timeout_s=0.2, exit=exits.append)
    watch.attach(metrics, mlperf, lambda: 8)
    never, writer = os.pipe()

    def train():
        watch.begin("step", "step 2", "data")
        os.read(never, 1)  # the next batch never comes

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not exits and time.monotonic() < deadline:
        time.sleep(0.02)
    os.write(writer, b"x")
    thread.join()
    watch.stop()
    assert exits == [1]
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"error: step 2: no progress for 0\.\d s \(bound 0\.2 s\) while waiting for data", lines[0]
    ), lines
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.5}]
    mlperf.run_stop("aborted", 8)  # what the training thread's `finally` does: nothing more
    stops = [
        line for line in (tmp_path / "mlperf.log").read_text().splitlines() if "run_stop" in line
    ]
    assert (
        len(stops) == 1 and '"status": "aborted"' in stops[0] and '"samples_count": 8' in stops[0]
    )


def test_a_failed_collective_is_recognized_through_its_wrappers():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Read error "
        "[127.0.0.1]:5864: Connection reset by peer"
    )
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise OutputWriteError("step_00000004: could not write the checkpoint") from e
    except OutputWriteError as wrapped:
        assert communication_error(wrapped) is gloo
    dcp_style = RuntimeError("checkpoint failed")
    dcp_style.failures = {1: (RuntimeError("Timed out waiting 5000ms for recv operation"), "tb")}
    assert "Timed out" in str(communication_error(dcp_style))
    assert communication_error(ValueError("train shard: not a JSON line")) is None
    assert communication_error(RuntimeError("non-finite loss at step 3")) is None


def test_heartbeats_name_the_peer_that_stopped_and_the_store_host_when_it_is_gone():
    """Real heartbeats through a real TCPStore (this process is both ranks)."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, 3, True, wait_for_workers=False)
    ranks = [Heartbeats(server, rank, 3, interval=0.1) for rank in (0, 1)]  # rank 2 never beats
    try:
        time.sleep(0.3)
        assert ranks[0].lost() == "rank 2 never sent a heartbeat: lost or hung"
        ranks[1].stop()
        time.sleep(0.2)
        lost = ranks[0].lost("host")
        assert re.fullmatch(
            rf"host 1 \(pid {os.getpid()} on {re.escape(socket.gethostname())}\) sent no "
            r"heartbeat for \d+\.\d s, host 2 never sent a heartbeat: lost or hung",
            lost,
        ), lost
        port = server.port
        del server  # rank 0's process, and the store it hosts, are gone
        assert ranks[1].lost() == (
            f"the heartbeat store at 127.0.0.1:{port}, hosted by rank 0, does not answer "
            "(Connection refused): rank 0 is lost or hung"
        )
    finally:
        for beats in ranks:
            beats.stop()


# The XLA backend's hosts: torch_xla 2.9's CPU runtime runs one process per machine (its PJRT
# CPU client has no multi-process mode: two processes started with RANK/WORLD_SIZE each report
# xr.process_count() == 1 and process_index() == 0), so two "hosts" are two processes whose
# torch_xla is told it is one of two (process_count/process_index), and what runs between them
# is the real code path: XlaBackend's gloo group over the xla:// rendezvous (a TCPStore on host
# 0), its barrier and any_process, and the watchdog built for an xla backend.
XLA_HOSTS = textwrap.dedent("""
    import os, sys, time, types
    import torch_xla.runtime as xr
    xr.process_count = lambda: 2
    xr.process_index = lambda: int(os.environ["RANK"])
    xr.use_spmd()
    from omegaconf import OmegaConf
    from clm.backends.xla_backend import XlaBackend, _host_process_group
    from clm.watchdog import Watchdog, collective_timeout

    cfg = OmegaConf.create({"step_timeout_s": 2, "first_step_timeout_s": 30})
    host = types.SimpleNamespace(
        process_group=_host_process_group(collective_timeout(cfg)), name="xla",
        compile_count=lambda: 0)
    watch = Watchdog.for_run(cfg, host)
    assert watch.peer == "host" and watch.heartbeats is not None
    for step in range(1, 100000):
        watch.begin("step", f"step {step}", "collective")
        try:
            XlaBackend.any_process(host, False)
            XlaBackend.barrier(host)
        except Exception as error:
            watch.on_error(error)
            raise
        watch.end()
        if step == 20:
            print("READY", flush=True)
        time.sleep(0.02)
    """)


def test_a_dead_xla_host_ends_the_other_in_bounded_time_naming_it(tmp_path):
    """kill -9 of host 1 while both sit in the hosts' group's collectives: host 0 exits 1 with
    one line naming host 1, within the first bound plus 30 s."""
    env = clean_env(tmp_path)
    env.update(PYTHONPATH=str(ROOT), PJRT_DEVICE="CPU", MASTER_ADDR="127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(probe.getsockname()[1])
    hosts = []
    try:
        for rank in (0, 1):
            with open(tmp_path / f"host{rank}.out", "w") as out:  # the child keeps its copy
                hosts.append(
                    subprocess.Popen(
                        [sys.executable, "-c", XLA_HOSTS],
                        cwd=ROOT,
                        env={**env, "RANK": str(rank)},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 120
        while "READY" not in (tmp_path / "host0.out").read_text():
            assert time.monotonic() < deadline and hosts[0].poll() is None, (
                tmp_path / "host0.out"
            ).read_text()[-3000:]
            time.sleep(0.05)
        killed = time.monotonic()
        hosts[1].kill()
        assert hosts[0].wait(timeout=30 + 30) == 1
        assert time.monotonic() - killed <= 30 + 30
        lines = (tmp_path / "host0.out").read_text().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
        assert re.fullmatch(
            r"error: step \d+: a collective failed while waiting for collective \(.+\); "
            rf"host 1 \(pid {hosts[1].pid} on .+\) sent no heartbeat for [\d.]+ s: lost or hung",
            errors[0],
        ), errors[0]
    finally:
        for proc in hosts:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
