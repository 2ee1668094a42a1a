"""What W&B logging adds to a run: its start, each logged record, and its finish.

    PYTHONPATH=. .venv/bin/python bench/wandb_overhead.py [runs]

Each of `runs` fresh processes (default 5) does what `clm.trainer.run` does on the main process
with `wandb.enabled=true` and WANDB_MODE=offline: starts a `clm.wandb_log.WandbRun` on the
embedded default's composed config (importing wandb included), hands it 200 records shaped like
the embedded default's metrics.jsonl lines (the trainer's `MetricsWriter.log` call), and finishes
it. Times are wall seconds in that process, medians over the runs; HOME and TMPDIR point into a
temporary directory so nothing of the caller's is touched.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORD = {
    "train/loss": 9.5,
    "train/grad_norm": 1.2,
    "train/lr": 0.002,
    "train/aux_loss": 2.0,
    "moe/drop_fraction": 0.01,
    "moe/load_max_over_mean": 1.5,
    "perf/tokens_per_sec": 1700.0,
    "perf/tflops_per_device": 0.05,
    "train/tokens_seen": 2048,
}


def child(run_dir: Path) -> dict:
    from clm.config import register_resolvers
    from clm.nemo.recipe import compose  # our Hydra config, composed as run_clm.py does

    register_resolvers()
    cfg = compose([f"output_dir={run_dir.parent}", "exp_name=w", "wandb.enabled=true"])
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").touch()
    t0 = time.perf_counter()
    from clm.wandb_log import WandbRun

    run = WandbRun(cfg, run_dir, None, resumed=False)
    t1 = time.perf_counter()
    assert run.active
    for step in range(1, 201):
        run.log(step, {**RECORD, "train/loss": 10.0 / step})
    t2 = time.perf_counter()
    run.finish(0)
    t3 = time.perf_counter()
    return {"start": t1 - t0, "log_us": (t2 - t1) / 200 * 1e6, "finish": t3 - t2}


def main(runs: int) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, WANDB_MODE="offline", HOME=tmp, TMPDIR=tmp)
        for i in range(runs):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", f"{tmp}/runs{i}/w"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for key, unit in (("start", "s"), ("log_us", "us per record"), ("finish", "s")):
        values = sorted(r[key] for r in results)
        print(
            f"{key:7s} median {statistics.median(values):.3f} {unit} "
            f"(min {values[0]:.3f}, max {values[-1]:.3f}, {runs} runs)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(Path(sys.argv[2]))))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
