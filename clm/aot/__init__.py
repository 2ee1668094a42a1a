"""Compile a run's train and eval steps for a TPU slice with the TPU compiler, on a CPU host.

    python -m clm.aot +experiment=gbs256_tpu slice=v5p-512 [--json out.json] [--workdir DIR]

It takes the overrides of a run and `clm.plan`'s `slice=` (and `hbm_reserve=`); `num_slices`
is the run's own key. The run's config is composed, validated and finalized for the slice as
`clm.plan` does (the gradient accumulation a fixed global batch needs there included). Then:

1. trace (`clm.aot.trace`, a torch_xla process on the CPU runtime): the run as `run_clm.py`
   builds it on backend=xla, one eval batch and one steady-state optimizer step, on
   placeholders (no host holds the weights), for the slice's device count;
2. compile (`clm.aot.compile`, this process: jax's compile-only client and libtpu): both
   programs SPMD-partitioned over the slice's topology, the parameters and AdamW state
   donated (aliased to the outputs that update them), as torch_xla compiles a step on a pod;
3. report the TPU compiler's own figures, per device.

Exit status: 0 fits, 1 does not fit (the peak, or an allocation the compiler refused, exceeds
the usable HBM: the chip's HBM less `hbm_reserve`, 10% by default), 2 a usage or
configuration error or a missing TPU compiler (one line on stderr).

`--json PATH` writes the figures (bytes and FLOPs per device, as numbers):
  devices                  devices of the slice (x num_slices)
  topology                 the TPU topology compiled for ("v5p:4x8x8"), num_slices
  hbm_bytes, usable_bytes  HBM per device (clm.plan's chip table) and that less the reserve
  fits                     peak_bytes of both programs <= usable_bytes
  kernels                  the attention kernel and the experts implementation traced
  trace_seconds            torch_xla's trace of both programs
  train_step, eval_step:
    memory.argument_bytes  inputs held on the device (parameters, AdamW state, batch shard)
    memory.output_bytes    outputs
    memory.alias_bytes     outputs written into donated inputs' buffers (counted once)
    memory.temp_bytes      temporaries at the compiler's scheduled peak
    memory.code_bytes      the program's code
    memory.peak_bytes      argument + output - alias + temp + code
    flops                  the compiler's FLOPs per device per step (its cost analysis, which
                           counts a loop body once: see loop_trips)
    loop_trips             the most times a computation runs per step (the scanned layers' loop
                           runs once per layer; 1: no loops, flops is per step)
    model_flops            clm.model_math's FLOPs per device per step: 6 x active parameters
                           + attention per token for training (forward only, a third of
                           it, for eval), the MFU numerator
    collectives            {kind: {count, bytes}} in the optimized program: all-gather,
                           reduce-scatter, all-reduce, all-to-all, collective-permute; bytes
                           of their results per device (clm.aot.hlo)
    tpu_kernels            {count, shapes}: the Pallas kernels (TPU custom calls) per step and
                           their per-device result shapes (flash attention's, here)
    fsdp_bytes             what FSDP over the mesh implies per device per step: the gathered
                           weights (all-gather: forward, and again for the backward) and the
                           gradients (reduce-scatter), in parameter bytes
    cost_model_seconds     the compiler's estimate of the step's time (null: unavailable)
    mfu                    model_flops / (cost_model_seconds x the chip's peak) (null likewise)
    compile_seconds        libtpu's compile time on this host
    peak_buffers           the largest buffers live at the memory peak (the compiler's buffer
                           assignment): name, bytes, shape, source (torch op, file:line)
  error                    the compiler's refusal, when a program does not fit (then the
                           program has no figures)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from clm import plan as plan_lib
from clm.aot import report
from clm.config import ConfigError, usage_error

PROGRAMS = ("eval_step", "train_step")
CPU_RUNTIME_DEVICES = 8  # the trace's CPU runtime; its mesh has the target's device count


def topology_name(kind: str, chips: int) -> str:
    """The TPU topology of a slice of `chips` chips, as libtpu names it ("v5p:4x8x8").

    v4 and v5p slices are 3-D tori (v5p-8: 2x2x1, v5p-16: 2x2x2, then the smallest dimension
    doubles, the last of equals first: 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...); v5e and v6e slices
    are 2-D (1x1, 2x2, 2x4, 4x4, 4x8, ...): the shapes of Cloud TPU's topology tables.
    """
    dims = [2, 2, 1] if kind in ("v4", "v5p") else [2, 2]
    if kind in ("v5e", "v6e") and chips == 1:
        dims = [1, 1]
    elif chips < 4 or chips & (chips - 1):
        raise ConfigError(f"{kind} slice of {chips} chips: clm.aot knows power-of-two slices")
    while dims[0] * dims[1] * (dims[2] if len(dims) == 3 else 1) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return f"{kind}:{'x'.join(map(str, dims))}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        json_path, workdir, argv = _own_options(argv)
        run = _plan(argv)
    except Exception as e:  # noqa: BLE001 - usage_error picks the user's mistakes
        if (message := usage_error(e)) is None:
            raise
        print(message, file=sys.stderr)
        return 2
    from clm.aot import compile as compile_lib

    with tempfile.TemporaryDirectory(prefix="clm-aot-") as scratch:
        work = Path(workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        for key, value in compile_lib.COMPILE_ENV.items():
            os.environ.setdefault(key, value)
        flags = compile_lib.dump_flags(work / "xla_dump")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        name = topology_name(run.slice.kind, run.slice.chips)
        try:
            topo = compile_lib.topology(name, run.num_slices)
        except compile_lib.LibtpuMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if len(topo.devices) != run.devices:
            print(
                f"error: {name} x {run.num_slices} has {len(topo.devices)} devices, the run "
                f"{run.devices}: clm.aot compiles for one device per chip",
                file=sys.stderr,
            )
            return 2
        result = _trace_and_compile(run, name, topo, work, compile_lib)
    if result is None:
        return 2
    print(report.render(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["fits"] else 1


def _own_options(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(--json PATH, --workdir DIR, the rest)."""
    found = {"--json": None, "--workdir": None}
    rest = []
    args = iter(argv)
    for arg in args:
        key, sep, value = arg.partition("=")
        if key in found:
            found[key] = value if sep else next(args, None)
            if not found[key]:
                raise ConfigError(f"{key} needs a path")
        else:
            rest.append(arg)
    return found["--json"], found["--workdir"], rest


def _plan(argv: list[str]) -> plan_lib.Plan:
    run = plan_lib.plan(argv)
    if not run.slice.is_tpu:
        raise ConfigError(f"slice={run.slice.name}: clm.aot compiles for TPU slices only")
    return run


def _trace_and_compile(run: plan_lib.Plan, name: str, topo, work: Path, compile_lib) -> dict | None:
    OmegaConf.save(
        OmegaConf.create(OmegaConf.to_container(run.config, resolve=True)), work / "config.yaml"
    )
    (work / "target.json").write_text(json.dumps({"devices": run.devices}))
    print(
        f"tracing the train and eval steps for {run.devices} devices (torch_xla, CPU runtime)",
        flush=True,
    )
    start = time.perf_counter()
    env = {
        **os.environ,
        **compile_lib.COMPILE_ENV,
        "PJRT_DEVICE": "CPU",
        "XLA_HLO_DEBUG": "1",  # the torch op and Python line of each instruction (peak buffers)
        "CPU_NUM_DEVICES": str(min(CPU_RUNTIME_DEVICES, run.devices)),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "clm.aot.trace", str(work)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        print(
            f"error: the trace failed: {lines[-1] if lines else proc.returncode}", file=sys.stderr
        )
        return None
    facts = json.loads((work / "trace.json").read_text())
    result = report.header(run, name, facts, time.perf_counter() - start)
    for program in PROGRAMS:
        print(f"compiling the {program.replace('_', ' ')} for {name} (libtpu)", flush=True)
        text = (work / f"{program}.hlo").read_text()
        text = compile_lib.with_aliases(text, facts[program]["aliases"], facts[program]["outputs"])
        try:
            compiled = compile_lib.compile_hlo(text, topo)
        except Exception as e:  # XlaRuntimeError; out of memory is the one we expect
            message = str(e).strip()
            if "RESOURCE_EXHAUSTED" not in message:
                raise
            result[program] = None
            result["error"] = f"{program}: {compile_lib.oom_summary(message)}"
            result["fits"] = False
            break  # the other program would not fit either: its inputs are the same
        result[program] = report.program_figures(run, facts, program, compiled)
        result[program]["peak_buffers"] = compile_lib.read_peak(work / "xla_dump")
        print(f"  {compiled.compile_seconds:.0f} s", flush=True)
    if result.get("error") is None:
        result["fits"] = all(
            result[p]["memory"]["peak_bytes"] <= result["usable_bytes"] for p in PROGRAMS
        )
    return result
