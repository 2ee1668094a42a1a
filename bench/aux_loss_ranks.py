"""How far 2-process torchrun losses are from 1 process, with the load-balancing loss on and off.

Under torchrun each rank computes the Switch load-balancing loss on its own rows and the ranks
average it (as Megatron does): E * sum_e f_e * P_e with f (the fraction of tokens sent to each
expert) and P (the mean router probability) taken over one rank's rows, then averaged. One
process takes f and P over all rows of the global batch. The mean of per-rank products is not
the product of global means, so from step 1 the aux loss, its gradient and then the weights
differ; the NLL of step 1 is identical (the same weights see the same rows), later losses drift
apart. With the aux loss off the runs agree to fp32 reduction order (tests/test_distributed.py).

Runs the embedded model (router_aux_loss_coef 0.02) on the same global batch of 8 x 64 tokens,
`python clm/run_clm.py per_device_train_batch_size=8` against `torchrun --nproc_per_node=2
clm/run_clm.py per_device_train_batch_size=4` (OMP_NUM_THREADS=1, gloo on CPU), and prints the
largest absolute differences of train/loss, eval/loss and train/aux_loss per stretch of steps.

    PYTHONPATH=. python bench/aux_loss_ranks.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "backend=cpu",
    "max_length=64",
    "n_eval_examples=5",
    "eval_frequency=2",
    "target_eval_loss=0",
    "save_frequency=0",
    "progress_bar=false",
]


def train(out: Path, processes: int, steps: int, extra: list[str]) -> list[dict]:
    from clm.metrics import read_metrics

    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    rows = 8 // processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(out / "hf_home")}
    subprocess.run(
        [*launcher, str(ROOT / "clm" / "run_clm.py"), f"output_dir={out}", *COMMON]
        + [f"max_steps={steps}", f"per_device_train_batch_size={rows}", *extra],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    return read_metrics(out / "embedded_default")


def largest(one: list[dict], two: list[dict], key: str, first: int, last: int) -> float | None:
    diffs = [
        abs(a[key] - b[key])
        for a, b in zip(one, two, strict=True)
        if key in a and first <= a["step"] <= last
    ]
    return max(diffs) if diffs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    stretches = [(1, 1), (1, 6), (1, args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (
            ("aux loss on (0.02)", []),
            ("aux loss off", ["model.router_aux_loss_coef=0"]),
        ):
            one = train(Path(tmp) / f"one{len(extra)}", 1, args.steps, extra)
            two = train(Path(tmp) / f"two{len(extra)}", 2, args.steps, extra)
            aux = (one[0]["train/aux_loss"], two[0]["train/aux_loss"])
            print(f"{label}: step 1 train/aux_loss {aux[0]:.4f} (1 process), {aux[1]:.4f} (2)")
            print("  largest |2 processes - 1 process|:")
            for first, last in stretches:
                cells = []
                for key in ("train/loss", "eval/loss", "train/aux_loss"):
                    value = largest(one, two, key, first, last)
                    cells.append(f"{key} {'-' if value is None else f'{value:.1e}'}")
                print(f"    steps {first}-{last}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
