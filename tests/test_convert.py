"""HF safetensors import, conversion to and from checkpoints, and clear errors for bad files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import fsspec
import pytest
import torch
from conftest import ROOT, clean_env, model_spec, run_clm, tiny_mixtral_config
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from clm import checkpoint
from clm import model as model_lib
from clm.metrics import read_metrics

CONVERT = ROOT / "scripts" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_mixtral_config()).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_model_matches_hf(hf_dir, dtype):
    """Our tensor-by-tensor load (Mixtral's w1/w2/w3 per expert fused on the fly) gives exactly
    the weights and logits of transformers' own from_pretrained, also when casting."""
    cfg = model_spec(name_or_path=str(hf_dir), dtype=dtype)
    ours = model_lib.build_model(cfg, torch.device("cpu"), 0).eval()
    # the config built from the spec equals HF's reading of config.json, but for the dtype
    # model.dtype casts to: no attributes of this package's own (the experts' settings travel
    # with the experts function, clm.moe)
    translated = ours.config.to_dict()
    assert translated == {**AutoConfig.from_pretrained(hf_dir).to_dict(), "dtype": dtype}
    # the same experts code on both sides (ours and HF's grouped_mm differ in the last bit on
    # some CPUs), so that equal logits mean equal weights
    theirs = AutoModelForCausalLM.from_pretrained(
        hf_dir, config=ours.config, dtype=model_lib.DTYPES[dtype]
    ).eval()
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in mine)
    ids = torch.randint(0, 32000, (2, 24))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_loaded_a_piece_at_a_time_into_place(hf_dir):
    """With a backend's `place` (the XLA path) each tensor is read, then handed over once,
    before the next decoder layer is read; the placed weights are HF's."""
    placed = {}

    def place(name, tensor):
        assert name not in placed, f"{name} placed twice"
        placed[name] = tensor.clone()
        return placed[name]

    ours = model_lib.build_model(
        model_spec(name_or_path=str(hf_dir)), torch.device("cpu"), 0, place
    )
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    mine = ours.state_dict()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    assert all(mine[k].data_ptr() == placed[k].data_ptr() for k in reference)
    order = [int(k.split(".")[2]) for k in placed if k.startswith("model.layers.")]
    assert order == sorted(order)  # layer by layer


def middle(shape) -> tuple[slice, ...]:
    """A box inside a tensor, partial in every dim: [n//3, n - n//4)."""
    return tuple(slice(n // 3, n - n // 4) for n in shape)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_only_the_kept_part_of_each_tensor_is_read(hf_dir, tmp_path, layout):
    """With a place's `region` (a sharded backend's), each tensor's box is read and nothing
    else: exactly its bytes, counted, and in the fused layout the bytes outside the boxes are
    NaNs in the file; the kept parts are HF's weights."""
    from safetensors.torch import save_file

    reference = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    directory = hf_dir  # Mixtral's per-expert w1/w2/w3: boxes cut across several keys
    if layout == "fused":  # the model's own names: the boxes can be poisoned around in the file
        directory = tmp_path / "fused"
        directory.mkdir()
        (directory / "config.json").write_text((hf_dir / "config.json").read_text())
        poisoned = {}
        for name, value in reference.items():
            poisoned[name] = torch.full_like(value, float("nan"))
            poisoned[name][middle(value.shape)] = value[middle(value.shape)]
        save_file(poisoned, directory / "model.safetensors", metadata={"format": "pt"})
    config = model_lib.build_hf_config(model_spec(name_or_path=str(directory)))
    model = model_lib._meta_model(config, torch.float32)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    kept = {}

    def place(name, tensor):
        kept[name] = tensor[middle(tensor.shape)].clone()
        return tensor

    def region(name, shape):
        assert shape == shapes[name]
        return middle(shape)

    with model_lib.SafetensorsReader([directory / "model.safetensors"], region) as reader:
        reader.plan(model)
        model_lib.materialize(model, reader.fill, place)
    assert kept.keys() >= reference.keys()
    assert [n for n in reference if not torch.equal(kept[n], reference[n][middle(shapes[n])])] == []
    kept_bytes = sum(kept[n].numel() * kept[n].element_size() for n in reference)
    assert reader.bytes_read == kept_bytes > 0  # (the rotary buffers are computed, not read)
    assert reader.bytes_read < sum(t.numel() * t.element_size() for t in reference.values()) / 4


def test_a_sharded_checkpoint_with_a_missing_shard_or_tensor_is_named(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="2MB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    ours = model_lib.build_model(model_spec(name_or_path=str(sharded)), torch.device("cpu"), 0)
    assert torch.equal(
        ours.state_dict()["model.layers.1.mlp.experts.gate_up_proj"],
        AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()[
            "model.layers.1.mlp.experts.gate_up_proj"
        ],
    )
    shards[-1].unlink()
    with pytest.raises(ValueError, match=f"{shards[-1]}: missing shard \\(named in model.safe"):
        model_lib.build_model(model_spec(name_or_path=str(sharded)), torch.device("cpu"), 0)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=f"{sharded}: no weights for .* of the model's tensors"):
        model_lib.build_model(model_spec(name_or_path=str(sharded)), torch.device("cpu"), 0)
    other = tiny_mixtral_config()
    other.intermediate_size = 64
    with pytest.raises(ValueError, match=r"experts.0.w1.weight has shape \[48, 32\], the model "):
        model_lib.load_pretrained(str(hf_dir), other, torch.float32)


def test_truncated_shard_is_named(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{broken}/model.safetensors: truncated or corrupt"):
        model_lib.build_model(model_spec(name_or_path=str(broken)), torch.device("cpu"), 0)
    (broken / "model.safetensors").unlink()
    torch.save({}, broken / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors files \\(pickle"):
        model_lib.build_model(model_spec(name_or_path=str(broken)), torch.device("cpu"), 0)


def convert(tmp_path, *args):
    return subprocess.run(
        [sys.executable, str(CONVERT), *args],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hf_to_checkpoint_to_training_and_back(hf_dir, tmp_path):
    dcp_dir = tmp_path / "dcp"
    proc = convert(tmp_path, "hf-to-dcp", str(hf_dir), str(dcp_dir), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr

    # training starts from the converted weights: the step-0 eval equals the HF model's
    model_json = tmp_path / "tiny.json"
    model_json.write_text(json.dumps(tiny_mixtral_config().to_dict()))
    proc = run_clm(
        tmp_path,
        f"model.config_path={model_json}",
        f"checkpoint_manager_path={dcp_dir}",
        "max_length=64",
        "n_eval_examples=5",
        "max_steps=1",
        "do_first_eval=true",
        "eval_frequency=1",
        "target_eval_loss=0",
        "save_frequency=1",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"restored {dcp_dir} (step 0)" in proc.stdout
    run_dir = tmp_path / "runs" / "embedded_default"
    first_eval = read_metrics(run_dir)[0]
    assert first_eval["step"] == 0

    from clm.tokenizer import load_tokenizer
    from clm.trainer import build_eval_set

    cfg = OmegaConf.load(run_dir / "config.yaml")
    eval_set = build_eval_set(cfg, load_tokenizer(None, cfg.dataset.tokenizer_sha256))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_set.batches(8):
            nll, n = model_lib.nll_sum(hf(input_ids=batch["input_ids"]).logits, batch["labels"])
            total, count = total + nll.item(), count + int(n)
    assert first_eval["eval/loss"] == pytest.approx(total / count, rel=1e-5)

    # and the trained checkpoint converts back to an HF directory that transformers loads
    out = tmp_path / "hf_out"
    proc = convert(
        tmp_path,
        "dcp-to-hf",
        str(run_dir / "checkpoints"),
        str(out),
        "--config",
        str(hf_dir),
        "--dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    trained = checkpoint.latest(run_dir / "checkpoints")
    reference = model_lib.build_model(
        model_spec(config_path=str(model_json)), torch.device("cpu"), 0
    )
    checkpoint.restore(trained, reference, None)
    for (name, a), b in zip(
        back.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(
        back.state_dict()["lm_head.weight"], hf.state_dict()["lm_head.weight"]
    )  # one training step changed the weights


@pytest.mark.parametrize("protocol", ["memory", "gs"])
def test_convert_to_and_from_a_url(request, hf_dir, tmp_path, capsys, protocol):
    """hf-to-dcp writes to an fsspec URL (memory://, and gs:// through the real gcsfs client on
    a GCS API emulator) and dcp-to-hf reads from one: the round trip gives back the HF weights
    exactly."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", CONVERT)
    convert_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_module)
    root = request.getfixturevalue("gcs_bucket") if protocol == "gs" else "memory:/"
    url = f"{root}/{tmp_path.name}/ckpt/tiny"
    assert convert_module.main(["hf-to-dcp", str(hf_dir), url, "--dtype", "float32"]) == 0
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.exists(f"{path}/COMMITTED")
    assert convert_module.main(["hf-to-dcp", str(hf_dir), url, "--dtype", "float32"]) == 2
    assert f"error: {url}: already exists" in capsys.readouterr().err

    out = tmp_path / "hf_out"
    args = ["--config", str(hf_dir), "--dtype", "float32"]
    assert convert_module.main(["dcp-to-hf", url, str(out), *args]) == 0
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)
    assert convert_module.main(["dcp-to-hf", url, "gs://bucket/out", *args]) == 2
    assert "writes a local directory" in capsys.readouterr().err
