"""`python -m clm.aot`'s figures: what the TPU compiler reported, against the model's own numbers.

`header` and `program_figures` build the JSON result (keys documented in clm/aot/__init__.py),
`render` the text report. No torch and no jax here.
"""

from __future__ import annotations

import math

from clm import plan as plan_lib
from clm.aot.hlo import KINDS, collectives, executions, tpu_kernels
from clm.sharding import partition_spec

GIB = 2**30


def header(run: plan_lib.Plan, topology: str, facts: dict, trace_seconds: float) -> dict:
    usable = run.slice.chip.hbm_bytes * (1 - run.hbm_reserve)
    return {
        "slice": run.slice.name,
        "num_slices": run.num_slices,
        "topology": topology,
        "devices": run.devices,
        "mesh": facts["mesh"],
        "chip": run.slice.chip.label,
        "hbm_bytes": run.slice.chip.hbm_bytes,
        "usable_bytes": usable,
        "hbm_reserve": run.hbm_reserve,
        "kernels": {
            "attention": facts["attention_kernel"],
            "experts": facts["experts_implementation"],
            "scan_layers": bool(run.config.xla_scan_layers),
        },
        "gradient_accumulation_steps": facts["gradient_accumulation_steps"],
        "parameters": facts["parameters"],
        "trace_seconds": trace_seconds,
        "error": None,
        "fits": None,
        "eval_step": None,  # filled as each program compiles
        "train_step": None,
    }


def program_figures(run: plan_lib.Plan, facts: dict, program: str, compiled) -> dict:
    train = program == "train_step"
    tokens = facts["train_tokens_per_step" if train else "eval_tokens_per_step"]
    per_token = facts["flops_per_token"] if train else facts["flops_per_token"] / 3
    model_flops = per_token * tokens / run.devices
    seconds = compiled.cost_model_seconds if compiled.cost_model_seconds > 0 else None
    peak = run.slice.chip.peak_tflops * 1e12
    return {
        "memory": {
            "argument_bytes": compiled.argument_bytes,
            "output_bytes": compiled.output_bytes,
            "alias_bytes": compiled.alias_bytes,
            "temp_bytes": compiled.temp_bytes,
            "code_bytes": compiled.code_bytes,
            "peak_bytes": compiled.peak_bytes,
        },
        "flops": compiled.flops,
        # the cost analysis counts a loop body once: not a per-step figure when this is > 1
        "loop_trips": max(executions(compiled.optimized_hlo).values(), default=1),
        "model_flops": model_flops,
        "collectives": collectives(compiled.optimized_hlo),
        "tpu_kernels": tpu_kernels(compiled.optimized_hlo),
        "fsdp_bytes": fsdp_bytes(run, facts["gradient_accumulation_steps"] if train else 1, train),
        "cost_model_seconds": seconds,
        "mfu": model_flops / (seconds * peak) if seconds else None,
        "compile_seconds": compiled.compile_seconds,
    }


def fsdp_bytes(run: plan_lib.Plan, micro_batches: int, train: bool) -> dict[str, float]:
    """Per device per step, what FSDP over the mesh's fsdp axis implies: each micro-batch
    gathers every weight it uses (whole along fsdp, still split along tensor and expert), in
    the forward and again in the backward, and reduce-scatters its gradients to the shards."""
    sizes = run.axis_sizes
    gathered = 0.0
    for name, shape in plan_lib.parameters(run.model):
        spec = partition_spec(name, shape, sizes)
        if "fsdp" in {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}:
            gathered += math.prod(shape) / plan_lib.shard_factor(spec, sizes, exclude="fsdp")
    gathered *= plan_lib.DTYPE_BYTES[run.dtype]
    if not train:
        return {"all-gather": gathered, "reduce-scatter": 0.0}
    return {
        "all-gather": 2 * micro_batches * gathered,
        "reduce-scatter": micro_batches * gathered / sizes["fsdp"],
    }


def render(result: dict) -> str:
    programs = [("train_step", "train step"), ("eval_step", "eval step")]
    mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
    kernels = result["kernels"]
    lines = [
        f"slice     {result['slice']}"
        + (f" x {result['num_slices']} slices" if result["num_slices"] > 1 else "")
        + f": {result['devices']} {result['chip']} devices, topology {result['topology']}; "
        f"mesh {mesh}",
        f"program   attention: {kernels['attention']}; experts: {kernels['experts']}; "
        f"layers {'scanned (one loop body)' if kernels['scan_layers'] else 'unrolled'}; "
        f"gradient_accumulation_steps={result['gradient_accumulation_steps']}",
        f"trace     {result['trace_seconds']:.0f} s (torch_xla, placeholders)",
        "",
        f"{'per device (GiB)':<30}" + "".join(f"{label:>14}" for _, label in programs),
    ]
    rows = [
        ("arguments", "argument_bytes"),
        ("outputs", "output_bytes"),
        ("  aliased to donated inputs", "alias_bytes"),
        ("temporaries", "temp_bytes"),
        ("code", "code_bytes"),
        ("peak", "peak_bytes"),
    ]
    for label, key in rows:
        cells = [
            f"{result[p]['memory'][key] / GIB:14.2f}" if result[p] else f"{'-':>14}"
            for p, _ in programs
        ]
        lines.append(f"{label:<30}" + "".join(cells))
    usable = result["usable_bytes"]
    lines.append(
        f"{'usable HBM':<30}{usable / GIB:14.2f}  ({1 - result['hbm_reserve']:.0%} of "
        f"{result['hbm_bytes'] / GIB:.1f} GiB)"
    )
    if result["error"]:
        lines += ["", f"DOES NOT FIT: the TPU compiler refused the program: {result['error']}"]
        return "\n".join(lines)
    peak = max(result[p]["memory"]["peak_bytes"] for p, _ in programs)
    verdict = (
        f"fits: {(usable - peak) / GIB:.1f} GiB to spare ({1 - peak / result['hbm_bytes']:.0%} "
        "of HBM free at the peak)"
        if result["fits"]
        else f"DOES NOT FIT: the peak of {peak / GIB:.1f} GiB exceeds the usable {usable / GIB:.1f} GiB"
    )
    lines.append(verdict)
    for program, label in programs:
        figures = result[program]
        lines += ["", f"{label}: compiled in {figures['compile_seconds']:.0f} s"]
        model = (
            f"{figures['model_flops']:.3e} (model: 6N + attention"
            f"{'' if program == 'train_step' else ', forward'})"
        )
        if figures["loop_trips"] > 1:
            lines.append(
                f"  FLOPs per device: model {model}; the compiler's cost analysis "
                f"({figures['flops']:.3e}) counts each loop body once, not "
                f"{figures['loop_trips']} times"
            )
        else:
            ratio = figures["flops"] / figures["model_flops"]
            lines.append(
                f"  FLOPs per device {figures['flops']:.3e} (compiler) vs {model}: {ratio:.2f}x"
            )
        if figures["cost_model_seconds"]:
            lines.append(
                f"  cost model: {figures['cost_model_seconds']:.2f} s per step, MFU "
                f"{figures['mfu']:.1%}"
            )
        else:
            lines.append("  cost model: no estimate for this program")
        kernels = figures["tpu_kernels"]
        lines.append(
            f"  Pallas kernels (tpu_custom_call): {kernels['count']} calls per step"
            + (f", results {'; '.join(kernels['shapes'])}" if kernels["shapes"] else "")
        )
        peak = figures.get("peak_buffers") or []
        if peak:
            lines.append("  largest buffers at the memory peak:")
        for buffer in peak:
            lines.append(
                f"    {buffer['bytes'] / GIB:7.2f} GiB  {buffer['shape']:<28} {buffer['source']}"
            )
        expected = figures["fsdp_bytes"]
        for kind in KINDS:
            c = figures["collectives"][kind]
            note = ""
            if kind in expected and expected[kind]:
                note = f"  (FSDP implies {expected[kind] / GIB:.1f} GiB)"
            lines.append(f"  {kind:<20}{c['count']:6d} x, {c['bytes'] / GIB:10.2f} GiB{note}")
    return "\n".join(lines)
