"""What a gloo collective does when the other of two processes dies or stops during it.

Starts two CPU processes in one gloo process group (a TCPStore on localhost, the group's timeout
`--timeout` seconds), lets them finish one all-reduce, then has rank 0 enter a second all-reduce
that rank 1 never joins, and after `--wait` seconds sends rank 1 SIGKILL or SIGSTOP. Prints, for
each, how long after the signal rank 0's all-reduce raised, and its error's first line: the facts
behind docs/RELIABILITY.md's paragraph on a dead or hung peer, which clm/watchdog.py bounds.

    PYTHONPATH=. .venv/bin/python bench/gloo_peer_loss.py [--timeout 5] [--wait 0.5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(rank: int, go: Path, timeout: float) -> None:
    """One process of the pair: rank 0 reports its second all-reduce; rank 1 waits to be
    signalled."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    dist.all_reduce(torch.ones(4))
    print("ready", flush=True)
    if rank == 1:
        time.sleep(3600)  # never joins the next all-reduce; signalled meanwhile
        return
    while not go.exists():
        time.sleep(0.001)
    entered = time.time()
    try:
        dist.all_reduce(torch.ones(4))
        outcome = {"error": None}
    except Exception as e:  # what gloo raises is the measurement
        outcome = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    outcome.update(entered=entered, raised=time.time())
    print(json.dumps(outcome), flush=True)
    os._exit(0)  # the group's other member is gone or stopped: skip the teardown


def _line(proc: subprocess.Popen, wanted) -> str:
    """The first line of `proc`'s stdout that `wanted` accepts (gloo prints its own lines)."""
    for line in proc.stdout:
        if wanted(line.strip()):
            return line.strip()
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(signum: int, timeout: float, wait: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(rank), "--go", str(go)]
                + ["--timeout", str(timeout)],
                env=dict(env, RANK=str(rank)),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for rank in (0, 1)
        ]
        for proc in procs:
            assert _line(proc, lambda line: line == "ready"), "a worker did not start"
        go.touch()
        time.sleep(wait)  # rank 0 is inside the all-reduce by now
        signalled = time.time()
        procs[1].send_signal(signum)
        result = json.loads(_line(procs[0], lambda line: line.startswith("{")))
        procs[0].wait()
        procs[1].kill()
        procs[1].wait()
    result["after_signal_s"] = result["raised"] - signalled
    result["in_call_s"] = result["raised"] - result["entered"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="process group timeout (s)")
    parser.add_argument("--wait", type=float, default=0.5, help="s in the call before the signal")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.go, args.timeout)
        return
    import torch

    print(
        f"# torch {torch.__version__}, gloo on localhost, 2 processes, timeout {args.timeout:g} s"
    )
    for name, signum in (("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
        r = measure(signum, args.timeout, args.wait)
        print(
            f"{name}: rank 0's all-reduce raised {r['after_signal_s'] * 1000:.0f} ms after the "
            f"signal ({r['in_call_s']:.2f} s in the call): {r['error']}"
        )


if __name__ == "__main__":
    main()
