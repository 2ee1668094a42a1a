"""Every shipped config and every command line of the reference README composes and validates."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import CLM, RUN_CLM, clean_env, run_python
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clm import config as config_lib
from clm.spec import load_spec

SEED_TPU_COMMAND = (
    "model.config_path=mixtral822.json per_device_train_batch_size=1 optimizer=ADAMW_TORCH_XLA "
    "checkpoint_manager_path=gs://lizhiyu-multipods-eu-west/moe/checkpoints-20240803/mixtral822/ "
    "model.name_or_path=mistralai/Mixtral-8x22B-v0.1 dataset.dataset_name=c4_mlperf max_steps=250 "
    "max_grad_norm=1.0 seed=4321 model.dtype=bfloat16 output_dir=/app/output max_length=32768 "
    "dataset.streaming=True tensor_parallelism=1 exp_name=convergence_exp "
    "model.capacity_factor=1.25 lr={lr} sched=WarmupHoldPolicy"
)
SEED_COMMANDS = {
    "xpk": SEED_TPU_COMMAND.format(lr="4e-5"),
    "gce": SEED_TPU_COMMAND.format(lr="2e-5"),
    "benchmark_preset": "+experiment=gbs256_tpu",
    "dry_run_mixtral80": (
        "model.config_path=mixtral80.json eval_frequency=3 n_eval_examples=100 "
        "per_device_train_batch_size=4 max_steps=30"
    ),
    "dry_run_gpt2": (
        "model.name_or_path=gpt2 eval_frequency=3 n_eval_examples=100 "
        "per_device_train_batch_size=4 gradient_accumulation_steps=2 sched.warmup_ratio=0. "
        "max_steps=30"
    ),
    "embedded_default": "",
}


def compose_cfg(overrides: list[str]):
    config_lib.register_resolvers()
    with initialize_config_dir(str(CLM / "config"), version_base=None):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("name", sorted(SEED_COMMANDS))
def test_seed_command_composes_with_cfg_job(name, tmp_path):
    """`python run_clm.py <args> --cfg job` from inside clm/, as the README runs it."""
    args = shlex.split(SEED_COMMANDS[name])
    proc = subprocess.run(
        [sys.executable, "run_clm.py", *args, "--cfg", "job"],
        cwd=CLM,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    for arg in args:
        key, value = arg.lstrip("+").split("=", 1)
        if key in ("experiment", "sched"):
            continue
        node = job
        for part in key.split("."):
            node = node[part]
        assert _norm(node) == _norm(value), key


def _norm(value):
    """Compare override strings with composed values: numbers as floats, the rest as text."""
    text = str(value).lower()
    if text in ("true", "false"):
        return text
    try:
        return float(text)
    except ValueError:
        return text


def print_job(tmp_path, *args: str):
    """`python clm/run_clm.py args --cfg job` from the repository root."""
    return run_python(tmp_path, str(RUN_CLM), *args, "--cfg", "job")


def test_root_invocation_composes(tmp_path):
    proc = print_job(tmp_path, "+experiment=dry_run_gpt2")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["config_path"] == "gpt2_tiny.json"


def test_benchmark_preset_values():
    cfg = compose_cfg(["+experiment=gbs256_tpu"])
    assert cfg.model.config_path == "mixtral822.json"
    assert cfg.max_length == 32768 and cfg.lr == 2e-5 and cfg.max_steps == 250
    assert cfg.sched.name == "WarmupHoldPolicy" and cfg.sched.warmup_ratio == 0.25
    assert cfg.weight_decay == 0.1 and cfg.max_grad_norm == 1.0 and cfg.seed == 4321
    assert cfg.model.capacity_factor == 1.25 and cfg.target_eval_loss == 1.8
    assert cfg.dataset.train_shards == [768, 1024]
    config_lib.validate(cfg)
    # 256 chips, one sequence each: GBS 256 and the 24*1024*2048-token cadence is 6 steps
    config_lib.finalize(cfg, data_parallel_size=256)
    assert cfg.global_train_batch_size == 256
    assert cfg.eval_frequency == 6
    assert 6 * 256 * 32768 >= 24 * 1024 * 2048 > 5 * 256 * 32768


def test_benchmark_preset_rejects_wrong_device_count():
    cfg = compose_cfg(["+experiment=gbs256_tpu"])
    with pytest.raises(config_lib.ConfigError, match="global_train_batch_size=256"):
        config_lib.finalize(cfg, data_parallel_size=128)


def preset_leaves(node, prefix=""):
    """(dotted key, value) of every value a preset file sets (its `defaults` list aside)."""
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from preset_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["gbs256_tpu", "dry_run_mixtral80", "dry_run_gpt2", "gbs256_gpu"])
def test_every_preset_composes_to_its_values_and_validates(name):
    """Every value the preset's file sets reaches the composed config (so a preset that stopped
    applying, or a base config that overrides it, fails here); run_clm.py's presets validate,
    and the NeMo one is refused by run_clm.py for what only NeMo runs."""
    cfg = compose_cfg([f"+experiment={name}"])
    preset = OmegaConf.load(CLM / "config" / "experiment" / f"{name}.yaml")
    leaves = dict(preset_leaves(OmegaConf.to_container(preset)))
    assert leaves
    for key, value in leaves.items():
        assert OmegaConf.select(cfg, key) == value, (name, key)
    config_lib.validate(cfg)
    spec = load_spec(cfg.model, cfg.max_length)  # the model keys and JSON, checked
    assert spec.name == cfg.model.config_path
    if name == "gbs256_gpu":  # the parallelism only the NeMo path runs: refused by run_clm.py
        assert leaves["pipeline_parallelism"] == 4
        with pytest.raises(config_lib.ConfigError, match="pipeline_parallelism=4: not impl"):
            config_lib.refuse_unimplemented(cfg, on_xla=False, torchrun=True)
    assert config_lib.resolve_config_file(cfg.model.config_path).is_file()
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("sched", ["WarmupHoldPolicy", "CosineAnnealing"])
@pytest.mark.parametrize("dataset", ["c4_mlperf", "c4_sample"])
def test_groups_compose(sched, dataset):
    """Each group option brings its own keys: the schedule's name and its shape keys (the
    warm-up from warmup_ratio x max_steps), the dataset's location and shard range."""
    cfg = compose_cfg([f"sched={sched}", f"dataset={dataset}", "max_steps=200"])
    config_lib.validate(cfg)
    assert cfg.sched.name == sched and cfg.sched.max_steps == 200
    assert config_lib.warmup_steps(cfg.sched) == 10  # 0.05 x 200
    shape_keys = {"WarmupHoldPolicy": "hold_steps", "CosineAnnealing": "constant_steps"}
    for name, key in shape_keys.items():
        assert (key in cfg.sched) == (name == sched), (sched, key)
    assert cfg.dataset.dataset_name == "c4_mlperf"  # the sample is C4 in the same format
    if dataset == "c4_mlperf":
        assert cfg.dataset.train_dataset_path.startswith("gs://")
        assert list(cfg.dataset.train_shards) == [768, 1024]
    else:
        assert cfg.dataset.train_dataset_path == str(CLM / "sample_data")
        assert list(cfg.dataset.train_shards) == [768, 772]
        assert list((CLM / "sample_data").glob("c4-train.00768-of-01024*"))


def test_global_batch_includes_accumulation_and_cadence_formula():
    cfg = compose_cfg(["per_device_train_batch_size=4", "gradient_accumulation_steps=2"])
    OmegaConf.update(cfg, "eval_frequency", -1)
    config_lib.finalize(cfg, data_parallel_size=3)
    assert cfg.global_train_batch_size == 24
    assert cfg.global_eval_batch_size == 12
    assert cfg.eval_frequency == -(-24576 * 2048 // (256 * 24))


@pytest.mark.parametrize(
    "override, message",
    [
        ("backend=tpu", "backend=tpu: must be one of auto, cpu, cuda"),
        ("optimizer=SGD", "optimizer=SGD: must be one of"),
        ("target_eval_loss=-0.5", "target_eval_loss=-0.5"),
        ("sched.warmup_steps=5000", "warm-up of 5000 steps exceeds max_steps=600"),
        ("dataset.dataset_name=wikitext", "dataset.dataset_name=wikitext"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size=0"),
        ("eval_frequency=0", "eval_frequency=0"),
        ("num_slices=0", "num_slices=0: must be a positive integer"),
        ("num_slices=two", "num_slices=two: must be an integer"),
        ("async_checkpointing=yes", "async_checkpointing=yes: must be auto, true or false"),
        ("run_lease_s=0", "run_lease_s=0: must be >= 1 (seconds a lease lasts"),
        ("run_lease_s=soon", "run_lease_s=soon: must be a number"),
        ("step_timeout_s=-1", "step_timeout_s=-1: must be a finite number of seconds >= 0"),
        ("first_step_timeout_s=0", "first_step_timeout_s=0: must be a finite number of seconds"),
        ("first_step_timeout_s=inf", "first_step_timeout_s=inf: must be a finite number"),
        ("wandb.enabled=yes", "wandb.enabled=yes: must be true or false"),
        ("wandb.tags=ci", "wandb.tags=ci: must be a list"),
        ("wandb.tags=[ci,'']", "wandb.tags: '' is not a tag"),
        ("wandb.project=[a,b]", "wandb.project=.* must be a name"),
    ],
)
def test_validation_names_the_key(override, message):
    cfg = compose_cfg([override])
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
        config_lib.validate(cfg)


def test_unknown_key_is_rejected_on_the_command_line(tmp_path):
    proc = print_job(tmp_path, "no_such_key=1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: no_such_key=1: no such key (clm/config/config.yaml documents every key)"
    ]


@pytest.mark.parametrize(
    "argv, line",
    [
        # a value of the wrong type names its key (not int()'s "invalid literal ...")
        (["max_length=abc"], "max_length=abc: must be an integer"),
        (["max_steps=ten"], "max_steps=ten: must be an integer"),
        (["lr=fast"], "lr=fast: must be a number"),
        (["step_timeout_s=10min"], "step_timeout_s=10min: must be a number"),
        (["shuffle=maybe"], "shuffle=maybe: must be true or false"),
        (["max_steps=true"], "max_steps=true: must be an integer"),
        (["n_eval_examples=all"], "n_eval_examples=all: must be an integer or null"),
        (["sched=CosineAnnealing", "sched.constant_ratio=x"], "sched.constant_ratio=x: must be"),
        (
            ["dataset.train_shards=[768]"],
            "dataset.train_shards=[768]: must be two integers [first, last] (a half-open range)",
        ),
        # Hydra's several-line errors, as one line naming the override
        (
            ["+experiment=gbs256_tpuu"],
            "+experiment=gbs256_tpuu: experiment has no option 'gbs256_tpuu'; the options are "
            "dry_run_gpt2, dry_run_mixtral80, gbs256_gpu, gbs256_tpu; did you mean gbs256_tpu?",
        ),
        (
            ["sched=Cosine"],
            "sched=Cosine: sched has no option 'Cosine'; the options are CosineAnnealing, "
            "WarmupHoldPolicy; did you mean CosineAnnealing?",
        ),
        (
            ["experiment=gbs256_tpu"],
            "experiment=gbs256_tpu: experiment is a preset group, not in the defaults: select "
            "it with +experiment=gbs256_tpu",
        ),
        # a misspelt key: the real one, never Hydra's `+key` (which would add an unread key)
        (["maxlength=128"], "maxlength=128: no such key; did you mean max_length=128?"),
        (["model.dtyp=bfloat16"], "model.dtyp=bfloat16: no such key; did you mean model.dtype"),
        (
            ["+maxlength=128"],
            "+maxlength=128: adds a key that nothing reads; did you mean max_length=128?",
        ),
        (["lr=["], "lr=[: not a valid override (no viable alternative at input '[')"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(argv, line):
    """What `python clm/run_clm.py <bad override>` checks before torch is imported (compose, then
    `run_clm.preflight`): one ConfigError line naming the override. In process; the command's
    exit 2 and its one stderr line are the next test's."""
    from clm.run_clm import preflight

    with pytest.raises(config_lib.ConfigError) as error:
        preflight(config_lib.compose([*argv, "output_dir=/nonexistent/runs"]))
    message = str(error.value)
    assert message.startswith(line) and "\n" not in message, message


def test_a_bad_override_on_the_command_line_is_exit_2_one_line_and_nothing_written(tmp_path):
    for argv, line in (
        (["max_length=abc"], "error: max_length=abc: must be an integer"),
        (["+experiment=gbs256_tpuu"], "error: +experiment=gbs256_tpuu: experiment has no option"),
    ):
        proc = run_python(tmp_path, str(RUN_CLM), *argv, f"output_dir={tmp_path / 'runs'}")
        assert proc.returncode == 2, proc.stderr
        [got] = proc.stderr.splitlines()
        assert got.startswith(line), got
    assert not (tmp_path / "runs").exists()


def test_key_types_cover_every_typed_key():
    """Every number or boolean of every shipped config is in KEY_TYPES, so a new key is checked."""
    typed = set()
    for overrides in (
        [],
        ["+experiment=gbs256_tpu"],
        ["+experiment=gbs256_gpu", "sched=CosineAnnealing"],
        ["+experiment=dry_run_gpt2"],
    ):
        cfg = OmegaConf.to_container(compose_cfg(overrides), resolve=True)
        stack = [("", cfg)]
        while stack:
            prefix, node = stack.pop()
            for key, value in node.items():
                if isinstance(value, dict):
                    stack.append((f"{prefix}{key}.", value))
                elif isinstance(value, (bool, int, float)):
                    typed.add(f"{prefix}{key}")
    assert typed - {"dataset.train_shards"} <= set(config_lib.KEY_TYPES)


def test_num_slices_needs_the_xla_backend():
    """A multi-slice run on backend=cpu|cuda is a config error, before any device is touched."""
    from clm.backends import select_backend

    cfg = compose_cfg(["backend=cpu", "num_slices=2"])
    config_lib.validate(cfg)
    with pytest.raises(
        config_lib.ConfigError, match="num_slices=2: multi-slice runs need backend=xla"
    ):
        select_backend(cfg)
