"""Golden per-step numbers: the train loss, gradient norm and eval loss of reference runs,
checked in under tests/golden/ and compared bitwise by the tests that make those runs.

A refactor must keep them; a change that moves a number says why in its commit and
regenerates the files in that same commit:

    CLM_WRITE_GOLDEN=1 make test ARGS="-k golden"        # the suite's runs
    make run && python tests/golden.py write make_run runs/embedded_default
    python tests/golden.py check make_run runs/embedded_default   # after a `make run`

CPU float results depend on the kernels' instruction set and thread count, so each file
records the machine class it was written on (torch version, CPU capability, cores). On
another class the comparison is to 1e-4 relative and says so; on the same class it is
bitwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
KEYS = ("train/loss", "train/grad_norm", "eval/loss")
OTHER_MACHINE_RTOL = 1e-4


def machine() -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
    }


def per_step(records: list[dict]) -> list[dict]:
    """The golden keys of every record that has one, with its step."""
    rows = []
    for record in records:
        values = {k: record[k] for k in KEYS if k in record}
        if values:
            rows.append({"step": record["step"], **values})
    return rows


def write(name: str, records: list[dict]) -> Path:
    path = GOLDEN_DIR / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    rows = ",\n  ".join(json.dumps(row) for row in per_step(records))
    path.write_text(f'{{"machine": {json.dumps(machine())},\n "steps": [\n  {rows}\n ]}}\n')
    return path


def differences(name: str, records: list[dict]) -> list[str]:
    """What differs from the golden file `name` (empty: the same numbers)."""
    golden = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    want, got = golden["steps"], per_step(records)

    def layout(rows):
        return [(r["step"], sorted(r)) for r in rows]

    if layout(got) != layout(want):
        return [f"steps or keys differ: got {layout(got)}, golden {layout(want)}"]
    bitwise = golden["machine"] == machine()
    problems = []
    for g, w in zip(got, want, strict=True):
        for key in KEYS:
            if key not in w:
                continue
            if bitwise:
                same = g[key] == w[key]
            else:
                same = math.isclose(g[key], w[key], rel_tol=OTHER_MACHINE_RTOL)
            if not same:
                problems.append(f"step {w['step']} {key}: got {g[key]!r}, golden {w[key]!r}")
    if problems and not bitwise:
        problems.append(
            f"(compared to {OTHER_MACHINE_RTOL} relative: written on {golden['machine']}, "
            f"this is {machine()})"
        )
    return problems


def check(name: str, records: list[dict]) -> None:
    """Assert the run's per-step numbers are golden file `name`'s (CLM_WRITE_GOLDEN=1: write
    it instead)."""
    if os.environ.get("CLM_WRITE_GOLDEN") == "1":
        write(name, records)
        return
    problems = differences(name, records)
    assert not problems, (
        f"tests/golden/{name}.json: the run's numbers moved (regenerate it in the commit that "
        "says why: CLM_WRITE_GOLDEN=1 and the test):\n" + "\n".join(problems[:10])
    )


def _main(argv: list[str]) -> int:
    """`python tests/golden.py write|check NAME RUN_DIR`."""
    if len(argv) != 3 or argv[0] not in ("write", "check"):
        print("usage: python tests/golden.py write|check NAME RUN_DIR", file=sys.stderr)
        return 2
    action, name, run_dir = argv
    metrics = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if action == "write":
        print(f"wrote {write(name, records)}")
        return 0
    problems = differences(name, records)
    for line in problems:
        print(line)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    verdict = "differs" if problems else "same as golden"
    print(f"{name}: {len(per_step(records))} records, {len(evals)} evals; {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
