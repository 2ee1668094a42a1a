"""The capacity planner (clm/plan.py): its numbers against the reference's statements, the built
model, a real optimizer step, the saved activations of a real forward, and the backend's rules."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import CLM, ROOT, clean_env, model_spec, run_python
from hydra import compose, initialize_config_dir

from clm import config as config_lib
from clm import plan
from clm.spec import load_spec

BENCHMARK = "+experiment=gbs256_tpu"
# planner vs measured bytes of parameters + gradients + AdamW state: the planner leaves out
# only AdamW's per-tensor `step` scalars (4 bytes each)
STATE_TOLERANCE = 1e-3
# planner vs the tensors a CPU forward of one decoder layer saves for backward
ACTIVATION_TOLERANCE = (0.90, 1.05)


def run_plan(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return run_python(tmp_path, "-m", "clm.plan", *args)


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("name,chips,fits", [("v5p-128", 64, False), ("v5p-512", 256, True)])
def test_benchmark_fits_v5p_512_not_v5p_128(name, chips, fits):
    """256 v5p chips (v5p-512, the reference's slice) fit, 64 do not; the smallest that fits is
    128 chips, at the edge (the TPU compiler's peak there, 89.4 GiB, leaves less than the 10%
    reserve: docs/PERFORMANCE.md, TPU section)."""
    p = plan.plan([BENCHMARK, f"slice={name}"])
    assert p.devices == chips
    assert p.fits == fits, plan.render(p)
    assert p.smallest_fit[:2] == ("v5p-256", 128)
    assert p.global_batch == 256 and p.seq_len == 32768
    assert p.accumulation == 256 // chips  # derived so the global batch stays 256


def test_tpu_verdicts_say_what_the_compiler_showed_the_model_leaves_out():
    """On v5p-256 the spare (1.0 GiB) is less than the model's error against the TPU compiler
    (which says 89.4 GiB: over the reserve); unrolled layers and dropless experts are named as not
    modelled / over-counted; a GPU plan carries no TPU caveat."""
    edge = plan.render(plan.plan([BENCHMARK, "slice=v5p-256"]))
    assert "at the edge" in edge and "not modelled" not in edge
    unrolled = plan.render(plan.plan([BENCHMARK, "slice=v5p-512", "xla_scan_layers=false"]))
    assert "not modelled: unrolled layers" in unrolled
    dropless = plan.tpu_caveats(plan.plan([BENCHMARK, "slice=v5p-512", "model.capacity_factor=0"]))
    assert any(line.startswith("over-counted: dropless") for line in dropless)
    scanned_dropping = ["xla_scan_layers=true", "model.capacity_factor=1.25"]
    assert plan.tpu_caveats(plan.plan(["slice=v5p-8", *scanned_dropping])) == []  # GiBs to spare
    assert plan.tpu_caveats(plan.plan([BENCHMARK, "slice=h100-256"])) == []


def test_benchmark_does_not_fit_v5p_64():
    p = plan.plan([BENCHMARK, "slice=v5p-64"])
    assert p.devices == 32 and not p.fits
    reason = plan.overflow_reason(p)
    over = (p.memory.peak - p.usable_hbm) / plan.GIB
    assert reason.startswith("DOES NOT FIT") and f"by {over:.1f} GiB" in reason
    assert "parameters + gradients + AdamW state 32.7" in reason  # 141B x 8 bytes / 32


def test_benchmark_evaluates_every_6_steps():
    """ceil(24576 * 2048 / 32768 / 256) = 6, whatever the slice."""
    for name in ("v5p-128", "v5p-512"):
        p = plan.plan([BENCHMARK, f"slice={name}"])
        assert p.eval_frequency == 6 and p.max_steps == 250


def test_mixtral_8x22b_counts():
    """141B total / 39B active, the figures Mistral publishes, from the JSON alone."""
    shape = model_spec(config_path="mixtral822.json")
    total, active = plan.count_parameters(shape)
    assert total == 140_620_634_112 and active == 39_152_031_744


def test_step_time_follows_the_flops_and_mfu():
    p = plan.plan([BENCHMARK, "slice=v5p-512", "mfu=0.5"])
    flops = p.flops_per_token * 256 * 32768
    assert p.step_seconds == pytest.approx(flops / (256 * 459e12 * 0.5))


# --------------------------------------------------------------------------- slices


@pytest.mark.parametrize(
    "text,kind,chips,hosts",
    [
        ("v5p-8", "v5p", 4, 1),
        ("v5p-128", "v5p", 64, 16),
        ("v4-8", "v4", 4, 1),
        ("v5e-16", "v5e", 16, 4),
        ("v5litepod-8", "v5e", 8, 1),
        ("v6e-256", "v6e", 256, 64),
        ("h100-16", "h100", 16, 2),
        ("H100 x 8", "h100", 8, 1),
        ("8xH100", "h100", 8, 1),
        ("h200-8", "h200", 8, 1),
    ],
)
def test_slice_names(text, kind, chips, hosts):
    s = plan.parse_slice(text)
    assert (s.kind, s.chips, s.hosts) == (kind, chips, hosts)


@pytest.mark.parametrize("text", ["v9-8", "v5p", "tpu", "v5p-7", "h100-0", ""])
def test_bad_slice_names(text):
    with pytest.raises(config_lib.ConfigError, match=r"^slice="):
        plan.parse_slice(text)


def test_peaks_match_the_metrics_table():
    """MFU from the planner and from metrics.jsonl use the same peak per chip."""
    from clm.metrics import PEAK_TFLOPS

    for kind, chip in plan.CHIPS.items():
        assert PEAK_TFLOPS[kind] == chip.peak_tflops


# --------------------------------------------------------------------------- the real model


DTYPES = ("float32", "bfloat16")


def tiny_spec(dtype: str = "float32"):
    """The small Mixtral with the benchmark's dropping experts (capacity factor 1.25)."""
    return model_spec(config_path="mixtral_small.json", dtype=dtype, capacity_factor=1.25)


@pytest.fixture(scope="module")
def tiny_models():
    from clm.model import build_model

    return {dtype: build_model(tiny_spec(dtype), torch.device("cpu"), 0) for dtype in DTYPES}


def test_parameters_match_the_built_model(tiny_models):
    """Names, shapes and the (total, active) count equal the real HF model's."""
    from clm.model import count_parameters

    model = tiny_models["float32"]
    shape = tiny_spec()
    built = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert plan.parameters(shape) == built
    assert plan.count_parameters(shape) == count_parameters(model)
    assert plan.count_parameters(shape)[0] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["mixtral822.json", "mixtral87.json", "mixtral80.json"])
def test_parameters_match_hf_for_shipped_configs(name):
    """The large configs too, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads((CLM / name).read_text())
    values.pop("transformers_version", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**values))
    shape = model_spec(config_path=name)
    assert plan.parameters(shape) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_flops_per_token_by_hand(tiny_models):
    """mixtral_small.json, counted by hand: hidden 128, 4 layers, 4 heads of 32 (2 k/v heads),
    8 experts of intermediate 256 (top 2), vocab 32000, untied. Per token and layer: q 128x128 +
    k, v 128x64 each + o 128x128 = 49,152; router 128x8 = 1,024; 2 experts x 3 x 128 x 256 =
    196,608; 2 norms 256: 247,040. Four layers 988,160 + final norm 128 + lm_head 4,096,000 =
    5,084,288 active matmul-side parameters (the input embedding is a lookup). x6, plus
    attention 12 x 4 x 128 x 256 = 1,572,864: 32,078,592. The metrics' formula on the built
    model gives the same (MFUs compare)."""
    from clm.metrics import training_flops_per_token
    from clm.model import count_parameters

    shape = model_spec(config_path="mixtral_small.json")
    assert plan.flops_per_token(shape, 256) == 6 * 5_084_288 + 1_572_864 == 32_078_592
    model = tiny_models["float32"]
    _, active = count_parameters(model)
    assert training_flops_per_token(shape, active, 256) == 32_078_592


@pytest.mark.parametrize(
    "tokens,factor,expected",
    [
        (32768, 1.25, 10240),  # 32768 x 2 / 8 x 1.25
        (512, 1.0, 128),
        (7, 3.3, 6),  # 1.75 x 3.3 = 5.775, rounded up
        (80, 1.1, 22),  # exactly 22 (in floats 20 x 1.1 = 22.000000000000004: 23)
        (1_048_576, 1.25, 327_680),
        (4, 1e6, 4),  # at most T: an expert gets each token once
        (1, 0.01, 1),  # at least 1
    ],
)
def test_capacity_by_hand(tokens, factor, expected):
    """C = ceil(T x K / E x factor), K=2, E=8, in [1, T]: the planner's and the experts' (one
    method, clm.spec.MoESpec.capacity, used by both)."""
    from clm.model_math import capacity
    from clm.spec import MoESpec

    moe = MoESpec(num_experts=8, top_k=2, implementation="dropping", capacity_factor=factor)
    assert moe.capacity(tokens) == capacity(tokens, 2, 8, factor) == expected


def _compose(*overrides: str):
    config_lib.register_resolvers()
    with initialize_config_dir(str(CLM / "config"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_bytes_match_a_real_adamw_step(tiny_models, dtype):
    """Parameters + gradients + AdamW state after one real optimizer step on the CPU, summed
    tensor by tensor, against the planner's one-device figure."""
    from clm import model as model_lib
    from clm import optim

    model = tiny_models[dtype]
    cfg = _compose(f"model.dtype={dtype}", "model.capacity_factor=1.25")
    optimizer = optim.build_optimizer(model, cfg, torch.device("cpu"))
    ids = torch.randint(0, 32000, (2, 32))
    total, count, aux = model_lib.forward(model, {"input_ids": ids, "labels": ids}, True)
    (total / count + (aux if aux is not None else 0)).backward()
    optimizer.step()

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters())
    state = sum(nbytes(v) for s in optimizer.state.values() for v in s.values())
    measured = params + grads + state
    optimizer.zero_grad(set_to_none=True)

    shape = load_spec(cfg.model, cfg.max_length)
    mem = plan.memory_per_device(shape, {"fsdp": 1}, 1, 32, "flash")
    assert mem.params == params
    assert mem.state == pytest.approx(measured, rel=STATE_TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_activations_match_a_real_forward(tiny_models, dtype):
    """Bytes autograd saves in one decoder layer (dropping experts, CPU sdpa), not counting
    weights, the layer input and the shared RoPE tables, against the planner's model."""
    model, shape = tiny_models[dtype], tiny_spec(dtype)
    rows, seq = 2, 256
    x = torch.randn(rows, seq, model.config.hidden_size, dtype=model.dtype, requires_grad=True)
    positions = torch.arange(seq).unsqueeze(0).expand(rows, -1)
    rope = model.model.rotary_emb(x, positions)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (x, *rope)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[1](x, position_ids=positions, position_embeddings=rope)
    slots = plan.expert_slots_per_token(shape, rows * seq)
    act = plan.DTYPE_BYTES[dtype]
    estimate, _ = plan.layer_activation_bytes(shape, act, slots, 1, seq, rows, "flash")
    low, high = ACTIVATION_TOLERANCE
    assert low <= sum(saved.values()) / estimate <= high


# --------------------------------------------------------------------------- sharding


def test_tensor_and_expert_parallelism_split_the_state():
    """More axes split more dimensions: 8x22B on v5p-512 with tensor=4 x expert=2 keeps about
    1/256 of the weights per device (the embeddings are not split on the expert axis)."""
    flat = plan.plan([BENCHMARK, "slice=v5p-512"])
    split = plan.plan([BENCHMARK, "slice=v5p-512", "tensor_parallelism=4", "expert_parallelism=2"])
    assert split.axis_sizes == {"fsdp": 32, "tensor": 4, "expert": 2}
    assert split.data_parallel == 64 and split.accumulation == 4
    assert math.isclose(split.memory.params, flat.memory.params, rel_tol=0.05)
    assert split.memory.layer_activations < flat.memory.layer_activations


def test_math_attention_counts_the_scores():
    """A materialized S x S attention does not fit at 32K tokens on any slice."""
    p = plan.plan([BENCHMARK, "slice=v5p-512", "attention=math"])
    assert not p.fits and p.smallest_fit is None


# --------------------------------------------------------------------------- the command line


def test_planner_imports_no_torch(tmp_path):
    """It runs on a laptop without the training stack's heavy imports, and never torch_xla."""
    script = (
        "import sys; from clm import plan; plan.plan(['+experiment=gbs256_tpu', 'slice=v5p-128']);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_xla')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=clean_env(tmp_path), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_fits(tmp_path):
    proc = run_plan(BENCHMARK, "slice=v5p-512", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fits:" in proc.stdout and "eval every 6 steps" in proc.stdout
    assert "140,620,634,112 parameters" in proc.stdout


def test_cli_does_not_fit_exits_1(tmp_path):
    proc = run_plan(BENCHMARK, "slice=v5p-64", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "smallest v5p slice that fits: v5p-256" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        ((BENCHMARK, "slice=v9-8"), "error: slice=v9-8: unknown slice"),
        ((BENCHMARK,), "error: slice=NAME is required"),
        ((BENCHMARK, "slice=v5p-128", "mfu=2"), "error: mfu=2: must be in (0, 1]"),
        (
            (BENCHMARK, "slice=v5p-128", "max_lenght=1024"),
            "error: max_lenght=1024: no such key; did you mean max_length=1024?",
        ),
        (
            (BENCHMARK, "slice=v5p-128", "gradient_accumulation_steps=2"),
            "error: global_train_batch_size=256: must equal",
        ),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message, tmp_path):
    proc = run_plan(*args, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1


def test_the_planner_needs_neither_jax_nor_torch_xla(tmp_path):
    """clm.plan runs where jax, jaxlib, libtpu and torch_xla cannot be imported (a laptop)."""
    script = (
        "import sys\n"
        "for name in ('jax', 'jaxlib', 'libtpu', 'torch_xla', 'torchax'):\n"
        "    sys.modules[name] = None  # import fails\n"
        "from clm import plan\n"
        "sys.exit(plan.main(['+experiment=gbs256_tpu', 'slice=v5p-512']))\n"
    )
    proc = run_python(tmp_path, "-c", script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fits: " in proc.stdout
