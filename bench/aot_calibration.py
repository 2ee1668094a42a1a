"""clm.plan's memory model against the TPU compiler's, configuration by configuration.

    PYTHONPATH=. .venv/bin/python bench/aot_calibration.py OUT_DIR [NAME ...]

For each configuration (`CONFIGS`: two slices, two sequence lengths, activation checkpointing
on and off, dropping and dropless; the benchmark preset and an 8-layer Mixtral-8x22B), runs
`python -m clm.aot ... --json OUT_DIR/NAME.json` (skipped when that file exists, so an
interrupted run resumes) and `clm.plan` on the same overrides, and prints a markdown table:
the compiler's peak per device (the larger of the train and eval steps), the planner's, and
their ratio. The compiles take minutes each (docs/PERFORMANCE.md, TPU section).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from clm import plan

GIB = 2**30
EIGHT = "model.config_path=bench/tpu/mixtral822_8layers.json"
PRESET = ["+experiment=gbs256_tpu"]
CONFIGS = {
    "preset-v5p-512": [*PRESET, "slice=v5p-512"],
    "preset-v5p-256": [*PRESET, "slice=v5p-256"],
    "8l-8k-v5p-512": [*PRESET, EIGHT, "max_length=8192", "slice=v5p-512"],
    # the same program unrolled: compile time per layer, and FLOPs per step (the compiler's
    # cost analysis counts a scanned loop's body once)
    "8l-8k-unrolled-v5p-512": [
        *PRESET,
        EIGHT,
        "max_length=8192",
        "xla_scan_layers=false",
        "slice=v5p-512",
    ],
    "8l-8k-nockpt-v5p-512": [
        *PRESET,
        EIGHT,
        "max_length=8192",
        "model.gradient_checkpointing=false",
        "slice=v5p-512",
    ],
    "8l-32k-dropless-v5p-256": [*PRESET, EIGHT, "model.capacity_factor=0", "slice=v5p-256"],
    "8l-8k-dropless-nockpt-v5p-256": [
        *PRESET,
        EIGHT,
        "max_length=8192",
        "model.capacity_factor=0",
        "model.gradient_checkpointing=false",
        "slice=v5p-256",
    ],
}


def compiler_peak(result: dict) -> float | None:
    programs = [result[p] for p in ("train_step", "eval_step") if result.get(p)]
    if not programs or result.get("error"):
        return None
    return max(p["memory"]["peak_bytes"] for p in programs)


def main(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names or CONFIGS:
        overrides = CONFIGS[name]
        path = out / f"{name}.json"
        if not path.exists():
            command = [sys.executable, "-m", "clm.aot", *overrides, "--json", str(path)]
            print("$", " ".join(command[1:]), flush=True)
            subprocess.run(command, check=False)
        result = json.loads(path.read_text()) if path.exists() else {}
        estimate = plan.plan(overrides).memory.peak
        peak = compiler_peak(result)
        ratio = f"{estimate / peak:.2f}" if peak else "-"
        shown = f"{peak / GIB:.1f}" if peak else f"does not fit ({result.get('error', '?')[:60]})"
        rows.append(f"| {name} | {shown} | {estimate / GIB:.1f} | {ratio} |")
    print("| configuration | compiler peak GiB | clm.plan GiB | plan / compiler |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
