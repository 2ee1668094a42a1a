"""The NeMo (Megatron-Bridge) path, everything that needs no GPU and no NeMo.

- data prep: the shipped sample written as Megatron indexed datasets, read back byte by byte
  (an independent parse of the layout) and, when megatron-core is installed, by Megatron's own
  IndexedDataset and GPTDataset; token ids equal our tokenizer's;
- the translation of our Hydra config into Megatron-Bridge settings, incl. the gbs256 presets
  and the 8x22B values, and its errors;
- the learning-rate schedules against Megatron-core's own OptimizerParamScheduler;
- the MLPerf lifecycle of the callback, checked by the compliance checker with the closed rules;
- the launcher as a user runs it: exit 2 with one line without NeMo, `--dry-run` JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLM, ROOT, run_python
from omegaconf import OmegaConf

from clm import config as config_lib
from clm import data as data_lib
from clm import mlperf
from clm.nemo import launch, recipe
from clm.nemo import prepare_data as prep
from clm.spec import load_spec
from clm.tokenizer import load_tokenizer

SAMPLE = CLM / "sample_data"
SHA = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
# token counts of the shipped sample (clm/sample_data/README.md)
SAMPLE_TOKENS = {768: 263_567, 769: 261_344, 770: 261_557, 771: 259_987}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The embedded default's data (4 sample shards, first 100 eval documents), prepared once."""
    out = tmp_path_factory.mktemp("c4_megatron")
    assert prep.main(["--output-dir", str(out), "--workers", "2"]) == 0
    return out


def parse_megatron_files(prefix: Path) -> tuple[int, list[np.ndarray]]:
    """Documents of a .bin/.idx pair, parsed from the layout of Megatron-core's _IndexReader."""
    idx = Path(str(prefix) + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, code, sequences, documents = struct.unpack_from("<QBQQ", idx, 9)
    assert version == 1
    lengths = np.frombuffer(idx, np.int32, sequences, 34)
    pointers = np.frombuffer(idx, np.int64, sequences, 34 + 4 * sequences)
    doc_idx = np.frombuffer(idx, np.int64, documents, 34 + 12 * sequences)
    assert len(idx) == 34 + 12 * sequences + 8 * documents  # nothing after the document indices
    assert doc_idx.tolist() == list(range(sequences + 1))  # one sequence per document
    dtype = {8: np.uint16, 4: np.int32}[code]
    raw = Path(str(prefix) + ".bin").read_bytes()
    assert len(raw) == int(lengths.sum()) * np.dtype(dtype).itemsize
    docs = [
        np.frombuffer(raw, dtype, int(n), int(p)) for n, p in zip(lengths, pointers, strict=True)
    ]
    return code, docs


def expected_ids(url: str, limit: int | None = None) -> list[list[int]]:
    tokenizer = load_tokenizer(None, SHA)
    texts = list(data_lib.read_texts(url))
    return tokenizer.encode(texts[:limit] if limit else texts)


# ---- data prep ------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", sorted(SAMPLE_TOKENS))
def test_train_shard_round_trip_equals_our_tokenizer(prepared, shard):
    prefix = prepared / prep.train_prefix(shard)
    code, docs = parse_megatron_files(prefix)
    assert code == 8  # uint16: a 32000-piece vocabulary, as Megatron's DType.optimal_dtype picks
    want = expected_ids(str(SAMPLE / data_lib.train_shard_name(shard)) + ".gz")
    assert [d.tolist() for d in docs] == want
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    assert meta["tokens"] == SAMPLE_TOKENS[shard] == sum(map(len, want))
    assert meta["documents"] == len(want) and meta["tokenizer_sha256"] == SHA
    assert [d.tolist() for d in prep.iter_documents(prefix)] == want


def test_eval_subset_is_the_first_n_documents(prepared):
    prefix = prepared / prep.VALIDATION_PREFIX
    _, docs = parse_megatron_files(prefix)
    want = expected_ids(str(SAMPLE / data_lib.VALIDATION_FILE), limit=100)
    assert [d.tolist() for d in docs] == want
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    assert meta["limit"] == 100 and meta["documents"] == 100
    assert prep.read_index(prefix).num_tokens == meta["tokens"] == sum(map(len, want))


def in_megatron(code: str, data) -> object:
    """Run `code` with megatron-core in a fresh interpreter: its import sets process-wide state
    that stays out of this one. `data` arrives as `data`; the result is its last printed line."""
    if importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core not installed (pip install --no-deps megatron-core==0.16.0)")
    prelude = "import json, sys, warnings\nwarnings.simplefilter('ignore')\n"
    prelude += "data = json.loads(sys.stdin.read())\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code],
        input=json.dumps(data),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


READ_WITH_MEGATRON = """
import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

class Tokenizer:  # what GPTDataset asks of a tokenizer when the data is already tokenized
    vocab_size, eod, pad = 32000, 2, -1
    unique_identifiers = {"class": "mistral-v1"}

prefix = data["prefix"]
indexed = IndexedDataset(prefix)
config = GPTDatasetConfig(
    random_seed=1, sequence_length=data["seq"], blend_per_split=[None, ([prefix], None), None],
    reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    path_to_cache=data["cache"], tokenizer=Tokenizer(),
)
gpt = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), None, Split.valid, config)
sample = gpt[0]
print(json.dumps({
    "documents": [indexed[i].tolist() for i in range(len(indexed))],
    "epoch": len(gpt),
    "tokens": sample["tokens"].tolist(),
    "labels": sample["labels"].tolist(),
    "loss_mask": float(sample["loss_mask"].sum()),
}))
"""


def test_megatron_core_reads_the_files(prepared):
    """Megatron-core's own IndexedDataset and GPTDataset on our files."""
    prefix = str(prepared / prep.VALIDATION_PREFIX)
    seq = 256
    got = in_megatron(
        READ_WITH_MEGATRON, {"prefix": prefix, "seq": seq, "cache": str(prepared / "cache")}
    )
    want = expected_ids(str(SAMPLE / data_lib.VALIDATION_FILE), limit=100)
    assert got["documents"] == want
    # one epoch of GPTDataset has (tokens - 1) // seq sequences: the count build_settings uses
    assert got["epoch"] == (sum(map(len, want)) - 1) // seq
    assert len(got["tokens"]) == seq and got["loss_mask"] == seq  # no EOD, no padding masked
    assert got["labels"][:-1] == got["tokens"][1:]


def test_prepare_is_idempotent_and_atomic(prepared, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    assert prep.main(["--output-dir", str(prepared)]) == 0
    assert capsys.readouterr().out.count("up to date") == 5
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before
    assert not [p for p in prepared.iterdir() if p.name.endswith(".tmp")]


def test_writer_layout_and_limits(tmp_path):
    with prep.IndexedDatasetWriter(tmp_path / "x", np.uint16) as writer:
        writer.add_document([5, 6, 7])
        writer.add_document(np.array([65535]))
    idx = (tmp_path / "x.idx").read_bytes()
    assert idx == (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 2, 3)
        + np.array([3, 1], np.int32).tobytes()
        + np.array([0, 6], np.int64).tobytes()
        + np.array([0, 1, 2], np.int64).tobytes()
    )
    assert (tmp_path / "x.bin").read_bytes() == np.array([5, 6, 7, 65535], np.uint16).tobytes()
    with pytest.raises(ValueError, match="out of range"):
        with prep.IndexedDatasetWriter(tmp_path / "y", np.uint16) as writer:
            writer.add_document([65536])
    with pytest.raises(ValueError, match="empty document"):
        with prep.IndexedDatasetWriter(tmp_path / "z", np.uint16) as writer:
            writer.add_document([])
    assert not list(tmp_path.glob("[yz].*"))  # a failed write leaves nothing behind
    assert prep.optimal_dtype(32000) is np.uint16 and prep.optimal_dtype(128256) is np.int32


def test_unreadable_shard_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "c4"
    bad.mkdir()
    (bad / "c4-train.00000-of-01024.json").write_text('{"text": "ok"}\nnot json\n')
    (bad / data_lib.VALIDATION_FILE).write_text('{"text": "fine"}\n')
    argv = ["--output-dir", str(tmp_path / "out"), f"dataset.train_dataset_path={bad}"]
    argv += [f"dataset.eval_dataset_path={bad}", "dataset.train_shards=[0,1]"]
    assert prep.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c4-train.00000-of-01024.json:2: not a JSON line" in err


# ---- config -> Megatron-Bridge settings -------------------------------------------------------
def build_settings(cfg, **kwargs) -> dict:
    """recipe.build_settings with the config's model spec, as clm.nemo.launch passes it."""
    return recipe.build_settings(cfg, load_spec(cfg.model, cfg.max_length), **kwargs)


def fake_data(eval_tokens: int = 12_000_000, train_tokens: int = 10**10) -> dict:
    """data_stats() for data not available here (the real C4 shards)."""
    return {
        "train_prefixes": ["/data/a", "/data/b"],
        "train_tokens": train_tokens,
        "eval_prefix": "/data/v",
        "eval_tokens": eval_tokens,
    }


def test_gbs256_gpu_preset_gives_the_8x22b_benchmark_settings():
    cfg = recipe.compose(["+experiment=gbs256_gpu"])
    config_lib.validate(cfg)
    s = build_settings(cfg, world_size=128, data=fake_data())
    m = s["model"]
    # Mixtral-8x22B (clm/mixtral822.json)
    assert (m["num_layers"], m["hidden_size"], m["ffn_hidden_size"]) == (56, 6144, 16384)
    assert (m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]) == (48, 8, 128)
    assert (m["vocab_size"], m["seq_length"], m["rotary_base"]) == (32000, 32768, 1e6)
    assert m["normalization"] == "RMSNorm" and m["activation_func"] == "silu"
    assert m["gated_linear_unit"] and not m["add_bias_linear"]
    assert not m["share_embeddings_and_output_weights"] and m["layernorm_epsilon"] == 1e-5
    # MoE: 8 experts top-2, aux loss 0.001, capacity 1.25 with token dropping by position
    assert (m["num_moe_experts"], m["moe_router_topk"], m["moe_ffn_hidden_size"]) == (8, 2, 16384)
    assert m["moe_aux_loss_coeff"] == 0.001 and m["moe_router_load_balancing_type"] == "aux_loss"
    assert m["moe_expert_capacity_factor"] == 1.25 and m["moe_pad_expert_input_to_capacity"]
    assert m["moe_token_drop_policy"] == "position" and not m["moe_router_pre_softmax"]
    # parallelism of the preset: TP 2, PP 4 x VP 14, CP 2, EP 8 -> DP 8 on 128 GPUs
    assert (m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"]) == (2, 4)
    assert m["virtual_pipeline_model_parallel_size"] == 14 and m["context_parallel_size"] == 2
    assert m["expert_model_parallel_size"] == 8 and m["sequence_parallel"]
    assert m["pipeline_dtype"] == "bfloat16" and s["mixed_precision"] == "bf16_mixed"
    assert m["recompute_granularity"] == "full"  # model.gradient_checkpointing
    t = s["train"]
    assert (t["global_batch_size"], t["micro_batch_size"], t["train_iters"]) == (256, 1, 250)
    assert t["eval_interval"] == 6  # ceil(24576 * 2048 / 32768 / 256)
    assert t["eval_iters"] == math.ceil((12_000_000 - 1) // 32768 / 256)
    o = s["optimizer"]
    assert (o["optimizer"], o["lr"], o["min_lr"]) == ("adam", 2e-5, 0.0)
    assert (o["adam_beta1"], o["adam_beta2"], o["adam_eps"]) == (0.9, 0.999, 1e-8)
    assert (o["weight_decay"], o["clip_grad"]) == (0.1, 1.0)
    sc = s["scheduler"]
    assert (sc["lr_decay_style"], sc["lr_warmup_iters"], sc["lr_decay_iters"]) == (
        "constant",
        62,  # int(0.25 * 250), NeMo's rule, as the MLPerf rules pin it
        250,
    )
    assert s["rng"]["seed"] == 4321 and s["dataset"]["random_seed"] == 4321
    assert s["dataset"]["seq_length"] == 32768
    assert s["checkpoint"]["save"] is None  # the benchmark preset does not checkpoint
    d = s["derived"]
    assert (d["data_parallel_size"], d["gradient_accumulation_steps"]) == (8, 32)
    assert d["eval_samples"] == (12_000_000 - 1) // 32768 and d["target_eval_loss"] == 1.8
    json.loads(recipe.to_json(s))  # plain data throughout


def test_gbs256_tpu_preset_translates_on_256_gpus():
    """The reference's preset as is: TP 1, one sequence per GPU, DP 256, no accumulation."""
    cfg = recipe.compose(["+experiment=gbs256_tpu"])
    assert cfg.nemo.data_dir is None  # the nemo group's defaults were added
    s = build_settings(cfg, world_size=256, data=fake_data())
    assert s["derived"]["data_parallel_size"] == 256
    assert s["derived"]["gradient_accumulation_steps"] == 1
    assert s["model"]["tensor_model_parallel_size"] == 1 and not s["model"]["sequence_parallel"]
    assert s["model"]["moe_aux_loss_coeff"] == 0.001
    assert s["train"]["eval_interval"] == 6 and s["optimizer"]["lr"] == 2e-5


def test_global_batch_derived_when_not_set():
    cfg = recipe.compose(["per_device_train_batch_size=2", "gradient_accumulation_steps=3"])
    s = build_settings(cfg, world_size=4, data=fake_data())
    assert s["train"]["global_batch_size"] == 2 * 4 * 3
    assert s["derived"]["gradient_accumulation_steps"] == 3
    assert s["model"]["num_moe_experts"] == 8 and s["mixed_precision"] is None  # float32
    assert s["model"]["moe_expert_capacity_factor"] is None  # capacity_factor 0: dropless
    assert s["model"]["moe_aux_loss_coeff"] == 0.02  # mixtral_small.json's


def test_cosine_schedule_and_overrides():
    cfg = recipe.compose(
        [
            "sched=CosineAnnealing",
            "sched.warmup_steps=20",
            "sched.constant_steps=100",
            "sched.min_lr=1e-5",
            "model.router_aux_loss_coef=0.005",
            "model.capacity_factor=2.0",
        ]
    )
    s = build_settings(cfg, world_size=1, data=fake_data())
    sc = s["scheduler"]
    assert (sc["lr_decay_style"], sc["lr_warmup_iters"], sc["lr_decay_iters"]) == (
        "cosine",
        20,
        500,
    )
    assert s["optimizer"]["min_lr"] == 1e-5
    assert s["model"]["moe_aux_loss_coeff"] == 0.005
    assert s["model"]["moe_expert_capacity_factor"] == 2.0


MEGATRON_LRS = """
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

sc, gbs = data["scheduler"], data["gbs"]
optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=data["lr"])
# Megatron-Bridge counts the schedule in samples: iterations x global batch
scheduler = OptimizerParamScheduler(
    optimizer, init_lr=sc["lr_warmup_init"], max_lr=data["lr"], min_lr=data["min_lr"],
    lr_warmup_steps=sc["lr_warmup_iters"] * gbs, lr_decay_steps=sc["lr_decay_iters"] * gbs,
    lr_decay_style=sc["lr_decay_style"], start_wd=sc["start_weight_decay"],
    end_wd=sc["end_weight_decay"], wd_incr_steps=sc["lr_decay_iters"] * gbs,
    wd_incr_style=sc["weight_decay_incr_style"],
)
lrs = []
for _ in range(data["steps"]):
    lrs.append(optimizer.param_groups[0]["lr"])  # the rate of the next update
    scheduler.step(increment=gbs)
print(json.dumps(lrs))
"""


def megatron_lrs(settings: dict, lr: float, min_lr: float, steps: int) -> list[float]:
    """Megatron-core's OptimizerParamScheduler, driven as Megatron-Bridge drives it."""
    payload = {"scheduler": settings["scheduler"], "lr": lr, "min_lr": min_lr, "steps": steps}
    return in_megatron(MEGATRON_LRS, {**payload, "gbs": settings["train"]["global_batch_size"]})


def test_schedules_match_megatron_cores_scheduler():
    from clm.optim import lr_schedule

    # cosine with constant steps: our (NeMo's) formula is Megatron's, exactly
    cfg = recipe.compose(
        [
            "sched=CosineAnnealing",
            "sched.warmup_steps=10",
            "sched.constant_steps=20",
            "max_steps=100",
        ]
    )
    cfg.sched.min_lr = 1e-4
    s = build_settings(cfg, world_size=1, data=fake_data())
    ours = lr_schedule(cfg.sched, float(cfg.lr))
    theirs = megatron_lrs(s, float(cfg.lr), 1e-4, 101)
    assert theirs == pytest.approx([ours(k) for k in range(101)], rel=1e-12, abs=1e-15)
    # WarmupHoldPolicy: the same hold; the warm-up ramps agree to within one step
    cfg = recipe.compose(["+experiment=gbs256_gpu"])
    s = build_settings(cfg, world_size=128, data=fake_data())
    ours = lr_schedule(cfg.sched, 2e-5)
    theirs = megatron_lrs(s, 2e-5, 0.0, 250)
    warmup = s["scheduler"]["lr_warmup_iters"]
    for k in range(250):
        if k >= warmup:
            assert theirs[k] == pytest.approx(ours(k)) == pytest.approx(2e-5)
        else:
            assert abs(theirs[k] - ours(k)) <= 2e-5 / warmup


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["+experiment=gbs256_gpu"], 100, "100 GPUs: must be a multiple of tensor_parallelism"),
        (["+experiment=gbs256_gpu"], 96, "global_train_batch_size=256: must be a multiple of"),
        (["expert_parallelism=3"], 3, "expert_parallelism=3: must divide 8 experts"),
        (["tensor_parallelism=3"], 3, "tensor_parallelism=3: must divide num_attention_heads=4"),
        (["pipeline_parallelism=3"], 3, "pipeline_parallelism=3: must divide 4 layers"),
        (["context_parallelism=3"], 3, "context_parallelism=3: max_length=256"),
        (["do_first_eval=true"], 1, "do_first_eval=true"),
        (["+experiment=dry_run_gpt2"], 1, "model_type='gpt2'"),
        (["nemo.token_dispatcher=ring"], 1, "nemo.token_dispatcher=ring"),
    ],
)
def test_translation_errors_name_the_key(overrides, world, message):
    cfg = recipe.compose(overrides)
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
        build_settings(cfg, world_size=world, data=fake_data())


WANDB_FIELDS = ("wandb_project", "wandb_entity", "wandb_exp_name", "wandb_save_dir")


def test_wandb_keys_map_onto_megatron_bridges_logger(monkeypatch, tmp_path):
    """Megatron-Bridge 0.3.0's LoggerConfig starts W&B when wandb_project is set; the tags, which
    it has no field for, travel as WANDB_TAGS."""
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    off = build_settings(recipe.compose([]), world_size=1, data=fake_data())
    assert {k: off["logger"][k] for k in WANDB_FIELDS} == dict.fromkeys(WANDB_FIELDS)
    assert off["derived"]["wandb_env"] == {}
    overrides = ["wandb.enabled=true", "wandb.tags=[ci,gpu]", "wandb.entity=team"]
    overrides += ["exp_name=moe1", f"output_dir={tmp_path}"]
    on = build_settings(recipe.compose(overrides), world_size=8, data=fake_data())
    run_dir = str(tmp_path / "moe1")
    assert {k: on["logger"][k] for k in WANDB_FIELDS} == {
        "wandb_project": "mlperf-moe",
        "wandb_entity": "team",
        "wandb_exp_name": "moe1",
        "wandb_save_dir": run_dir,
    }
    assert on["derived"]["wandb_env"] == {
        "WANDB_CACHE_DIR": f"{run_dir}/wandb/cache",
        "WANDB_TAGS": "ci,gpu",
    }
    json.loads(recipe.to_json(on))
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_NAME", "named-by-env")
    env = build_settings(recipe.compose(overrides), world_size=8, data=fake_data())
    assert env["logger"]["wandb_project"] == "from-env"
    assert env["logger"]["wandb_exp_name"] == "named-by-env"
    with pytest.raises(config_lib.ConfigError, match="wandb.project=null: the NeMo path needs"):
        build_settings(
            recipe.compose([*overrides, "wandb.project=null"]), world_size=8, data=fake_data()
        )


def test_data_stats_checks_the_prepared_data(prepared):
    cfg = recipe.compose([f"nemo.data_dir={prepared}"])
    stats = recipe.data_stats(cfg)
    assert stats["train_tokens"] == sum(SAMPLE_TOKENS.values())
    assert len(stats["train_prefixes"]) == 4
    s = build_settings(cfg, world_size=1, data=stats)
    assert s["derived"]["eval_samples"] == (stats["eval_tokens"] - 1) // 256
    assert s["dataset"]["blend_per_split"][1] == [[stats["eval_prefix"]], None]
    for override, message in [
        ("n_eval_examples=50", "holds the first 100 documents, n_eval_examples=50"),
        ("dataset.train_shards=[768,773]", "c4-train.00772-of-01024_text_document.idx: missing"),
        ("dataset.tokenizer_sha256=abc", "not dataset.tokenizer_sha256=abc"),
        ("nemo.data_dir=null", "nemo.data_dir=null"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
            recipe.data_stats(recipe.compose([f"nemo.data_dir={prepared}", override]))


def test_distributed_env_from_slurm():
    slurm = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    assert launch.distributed_env(slurm) == {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "MASTER_PORT": "29500",
    }
    # torchrun already set them: nothing changes
    assert launch.distributed_env({"RANK": "0", "SLURM_PROCID": "3", "MASTER_PORT": "1"}) == {}


# ---- MLPerf events ------------------------------------------------------------------------------
def run_events(tmp_path, losses: dict[int, float], max_steps: int = 250):
    """A simulated gbs256_gpu run: eval every 6 steps with the given losses, others 2.5."""
    cfg = recipe.compose(["+experiment=gbs256_gpu", f"output_dir={tmp_path}", "mlperf.org=Test"])
    settings = build_settings(cfg, world_size=128, data=fake_data())
    events = launch.mlperf_events(cfg, load_spec(cfg.model, cfg.max_length), settings, rank=0)
    events.train_start(0)
    for step in range(1, max_steps + 1):
        if events.train_step_end(step, 3.0):
            break
        if step % settings["train"]["eval_interval"] == 0:
            events.eval_start(step)
            if events.eval_end(step, losses.get(step, 2.5)):
                break
    events.train_end()
    events.logger.close()
    return events, mlperf.compliance_path(cfg.run_dir)


def test_target_reached_log_passes_the_closed_rules(tmp_path):
    events, log = run_events(tmp_path, {6: 2.1, 12: 1.79})
    assert events.status == "success" and events.step == 12
    keys = [
        json.loads(line.split(":::MLLOG ", 1)[1])["key"] for line in log.read_text().splitlines()
    ]
    assert keys[:2] == ["cache_clear", "init_start"] and keys.count("run_stop") == 1
    lifecycle = [k for k in keys if k in ("block_start", "block_stop", "eval_start", "eval_stop")]
    assert lifecycle == ["block_start", "block_stop", "eval_start", "eval_stop"] * 2
    ok, output = mlperf.check_log(log, "closed")
    assert ok, output
    record = {
        json.loads(x.split(":::MLLOG ", 1)[1])["key"]: json.loads(x.split(":::MLLOG ", 1)[1])
        for x in log.read_text().splitlines()
    }
    assert record["global_batch_size"]["value"] == 256
    assert record["gradient_accumulation_steps"]["value"] == 32
    stop = record["run_stop"]["metadata"]
    assert (stop["samples_count"], stop["status"]) == (12 * 256, "success")


def test_max_steps_without_target_is_aborted_once(tmp_path):
    events, log = run_events(tmp_path, {}, max_steps=250)
    assert events.status == "aborted" and events.step == 250
    stops = [x for x in log.read_text().splitlines() if '"run_stop"' in x]
    assert len(stops) == 1 and '"aborted"' in stops[0]
    ok, output = mlperf.check_log(log, "closed")
    assert not ok, output  # an aborted run is not a result


# ---- the launcher, as a user runs it ----------------------------------------------------------
def run_launch(tmp_path, *args):
    return run_python(tmp_path, "-m", "clm.nemo.launch", *args)


def test_launch_without_nemo_exits_2_with_one_line(tmp_path):
    try:
        import megatron.bridge  # noqa: F401

        pytest.skip("Megatron-Bridge is installed here")
    except ImportError:
        pass
    proc = run_launch(tmp_path, "+experiment=gbs256_gpu")
    assert proc.returncode == 2
    assert proc.stderr.strip() == launch.NEMO_MISSING
    assert "NeMo container" in proc.stderr and proc.stdout == ""


def test_launch_dry_run_prints_the_settings(tmp_path, prepared):
    proc = run_launch(
        tmp_path, "--dry-run", "--world-size", "2", f"nemo.data_dir={prepared}", "max_steps=50"
    )
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)
    assert settings["train"]["train_iters"] == 50
    assert settings["derived"]["world_size"] == 2
    assert settings["derived"]["megatron_bridge"] == recipe.MEGATRON_BRIDGE_VERSION
    bad = run_launch(
        tmp_path, "--dry-run", "--world-size=3", f"nemo.data_dir={prepared}", "tensor_parallelism=2"
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: 3 GPUs")


def test_every_preset_composes_for_the_nemo_path():
    """Each experiment preset, as the launcher composes it (with the nemo group): validated and
    resolved, every key of the nemo group's file in the run's `nemo` node. The group has one
    file; a second one fails here until this test composes it too."""
    assert [p.name for p in (CLM / "config" / "nemo").glob("*.yaml")] == ["default.yaml"]
    keys = set(OmegaConf.load(CLM / "config" / "nemo" / "default.yaml").keys())
    presets = sorted((CLM / "config" / "experiment").glob("*.yaml"))
    assert len(presets) >= 4
    for preset in presets:
        cfg = recipe.compose([f"+experiment={preset.stem}"])
        config_lib.validate(cfg)
        OmegaConf.to_container(cfg, resolve=True)
        assert keys <= set(cfg.nemo.keys()), preset.name
