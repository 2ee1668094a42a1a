"""Forward+backward time of each clm.moe experts implementation against transformers' default.

Runs one `MixtralExperts` layer (top-k routing from a random router with uneven load) and
prints the median and min time of forward+backward and the speedup over HF's default experts
code (`grouped_mm`, what transformers picks for Mixtral) measured in the same run on the same
inputs, as the median of per-repetition ratios. `dropless` is our default (`model.capacity_factor
=0`); on CPU it is timed with both backends (`torch._grouped_mm` kernel, per-expert loop).
`dropping` runs at capacity factor 1.25 (with its dropped fraction) and at capacity T (nothing
dropped); `dense` and `dropping no-drop` do E/K times the expert FLOPs: references only.

Default sizes (T tokens x D hidden x F ffn x E experts):
  - the embedded default: D, F, E and top-k from clm/mixtral_small.json, T = one micro-batch
    of the embedded run (per_device_train_batch_size x max_length of clm/config, 8 x 256);
  - 4096 x 1024 x 3584 x 8;
  - Mixtral-8x7B, 4096 x 4096 x 14336 x 8, only when CUDA is available.
fp32 on CPU; on CUDA bf16 (the dtype `torch._grouped_mm` needs there). Each timed sample
averages enough back-to-back calls that hf's take `--min-sample-ms` (one ~20 ms call alone is
at the mercy of one scheduler hiccup). On CPU the script ends with the project's issue-3
targets for the sizes measured: at the embedded dims our default >= 1.5x HF; at 4096 x 1024 x
3584 x 8 `dropless` >= 0.95x HF and `dropping` <= 1.1 x capacity factor x `dropless`.

    PYTHONPATH=. python bench/moe_layer.py                 # default sizes
    PYTHONPATH=. python bench/moe_layer.py --shapes 512x128x256 --reps 3
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from clm import moe
from clm.config import CLM_DIR, register_resolvers
from clm.spec import IMPLEMENTATIONS, MoESpec, load_spec

MID_SHAPE = "4096x1024x3584x8"
MIXTRAL_8X7B_SHAPE = "4096x4096x14336x8"  # CUDA only
CAPACITY_FACTOR = 1.25
# Router logits' std and a per-expert preference: an uneven load, as trained routers have.
ROUTER_SCALE, ROUTER_BIAS = 2.0, 0.5

BASELINE = "hf (grouped_mm)"
DEFAULT = "dropless (grouped_mm)"  # what the embedded run uses (dropless, CPU kernel backend)
# name -> (experts implementation key, capacity factor or "nodrop", CPU dropless backend)
VARIANTS = {
    "hf (grouped_mm)": ("grouped_mm", 0.0, None),
    "hf eager": ("eager", 0.0, None),
    "dense": ("dense", 0.0, None),
    f"dropping cf={CAPACITY_FACTOR}": ("dropping", CAPACITY_FACTOR, None),
    "dropping no-drop": ("dropping", "nodrop", None),
    "dropless (grouped_mm)": ("dropless", 0.0, "grouped_mm"),
    "dropless (loop)": ("dropless", 0.0, "loop"),
}
CPU_ONLY = ("dropless (loop)",)  # the CPU backend switch: on CUDA dropless is always the kernel


def embedded_sizes() -> tuple[int, int, int, int, int]:
    """(tokens, hidden, ffn, experts, top-k) of the embedded default run."""
    # The embedded run is clm/config composed with no overrides, as run_clm.py does.
    register_resolvers()
    with initialize_config_dir(str(CLM_DIR / "config"), version_base=None):
        cfg = compose("config")
    spec = load_spec(cfg.model, cfg.max_length)
    tokens = int(cfg.per_device_train_batch_size) * int(cfg.max_length)
    return tokens, spec.hidden, spec.ffn, spec.moe.num_experts, spec.moe.top_k


def parse_shape(shape: str, default_experts: int) -> tuple[int, int, int, int]:
    """ "TxDxF" or "TxDxFxE" -> (T, D, F, E)."""
    values = [int(v) for v in shape.lower().split("x")]
    if len(values) == 3:
        values.append(default_experts)
    if len(values) != 4:
        raise SystemExit(f"--shapes {shape}: expected TxDxF or TxDxFxE")
    return tuple(values)


def make_layer(dim: int, ffn: int, experts: int, top_k: int, device, dtype, seed: int = 0):
    """A Mixtral experts layer, its config pointed at our dropless experts (`select` repoints)."""
    config = MixtralConfig(
        hidden_size=dim,
        intermediate_size=ffn,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    moe.configure_moe(config, MoESpec(experts, top_k, "dropless"))
    torch.manual_seed(seed)
    layer = MixtralExperts(config)
    for weight in (layer.gate_up_proj, layer.down_proj):
        torch.nn.init.normal_(weight, std=dim**-0.5)
    return layer.to(device=device, dtype=dtype)


def route(x_TD: torch.Tensor, experts: int, top_k: int, seed: int = 1):
    """Top-k routing of a random linear router, as MixtralTopKRouter does it (fp32 weights)."""
    generator = torch.Generator().manual_seed(seed)
    dim = x_TD.shape[1]
    router_ED = torch.randn(experts, dim, generator=generator) * ROUTER_SCALE * dim**-0.5
    bias_E = torch.randn(experts, generator=generator) * ROUTER_BIAS
    logits_TE = x_TD.float() @ router_ED.to(x_TD.device).T + bias_E.to(x_TD.device)
    weights_TK, index_TK = torch.softmax(logits_TE, dim=-1).topk(top_k, dim=-1)
    return index_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(layer, x_TD, index_TK, weights_TK, grad_TD, calls: int = 1) -> float:
    """Seconds of one forward + backward (inputs and expert weights need grads), averaged
    over `calls` back-to-back calls."""
    total = 0.0
    for _ in range(calls):
        sync(x_TD.device)
        start = time.perf_counter()
        layer(x_TD, index_TK, weights_TK).backward(grad_TD)
        sync(x_TD.device)
        total += time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        x_TD.grad = weights_TK.grad = None
    return total / calls


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def matmul_seconds(layer, variant, x_TD, index_TK, weights_TK, grad_TD, calls: int) -> float:
    """Seconds per forward + backward spent in the matrix-multiply kernels themselves (CPU
    profiler, self time of MATMUL_OPS; `torch._grouped_mm` runs one `mm` per expert on CPU):
    no implementation that does the same matmuls can take less."""
    select(layer, variant)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        time_once(layer, x_TD, index_TK, weights_TK, grad_TD, calls)
    events = profile.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6 / calls


def select(layer, variant: str) -> None:
    """Point the layer at a variant: experts function (ours bound to a MoESpec of its capacity
    factor, or transformers' by name), dropless backend."""
    name, capacity_factor, backend = VARIANTS[variant]
    top_k = layer.config.num_experts_per_tok
    if capacity_factor == "nodrop":  # capacity = T: an expert can take every token
        capacity_factor = layer.num_experts / top_k
    key = name
    if name in IMPLEMENTATIONS:
        key = moe.experts_key(MoESpec(layer.num_experts, top_k, name, capacity_factor))
    layer.config._experts_implementation = key
    moe.CPU_DROPLESS_BACKEND = backend or "grouped_mm"


def bench_shape(
    tokens, dim, ffn, experts, top_k, variants, reps, warmup, device, dtype, min_sample_s
):
    """Per variant: (variant, median s, min s, median of per-repetition hf/variant ratios, note,
    matmul kernels' s per call or None: measured on CPU for hf and our default).

    Variants run interleaved within each repetition, and the ratio pairs each variant with
    the hf run of the same repetition, so load from other processes on the machine hits both.
    A sample is the mean of enough back-to-back calls that hf's takes `min_sample_s` (small
    sizes: a single ~20 ms call is at the mercy of one scheduler hiccup).
    """
    layer = make_layer(dim, ffn, experts, top_k, device, dtype)
    torch.manual_seed(2)
    x_TD = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    index_TK, weights_TK = route(x_TD.detach(), experts, top_k)
    weights_TK.requires_grad_(True)
    grad_TD = torch.randn(tokens, dim, device=device, dtype=dtype)
    times = {variant: [] for variant in variants}
    calls = 1
    for rep in range(warmup + reps):
        if rep == warmup and warmup > 0:  # calibrated on the last warm-up repetition's hf time
            calls = max(1, math.ceil(min_sample_s / times[BASELINE][-1]))
        for variant in variants:
            select(layer, variant)
            times[variant].append(time_once(layer, x_TD, index_TK, weights_TK, grad_TD, calls))
    times = {variant: samples[warmup:] for variant, samples in times.items()}
    baseline = times[BASELINE]
    rows = []
    for variant, samples in times.items():
        ratio = statistics.median(b / t for b, t in zip(baseline, samples, strict=True))
        note = describe(layer, variant, x_TD, index_TK, weights_TK)
        if variant == BASELINE:
            note = f"{calls} call{'s' if calls > 1 else ''} per sample"
        matmuls = None
        if device.type == "cpu" and variant in (BASELINE, DEFAULT):
            matmuls = matmul_seconds(layer, variant, x_TD, index_TK, weights_TK, grad_TD, calls)
            note = f"{note}; matmuls {matmuls * 1e3:.1f} ms".lstrip("; ")
        rows.append((variant, statistics.median(samples), min(samples), ratio, note, matmuls))
    moe.CPU_DROPLESS_BACKEND = "grouped_mm"
    del layer, x_TD, grad_TD
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def describe(layer, variant: str, x_TD, index_TK, weights_TK) -> str:
    """Dropped fraction (dropping) or expert load imbalance, from moe_metrics."""
    select(layer, variant)
    layer.__dict__.pop(moe._STATS_ATTR, None)  # stale stats from the previous variant
    with torch.no_grad():
        layer(x_TD, index_TK, weights_TK)
    metrics = moe.moe_metrics(layer)
    if not metrics:
        return ""
    if "dropping" in variant:
        return f"dropped {metrics['moe/drop_fraction']:.3f}"
    return f"load max/mean {metrics['moe/load_max_over_mean']:.2f}"


def check_targets(results: dict[str, dict], embedded_shape: str) -> list[str]:
    """The issue's CPU targets, for the sizes that were measured."""
    lines = []
    if embedded_shape in results and DEFAULT in results[embedded_shape]:
        ratio = results[embedded_shape][DEFAULT][2]
        verdict = "met" if ratio >= 1.5 else "NOT met"
        lines.append(
            f"- {embedded_shape} (embedded default): our default `{DEFAULT}` {ratio:.2f}x HF "
            f"(target >= 1.5x): {verdict}"
        )
        hf_median, matmuls = (
            results[embedded_shape][BASELINE][0],
            results[embedded_shape][DEFAULT][4],
        )
        if matmuls:
            lines.append(
                f"  its matmul kernels alone take {matmuls * 1e3:.1f} ms of HF's "
                f"{hf_median * 1e3:.1f} ms: with the same matmuls no implementation can beat "
                f"{hf_median / matmuls:.2f}x HF here"
            )
    if MID_SHAPE in results and DEFAULT in results[MID_SHAPE]:
        rows = results[MID_SHAPE]
        ratio = rows[DEFAULT][2]
        verdict = "met" if ratio >= 0.95 else "NOT met"
        lines.append(f"- {MID_SHAPE}: `{DEFAULT}` {ratio:.2f}x HF (target >= 0.95x): {verdict}")
        dropping = rows.get(f"dropping cf={CAPACITY_FACTOR}")
        if dropping:
            limit = 1.1 * CAPACITY_FACTOR * rows[DEFAULT][0]
            verdict = "met" if dropping[0] <= limit else "NOT met"
            lines.append(
                f"- {MID_SHAPE}: dropping cf={CAPACITY_FACTOR} median {dropping[0] * 1e3:.0f} ms "
                f"vs 1.1 x {CAPACITY_FACTOR} x dropless median = {limit * 1e3:.0f} ms "
                f"(ratio {dropping[0] / rows[DEFAULT][0]:.2f}x dropless, target <= "
                f"{1.1 * CAPACITY_FACTOR:.3f}x): {verdict}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", default=None, help="TxDxF or TxDxFxE (default: see the docstring)"
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--min-sample-ms",
        type=float,
        default=200.0,
        help="each sample averages enough calls that hf's take this long (1 call if longer)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    tokens, dim, ffn, experts, top_k = embedded_sizes()
    embedded_shape = f"{tokens}x{dim}x{ffn}x{experts}"
    shapes = args.shapes or [embedded_shape, MID_SHAPE]
    if args.shapes is None and device.type == "cuda":
        shapes.append(MIXTRAL_8X7B_SHAPE)
    variants = [
        v
        for v in (args.variants or VARIANTS)
        if not (device.type != "cpu" and v in CPU_ONLY) and v != BASELINE
    ]
    variants = [BASELINE] + variants  # ratios need the baseline in every repetition
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"# torch {torch.__version__}, {name}, {args.threads} threads, "
        f"{str(dtype).removeprefix('torch.')}, top-{top_k}, "
        f"{args.warmup} warm-up + {args.reps} timed repetitions"
    )
    print("| T x D x F x E | implementation | median ms | min ms | speedup vs hf | note |")
    print("|---|---|---:|---:|---:|---|")
    results: dict[str, dict] = {}
    for shape in shapes:
        size = parse_shape(shape, experts)
        shape = "x".join(str(v) for v in size)
        rows = bench_shape(
            *size, top_k, variants, args.reps, args.warmup, device, dtype, args.min_sample_ms / 1e3
        )
        results[shape] = {row[0]: row[1:] for row in rows}
        for variant, median, fastest, ratio, note, _ in rows:
            print(
                f"| {shape} | {variant} | {median * 1e3:.1f} | {fastest * 1e3:.1f} "
                f"| {ratio:.2f}x | {note} |",
                flush=True,
            )
    if device.type == "cpu":
        lines = check_targets(results, embedded_shape)
        if lines:
            print("\nThe issue's CPU targets:")
            print("\n".join(lines))


if __name__ == "__main__":
    main()
