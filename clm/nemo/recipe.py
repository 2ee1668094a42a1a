"""Our composed Hydra config -> Megatron-Bridge settings, as plain data (no NeMo imports).

Pinned stack: **Megatron-Bridge 0.3.0 in the NeMo Framework 26.02 container** (Megatron-core
0.16, Transformer Engine 2.12, PyTorch 2.10). Why: Megatron-Bridge is NVIDIA's current
NeMo-framework stack for LLM pretraining (NeMo 2's `nemo.collections.llm` recipes are deprecated
in its favour, with a published migration guide), MLCommons' current MoE reference
(`llm_moe_pretraining/nemo`) pins the same 0.3.0, and 26.02 is the container that ships it.
Megatron-Bridge has no Mixtral recipe (its MoE recipes are DeepSeek, Qwen3-MoE, OLMoE, GPT-OSS,
...), so this module is one: Mixtral is `MistralModelProvider` (RMSNorm, SwiGLU, RoPE, GQA, no
biases, untied embeddings) plus Megatron-core's MoE fields, sized from our model JSON, with the
optimizer, schedule, data and checkpoint settings of our config.

`build_settings` returns a dict whose sections are the `ConfigContainer` fields of 0.3.0
(`model`, `train`, `optimizer`, `scheduler`, `ddp`, `dataset`, `tokenizer`, `checkpoint`,
`logger`, `rng`, `mixed_precision`) and whose keys are those dataclasses' field names, so
`clm.nemo.launch` only instantiates them. Values that are objects there are names here:
`activation_func: "silu"`, dtypes as strings, blends as lists. `derived` holds what the
launcher and the MLPerf log need (data-parallel size, gradient accumulation, eval samples).

How our semantics map, and where they differ:

- Global batch: `global_train_batch_size` when set (the benchmark's 256), else
  per_device_train_batch_size x data-parallel size x gradient_accumulation_steps. Megatron
  derives the accumulation as GBS / (micro batch x DP), DP = GPUs / (TP x PP x CP).
- Schedules: WarmupHoldPolicy -> `lr_decay_style="constant"`; CosineAnnealing -> `"cosine"`
  decaying to `sched.min_lr` at `max_steps - constant_steps`. Warm-up steps follow NeMo's rule
  (`clm.config.warmup_steps`). Megatron's warm-up is lr * step / warmup (NeMo's is
  lr * (step + 1) / (warmup + 1)): the same ramp, one step apart.
- MoE: top-k then softmax over the k (`moe_router_pre_softmax=False`), which equals HF
  Mixtral's softmax, top-k, renormalize. Capacity factor > 0: token dropping with padding to
  capacity, dropped by position (`moe_token_drop_policy="position"`), as `clm.moe`'s
  `dropping`; 0: dropless. Load balancing: Switch aux loss times the model's
  `router_aux_loss_coef` (0.001 for 8x22B). Megatron adds it per MoE layer, where HF computes
  one loss over all layers' router outputs: the same coefficient, a different sum.
- Data: Megatron's GPTDataset concatenates documents and cuts windows of max_length + 1
  tokens (inputs and shifted labels), so it has (tokens - 1) // max_length sequences per epoch;
  ours cuts max_length blocks and the model shifts inside each. No EOD and no masks, as ours.
- Eval: every `eval_frequency` steps (-1: the benchmark cadence), `eval_iters` =
  ceil(eval sequences / GBS) batches of GBS, drawn from Megatron's cyclic, shuffled validation
  iterator. Megatron-Bridge 0.3.0 has no separate eval batch size, so an eval covers the set
  approximately, not each sequence exactly once as `clm.trainer` does; the loss is still the
  token mean over the evaluated batches.

Why this module is long: one translation table, our config and spec to Megatron-Bridge's
settings, as plain data; long because the settings are many.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clm import config as config_lib
from clm.spec import ModelSpec, MoESpec

MEGATRON_BRIDGE_VERSION = "0.3.0"
NEMO_CONTAINER_TAG = "26.02"
ARCHITECTURES = ("mixtral", "mistral")
DISPATCHERS = ("alltoall", "allgather", "flex")
ROUTER_DTYPES = ("fp32", "fp64", None)
MIXED_PRECISION = {"bfloat16": "bf16_mixed", "float16": "fp16_mixed", "float32": None}


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Our Hydra config with `overrides`, plus the `nemo` group's defaults when none is chosen.

    `hydra.searchpath=[file:///dir]` among the overrides adds `dir` to the config search path
    (how the helm chart's selected-configuration.yaml becomes `+experiment=...`). Hydra's own
    errors become ConfigError with their first line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_lib.register_resolvers()
    overrides = list(overrides)
    try:
        with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
            # does a chosen preset already bring the nemo group? (nemo.* values need it first)
            probe = [o for o in overrides if not o.lstrip("+~").startswith("nemo.")]
            if "nemo" not in hydra_compose("config", overrides=probe):
                overrides.append("+nemo=default")
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise config_lib.ConfigError(str(e).strip().splitlines()[0]) from e


def check_architecture(spec: ModelSpec) -> ModelSpec:
    """The model spec, if Megatron-Bridge's MistralModelProvider builds it; else ConfigError."""
    if spec.model_type not in ARCHITECTURES:
        raise config_lib.ConfigError(
            f"{spec.name}: model_type={spec.model_type!r}; the NeMo path builds "
            f"{' and '.join(ARCHITECTURES)} models only"
        )
    return spec


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise config_lib.ConfigError(message)


def model_settings(cfg: DictConfig, spec: ModelSpec) -> dict:
    """`MistralModelProvider` fields: the architecture from the model spec (its sizes, and the
    JSON's own values for the rest), parallelism from cfg."""
    hf = spec.values
    heads, hidden, layers = spec.heads, spec.hidden, spec.layers
    tp = int(cfg.tensor_parallelism)
    pp = int(cfg.pipeline_parallelism)
    vpp = int(cfg.virtual_pipeline_parallelism)
    nemo = cfg.nemo
    _check(heads % tp == 0, f"tensor_parallelism={tp}: must divide num_attention_heads={heads}")
    _check(layers % pp == 0, f"pipeline_parallelism={pp}: must divide {layers} layers")
    _check(
        vpp == 1 or (pp > 1 and (layers // pp) % vpp == 0),
        f"virtual_pipeline_parallelism={vpp}: needs pipeline_parallelism > 1 and must divide "
        f"the {layers // pp} layers of each pipeline stage",
    )
    cp = int(cfg.context_parallelism)
    _check(
        cp == 1 or int(cfg.max_length) % (2 * cp) == 0,
        f"context_parallelism={cp}: max_length={cfg.max_length} must be a multiple of 2 x {cp}",
    )
    dtype = spec.dtype
    settings = {
        # architecture (HF Mixtral/Mistral config.json)
        "num_layers": layers,
        "hidden_size": hidden,
        "ffn_hidden_size": spec.ffn,
        "num_attention_heads": heads,
        "num_query_groups": spec.kv_heads,
        "kv_channels": spec.head_dim,
        "vocab_size": spec.vocab,
        "seq_length": int(cfg.max_length),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
        "activation_func": "silu",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "position_embedding_type": "rope",
        "rotary_base": float(hf.get("rope_theta", 1e6)),
        "rotary_percent": 1.0,
        "share_embeddings_and_output_weights": spec.tied,
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "hidden_dropout": 0.0,
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "window_size": None,
        # precision: the mixed-precision recipe sets the compute dtype; this the parameters'
        "params_dtype": dtype,
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
        # parallelism
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp if vpp > 1 else None,
        "pipeline_dtype": dtype if pp > 1 else None,
        "context_parallel_size": cp,
        "sequence_parallel": bool(
            tp > 1 if nemo.sequence_parallel is None else nemo.sequence_parallel
        ),
        "expert_model_parallel_size": int(cfg.expert_parallelism),
        "expert_tensor_parallel_size": int(nemo.expert_tensor_parallelism),
    }
    if spec.gradient_checkpointing:
        settings.update(recompute_granularity="full", recompute_method="uniform")
        settings["recompute_num_layers"] = 1
    if spec.moe is not None:
        settings.update(moe_settings(cfg, spec.moe, spec.ffn))
    else:
        _check(
            int(cfg.expert_parallelism) == 1,
            f"expert_parallelism={cfg.expert_parallelism}: the model has no experts",
        )
    return settings


def moe_settings(cfg: DictConfig, moe: MoESpec, ffn: int) -> dict:
    """Megatron-core's MoE fields for Mixtral's sparse MLP (experts of `ffn` hidden units)."""
    ep = int(cfg.expert_parallelism)
    experts, capacity = moe.num_experts, moe.capacity_factor
    nemo = cfg.nemo
    _check(ep >= 1 and experts % ep == 0, f"expert_parallelism={ep}: must divide {experts} experts")
    _check(
        nemo.token_dispatcher in DISPATCHERS,
        f"nemo.token_dispatcher={nemo.token_dispatcher}: must be one of {', '.join(DISPATCHERS)}",
    )
    _check(
        nemo.router_dtype in ROUTER_DTYPES,
        f"nemo.router_dtype={nemo.router_dtype}: must be fp32, fp64 or null",
    )
    return {
        "num_moe_experts": experts,
        "moe_router_topk": moe.top_k,
        "moe_ffn_hidden_size": ffn,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": moe.aux_loss_coef,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": False,
        "moe_router_dtype": nemo.router_dtype,
        "moe_expert_capacity_factor": capacity if capacity > 0 else None,
        "moe_pad_expert_input_to_capacity": capacity > 0,
        "moe_token_drop_policy": "position",
        "moe_token_dispatcher_type": str(nemo.token_dispatcher),
        "moe_grouped_gemm": bool(nemo.grouped_gemm),
    }


def schedule_settings(cfg: DictConfig) -> tuple[dict, float]:
    """`SchedulerConfig` fields for our `sched` group, and its min_lr (an optimizer field)."""
    sched = cfg.sched
    max_steps = int(sched.max_steps)
    warmup = config_lib.warmup_steps(sched)
    if sched.name == "WarmupHoldPolicy":
        style, decay_iters = "constant", max_steps
    else:
        style, decay_iters = "cosine", max_steps - config_lib.constant_steps(sched)
        _check(
            decay_iters > warmup,
            f"sched: the cosine decay ends at step {decay_iters}, not after the {warmup} "
            "warm-up steps",
        )
    weight_decay = float(cfg.weight_decay)
    return {
        "lr_decay_style": style,
        "lr_warmup_iters": warmup,
        "lr_warmup_init": 0.0,
        "lr_decay_iters": decay_iters,
        "start_weight_decay": weight_decay,
        "end_weight_decay": weight_decay,
        "weight_decay_incr_style": "constant",
        "override_opt_param_scheduler": True,
    }, float(sched.min_lr)


def sizes(cfg: DictConfig, world_size: int) -> dict:
    """Data-parallel size, global batch and gradient accumulation on `world_size` GPUs."""
    tp, pp, cp = (
        int(cfg.tensor_parallelism),
        int(cfg.pipeline_parallelism),
        int(cfg.context_parallelism),
    )
    model_parallel = tp * pp * cp
    _check(
        world_size >= 1 and world_size % model_parallel == 0,
        f"{world_size} GPUs: must be a multiple of tensor_parallelism x pipeline_parallelism x "
        f"context_parallelism = {tp} x {pp} x {cp} = {model_parallel}",
    )
    dp = world_size // model_parallel
    ep, etp = int(cfg.expert_parallelism), int(cfg.nemo.expert_tensor_parallelism)
    _check(
        world_size % (ep * etp * pp) == 0,
        f"{world_size} GPUs: must be a multiple of expert_parallelism x "
        f"nemo.expert_tensor_parallelism x pipeline_parallelism = {ep} x {etp} x {pp}",
    )
    mbs = int(cfg.per_device_train_batch_size)
    if cfg.global_train_batch_size is not None:
        gbs = int(cfg.global_train_batch_size)
    else:
        gbs = mbs * dp * int(cfg.gradient_accumulation_steps)
    _check(
        gbs % (mbs * dp) == 0,
        f"global_train_batch_size={gbs}: must be a multiple of per_device_train_batch_size x "
        f"data-parallel size = {mbs} x {dp} (data-parallel size = {world_size} GPUs / "
        f"{model_parallel} model-parallel)",
    )
    return {
        "world_size": world_size,
        "data_parallel_size": dp,
        "global_batch_size": gbs,
        "micro_batch_size": mbs,
        "gradient_accumulation_steps": gbs // (mbs * dp),
    }


def build_settings(cfg: DictConfig, spec: ModelSpec, *, world_size: int, data: dict) -> dict:
    """Every Megatron-Bridge setting of a run, from our config, its model spec
    (`clm.spec.load_spec`), the GPU count and the data.

    `data` is `data_stats(cfg)`: the prefixes of the indexed datasets and their token counts.
    Raises ConfigError (one line naming the key) for anything Megatron would reject later.
    """
    _check(
        not cfg.do_first_eval,
        "do_first_eval=true: Megatron-Bridge 0.3.0 does not evaluate before the first step",
    )
    model = model_settings(cfg, check_architecture(spec))
    size = sizes(cfg, world_size)
    gbs = size["global_batch_size"]
    seq = int(cfg.max_length)
    eval_samples = (int(data["eval_tokens"]) - 1) // seq
    _check(
        eval_samples >= 1,
        f"{data['eval_prefix']}: {data['eval_tokens']} tokens, fewer than max_length + 1 = "
        f"{seq + 1} (one eval sequence)",
    )
    train_samples = (int(data["train_tokens"]) - 1) // seq
    eval_interval = int(cfg.eval_frequency)
    if eval_interval == -1:
        eval_interval = config_lib.eval_cadence(seq, gbs)
    scheduler, min_lr = schedule_settings(cfg)
    dtype = spec.dtype
    run_dir = str(cfg.run_dir)
    save = int(cfg.save_frequency) > 0
    save_dir = str(cfg.save_dir)
    from clm.tokenizer import find_tokenizer_file

    return {
        "model": model,
        "train": {
            "train_iters": int(cfg.max_steps),
            "global_batch_size": gbs,
            "micro_batch_size": size["micro_batch_size"],
            "eval_interval": eval_interval,
            "eval_iters": math.ceil(eval_samples / gbs),
            "exit_signal_handler": True,
            "manual_gc": True,
            "manual_gc_interval": 100,
        },
        "optimizer": {
            # Megatron's "adam" is AdamW: decoupled weight decay, not on biases and norms
            "optimizer": "adam",
            "lr": float(cfg.lr),
            "min_lr": min_lr,
            "weight_decay": float(cfg.weight_decay),
            "adam_beta1": float(cfg.adam_beta1),
            "adam_beta2": float(cfg.adam_beta2),
            "adam_eps": float(cfg.adam_epsilon),
            "clip_grad": float(cfg.max_grad_norm or 0.0),
            "use_distributed_optimizer": True,
            "bf16": dtype == "bfloat16",
            "fp16": dtype == "float16",
        },
        "scheduler": scheduler,
        "ddp": {
            "use_distributed_optimizer": True,
            "overlap_grad_reduce": True,
            "overlap_param_gather": True,
            "grad_reduce_in_fp32": True,
            "average_in_collective": True,
            "check_for_nan_in_grad": True,
        },
        "dataset": {
            "random_seed": int(cfg.seed),
            "seq_length": seq,
            # [train, validation, test]: (prefixes, weights); None weights: by size
            "blend_per_split": [
                [data["train_prefixes"], None],
                [[data["eval_prefix"]], None],
                None,
            ],
            "reset_position_ids": False,
            "reset_attention_mask": False,
            "eod_mask_loss": False,
            "path_to_cache": str(cfg.nemo.index_cache_dir),
            "dataloader_type": "single",
            "num_workers": int(cfg.nemo.num_workers),
            "data_sharding": True,
            "skip_getting_attention_mask_from_dataset": True,
        },
        "tokenizer": {
            # only the vocabulary size and EOD id matter: the data is already tokenized
            "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": str(find_tokenizer_file(cfg.model.name_or_path)),
            "legacy_tokenizer": True,
        },
        "checkpoint": {
            "save": save_dir if save else None,
            "save_interval": int(cfg.save_frequency) if save else None,
            "most_recent_k": int(cfg.keep_last_n) if cfg.keep_last_n else -1,
            "load": save_dir if save and cfg.auto_resume else None,
            # a Megatron (torch_dist) checkpoint to start from: weights only, step 0
            "pretrained_checkpoint": (
                None if cfg.checkpoint_manager_path is None else str(cfg.checkpoint_manager_path)
            ),
            "ckpt_format": "torch_dist",
            "fully_parallel_save": True,
        },
        "logger": {
            "log_interval": int(cfg.log_frequency),
            "tensorboard_dir": str(Path(run_dir) / "tensorboard"),
            "log_timers_to_tensorboard": True,
            "log_throughput": True,
            **wandb_settings(cfg)[0],
        },
        "rng": {"seed": int(cfg.seed)},
        "mixed_precision": MIXED_PRECISION[dtype],
        "derived": {
            **size,
            # distinct validation sequences (what clm.mlperf logs as eval_samples) and the
            # sequences one eval runs through (whole batches of GBS)
            "eval_samples": eval_samples,
            "eval_sequences_per_eval": math.ceil(eval_samples / gbs) * gbs,
            "train_samples": train_samples,
            "warmup_steps": scheduler["lr_warmup_iters"],
            "target_eval_loss": float(cfg.target_eval_loss),
            "max_steps": int(cfg.max_steps),
            "megatron_bridge": MEGATRON_BRIDGE_VERSION,
            "nemo_container": NEMO_CONTAINER_TAG,
            # variables the launcher sets (unless already set) for what LoggerConfig lacks
            "wandb_env": wandb_settings(cfg)[1],
        },
    }


def wandb_settings(cfg: DictConfig) -> tuple[dict, dict]:
    """Our `wandb` keys as Megatron-Bridge 0.3.0's own W&B logger settings, and environment.

    Its LoggerConfig turns W&B on when `wandb_project` is set and then starts it on the last
    rank (`GlobalState.wandb_logger`) with `dir=wandb_save_dir`, `name=wandb_exp_name`, the
    project and entity; everything else W&B reads from the environment, so the tags go there as
    WANDB_TAGS, and WANDB_CACHE_DIR keeps wandb's own logs in the run directory, as `run_clm.py`
    does. Off: the four fields are None, as in Megatron-Bridge's defaults. Megatron-Bridge logs
    its own metrics (lm loss, throughput, timers) at its iteration numbers, not our metrics.jsonl
    keys, and passes no run id: a restarted job is a new W&B run unless WANDB_RUN_ID and
    WANDB_RESUME=allow are set in the job's environment.
    """
    from clm.wandb_log import enabled

    if not enabled(cfg):
        fields = ("wandb_project", "wandb_entity", "wandb_exp_name", "wandb_save_dir")
        return dict.fromkeys(fields), {}
    node = cfg.wandb
    _check(
        node.project is not None,
        "wandb.project=null: the NeMo path needs a project (Megatron-Bridge turns W&B on by it)",
    )
    run_dir = str(cfg.run_dir)
    env = {"WANDB_CACHE_DIR": str(Path(run_dir) / "wandb" / "cache")}
    if node.tags:
        env["WANDB_TAGS"] = ",".join(str(tag) for tag in node.tags)
    return {
        "wandb_project": str(node.project),
        "wandb_entity": None if node.entity is None else str(node.entity),
        # null leaves the name to W&B, as with run_clm.py
        "wandb_exp_name": None if node.name is None else str(node.name),
        "wandb_save_dir": run_dir,  # W&B writes <run_dir>/wandb/, as with run_clm.py
    }, env


def data_stats(cfg: DictConfig) -> dict:
    """Prefixes and token counts of the prepared data in `nemo.data_dir`, checked against cfg.

    Reads only the `.idx` headers and the sidecars `clm.nemo.prepare_data` writes; a missing
    shard, a different tokenizer or a different eval subset is a ConfigError naming the fix.
    """
    from clm.nemo import prepare_data as prep

    if cfg.nemo.data_dir is None:
        raise config_lib.ConfigError(
            "nemo.data_dir=null: set it to the --output-dir of python -m clm.nemo.prepare_data"
        )
    root = Path(str(cfg.nemo.data_dir))
    first, last = cfg.dataset.train_shards
    fix = f"run python -m clm.nemo.prepare_data --output-dir {root} with this config"
    train, train_tokens = [], 0
    for i in range(first, last):
        prefix = root / prep.train_prefix(i)
        train.append(str(prefix))
        train_tokens += _checked_tokens(prefix, cfg, None, fix)
    eval_prefix = root / prep.VALIDATION_PREFIX
    n_eval = None if cfg.n_eval_examples is None else int(cfg.n_eval_examples)
    eval_tokens = _checked_tokens(eval_prefix, cfg, n_eval, fix)
    return {
        "train_prefixes": train,
        "train_tokens": train_tokens,
        "eval_prefix": str(eval_prefix),
        "eval_tokens": eval_tokens,
    }


def _checked_tokens(prefix: Path, cfg: DictConfig, limit: int | None, fix: str) -> int:
    from clm.nemo import prepare_data as prep

    sidecar = Path(str(prefix) + ".json")
    if not (sidecar.is_file() and Path(str(prefix) + ".idx").is_file()):
        raise config_lib.ConfigError(f"{prefix}.idx: missing prepared data ({fix})")
    meta = json.loads(sidecar.read_text())
    want_sha = cfg.dataset.tokenizer_sha256
    if want_sha and meta.get("tokenizer_sha256") != want_sha:
        raise config_lib.ConfigError(
            f"{prefix}: tokenized with tokenizer sha256 {meta.get('tokenizer_sha256')}, not "
            f"dataset.tokenizer_sha256={want_sha} ({fix})"
        )
    if meta.get("limit") != limit:
        raise config_lib.ConfigError(
            f"{prefix}: holds the first {meta.get('limit')} documents, n_eval_examples={limit} "
            f"({fix})"
        )
    return prep.read_index(prefix).num_tokens


def to_json(settings: dict) -> str:
    """The settings as JSON (what the launcher writes to the run directory)."""
    return json.dumps(settings, indent=2, sort_keys=True)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(config_lib.redacted(cfg))
