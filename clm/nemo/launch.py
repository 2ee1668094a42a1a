"""`python -m clm.nemo.launch [--dry-run] [--world-size N] <hydra overrides>`: train on GPUs with
Megatron-Bridge, configured from the same Hydra config as `clm/run_clm.py`.

One process per GPU, started by torchrun (`helm-context/`) or srun (`scripts/gpu/run.sub`), inside
the NeMo Framework container built from `nemo_example.Dockerfile` (Megatron-Bridge 0.3.0, see
`clm.nemo.recipe` for why that pin). Each process composes the config, reads the token counts of
the prepared data (`clm.nemo.prepare_data`), translates everything with
`recipe.build_settings` into plain data, instantiates Megatron-Bridge's `ConfigContainer` from it
and runs `pretrain` with the MLPerf callback (`clm.nemo.callback`). Rank 0 writes
`<run_dir>/config.yaml`, `<run_dir>/nemo_settings.json` and the MLPerf log
(`mlperf_compliance.log` or `$COMPLIANCE_FILE`), the same files as `run_clm.py`.

`--dry-run` stops after the translation and prints the settings as JSON: it needs no GPU and no
NeMo, so a configuration can be checked anywhere (`--world-size` sets the GPU count it assumes;
default `$WORLD_SIZE`, else 1).

Exit codes: 0 when training ends (target or max_steps); 2 with one line on stderr for a
configuration or data error, or when Megatron-Bridge is not installed; 1 when training fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from clm import config as config_lib
from clm.nemo import recipe
from clm.spec import load_spec

NEMO_MISSING = (
    "error: clm.nemo.launch needs Megatron-Bridge (megatron.bridge), which is not installed here; "
    "run it inside the NeMo container built from nemo_example.Dockerfile (or add --dry-run to "
    "print the settings)"
)
USAGE = "usage: python -m clm.nemo.launch [--dry-run] [--world-size N] [hydra overrides ...]"


def distributed_env(environ: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables, filled from Slurm's when srun (not torchrun) started us.

    MASTER_ADDR must come from the job script (the first node); MASTER_PORT defaults to 29500.
    """
    env: dict[str, str] = {}
    if "RANK" not in environ and "SLURM_PROCID" in environ:
        env["RANK"] = environ["SLURM_PROCID"]
        env["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = environ.get("SLURM_NTASKS", "1")
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = "29500"
    return env


def parse_args(argv: list[str]) -> tuple[bool, int | None, list[str]]:
    """(dry_run, world_size, hydra overrides); Hydra overrides never start with `--`."""
    dry_run, world_size, overrides = False, None, []
    args = iter(argv)
    for arg in args:
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--world-size" or arg.startswith("--world-size="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            if not value.isdigit() or int(value) < 1:
                raise config_lib.ConfigError(f"--world-size {value!r}: must be a positive integer")
            world_size = int(value)
        elif arg in ("-h", "--help"):
            raise SystemExit(f"{USAGE}\n\n{__doc__}")
        elif arg.startswith("--"):
            raise config_lib.ConfigError(f"{arg}: unknown option ({USAGE})")
        else:
            overrides.append(arg)
    return dry_run, world_size, overrides


def settings_for(overrides: list[str], world_size: int):
    """(cfg, spec, settings): compose, validate, read the model spec and the data's token
    counts, translate."""
    cfg = recipe.compose(overrides)
    config_lib.validate(cfg)
    spec = load_spec(cfg.model, cfg.max_length)
    data = recipe.data_stats(cfg)
    return cfg, spec, recipe.build_settings(cfg, spec, world_size=world_size, data=data)


def build_container(settings: dict):
    """Megatron-Bridge's ConfigContainer from the plain settings (NeMo container only)."""
    import torch
    import torch.nn.functional as F
    from megatron.bridge.models import MistralModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        GPTDatasetConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
    )

    model = dict(settings["model"])
    model["activation_func"] = {"silu": F.silu}[model["activation_func"]]
    for key in ("params_dtype", "pipeline_dtype"):
        if model.get(key) is not None:
            model[key] = getattr(torch, model[key])
    dataset = dict(settings["dataset"])
    dataset["blend_per_split"] = [
        None if blend is None else (list(blend[0]), blend[1])
        for blend in dataset["blend_per_split"]
    ]
    return ConfigContainer(
        model=MistralModelProvider(**model),
        train=TrainingConfig(**settings["train"]),
        optimizer=OptimizerConfig(**settings["optimizer"]),
        scheduler=SchedulerConfig(**settings["scheduler"]),
        ddp=DistributedDataParallelConfig(**settings["ddp"]),
        dataset=GPTDatasetConfig(**dataset),
        tokenizer=TokenizerConfig(**settings["tokenizer"]),
        checkpoint=CheckpointConfig(**settings["checkpoint"]),
        logger=LoggerConfig(**settings["logger"]),
        rng=RNGConfig(**settings["rng"]),
        mixed_precision=settings["mixed_precision"],
    )


def mlperf_events(cfg, spec, settings: dict, rank: int):
    """The MLPerf logger (enabled on rank 0), with init_start and the hyperparameters logged
    (the model's from `spec`)."""
    from omegaconf import open_dict

    from clm import mlperf
    from clm.nemo.callback import MLPerfEvents

    derived = settings["derived"]
    # the MLPerf keys describe what Megatron runs: its global batch and derived accumulation
    with open_dict(cfg):
        cfg.global_train_batch_size = derived["global_batch_size"]
        cfg.gradient_accumulation_steps = derived["gradient_accumulation_steps"]
    logger = mlperf.MLPerfLogger(cfg, mlperf.compliance_path(cfg.run_dir), enabled=rank == 0)
    logger.init_start()
    logger.log_hparams(
        cfg,
        spec,
        eval_samples=derived["eval_samples"],
        train_samples=derived["train_samples"],
        warmup_steps=derived["warmup_steps"],
    )
    return MLPerfEvents(
        logger,
        global_batch_size=derived["global_batch_size"],
        max_steps=derived["max_steps"],
        eval_interval=settings["train"]["eval_interval"],
        target_eval_loss=derived["target_eval_loss"],
        log_interval=settings["logger"]["log_interval"],
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        dry_run, world_size, overrides = parse_args(argv)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if not dry_run:
        try:
            import megatron.bridge  # noqa: F401
        except ImportError:
            print(NEMO_MISSING, file=sys.stderr, flush=True)
            return 2
        os.environ.update(distributed_env(dict(os.environ)))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, spec, settings = settings_for(overrides, world_size)
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if dry_run:
        print(recipe.to_json(settings))
        return 0
    return train(cfg, spec, settings)


def train(cfg, spec, settings: dict) -> int:
    """Run pretrain() with the MLPerf callback; rank 0 writes the run directory's files."""
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from clm.nemo.callback import bridge_callback

    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(str(cfg.run_dir))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(recipe.resolved_yaml(cfg))
        (run_dir / "nemo_settings.json").write_text(recipe.to_json(settings) + "\n")
    for name, value in settings["derived"]["wandb_env"].items():
        os.environ.setdefault(name, value)  # the job's own environment wins
    events = mlperf_events(cfg, spec, settings, rank)
    try:
        pretrain(build_container(settings), forward_step, callbacks=[bridge_callback(events)])
    finally:
        # normally the callback has logged run_stop; after a failure the run is aborted
        events.train_end()
        events.logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
