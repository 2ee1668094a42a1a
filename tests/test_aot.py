"""clm.aot: the run's steps traced on placeholders and compiled by the TPU compiler (libtpu),
on this CPU host. A 2-layer Mixtral whose every shard is a whole number of TPU tiles (so the
compiler's argument bytes are exactly the shards' bytes), on a v5p slice of 8 chips."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env

from clm import aot

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or importlib.util.find_spec("torch_xla") is None,
    reason="needs libtpu, jax and torch_xla (requirements.lock)",
)

SLICE = "v5p-16"  # 8 chips
# Every shard on 8 devices (fsdp 8, or 4 x tensor 2, or 4 x expert 2) is a multiple of the
# TPU's (8, 128) fp32 tile: hidden 1024, ffn 256, 8 heads of 128, 2 KV heads, vocab 4096.
MODEL = {
    "model_type": "mixtral",
    "hidden_size": 1024,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
# dropping experts (the benchmark's): dropless on XLA would compute every slot of C = T
RUN = [
    "model.dtype=float32",
    "model.capacity_factor=1.25",
    "max_length=256",
    "per_device_train_batch_size=1",
]


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "mixtral_aot.json"
    path.write_text(json.dumps(MODEL))
    return path


def aot_env(tmp_path) -> dict[str, str]:
    env = clean_env(tmp_path)
    env.pop("CPU_NUM_DEVICES", None)
    return env


def run_aot(tmp_path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clm.aot", *args],
        cwd=ROOT,
        env=env or aot_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )


# --------------------------------------------------------------------------- no compiler


def test_topology_names_follow_the_slice_tables():
    assert aot.topology_name("v5p", 4) == "v5p:2x2x1"  # v5p-8
    assert aot.topology_name("v5p", 8) == "v5p:2x2x2"
    assert aot.topology_name("v5p", 64) == "v5p:4x4x4"  # v5p-128
    assert aot.topology_name("v5p", 128) == "v5p:4x4x8"  # v5p-256
    assert aot.topology_name("v5p", 256) == "v5p:4x8x8"  # v5p-512
    assert aot.topology_name("v5e", 1) == "v5e:1x1"
    assert aot.topology_name("v6e", 32) == "v6e:4x8"
    with pytest.raises(aot.ConfigError, match="power-of-two"):
        aot.topology_name("v5p", 12)


def test_collectives_are_read_from_optimized_hlo():
    from clm.aot.hlo import collectives

    hlo = "\n".join(
        [
            "%all-reduce-scatter.1 (input: f32[64,128]) -> f32[64,32] {",
            "  %input = f32[64,128]{0,1} parameter(0)",
            "  %all-reduce.5 = f32[64,128]{0,1} all-reduce(%input), channel_id=3",
            "  ROOT %ds = f32[64,32]{0,1} dynamic-slice(%all-reduce.5, %c, %d)",
            "}",
            "ENTRY %main (p: bf16[8,16]) -> bf16[8,64] {",
            "  %ag = (bf16[8,16]{1,0}, bf16[8,64]{1,0}) all-gather-start(%p), dimensions={1}",
            "  %agd = bf16[8,64]{1,0} all-gather-done(%ag)",
            "  %ar = f32[] all-reduce(%x), to_apply=%add",
            "  %cp = (s32[4]{0}, s32[4]{0}, u32[], u32[]) collective-permute-start(%y)",
            "  %a2a = bf16[4,8]{1,0} all-to-all(%z), dimensions={0}",
            "  %loop = (s32[], f32[4]) while(%init), condition=%cond, body=%body",
            "}",
            "%cond (c: (s32[], f32[4])) -> pred[] {",
            "  %n = s32[] constant(7)",
            "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
            "}",
            "%body (b: (s32[], f32[4])) -> (s32[], f32[4]) {",
            "  %g = f32[4]{0} all-gather(%v), dimensions={0}",
            "}",
        ]
    )
    found = collectives(hlo)
    assert found["reduce-scatter"] == {"count": 1, "bytes": 64 * 32 * 4}
    # one in the entry, and one in a loop body that runs 7 times
    assert found["all-gather"] == {"count": 1 + 7, "bytes": 8 * 64 * 2 + 7 * 4 * 4}
    assert found["all-reduce"] == {"count": 1, "bytes": 4}
    assert found["collective-permute"] == {"count": 1, "bytes": 16}
    assert found["all-to-all"] == {"count": 1, "bytes": 64}


def test_bad_slice_is_one_line_exit_2(tmp_path):
    proc = run_aot(tmp_path, "slice=h100-8")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "TPU slices" in proc.stderr


# --------------------------------------------------------------------------- with libtpu


def expected_state_bytes(axis_sizes: dict[str, int], rules) -> int:
    """Parameters + AdamW's two moments, per device, fp32, from the rules table: the first rule
    matching a name gives one mesh axis (or tuple, or None) per dim, split only where the
    axes' sizes divide it; other >= 2-D tensors split their largest fsdp-divisible dim."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**MODEL)
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = 0
    for name, p in model.named_parameters():
        shape, per_device = tuple(p.shape), p.numel()
        spec = next((s for pattern, s in rules if re.search(pattern, name)), None)
        if p.dim() < 2:
            spec = None
        elif spec is None:
            divisible = [i for i, n in enumerate(shape) if n % axis_sizes["fsdp"] == 0]
            spec = [None] * len(shape)
            if divisible and axis_sizes["fsdp"] > 1:
                spec[max(divisible, key=lambda i: shape[i])] = "fsdp"
        for entry, n in zip(spec or (None,) * len(shape), shape, strict=True):
            axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
            split = math.prod(axis_sizes[a] for a in axes)
            if split > 1 and n % split == 0:
                per_device //= split
        total += 3 * per_device * 4
    return total


def batch_bytes(rows: int, length: int, data_parallel: int) -> int:
    return 2 * rows * length * 8 // data_parallel  # input_ids and labels, int64


@needs_libtpu
@pytest.mark.parametrize(
    "mesh,axis_sizes",
    [
        ([], {"fsdp": 8, "tensor": 1, "expert": 1}),
        (["tensor_parallelism=2"], {"fsdp": 4, "tensor": 2, "expert": 1}),
        (["expert_parallelism=2"], {"fsdp": 4, "tensor": 1, "expert": 2}),
    ],
    ids=["fsdp", "fsdp-tensor", "fsdp-expert"],
)
def test_argument_bytes_are_the_shards(tmp_path, model_json, mesh, axis_sizes):
    from clm.sharding import SHARDING_RULES

    out = tmp_path / "aot.json"
    args = [f"model.config_path={model_json}", *RUN, *mesh, f"slice={SLICE}", "--json", str(out)]
    proc = run_aot(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["topology"] == "v5p:2x2x2"
    assert result["mesh"] == axis_sizes
    train = result["train_step"]["memory"]
    data_parallel = axis_sizes["fsdp"] * axis_sizes["expert"]
    expected = expected_state_bytes(axis_sizes, SHARDING_RULES)
    expected += batch_bytes(data_parallel, 256, data_parallel)
    # beyond the shards: a few scalars (the step's targets count, the non-finite counter,
    # AdamW's bias corrections), each padded to one TPU tile at most
    assert 0 <= train["argument_bytes"] - expected <= 64 * 4096, (train, expected)
    # the parameters and moments are donated: their outputs reuse the inputs' buffers
    assert train["alias_bytes"] >= expected_state_bytes(axis_sizes, SHARDING_RULES)
    assert result["fits"] is True
    assert result["kernels"]["attention"] == "Pallas flash attention"
    # the TPU custom calls in the compiled program: per layer one forward kernel, and in the
    # train step the two backward kernels (dq, dk/dv); results one sequence of 8 heads each
    assert result["eval_step"]["tpu_kernels"]["count"] == 2
    assert result["train_step"]["tpu_kernels"]["count"] == 2 * 3
    heads = MODEL["num_attention_heads"] // axis_sizes["tensor"]  # heads split over "tensor"
    shapes = result["train_step"]["tpu_kernels"]["shapes"]
    assert any(f"[1,{heads},256,128]" in shape for shape in shapes), shapes
    for program in ("train_step", "eval_step"):
        figures = result[program]
        assert figures["flops"] > 0 and figures["model_flops"] > 0
        assert figures["memory"]["peak_bytes"] > figures["memory"]["argument_bytes"]
    assert result["train_step"]["collectives"]["all-gather"]["count"] > 0
    assert "fits:" in proc.stdout and "reduce-scatter" in proc.stdout


BROKEN_RULE = """
import sys
from clm import sharding
# the output projection replicated on purpose: its rule names no mesh axis
sharding.SHARDING_RULES = tuple(
    (pattern, (None, None) if "lm_head" in pattern else spec)
    for pattern, spec in sharding.SHARDING_RULES
)
from clm.aot.trace import main
sys.exit(main(sys.argv[1:]))
"""


@needs_libtpu
def test_a_replicated_weight_shows_in_the_argument_bytes(tmp_path, model_json):
    """The same run traced twice, once with the lm_head rule broken (replicated): the
    compiler's argument bytes for one eval batch grow by the lm_head less its shard."""
    from omegaconf import OmegaConf

    from clm.aot import compile as compile_lib
    from clm.aot import trace as trace_lib  # noqa: F401  (the module the script runs)

    run = aot._plan([f"model.config_path={model_json}", *RUN, f"slice={SLICE}"])
    env = {**aot_env(tmp_path), **compile_lib.COMPILE_ENV, "PJRT_DEVICE": "CPU"}
    env["CPU_NUM_DEVICES"] = "8"
    env["PYTHONPATH"] = str(ROOT)
    arguments = {}
    for name, script in (("rules", None), ("broken", BROKEN_RULE)):
        work = tmp_path / name
        work.mkdir()
        OmegaConf.save(
            OmegaConf.create(OmegaConf.to_container(run.config, resolve=True)),
            work / "config.yaml",
        )
        (work / "target.json").write_text(json.dumps({"devices": 8}))
        command = ["-c", script] if script else ["-m", "clm.aot.trace"]
        proc = subprocess.run(
            [sys.executable, *command, str(work)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        facts = json.loads((work / "trace.json").read_text())["eval_step"]
        hlo = compile_lib.with_aliases(
            (work / "eval_step.hlo").read_text(), facts["aliases"], facts["outputs"]
        )
        for key, value in compile_lib.COMPILE_ENV.items():
            os.environ.setdefault(key, value)
        compiled = compile_lib.compile_hlo(hlo, compile_lib.topology("v5p:2x2x2"))
        arguments[name] = compiled.argument_bytes
    lm_head = MODEL["vocab_size"] * MODEL["hidden_size"] * 4
    assert arguments["broken"] - arguments["rules"] == lm_head - lm_head // 8


@needs_libtpu
def test_a_program_that_cannot_fit_exits_1_naming_the_overflow(tmp_path, model_json):
    """4 chips, 64 rows of 4096 tokens per device: the eval batch's logits alone are
    64 x 4096 x 4096 fp32 = 4 GiB... times what the loss keeps: the compiler refuses."""
    out = tmp_path / "aot.json"
    args = [
        f"model.config_path={model_json}",
        "model.dtype=float32",
        "max_length=4096",
        "per_device_train_batch_size=512",
        "slice=v5p-8",
        "--json",
        str(out),
    ]
    proc = run_aot(tmp_path, *args)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["fits"] is False and result["eval_step"] is None
    assert "Ran out of memory" in result["error"] and "largest allocations" in result["error"]
    assert "DOES NOT FIT" in proc.stdout and re.search(r"(f32|bf16)\[", proc.stdout)


@needs_libtpu
def test_a_missing_tpu_compiler_is_one_line_exit_2(tmp_path, model_json):
    """libtpu not importable (a stand-in package that fails to import shadows it)."""
    stub = tmp_path / "no_libtpu" / "libtpu"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('libtpu is not installed')\n")
    env = aot_env(tmp_path)
    env["PYTHONPATH"] = f"{stub.parent}{os.pathsep}{ROOT}"
    env.pop("TPU_LIBRARY_PATH", None)  # set by an imported libtpu (another test's, in-process)
    proc = run_aot(tmp_path, f"model.config_path={model_json}", *RUN, f"slice={SLICE}", env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "libtpu" in lines[0], proc.stderr
