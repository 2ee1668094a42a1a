"""clm.spec: the model JSON read once into a frozen spec, its sizes as transformers reads them,
the auto rule, one validation with one-line errors, and the readers that take the spec."""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest
from conftest import CLM, model_cfg, model_spec
from hydra import compose, initialize_config_dir

from clm import config as config_lib
from clm import spec as spec_lib
from clm.spec import DEFAULTS, MoESpec, load_spec, resolve_implementation, spec_from_values

SHIPPED = ("mixtral_small.json", "mixtral822.json", "mixtral87.json", "mixtral80.json")


def compose_cfg(*overrides: str):
    config_lib.register_resolvers()
    with initialize_config_dir(str(CLM / "config"), version_base=None):
        return compose("config", overrides=list(overrides))


def hf_sizes(config) -> dict:
    """The spec's sizes as transformers' own config of the same JSON has them."""
    heads = config.num_attention_heads
    experts = getattr(config, "num_local_experts", None) or 0
    return {
        "vocab": config.vocab_size,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "tied": config.tie_word_embeddings,
        "max_positions": config.max_position_embeddings,
        "experts": experts if experts > 1 else None,
        "top_k": config.num_experts_per_tok if experts > 1 else None,
        "aux": config.router_aux_loss_coef if experts > 1 else 0.0,
    }


def spec_sizes(spec) -> dict:
    fields = ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "tied")
    return {
        **{name: getattr(spec, name) for name in fields},
        "max_positions": spec.max_positions,
        "experts": spec.moe.num_experts if spec.moe else None,
        "top_k": spec.moe.top_k if spec.moe else None,
        "aux": spec.aux_loss_coef,
    }


@pytest.mark.parametrize("name", [*SHIPPED, "gpt2_tiny.json"])
def test_shipped_jsons_read_as_transformers_reads_them(name):
    from transformers import AutoConfig

    spec = model_spec(config_path=name)
    assert spec.name == name and spec.pretrained is None
    assert spec_sizes(spec) == hf_sizes(AutoConfig.for_model(**spec.hf_values()))
    assert dict(spec.values) == json.loads((CLM / name).read_text())


@pytest.mark.parametrize("model_type", sorted(DEFAULTS))
def test_defaults_are_transformers_defaults(model_type):
    """A JSON that leaves every size out gets HF's defaults for its model_type."""
    from transformers import AutoConfig

    spec = spec_from_values({"model_type": model_type}, model_cfg())
    assert spec_sizes(spec) == hf_sizes(AutoConfig.for_model(model_type))


def test_an_unknown_model_type_must_spell_out_its_sizes():
    with pytest.raises(config_lib.ConfigError, match=r"^x.json: no hidden_size \(model_type"):
        spec_from_values({"model_type": "llama"}, model_cfg(), name="x.json")


def test_the_auto_rule():
    """model.moe_implementation null or auto: dropping when capacity_factor > 0, else dropless;
    resolved once, in the spec, for every reader (the experts, the planner, MLPerf, NeMo)."""
    assert resolve_implementation(None, 1.25) == "dropping"
    assert resolve_implementation("auto", 0) == "dropless"
    assert resolve_implementation("dense", 1.25) == "dense"
    for name, factor, implementation in [
        (None, 1.25, "dropping"),
        ("auto", 0, "dropless"),
        (None, 0, "dropless"),
        ("dense", 0, "dense"),
        ("hf", 1.25, "hf"),
        ("dropless", 1.25, "dropless"),
    ]:
        cfg = model_cfg(
            config_path="mixtral_small.json", moe_implementation=name, capacity_factor=factor
        )
        moe = load_spec(cfg, 128).moe
        assert (moe.implementation, moe.capacity_factor, moe.group_tokens) == (
            implementation,
            factor,
            128,
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.capacity_factor=-1"], "model.capacity_factor=-1: must be >= 0 (0: dropless)"),
        (["model.capacity_factor=nan"], "model.capacity_factor=nan: must be >= 0"),
        (
            ["model.moe_implementation=gmm"],
            "model.moe_implementation='gmm': must be null or one of auto, hf, dense, dropping, "
            "dropless",
        ),
        (
            ["model.moe_implementation=dropping"],
            "model.moe_implementation='dropping' needs model.capacity_factor > 0 (0 means "
            "dropless), e.g. 1.25",
        ),
        (["model.config_path=nope.json"], "model.config_path=nope.json: no such file"),
        (
            ["max_length=8192"],
            "max_length=8192: above the model's max_position_embeddings=4096 "
            "(mixtral_small.json)",
        ),
        (
            ["model.config_path=null"],
            "model.config_path and model.name_or_path are both null: set one",
        ),
        (
            ["model.config_path=null", "model.name_or_path=/no/such/model"],
            "model.name_or_path=/no/such/model: not a local model directory and not in the "
            "local HF cache",
        ),
        # the MoE keys are checked for a dense model too
        (["+experiment=dry_run_gpt2", "model.capacity_factor=-2"], "model.capacity_factor=-2"),
    ],
)
def test_validation_names_the_key_in_one_line(overrides, message):
    cfg = compose_cfg(*overrides)
    config_lib.validate(cfg)  # the config's own checks pass: the model's are the spec's
    with pytest.raises(config_lib.ConfigError) as error:
        load_spec(cfg.model, cfg.max_length)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_broken_json_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "mixtral",}')
    with pytest.raises(config_lib.ConfigError, match=rf"^{bad}: not valid JSON \(.* at line 1\)"):
        load_spec(model_cfg(config_path=str(bad)))
    bad.write_text('{"hidden_size": 8}')
    with pytest.raises(config_lib.ConfigError, match=rf"^{bad}: no 'model_type' key"):
        load_spec(model_cfg(config_path=str(bad)))


def test_moe_spec_checks_every_instance():
    with pytest.raises(config_lib.ConfigError, match="'dropping' needs model.capacity_factor > 0"):
        MoESpec(8, 2, "dropping", 0.0)
    with pytest.raises(config_lib.ConfigError, match="must be null or one of"):
        MoESpec(8, 2, "auto")  # the auto rule is resolved before: a spec never holds it
    with pytest.raises(config_lib.ConfigError, match="capacity group of 0 tokens"):
        MoESpec(8, 2, "dropping", 1.25, group_tokens=0)
    with pytest.raises(config_lib.ConfigError, match=r"num_experts_per_tok=9: must be in \[1, "):
        MoESpec(8, 9)
    assert MoESpec(8, 2, "dropping", 1.25).capacity(4096) == 1280


def test_the_aux_loss_coefficient():
    """The model.* override, else the JSON's, else HF Mixtral's default; 0 for a dense model."""
    assert model_spec(config_path="mixtral_small.json").aux_loss_coef == 0.02
    override = model_spec(config_path="mixtral_small.json", router_aux_loss_coef=0.5)
    assert override.aux_loss_coef == 0.5 == override.moe.aux_loss_coef
    assert spec_from_values({"model_type": "mixtral"}, model_cfg()).aux_loss_coef == 0.001
    gpt2 = model_spec(config_path="gpt2_tiny.json", router_aux_loss_coef=0.5)
    assert gpt2.moe is None and gpt2.aux_loss_coef == 0.0


def test_a_pretrained_directory_is_read_from_its_config_json(tmp_path):
    values = json.loads((CLM / "mixtral_small.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, "num_hidden_layers": 3}))
    spec = model_spec(name_or_path=str(tmp_path), dtype="bfloat16", capacity_factor=1.25)
    assert spec.pretrained == str(tmp_path) and spec.layers == 3 and spec.dtype == "bfloat16"
    assert spec.moe.implementation == "dropping"
    # config_path wins: its architecture, random init, name_or_path only names the tokenizer
    both = model_spec(config_path="mixtral_small.json", name_or_path=str(tmp_path))
    assert both.pretrained is None and both.layers == 4


def test_the_spec_is_frozen():
    spec = model_spec(config_path="mixtral_small.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hidden = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.moe.capacity_factor = 2.0
    with pytest.raises(TypeError):
        spec.values["hidden_size"] = 1
    copy = spec.hf_values()  # what clm.model builds the HF config from: the reader's own
    copy["hidden_size"] = 1
    assert spec.values["hidden_size"] == 128


def test_trainer_metrics_and_mlperf_read_the_spec():
    """The trainer's MoE switch and aux coefficient, the FLOPs behind MFU and the MLPerf
    hyperparameters all come from the spec (an override visible only there)."""
    import torch

    from clm import mlperf, optim
    from clm.backends.torch_backend import TorchBackend
    from clm.metrics import MetricsWriter, training_flops_per_token
    from clm.model import build_model, count_parameters
    from clm.model_math import flops_per_token
    from clm.trainer import Trainer

    cfg = compose_cfg("max_length=32")
    spec = model_spec(32, config_path="mixtral_small.json", router_aux_loss_coef=0.25)
    spec = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, capacity_factor=1.5))
    config_lib.finalize(cfg, 1)
    cpu = torch.device("cpu")
    model = build_model(spec, cpu, 0)
    opt = optim.build_optimizer(model, cfg, cpu)
    sched = optim.build_scheduler(opt, cfg.sched, float(cfg.lr))
    logger = mlperf.MLPerfLogger(cfg, None, enabled=False)
    metrics = MetricsWriter(None, enabled=False)
    backend = TorchBackend(cpu)
    trainer = Trainer(
        cfg=cfg,
        backend=backend,
        model=model,
        optimizer=opt,
        scheduler=sched,
        metrics=metrics,
        mlperf=logger,
        spec=spec,
    )
    _, active = count_parameters(model)
    assert trainer.is_moe and trainer.aux_coef == 0.25
    expected = flops_per_token(active, 32000 * 128, False, 4, 128, 32)
    assert trainer.flops_per_token == training_flops_per_token(spec, active, 32) == expected
    hparams = mlperf.hyperparameters(cfg, spec, eval_samples=1, train_samples=None, warmup_steps=0)
    assert hparams["moe_aux_loss_coeff"] == 0.25 and hparams["capacity_factor"] == 1.5


def test_only_the_spec_reads_the_model_json():
    """No module of clm/ but clm/spec.py finds or parses the architecture JSON (config.py
    defines the file lookup; clm.model builds HF's config from the spec's values)."""
    readers = {}
    for path in sorted(CLM.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("resolve_config_file", "from_pretrained", "model_json_path"):
                    readers.setdefault(str(path.relative_to(CLM)), set()).add(name)
    assert readers == {
        "spec.py": {"resolve_config_file", "model_json_path"},
        # the weights (a model id only in the HF cache), with the config the spec made
        "model.py": {"from_pretrained"},
    }, readers
    assert spec_lib.load_spec.__module__ == "clm.spec"
