"""The torch_xla SPMD backend on 4 virtual CPU devices (PJRT_DEVICE=CPU, CPU_NUM_DEVICES=4).

Everything that touches torch_xla runs in a subprocess: the runtime reads its environment once,
when it starts, and must not start inside the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import golden
import pytest
import torch
from conftest import ROOT, clean_env, run_clm, run_python, tiny_mixtral_config

from clm.config import ConfigError
from clm.metrics import read_metrics
from clm.sharding import (
    host_rows,
    mesh_device_ids,
    mesh_shape,
    rows_by_device,
    slices_are_outermost,
)

needs_xla = pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed"
)

XLA_DEVICES = 4
# the same global batch (8 rows x 64 tokens) on both backends
COMMON = [
    "max_length=64",
    "n_eval_examples=5",
    "max_steps=4",
    "eval_frequency=2",
    "target_eval_loss=0",
    "save_frequency=0",
]
XLA_RUN = ["backend=xla", f"per_device_train_batch_size={8 // XLA_DEVICES}", "xla_recompile=error"]
CPU_RUN = ["backend=cpu", "per_device_train_batch_size=8"]
# fp32, this model, 4 steps on 1 to 8 virtual devices (five meshes and settings, measured at
# the commit that set these): losses within 9.6e-7 of the CPU run's (step 1 identical; the rest
# is reduction order), gradient norms within 4.4e-6 of theirs, relative. About 10x that:
LOSS_TOLERANCE = 1e-5
GRAD_NORM_TOLERANCE = 5e-5  # relative


def xla_env(tmp_path, devices: int = XLA_DEVICES) -> dict[str, str]:
    env = clean_env(tmp_path)
    env["PJRT_DEVICE"] = "CPU"
    env["CPU_NUM_DEVICES"] = str(devices)
    return env


def run_xla(tmp_path, *overrides: str, devices: int = XLA_DEVICES) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "clm" / "run_clm.py"), f"output_dir={tmp_path / 'runs'}"]
    return subprocess.run(
        args + ["progress_bar=false", *COMMON, *overrides],
        cwd=ROOT,
        env=xla_env(tmp_path, devices),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The reference: backend=cpu, checkpoints at steps 2 and 4."""
    cpu_dir = tmp_path_factory.mktemp("cpu")
    overrides = [o for o in COMMON if not o.startswith("save_frequency=")]
    cpu = run_clm(cpu_dir, *overrides, *CPU_RUN, "save_frequency=2")
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    return cpu_dir / "runs" / "embedded_default"


@pytest.fixture(scope="module")
def cpu_metrics(cpu_run):
    return read_metrics(cpu_run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cpu_metrics):
    """(xla process, xla metrics, cpu metrics) of the same 4-step run; the XLA run saves at
    steps 2 and 4 in `xla.run_dir`."""
    xla_dir = tmp_path_factory.mktemp("xla")
    xla = run_xla(xla_dir, *XLA_RUN, "save_frequency=2")
    assert xla.returncode == 0, xla.stderr[-3000:]
    xla.run_dir = xla_dir / "runs" / "embedded_default"
    return xla, read_metrics(xla.run_dir), cpu_metrics


def assert_losses_match(xla: list[dict], cpu: list[dict]) -> None:
    """The XLA run's losses and gradient norms are the CPU run's, step by step. The gradient
    norm matters: AdamW with clipping hides a mis-scaled gradient (a sum where a mean belongs)
    from the loss for many steps."""
    pairs = [
        (x["step"], key, x[key], c[key])
        for x, c in zip(xla, cpu, strict=True)
        for key in ("train/loss", "train/grad_norm", "eval/loss")
        if key in x
    ]
    assert [(s, k.split("/")[1]) for s, k, _, _ in pairs] == [
        (1, "loss"),
        (1, "grad_norm"),
        (2, "loss"),
        (2, "grad_norm"),
        (2, "loss"),
        (3, "loss"),
        (3, "grad_norm"),
        (4, "loss"),
        (4, "grad_norm"),
        (4, "loss"),
    ]
    for step, key, x, c in pairs:
        if key == "train/grad_norm":
            assert abs(x - c) <= GRAD_NORM_TOLERANCE * c, (step, key, x, c)
        else:
            assert abs(x - c) <= LOSS_TOLERANCE, (step, key, x, c)
    assert xla[0]["train/loss"] == pytest.approx(cpu[0]["train/loss"], abs=1e-5)


def test_the_parity_check_catches_a_gradient_summed_where_it_is_averaged(cpu_metrics):
    """Four data-parallel devices summing their gradients instead of averaging them: 4x the
    norm. The losses alone would pass (step 1 is computed before any update)."""
    summed = [
        {**r, "train/grad_norm": 4 * r["train/grad_norm"]} if "train/grad_norm" in r else r
        for r in cpu_metrics
    ]
    with pytest.raises(AssertionError, match="train/grad_norm"):
        assert_losses_match(summed, cpu_metrics)
    off_by_1e4 = [
        {**r, "train/grad_norm": r["train/grad_norm"] * (1 + 1e-4)} if "train/grad_norm" in r else r
        for r in cpu_metrics
    ]
    with pytest.raises(AssertionError, match="train/grad_norm"):
        assert_losses_match(off_by_1e4, cpu_metrics)
    assert_losses_match(cpu_metrics, cpu_metrics)


@needs_xla
def test_xla_run_end_to_end(runs):
    proc, records, _ = runs
    # no TPU: xla_attention=auto keeps HF's sdpa
    assert (
        "4 XLA CPU devices (SPMD mesh fsdp=4 x tensor=1 x expert=1; HF sdpa attention)"
        in proc.stdout
    )
    assert "global batch 8 x 64 tokens" in proc.stdout
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]
    for key in ("train/grad_norm", "train/lr", "perf/tokens_per_sec", "moe/drop_fraction"):
        assert all(key in r for r in train), key
    assert all(r["moe/drop_fraction"] == 0.0 for r in train)  # dropless stays exact on XLA


@needs_xla
def test_xla_losses_match_cpu(runs):
    _, xla, cpu = runs
    assert_losses_match(xla, cpu)


@needs_xla
def test_xla_and_cpu_runs_are_golden(runs):
    """Both 4-step runs' numbers, bitwise, against tests/golden/ (a refactor keeps them)."""
    _, xla, cpu = runs
    golden.check("xla_4_devices_4_steps", xla)
    golden.check("cpu_4_steps", cpu)


# (devices, tensor, expert, rows per data-parallel device): always the same 8-row global batch
MESHES = {
    "one device": (1, 1, 1, 8),
    "fsdp2 x tensor2": (4, 2, 1, 4),
    "fsdp2 x tensor2 x expert2": (8, 2, 2, 2),
}


@needs_xla
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_matches_cpu(tmp_path, cpu_metrics, mesh):
    devices, tensor, expert, rows = MESHES[mesh]
    proc = run_xla(
        tmp_path,
        "backend=xla",
        "xla_recompile=error",
        f"tensor_parallelism={tensor}",
        f"expert_parallelism={expert}",
        f"per_device_train_batch_size={rows}",
        devices=devices,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp = devices // (tensor * expert)
    assert f"SPMD mesh fsdp={fsdp} x tensor={tensor} x expert={expert}" in proc.stdout
    run_dir = tmp_path / "runs" / "embedded_default"
    assert_losses_match(read_metrics(run_dir), cpu_metrics)
    logged = {
        record["key"]: record["value"]
        for line in (run_dir / "mlperf_compliance.log").read_text().splitlines()
        for record in [json.loads(line.split(":::MLLOG ", 1)[1])]
        if record["key"].endswith("_parallelism")
    }
    assert logged == {  # the mesh that ran
        "tensor_parallelism": tensor,
        "expert_parallelism": expert,
        "pipeline_parallelism": 1,
        "context_parallelism": 1,
    }


@needs_xla
def test_checkpointing_syncfree_adamw_and_a_profile(tmp_path, cpu_metrics):
    """Per-layer checkpointing (aux-loss gradient included) and syncfree AdamW: same losses."""
    proc = run_xla(
        tmp_path,
        *XLA_RUN,
        "model.gradient_checkpointing=true",
        "optimizer=ADAMW_TORCH_XLA",
        "xla_profile_step=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "embedded_default"
    assert_losses_match(read_metrics(run_dir), cpu_metrics)
    traces = list((run_dir / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1, traces  # exactly the one step asked for


@needs_xla
def test_a_mesh_checkpoint_goes_on_on_fewer_devices(tmp_path, runs):
    """Step 2 of the 4-device run (fsdp=4) restored onto 2 devices (fsdp=2, 4 rows each): the
    CPU run's steps 3 and 4, within the parity tolerances."""
    xla, _, cpu_metrics = runs
    step2 = xla.run_dir / "checkpoints" / "step_00000002"
    proc = run_xla(
        tmp_path,
        "backend=xla",
        "per_device_train_batch_size=4",
        "xla_recompile=error",
        f"checkpoint_manager_path={step2}",
        devices=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPMD mesh fsdp=2 x tensor=1 x expert=1" in proc.stdout
    assert f"restored {step2} (step 2" in proc.stdout
    resumed = read_metrics(tmp_path / "runs" / "embedded_default")
    want = [r for r in cpu_metrics if r["step"] > 2]
    assert [r["step"] for r in resumed] == [r["step"] for r in want]
    for got, ref in zip(resumed, want, strict=True):
        for key in ("train/loss", "eval/loss"):
            if key in ref:
                assert abs(got[key] - ref[key]) <= LOSS_TOLERANCE, (ref["step"], key)
        if "train/grad_norm" in ref:
            assert abs(got["train/grad_norm"] - ref["train/grad_norm"]) <= (
                GRAD_NORM_TOLERANCE * ref["train/grad_norm"]
            )


@needs_xla
def test_no_recompiles_after_warm_up(runs):
    proc, records, _ = runs
    compiles = [r["perf/compiles"] for r in records if "train/loss" in r]
    assert compiles[0] >= 1
    assert compiles[2] == compiles[3], compiles  # steps 3 and 4 (and the eval between) reuse
    # xla_recompile=error: a recompile after warm-up would have stopped the run (exit 1)
    assert "XLA compiled" not in proc.stderr


SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch_xla
    from clm.backends.xla_backend import XlaBackend, mesh_shape
    from clm.config import ConfigError
    from conftest import model_spec

    tp, ep = int(sys.argv[1]), int(sys.argv[2])
    backend = XlaBackend(tp, ep)
    model = backend.build_model(model_spec(config_path="mixtral_small.json"), 0)
    specs = {
        name: torch_xla._XLAC._get_xla_sharding_spec(param)
        for name, param in model.named_parameters()
    }
    batch = backend.to_device({"input_ids": torch_xla.torch.zeros(8, 16, dtype=int)})
    specs["batch"] = torch_xla._XLAC._get_xla_sharding_spec(batch["input_ids"])
    try:
        mesh_shape(4, 3, 1)
    except ConfigError as e:
        specs["error"] = str(e)
    print(json.dumps({"dp": backend.data_parallel_size, "specs": specs}))
    """)


PRETRAINED_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch_xla
    from transformers import AutoModelForCausalLM
    from clm.backends.xla_backend import XlaBackend
    from conftest import model_spec

    backend = XlaBackend(tensor_parallelism=2)
    model = backend.build_model(model_spec(name_or_path=sys.argv[1]), 0)
    reference = AutoModelForCausalLM.from_pretrained(sys.argv[1]).state_dict()
    mine = model.state_dict()
    print(json.dumps({
        "differ": [k for k in reference if not torch.equal(mine[k].cpu(), reference[k])],
        "devices": sorted({str(t.device) for t in mine.values()}),
        "spec": torch_xla._XLAC._get_xla_sharding_spec(
            mine["model.layers.1.mlp.experts.gate_up_proj"]
        ),
    }))
    """)


def run_xla_script(tmp_path, script: str, *args: str, devices: int = XLA_DEVICES) -> dict:
    """Run `python -c script args...` on `devices` virtual XLA devices; its last line as JSON."""
    env = xla_env(tmp_path, devices)
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'tests'}"
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


FULL_PRECISION_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch_xla.backends
    from clm import config
    from clm.backends import select_backend

    before = torch_xla.backends.get_mat_mul_precision()
    select_backend(config.compose(["backend=xla", f"full_precision={sys.argv[1]}"]))
    print(json.dumps([before, torch_xla.backends.get_mat_mul_precision()]))
    """)


@needs_xla
def test_full_precision_sets_xla_matmul_precision_to_highest(tmp_path):
    assert run_xla_script(tmp_path, FULL_PRECISION_SCRIPT, "true") == ["default", "highest"]
    assert run_xla_script(tmp_path, FULL_PRECISION_SCRIPT, "false") == ["default", "default"]


def sharding(tmp_path, tensor: int, expert: int, devices: int = XLA_DEVICES) -> dict:
    return run_xla_script(tmp_path, SHARDING_SCRIPT, str(tensor), str(expert), devices=devices)


@needs_xla
def test_fsdp_sharding_of_parameters_and_batch(tmp_path):
    out = sharding(tmp_path, 1, 1)
    specs = out["specs"]
    assert out["dp"] == 4
    # [V, D] embedding and [out, in] projections: the input dim split 4 ways
    fsdp_last = "{devices=[1,4]0,1,2,3}"
    assert specs["model.embed_tokens.weight"] == fsdp_last
    assert specs["model.layers.0.self_attn.q_proj.weight"] == fsdp_last
    assert specs["model.layers.0.self_attn.o_proj.weight"] == "{devices=[4,1]0,1,2,3}"
    assert specs["model.layers.0.mlp.experts.gate_up_proj"] == "{devices=[1,1,4]0,1,2,3}"
    assert specs["model.layers.0.mlp.experts.down_proj"] == "{devices=[1,4,1]0,1,2,3}"
    assert specs["lm_head.weight"] == fsdp_last
    assert specs["model.layers.0.input_layernorm.weight"] in ("", "{replicated}")
    assert specs["batch"] == "{devices=[4,1]0,1,2,3}"
    assert "tensor_parallelism=3 x expert_parallelism=1 = 3 does not divide" in specs["error"]


@needs_xla
def test_tensor_and_expert_parallel_sharding(tmp_path):
    """tensor_parallelism=2 x expert_parallelism=2 on 4 devices (fsdp=1): the 2-D rules."""
    out = sharding(tmp_path, 2, 2)
    specs = out["specs"]
    assert out["dp"] == 2  # rows split over fsdp x expert
    on_tensor_rows = "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}"  # replicated on expert
    assert specs["model.embed_tokens.weight"] == on_tensor_rows
    assert specs["model.layers.0.self_attn.q_proj.weight"] == on_tensor_rows  # column parallel
    assert specs["model.layers.0.self_attn.o_proj.weight"] == (
        "{devices=[1,2,2]0,1,2,3 last_tile_dim_replicate}"  # row parallel
    )
    # experts: E on "expert" (the minor mesh axis: devices 0,2 | 1,3), F on "tensor"
    assert specs["model.layers.0.mlp.experts.gate_up_proj"] == "{devices=[2,2,1]0,2,1,3}"
    assert specs["model.layers.0.mlp.experts.down_proj"] == "{devices=[2,1,2]0,2,1,3}"
    assert specs["batch"] == "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}"


def test_backend_xla_without_torch_xla_is_a_config_error(monkeypatch):
    from omegaconf import OmegaConf

    from clm.backends import select_backend
    from clm.config import ConfigError

    monkeypatch.setitem(sys.modules, "torch_xla", None)  # import torch_xla -> ImportError
    monkeypatch.delitem(sys.modules, "clm.backends.xla_backend", raising=False)
    cfg = OmegaConf.create({"backend": "xla", "tensor_parallelism": 1, "expert_parallelism": 1})
    with pytest.raises(ConfigError, match=r"^backend=xla: torch_xla is not importable") as e:
        select_backend(cfg)
    assert "\n" not in str(e.value)
    # auto picks XLA when PJRT_DEVICE=TPU is set: the same error, not a silent CPU run
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    with pytest.raises(ConfigError, match="backend=xla"):
        select_backend(OmegaConf.merge(cfg, {"backend": "auto"}))


class _CountingBackend:
    """What the compile watch reads from a backend: a compile count and is_main (and the device
    description, for the metrics processor's MFU)."""

    is_main = True

    def __init__(self, count: int, recompile_policy: str):
        self.count = count
        self.recompile_policy = recompile_policy  # XlaBackend's, from xla_recompile

    def compile_count(self) -> int:
        return self.count

    def device_description(self) -> str:
        return "1 XLA CPU device"


@pytest.mark.parametrize("policy", ["warn", "error", "ignore"])
def test_a_recompile_after_warm_up_follows_xla_recompile(policy, capsys):
    """This process's first 3 steps and first eval may compile (a resumed run's too, whatever
    its step numbers); a new compile after that follows xla_recompile."""
    from omegaconf import OmegaConf

    from clm.errors import TrainingError
    from clm.metrics_processor import MetricsProcessor

    cfg = OmegaConf.create({"peak_tflops_per_device": None})
    processor = MetricsProcessor(
        cfg=cfg,
        backend=_CountingBackend(9, policy),
        metrics=None,
        mlperf=None,
        tokens_per_step=1,
        flops_per_token=1.0,
    )
    assert processor.watch_compiles("step 2", False, 4) == 9  # warm-up: silent
    assert processor.watch_compiles("step 5", True, 9) == 9  # nothing new: silent
    for step in (6, 7, 8):  # a run resumed at step 5: its first 3 steps may compile
        values = {}
        processor.step_compiles(step, 8, values)
        assert values == {"perf/compiles": 9}
    processor.eval_compiles(8, 8)  # its first eval too
    assert capsys.readouterr().err == ""
    if policy == "error":
        with pytest.raises(TrainingError, match="XLA compiled 1 new program"):
            processor.step_compiles(9, 8, {})
        with pytest.raises(TrainingError, match="during the eval at step 9"):
            processor.eval_compiles(9, 8)
        return
    values = {}
    processor.step_compiles(9, 8, values)
    assert values == {"perf/compiles": 9}
    processor.eval_compiles(9, 8)
    err = capsys.readouterr().err.splitlines()
    if policy == "warn":
        assert len(err) == 2
        assert err[0].startswith("warning: XLA compiled 1 new program(s) during step 9, after")
        assert err[1].startswith("warning: XLA compiled 1 new program(s) during the eval at step 9")
    else:
        assert err == []


@needs_xla
def test_three_axis_mesh_sharding(tmp_path):
    """fsdp=2 x tensor=2 x expert=2 on 8 devices; device id = fsdp*4 + tensor*2 + expert."""
    out = sharding(tmp_path, 2, 2, devices=8)
    specs = out["specs"]
    assert out["dp"] == 4  # rows split over fsdp x expert
    # q_proj [out, in]: out on tensor, in on fsdp, replicated over expert
    assert specs["model.layers.0.self_attn.q_proj.weight"] == (
        "{devices=[2,2,2]0,1,4,5,2,3,6,7 last_tile_dim_replicate}"
    )
    # experts [E, 2F, D]: E on expert, 2F on tensor, D on fsdp: every device holds one tile
    assert specs["model.layers.0.mlp.experts.gate_up_proj"] == "{devices=[2,2,2]0,4,2,6,1,5,3,7}"
    assert specs["model.layers.0.mlp.experts.down_proj"] == "{devices=[2,2,2]0,2,4,6,1,3,5,7}"
    # the batch: rows 4 ways over (fsdp, expert), replicated over tensor
    assert specs["batch"] == "{devices=[4,1,2]0,2,1,3,4,6,5,7 last_tile_dim_replicate}"


@needs_xla
def test_fsdp_by_tensor_sharding(tmp_path):
    """fsdp=2 x tensor=2 on 4 devices: 2-D sharding of every matrix, batch rows on fsdp."""
    out = sharding(tmp_path, 2, 1)
    specs = out["specs"]
    assert out["dp"] == 2
    assert specs["model.layers.0.self_attn.q_proj.weight"] == "{devices=[2,2]0,2,1,3}"  # column
    assert specs["model.layers.0.self_attn.o_proj.weight"] == "{devices=[2,2]0,1,2,3}"  # row
    assert specs["model.layers.0.mlp.experts.gate_up_proj"] == "{devices=[1,2,2]0,2,1,3}"
    assert specs["batch"] == "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}"


@needs_xla
def test_a_mesh_that_does_not_divide_the_devices_fails_before_any_work(tmp_path):
    proc = run_xla(tmp_path, "backend=xla", "tensor_parallelism=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: tensor_parallelism=3 x expert_parallelism=1 = 3 does not divide the 4 devices "
        "(fsdp = devices / (tensor x expert))"
    ]
    assert not (tmp_path / "runs").exists()  # nothing written


@needs_xla
def test_flash_attention_off_tpu_is_a_config_error(tmp_path):
    proc = run_xla(tmp_path, *XLA_RUN, "xla_attention=flash")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: xla_attention=flash needs torch_xla's Pallas flash attention: a TPU and jax"
        )
    )


def _load_on_cpu(path):
    from conftest import model_spec

    from clm import checkpoint
    from clm.model import build_model

    model = build_model(model_spec(config_path="mixtral_small.json"), torch.device("cpu"), 1)
    checkpoint.restore(path, model, None)
    return model.state_dict()


@needs_xla
def test_checkpoints_move_between_cpu_and_an_spmd_mesh(tmp_path, cpu_run, cpu_metrics):
    """A CPU checkpoint restores onto fsdp=4 and training goes on with the CPU losses; the
    checkpoint the mesh saves loads back on the CPU with the CPU run's weights."""
    step2 = cpu_run / "checkpoints" / "step_00000002"
    proc = run_xla(tmp_path, *XLA_RUN, f"checkpoint_manager_path={step2}", "save_frequency=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"restored {step2} (step 2" in proc.stdout
    run_dir = tmp_path / "runs" / "embedded_default"
    xla = read_metrics(run_dir)
    for key in ("train/loss", "eval/loss"):
        got = [(r["step"], r[key]) for r in xla if key in r]
        want = [(r["step"], r[key]) for r in cpu_metrics if key in r and r["step"] > 2]
        assert [s for s, _ in got] == [s for s, _ in want]
        for (_, x), (_, c) in zip(got, want, strict=True):
            assert abs(x - c) <= LOSS_TOLERANCE, (key, x, c)
    saved = _load_on_cpu(run_dir / "checkpoints" / "step_00000004")
    # the trainer saved through the XLA backend's SPMD planner: one DCP chunk per shard
    assert len(_chunks(run_dir / "checkpoints" / "step_00000004", "model.lm_head.weight")) > 1
    reference = _load_on_cpu(cpu_run / "checkpoints" / "step_00000004")
    assert saved.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(saved[name], tensor, atol=1e-5, rtol=1e-4), name


# --------------------------------------------------------------------------- multi-host, slices
#
# torch_xla's CPU runtime cannot run SPMD over several processes: each process builds its own
# PJRT CPU client with CPU_NUM_DEVICES devices (process_count() == 1, no coordinator; measured
# with RANK/WORLD_SIZE/MASTER_ADDR/PJRT_LOCAL_PROCESS_* set: two processes each saw 2 devices).
# So the multi-host input path is tested through its parts: which rows each device holds after
# the backend's sharded transfer (real shards, one process), and which rows a host's devices
# need (pure functions, any number of hosts).


def test_slices_are_the_outer_factor_of_fsdp():
    # 8 devices, 2 slices, fsdp=4 x tensor=2: slice 0 = devices 0-3 -> fsdp rows 0, 1
    ids = mesh_device_ids([d // 4 for d in range(8)], (4, 2, 1), 2)
    assert ids == list(range(8))
    assert slices_are_outermost(ids, (4, 2, 1), [d // 4 for d in range(8)], 2)
    # slices need not be contiguous ids (the TPU runtime's slice_index): each slice's devices
    # fill its own fsdp block, so a tensor pair never spans two slices
    interleaved = [d % 2 for d in range(8)]
    ids = mesh_device_ids(interleaved, (4, 2, 1), 2)
    assert ids == [0, 2, 4, 6, 1, 3, 5, 7]
    assert all(interleaved[a] == interleaved[b] for a, b in zip(ids[::2], ids[1::2], strict=True))
    assert slices_are_outermost(ids, (4, 2, 1), interleaved, 2)
    assert not slices_are_outermost(list(range(8)), (4, 2, 1), interleaved, 2)
    with pytest.raises(ConfigError, match="in 2 slice.*set num_slices=2"):
        mesh_device_ids(interleaved, (4, 2, 1), 1)


def test_num_slices_must_keep_tensor_and_expert_groups_inside_a_slice():
    assert mesh_shape(8, 2, 1, num_slices=2) == (4, 2, 1)
    assert mesh_shape(16, 2, 2, num_slices=4) == (4, 2, 2)
    with pytest.raises(ConfigError, match=r"num_slices=4: must divide .* fsdp=2"):
        mesh_shape(8, 2, 2, num_slices=4)  # fsdp=2: a slice would hold half a tensor group
    with pytest.raises(ConfigError, match="num_slices=3"):
        mesh_shape(8, 1, 1, num_slices=3)


def test_each_host_transfers_only_its_devices_rows():
    """v5p-16-like: 2 hosts x 4 devices, a 16-row global batch."""
    hosts = [[0, 1, 2, 3], [4, 5, 6, 7]]
    fsdp8 = list(range(8))
    assert host_rows(fsdp8, (8, 1, 1), 16, hosts[0]) == list(range(8))
    assert host_rows(fsdp8, (8, 1, 1), 16, hosts[1]) == list(range(8, 16))
    # fsdp=4 x tensor=2: each row block lives on a tensor pair, which is on one host
    assert host_rows(fsdp8, (4, 2, 1), 16, hosts[1]) == list(range(8, 16))
    # fsdp=2 x expert=4 (rows over fsdp x expert): a host's 4 devices hold 4 distinct blocks
    assert host_rows(fsdp8, (2, 1, 4), 16, hosts[0]) == list(range(8))
    # the rows of all hosts tile the batch exactly once per tensor replica
    by_device = rows_by_device(fsdp8, (2, 2, 2), 16)
    assert sorted(r for rows in by_device.values() for r in rows) == sorted(list(range(16)) * 2)
    # 2 slices of 2 hosts each (interleaved slice ids): every host still gets whole blocks
    slice_of = [0, 0, 1, 1, 0, 0, 1, 1]
    ids = mesh_device_ids(slice_of, (8, 1, 1), 2)
    assert ids == [0, 1, 4, 5, 2, 3, 6, 7]
    assert host_rows(ids, (8, 1, 1), 16, [0, 1]) == [0, 1, 2, 3]  # slice 0's first host
    assert host_rows(ids, (8, 1, 1), 16, [2, 3]) == [8, 9, 10, 11]  # slice 1's first host


SHARDS_SCRIPT = textwrap.dedent("""
    import json
    import torch
    import torch_xla.distributed.spmd as xs
    from clm.backends.xla_backend import XlaBackend
    from clm import model as model_lib
    from clm.sharding import blocks_by_device, partition_spec, rows_by_device
    from conftest import model_spec

    config = model_lib.build_hf_config(model_spec(config_path="mixtral_small.json"))
    shapes = model_lib._meta_model(config, torch.float32).state_dict()
    out = {}
    for tp, ep, slices in ((1, 1, 1), (2, 1, 2), (2, 2, 2)):
        backend = XlaBackend(tp, ep, num_slices=slices)
        rows = 16
        batch = {"input_ids": torch.arange(rows).repeat_interleave(4).view(rows, 4)}
        sharded = xs.wrap_if_sharded(backend.to_device(batch)["input_ids"])
        held = {
            int(s.shard_device.split(":")[-1]): sorted(s.unpadded_data[:, 0].tolist())
            for s in sharded.local_shards
        }
        ids = [int(d) for d in backend.mesh.device_ids]
        shape = tuple(backend.axis_sizes.values())
        want = {d: list(r) for d, r in rows_by_device(ids, shape, rows).items()}
        # parameters: every device holds `blocks_by_device`'s block; a host of devices 0-3
        # that reads only its `region` of each tensor (NaN elsewhere) still gets every value
        params_ok, partial, host = [], 0, [0, 1, 2, 3]
        for name, meta in shapes.items():
            spec = partition_spec(name, tuple(meta.shape), backend.axis_sizes)
            blocks = blocks_by_device(ids, shape, spec, tuple(meta.shape))
            full = torch.arange(meta.numel(), dtype=torch.float32).view(meta.shape)
            backend._local_ids = host
            box = backend.region(name, tuple(meta.shape))
            read = full
            if box is not None:
                partial += 1
                read = torch.full_like(full, float("nan"))
                read[box] = full[box]
            for value, devices in ((full, ids), (read, host)):
                placed = xs.wrap_if_sharded(backend.place(name, value))
                for s in placed.local_shards:
                    device = int(s.shard_device.split(":")[-1])
                    if device in devices:
                        expected = full[blocks[device]]
                        params_ok.append(torch.equal(s.unpadded_data, expected))
        out[f"{tp},{ep},{slices}"] = {"held": held == want, "ids": ids,
                                      "description": backend.device_description(),
                                      "params": all(params_ok) and len(params_ok) > len(shapes),
                                      "partial": partial}
    out["any"] = [backend.any_process(True), backend.any_process(False)]
    backend.barrier()
    print(json.dumps(out))
    """)


@needs_xla
def test_device_shards_hold_the_rows_the_host_logic_says(tmp_path):
    """The backend's sharded transfer on 8 devices (plain, 2 slices x tensor 2, 2 slices x
    tensor 2 x expert 2): every device holds exactly `rows_by_device`'s rows and each
    parameter's `blocks_by_device` block; a host that reads only `region` of each tensor still
    transfers every value its devices hold; and barrier and any_process run on the hosts' gloo
    group (one process here)."""
    out = run_xla_script(tmp_path, SHARDS_SCRIPT, devices=8)
    for mesh in ("1,1,1", "2,1,2", "2,2,2"):
        assert out[mesh]["held"], (mesh, out[mesh])
        assert out[mesh]["params"], mesh
        assert out[mesh]["partial"] > 5, mesh  # most tensors: half a host's box or less
        assert out[mesh]["ids"] == list(range(8))  # CPU stand-in slices: consecutive ids
    assert out["2,1,2"]["description"].endswith(
        "(SPMD mesh fsdp=4 x tensor=2 x expert=1; fsdp over 2 slices)"
    )
    assert out["any"] == [True, False]


@needs_xla
def test_two_slices_match_cpu_reading_losses_every_other_step(tmp_path, cpu_metrics):
    """num_slices=2 on 8 devices (fsdp 4 = 2 slices x 2, tensor 2) with log_frequency=2: the
    XLA loop launches steps 1 and 3 without reading anything back, and the logged steps 2 and 4
    (train and eval) match the CPU run, with no recompile after warm-up."""
    proc = run_xla(
        tmp_path,
        "backend=xla",
        "xla_recompile=error",
        "num_slices=2",
        "tensor_parallelism=2",
        "per_device_train_batch_size=2",
        "log_frequency=2",
        devices=8,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "(SPMD mesh fsdp=4 x tensor=2 x expert=1; HF sdpa attention, fsdp over 2 slices)"
        in proc.stdout
    )
    xla = read_metrics(tmp_path / "runs" / "embedded_default")
    got = [(r["step"], k, r[k]) for r in xla for k in ("train/loss", "eval/loss") if k in r]
    want = {
        (r["step"], k): r[k] for r in cpu_metrics for k in ("train/loss", "eval/loss") if k in r
    }
    assert [(s, k) for s, k, _ in got] == [
        (2, "train/loss"),
        (2, "eval/loss"),
        (4, "train/loss"),
        (4, "eval/loss"),
    ]
    for step, key, value in got:
        assert abs(value - want[(step, key)]) <= LOSS_TOLERANCE, (step, key, value)


@needs_xla
def test_the_tpu_generation_names_the_mfu_peak(monkeypatch):
    """On a TPU VM the description carries the generation (from the accelerator type, here
    given the way GKE passes it, as variables), so perf/mfu finds the chip's peak."""
    from clm.backends import xla_backend
    from clm.metrics import peak_tflops

    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-128")
    xla_backend._tpu_generation.cache_clear()
    try:
        generation = xla_backend._tpu_generation()
    finally:
        xla_backend._tpu_generation.cache_clear()
    assert generation == " v5p"
    assert peak_tflops(f"64 XLA TPU{generation} devices (SPMD mesh fsdp=64)", None) == 459.0


SPMD_CHECKPOINT_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch_xla
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from clm import checkpoint
    from clm.backends.xla_backend import XlaBackend
    from conftest import model_spec

    backend = XlaBackend(1, 1)

    def build(seed):
        model = backend.build_model(model_spec(config_path="mixtral_small.json"), seed)
        return model, adamw(model.parameters(), lr=1e-2)

    batch = backend.to_device({"input_ids": torch.arange(8 * 16).reshape(8, 16) % 1000})

    def step(model, optimizer):
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        backend.step_boundary()  # launched, not waited for: the planner must wait
        return loss

    def cpu_state(model, optimizer):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        flat = {f"model.{k}": v for k, v in model_sd.items()}
        for name, state in optim_sd["state"].items():
            flat.update({f"optim.{name}.{k}": v for k, v in state.items()})
        return {k: v.detach().cpu().clone() for k, v in flat.items()}

    out = {"group": dist.get_world_size()}
    tmp = sys.argv[1]
    for name in sys.argv[2:]:  # checkpoints in tmp/<name>/, the saved weights in tmp/<name>.pt
        adamw = backend.optimizer_class(name)
        model, optimizer = build(0)
        step(model, optimizer)
        where = checkpoint.save(
            f"{tmp}/{name}", 1, model, optimizer, {"step": 1}, **backend.checkpoint_options(load=False)
        )
        saved = cpu_state(model, optimizer)
        torch.save(saved, f"{tmp}/{name}.pt")
        after = float(step(model, optimizer))

        other, other_optimizer = build(1)  # other weights, no optimizer state yet
        state = checkpoint.restore(
            where, other, other_optimizer, **backend.checkpoint_options(load=True)
        )
        restored = cpu_state(other, other_optimizer)
        spec = torch_xla._XLAC._get_xla_sharding_spec(other.model.embed_tokens.weight)
        mismatched = [k for k in saved if not torch.equal(saved[k], restored[k])]
        resumed = float(step(other, other_optimizer))
        out[name] = {
            "state": state, "mismatched": mismatched, "keys": len(saved), "spec": spec,
            "after": after, "resumed": resumed,
        }
    backend.close()
    print(json.dumps(out))
""")


@needs_xla
def test_spmd_planners_save_shards_and_resume_exactly(tmp_path):
    """fsdp=4: each device's shard is its own DCP chunk (SPMDSavePlanner, not a gathered
    whole tensor); the checkpoint restores onto the mesh in place (SPMDLoadPlanner) with every
    weight and AdamW moment bitwise equal and the next step's loss identical; the plain CPU
    loader reads the same files back with the same weights."""
    from clm import checkpoint

    optimizers = ["ADAMW_TORCH_XLA", "ADAMW_TORCH"]  # syncfree AdamW and torch's
    out = run_xla_script(tmp_path, SPMD_CHECKPOINT_SCRIPT, str(tmp_path), *optimizers)
    assert out["group"] == 1  # the gloo group over hosts, here one
    for optimizer in optimizers:
        run = out[optimizer]
        assert run["state"] == {"step": 1}
        assert run["mismatched"] == [] and run["keys"] > 0, optimizer
        assert run["spec"] == "{devices=[1,4]0,1,2,3}"  # restored into the mesh's layout
        assert run["resumed"] == run["after"], optimizer
        _assert_spmd_checkpoint(
            checkpoint.latest(tmp_path / optimizer), tmp_path / f"{optimizer}.pt"
        )


def _assert_spmd_checkpoint(path, weights):
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # embed_tokens [32000, 128] sharded [1, 4]: four chunks of [32000, 32], for the weight
    # and both moments; the gathering default planner would have written one whole chunk
    for key in (
        "model.model.embed_tokens.weight",
        "optim.state.model.embed_tokens.weight.exp_avg",
        "optim.state.model.embed_tokens.weight.exp_avg_sq",
    ):
        chunks = metadata[key].chunks
        assert sorted(c.offsets[1] for c in chunks) == [0, 32, 64, 96], key
        assert all(tuple(c.sizes) == (32000, 32) for c in chunks), key
    # DCP's own keys (the CPU backend's), not torch_xla's "optim.param_groups" in one piece
    assert "optim.param_groups.0.lr" in metadata and "optim.param_groups" not in metadata
    # the plain CPU loader restores weights and AdamW state (step, moments) as saved
    from conftest import model_spec
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from clm import checkpoint
    from clm.model import build_model

    model = build_model(model_spec(config_path="mixtral_small.json"), torch.device("cpu"), 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert checkpoint.restore(path, model, optimizer) == {"step": 1}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    on_cpu = {f"model.{k}": v for k, v in model_sd.items()}
    for name, state in optim_sd["state"].items():
        on_cpu.update({f"optim.{name}.{k}": v for k, v in state.items()})
    reference = torch.load(weights)
    assert on_cpu.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(on_cpu[name], tensor), name


def _chunks(path, key: str) -> list:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata[key].chunks


COMMIT_ORDER_SCRIPT = textwrap.dedent("""
    import errno, json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from clm import checkpoint
    from clm.errors import OutputWriteError

    def host(rank, save_dir, port, results):
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
        group = dist.new_group(backend="gloo")  # passed explicitly, as the XLA backend does
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        out = {}
        checkpoint.save(save_dir, 1, model, optimizer, {"step": 1}, is_main=rank == 0,
                        process_group=group)
        # leaving save: committed, for every process
        out["latest"] = os.path.basename(str(checkpoint.latest(save_dir)))
        if rank == 0:  # the main process fails to commit step 2 (after dcp.save's files)
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            checkpoint._fsync_dir = full  # dcp.save's own writes use torch.save
        try:
            checkpoint.save(save_dir, 2, model, optimizer, {"step": 2}, is_main=rank == 0,
                            process_group=group)
            out["error"] = None
        except OutputWriteError as e:
            out["error"] = str(e)
        out["after"] = sorted(os.listdir(save_dir))
        results[rank] = out
        dist.destroy_process_group()

    if __name__ == "__main__":
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = mp.Manager().dict()
        mp.spawn(host, args=(sys.argv[1], port, results), nprocs=2)
        print(json.dumps(dict(results)))
""")


def test_the_main_process_commits_after_every_process_wrote_and_all_see_it(tmp_path):
    """Two processes save over a gloo group passed in, as the XLA backend's hosts do: both
    leave `save` with the step committed; the main process failing to commit raises
    OutputWriteError on both, and nothing partial is left."""
    script = tmp_path / "commit.py"
    script.write_text(COMMIT_ORDER_SCRIPT)
    proc = run_python(tmp_path, str(script), str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for rank in ("0", "1"):
        out = results[rank]
        assert out["latest"] == "step_00000001", rank
        assert out["after"] == ["step_00000001"], rank
    assert "ENOSPC" in results["0"]["error"]
    assert "process 0 failed: OSError" in results["1"]["error"]
    assert "the previous checkpoint" in results["1"]["error"]


@needs_xla
def test_pretrained_weights_load_a_piece_at_a_time_onto_the_mesh(tmp_path):
    """An HF checkpoint (Mixtral's per-expert layout) read piece by piece straight onto a
    (fsdp 2, tensor 2) mesh: HF's weights, each sharded as the rules say."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_mixtral_config()).save_pretrained(tmp_path / "hf")
    out = run_xla_script(tmp_path, PRETRAINED_SCRIPT, str(tmp_path / "hf"))
    assert out["differ"] == []
    assert out["devices"] == ["xla:0"]
    # gate_up_proj [E, 2F, D]: 2F on "tensor", D on "fsdp"
    assert out["spec"].startswith("{devices=[1,2,2]"), out["spec"]


@needs_xla
def test_a_run_cut_after_a_save_resumes_with_the_same_losses(tmp_path, runs):
    """XLA exact resume: the 4-step run saving every 2 steps (the `runs` fixture); its run
    directory as a crash after step 3 would leave it (step 2 the latest committed checkpoint,
    metrics written past it); the same command resumes from step 2 and logs bitwise the
    uninterrupted run's losses."""
    import shutil

    from clm import checkpoint

    xla, want, _ = runs
    again = tmp_path / "again"
    shutil.copytree(xla.run_dir.parent, again / "runs")
    run_dir = again / "runs" / "embedded_default"
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000002"
    proc = run_xla(again, *XLA_RUN, "save_frequency=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restored" in proc.stdout and "(step 2" in proc.stdout, proc.stdout[-2000:]
    got = read_metrics(run_dir)
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        expected = [(r["step"], r[key]) for r in want if key in r]
        assert [(r["step"], r[key]) for r in got if key in r] == expected, key
        assert [s for s, _ in expected][-1] == 4


SCAN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch_xla
    from clm import moe
    from clm.backends.xla_backend import XlaBackend
    from clm.model import build_model, forward
    from conftest import model_spec

    # the preset's program: dropping experts, per-sequence capacity, checkpointed layers
    scan = sys.argv[1] == "scan"
    cfg = model_spec(
        32, config_path="mixtral_small.json", capacity_factor=0.5, gradient_checkpointing=True
    )
    backend = XlaBackend(scan_layers=scan)
    model = backend.wrap_model(
        build_model(cfg, backend.init_device, 0, backend.place, backend.region)
    )
    reference = build_model(cfg, torch.device("cpu"), 0)
    ids = torch.randint(0, 32000, (8, 32), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, net, batch in (
        ("xla", model, backend.to_device({"input_ids": ids, "labels": ids})),
        ("cpu", reference, {"input_ids": ids, "labels": ids}),
    ):
        nll, count, aux = forward(net, batch, True)
        (nll / count + aux).backward()
        if name == "xla":
            torch_xla.sync()  # one program for the step; each read below then reads its result
        grads = {n: p.grad.cpu() for n, p in net.named_parameters()}
        results[name] = (float(nll / count), float(aux), grads, moe.moe_metrics(net))
    (loss, aux, grads, stats), (cpu_loss, cpu_aux, cpu_grads, cpu_stats) = results.values()
    print(json.dumps({
        "loss": [loss, cpu_loss],
        "aux": [aux, cpu_aux],
        "grad": max((grads[n] - g).abs().max().item() for n, g in cpu_grads.items()),
        "stats": [stats, cpu_stats],
        "scanned": type(model.model).forward is not model.model.forward.__func__,
    }))
    """)


@needs_xla
@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_scanned_or_unrolled_layers_match_cpu(tmp_path, layers):
    """xla_scan_layers: the decoder layers as one scanned loop (recomputed in the backward:
    checkpointing is on) give the CPU model's loss, aux loss, every gradient and the MoE
    statistics, on 4 devices with dropping experts (about a third of the assignments dropped,
    so the per-sequence capacity and the sharded slot copies matter)."""
    out = run_xla_script(tmp_path, SCAN_SCRIPT, layers)
    assert out["scanned"] == (layers == "scan")
    assert out["loss"][0] == pytest.approx(out["loss"][1], abs=2e-5)
    assert out["aux"][0] == pytest.approx(out["aux"][1], abs=2e-5)
    assert out["grad"] < 1e-5, out["grad"]
    stats, cpu_stats = out["stats"]
    assert 0.1 < cpu_stats["moe/drop_fraction"] < 0.9
    assert stats == pytest.approx(cpu_stats, abs=1e-3)


@needs_xla
def test_scanned_run_matches_cpu(tmp_path, cpu_metrics):
    """A whole run with scanned layers: the CPU run's losses and gradient norms, no
    recompiles."""
    proc = run_xla(tmp_path, *XLA_RUN, "xla_scan_layers=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "runs" / "embedded_default")
    assert_losses_match(records, cpu_metrics)
