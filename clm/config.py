"""Config helpers: Hydra resolvers, derived values and validation before any work starts.

The YAML tree in `clm/config/` documents every key. This module only adds what YAML cannot:
the resolvers the tree uses, the values derived from the device count (global batch sizes,
eval cadence), and checks that fail in one line naming the key, before data or devices are
touched.

Why this module is long: every check of every top-level key (one `ConfigError` line each) and
the derived sizes; long because the keys are many, each check a few lines.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CLM_DIR = Path(__file__).resolve().parent

# The benchmark evaluates every 24 * 1024 * 2048 tokens.
EVAL_EVERY_TOKENS = 24576 * 2048

BACKENDS = ("auto", "cpu", "cuda", "xla")
XLA_RECOMPILE = ("warn", "error", "ignore")
XLA_ATTENTION = ("auto", "flash", "sdpa")  # clm.backends.xla_attention.CHOICES (torch-free here)
OPTIMIZERS = ("ADAMW_TORCH", "ADAMW_TORCH_XLA")
SCHEDULERS = ("WarmupHoldPolicy", "CosineAnnealing")
DTYPES = ("float32", "bfloat16", "float16")
DATASETS = ("c4_mlperf",)


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line naming the key."""


# the model a run builds when neither model.config_path nor model.name_or_path is given
EMBEDDED_MODEL = "mixtral_small.json"


def register_resolvers() -> None:
    """Resolvers used by the YAML tree; safe to call more than once."""
    OmegaConf.register_new_resolver(
        "path_join", lambda *parts: os.path.join(*map(str, parts)), replace=True
    )
    OmegaConf.register_new_resolver("clm_dir", lambda: str(CLM_DIR), replace=True)
    # model.config_path's default: the embedded model, unless model.name_or_path names one to load
    OmegaConf.register_new_resolver(
        "embedded_model",
        lambda name_or_path: EMBEDDED_MODEL if name_or_path is None else None,
        replace=True,
    )


def resolve_config_file(path: str) -> Path:
    """A model JSON: absolute, relative to the working directory, or shipped in clm/."""
    for candidate in (Path(path), CLM_DIR / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"model.config_path={path}: no such file (looked in . and {CLM_DIR})")


def eval_cadence(max_length: int, global_batch: int) -> int:
    """Steps between evals for the benchmark's 24*1024*2048-token cadence."""
    return math.ceil(EVAL_EVERY_TOKENS / max_length / global_batch)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# The type of every numeric and boolean key (`?`: null allowed). The YAML tree is untyped, so
# Hydra takes `max_length=abc` as a string; check_types names the key before any int() reads it.
# Keys of groups that a config may lack (sched's, nemo's) are checked when present.
KEY_TYPES = {
    **dict.fromkeys(
        (
            "seed",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "pad_token_id",
            "max_steps",
            "eval_frequency",
            "log_frequency",
            "tensor_parallelism",
            "expert_parallelism",
            "num_slices",
            "context_parallelism",
            "pipeline_parallelism",
            "virtual_pipeline_parallelism",
            "save_frequency",
            "keep_last_n",
            "xla_profile_step",
            "dataset.shuffle_buffer_size",
            "sched.max_steps",
            "sched.hold_steps",
            "sched.constant_steps",
            "nemo.num_workers",
            "nemo.expert_tensor_parallelism",
        ),
        "int",
    ),
    **dict.fromkeys(
        (
            "global_train_batch_size",
            "global_eval_batch_size",
            "n_eval_examples",
            "sched.warmup_steps",
        ),
        "int?",
    ),
    **dict.fromkeys(
        (
            "lr",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "target_eval_loss",
            "model.capacity_factor",
            "sched.min_lr",
            "run_lease_s",
            "step_timeout_s",
            "first_step_timeout_s",
        ),
        "number",
    ),
    **dict.fromkeys(
        (
            "max_grad_norm",
            "peak_tflops_per_device",
            "model.router_aux_loss_coef",
            "sched.warmup_ratio",
            "sched.hold_ratio",
            "sched.constant_ratio",
        ),
        "number?",
    ),
    **dict.fromkeys(
        (
            "overwrite_output_dir",
            "do_first_eval",
            "shuffle",
            "auto_resume",
            "full_precision",
            "progress_bar",
            "check_memory",
            "xla_scan_layers",
            "wandb.enabled",
            "model.gradient_checkpointing",
            "dataset.streaming",
            "dataset.skip_bad_records",
            "nemo.grouped_gemm",
        ),
        "bool",
    ),
    "nemo.sequence_parallel": "bool?",
}
_KIND_WORDS = {"int": "an integer", "number": "a number", "bool": "true or false"}
_ABSENT = object()


def _has_kind(value, kind: str) -> bool:
    if value is None:
        return kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, not to a user
        return False
    return isinstance(value, int) or (kind == "number" and isinstance(value, float))


def check_types(cfg: DictConfig) -> None:
    """Every key of KEY_TYPES holds its type: ConfigError naming the key and the value."""
    for key, kind in KEY_TYPES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not _has_kind(value, kind):
            word = _KIND_WORDS[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
            shown = str(value).lower() if isinstance(value, bool) else value  # as typed
            raise ConfigError(f"{key}={shown}: must be {word}")
    shards = OmegaConf.select(cfg, "dataset.train_shards", default=_ABSENT)
    if shards is not _ABSENT and not (
        OmegaConf.is_list(shards) and len(shards) == 2 and all(_has_kind(v, "int") for v in shards)
    ):
        raise ConfigError(
            f"dataset.train_shards={shards}: must be two integers [first, last] (a half-open range)"
        )


def validate(cfg: DictConfig) -> None:
    """Checks that need no device and no data. Raises ConfigError naming the key.

    The `model` keys and the architecture JSON they name are checked by `clm.spec.load_spec`,
    which every entry point calls next (the JSON is read there, once)."""
    check_types(cfg)
    _check(cfg.backend in BACKENDS, f"backend={cfg.backend}: must be one of {', '.join(BACKENDS)}")
    _check(
        cfg.optimizer in OPTIMIZERS,
        f"optimizer={cfg.optimizer}: must be one of {', '.join(OPTIMIZERS)}",
    )
    _check(
        cfg.sched.name in SCHEDULERS,
        f"sched.name={cfg.sched.name}: must be one of {', '.join(SCHEDULERS)}",
    )
    _check(
        cfg.model.dtype in DTYPES,
        f"model.dtype={cfg.model.dtype}: must be one of {', '.join(DTYPES)}",
    )
    _check(
        cfg.dataset.dataset_name in DATASETS,
        f"dataset.dataset_name={cfg.dataset.dataset_name}: must be one of {', '.join(DATASETS)} "
        "(C4-format json shards; no hub datasets)",
    )
    _check(
        cfg.get("xla_recompile", "warn") in XLA_RECOMPILE,
        f"xla_recompile={cfg.get('xla_recompile')}: must be one of {', '.join(XLA_RECOMPILE)}",
    )
    _check(
        cfg.get("xla_attention", "auto") in XLA_ATTENTION,
        f"xla_attention={cfg.get('xla_attention')}: must be one of {', '.join(XLA_ATTENTION)}",
    )
    scan = cfg.get("xla_scan_layers", False)
    _check(isinstance(scan, bool), f"xla_scan_layers={scan}: must be true or false")
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "max_steps",
        "log_frequency",
    ):
        _check(int(cfg[key]) >= 1, f"{key}={cfg[key]}: must be a positive integer")
    _check(
        cfg.eval_frequency == -1 or cfg.eval_frequency >= 1,
        f"eval_frequency={cfg.eval_frequency}: must be -1 (benchmark cadence) or >= 1",
    )
    _check(float(cfg.lr) > 0, f"lr={cfg.lr}: must be > 0")
    _check(float(cfg.weight_decay) >= 0, f"weight_decay={cfg.weight_decay}: must be >= 0")
    _check(
        cfg.max_grad_norm is None or float(cfg.max_grad_norm) >= 0,
        f"max_grad_norm={cfg.max_grad_norm}: must be >= 0 or null",
    )
    _check(
        float(cfg.target_eval_loss) >= 0,
        f"target_eval_loss={cfg.target_eval_loss}: must be >= 0 (0: no early stop)",
    )
    _check(
        cfg.n_eval_examples is None or int(cfg.n_eval_examples) >= 1,
        f"n_eval_examples={cfg.n_eval_examples}: must be >= 1 or null (all documents)",
    )
    first, last = cfg.dataset.train_shards
    _check(
        0 <= first < last,
        f"dataset.train_shards=[{first}, {last}]: need 0 <= first < last (a half-open range)",
    )
    warmup = warmup_steps(cfg.sched)
    _check(
        warmup <= cfg.max_steps,
        f"sched.warmup_steps/warmup_ratio: a warm-up of {warmup} steps exceeds "
        f"max_steps={cfg.max_steps}",
    )
    lease_s = cfg.get("run_lease_s", 60)
    _check(
        float(lease_s) >= 1,
        f"run_lease_s={lease_s}: must be >= 1 (seconds a lease lasts without a renewal)",
    )
    for key in ("save_frequency", "keep_last_n"):
        _check(int(cfg[key]) >= 0, f"{key}={cfg[key]}: must be >= 0 (0: off)")
    # clm/watchdog.py (seconds); the first bound is also the process groups' collective timeout
    step_timeout = float(cfg.get("step_timeout_s", 0))
    _check(
        math.isfinite(step_timeout) and step_timeout >= 0,
        f"step_timeout_s={cfg.get('step_timeout_s')}: must be a finite number of seconds >= 0 "
        "(0: no watchdog)",
    )
    first_timeout = float(cfg.get("first_step_timeout_s", 1))
    _check(
        math.isfinite(first_timeout) and first_timeout > 0,
        f"first_step_timeout_s={cfg.get('first_step_timeout_s')}: must be a finite number of "
        "seconds > 0",
    )
    async_saves = cfg.get("async_checkpointing", "auto")
    _check(
        async_saves == "auto" or isinstance(async_saves, bool),
        f"async_checkpointing={async_saves}: must be auto, true or false",
    )
    for key in ("tensor_parallelism", "expert_parallelism", "context_parallelism"):
        _check(int(cfg[key]) >= 1, f"{key}={cfg[key]}: must be >= 1")
    _check(
        cfg.get("cache_local_dir") is None,
        f"cache_local_dir={cfg.get('cache_local_dir')}: not read by this package (models and "
        "tokenizers come from local files and the HF cache only); set HF_HOME to that directory",
    )
    _validate_wandb(cfg.get("wandb"))
    slices = cfg.get("num_slices", 1)
    _check(
        isinstance(slices, int) and not isinstance(slices, bool) and slices >= 1,
        f"num_slices={slices}: must be a positive integer (TPU slices; it must also divide the "
        "device count, checked when the devices are known)",
    )


def _validate_wandb(node) -> None:
    """The `wandb` block: checked whether or not it is enabled, so a typo fails before a run."""
    if node is None:
        return
    _check(
        isinstance(node.get("enabled"), bool),
        f"wandb.enabled={node.get('enabled')}: must be true or false",
    )
    for key in ("project", "entity", "name"):
        value = node.get(key)
        _check(
            value is None
            or (isinstance(value, (str, int)) and not isinstance(value, bool) and str(value)),
            f"wandb.{key}={value}: must be a name (text) or null",
        )
    tags = node.get("tags")
    _check(
        tags is None or OmegaConf.is_list(tags),
        f"wandb.tags={tags}: must be a list, e.g. wandb.tags=[{tags}]",
    )
    for tag in tags or ():
        _check(
            isinstance(tag, (str, int, float))
            and not isinstance(tag, bool)
            and 1 <= len(str(tag)) <= 64,
            f"wandb.tags: {tag!r} is not a tag (text of 1 to 64 characters)",
        )


# key names ending like these hold secrets (hf_token, db_password, ...; not pad_token_id)
SECRET_KEY = re.compile(
    r"(^|_)(token|secret|password|passwd|api_key|apikey|secret_key|access_key)$", re.I
)


def redacted(node):
    """A plain copy of a config with the values of secret-looking keys (hf_token, ...) masked."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {
            k: "***" if SECRET_KEY.search(str(k)) and v is not None else redacted(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [redacted(v) for v in node]
    return node


def runs_on_xla(cfg: DictConfig) -> bool:
    """backend=xla, or backend=auto with PJRT_DEVICE=TPU (clm.backends.select_backend's rule)."""
    return cfg.backend == "xla" or (
        cfg.backend == "auto" and os.environ.get("PJRT_DEVICE") == "TPU"
    )


def under_torchrun() -> bool:
    """Several processes, one per device (torchrun, or RANK/WORLD_SIZE set by hand)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# Keys that only the NeMo path (clm.nemo.launch: Megatron) implements.
NEMO_ONLY = ("pipeline_parallelism", "virtual_pipeline_parallelism", "context_parallelism")


def refuse_unimplemented(cfg: DictConfig, on_xla: bool, torchrun: bool) -> None:
    """A parallelism run_clm.py would accept and not run is a ConfigError before any work: the
    MLPerf log records what ran, so a key must not claim what did not. XLA runs tensor and
    expert parallelism, torchrun (FSDP2) expert parallelism, one process neither."""
    for key in NEMO_ONLY:
        value = cfg.get(key)
        if value is not None and int(value) > 1:
            raise ConfigError(
                f"{key}={value}: not implemented by run_clm.py's backends (cpu, cuda, torchrun "
                "FSDP2, xla); the NeMo path runs it (python -m clm.nemo.launch); use 1 here"
            )
    if on_xla:
        return
    tensor, expert = int(cfg.get("tensor_parallelism", 1)), int(cfg.get("expert_parallelism", 1))
    if torchrun and tensor > 1:
        raise ConfigError(
            f"tensor_parallelism={tensor}: not supported by the torchrun (FSDP2) backend; use 1 "
            "(expert_parallelism and data parallelism are), or backend=xla"
        )
    if not torchrun:
        for key, value, where in (
            ("tensor_parallelism", tensor, "backend=xla"),
            ("expert_parallelism", expert, "backend=xla, or torchrun with FSDP2"),
        ):
            if value > 1:
                raise ConfigError(
                    f"{key}={value}: backend={cfg.backend} in one process trains on one "
                    f"device; {key.split('_')[0]} parallelism runs on {where}"
                )


def warmup_steps(sched: DictConfig) -> int:
    """NeMo's rule: warmup_steps wins, else int(warmup_ratio * max_steps), else 0."""
    if sched.get("warmup_steps") is not None:
        return int(sched.warmup_steps)
    if sched.get("warmup_ratio") is not None:
        return int(float(sched.warmup_ratio) * int(sched.max_steps))
    return 0


def constant_steps(sched: DictConfig) -> int:
    """CosineAnnealing's steps held at min_lr at the end: constant_steps, else the ratio, else 0."""
    if sched.get("constant_steps"):
        return int(sched.constant_steps)
    if sched.get("constant_ratio") is not None:
        return int(float(sched.constant_ratio) * int(sched.max_steps))
    return 0


def finalize(cfg: DictConfig, data_parallel_size: int) -> None:
    """Fill the values that depend on the device count, checking any the user set."""
    train = cfg.per_device_train_batch_size * data_parallel_size * cfg.gradient_accumulation_steps
    evaluation = cfg.per_device_eval_batch_size * data_parallel_size
    for key, derived, formula in (
        (
            "global_train_batch_size",
            train,
            f"per_device_train_batch_size ({cfg.per_device_train_batch_size}) x data-parallel "
            f"devices ({data_parallel_size}) x gradient_accumulation_steps "
            f"({cfg.gradient_accumulation_steps})",
        ),
        (
            "global_eval_batch_size",
            evaluation,
            f"per_device_eval_batch_size ({cfg.per_device_eval_batch_size}) x data-parallel "
            f"devices ({data_parallel_size})",
        ),
    ):
        _check(
            cfg[key] is None or int(cfg[key]) == derived,
            f"{key}={cfg[key]}: must equal {formula} = {derived}",
        )
    with open_dict(cfg):
        cfg.global_train_batch_size = train
        cfg.global_eval_batch_size = evaluation
        if cfg.eval_frequency == -1:
            cfg.eval_frequency = eval_cadence(cfg.max_length, train)


# --------------------------------------------------------------------------- composition

CONFIG_DIR = CLM_DIR / "config"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `run_clm.py` runs with: clm/config composed with Hydra `overrides`.

    Hydra's own errors are several lines and, for a misspelt key, suggest `+key=value`, which
    adds a key nothing reads. Here each is one ConfigError line naming the override: a malformed
    override, an unknown key (with the closest real key), an unknown group option (with the
    options), and a `+key` that adds a key resembling a real one (`+maxlength=128`). A value of
    the wrong type (`max_length=abc`) is one line too (check_types).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException, OverrideParseException

    register_resolvers()
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except OverrideParseException as e:
            raise ConfigError(f"{text}: not a valid override ({_first_line(e)})") from None
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}

    def is_group(override) -> bool:
        return override.key_or_group.lstrip("/").split("@")[0] in groups

    try:
        cfg = _hydra_compose(list(overrides))
    except MissingConfigException as e:
        raise ConfigError(_missing_option(e, parsed, is_group)) from None
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many kinds
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise ConfigError(_composition_error(e, parsed, is_group)) from None
    added = [o for o in parsed if (o.is_add() or o.is_force_add()) and not is_group(o)]
    if added:
        known = _keys(_hydra_compose([o.input_line for o in parsed if is_group(o)]))
        for o in added:
            close = _closest(o.key_or_group, known, cutoff=0.8)
            if o.key_or_group not in known and close:
                raise ConfigError(
                    f"{o.input_line}: adds a key that nothing reads; did you mean "
                    f"{close}={_value_text(o)}?"
                )
    check_types(cfg)
    return cfg


def usage_error(error: BaseException) -> str | None:
    """A command-line tool's one line for a mistake in its arguments: ours (ConfigError, a bad
    value, a missing file) or Hydra's and OmegaConf's; None for anything else, a bug to raise."""
    if isinstance(error, (ConfigError, ValueError, FileNotFoundError)):
        return f"error: {error}"
    if type(error).__module__.split(".")[0] in ("hydra", "omegaconf"):
        return f"error: {_first_line(error)}"
    return None


def _hydra_compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return hydra_compose("config", overrides=overrides)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _value_text(override) -> str:
    try:
        return override.get_value_element_as_str()
    except Exception:  # noqa: BLE001 - a sweep has no single value
        return "..."


def _keys(cfg: DictConfig, prefix: str = "") -> set[str]:
    """Every key of `cfg` as a dotted path, nodes included."""
    keys = set()
    for key in cfg:
        path = f"{prefix}{key}"
        keys.add(path)
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node):
            keys |= _keys(node, path + ".")
    return keys


def _closest(word: str, candidates, cutoff: float = 0.6) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=cutoff)
    return match[0] if match else None


def _missing_option(error, parsed, is_group) -> str:
    """An unknown group option (`+experiment=gbs256_tpuu`): the options, and the closest."""
    group, _, name = str(error.missing_cfg_file or "").rpartition("/")
    options = list(error.options or [])
    named = [o for o in parsed if is_group(o) and o.key_or_group.lstrip("/").split("@")[0] == group]
    if not named or not options:  # not from the command line: a preset names a missing file
        return f"{error.missing_cfg_file}: config not found ({_first_line(error)})"
    starting = [o for o in options if o.lower().startswith(name.lower())]
    close = starting[0] if len(starting) == 1 else _closest(name, options)
    hint = f"; did you mean {close}?" if close else ""
    return (
        f"{named[-1].input_line}: {group} has no option {name!r}; the options are "
        f"{', '.join(options)}{hint}"
    )


def _composition_error(error, parsed, is_group) -> str:
    message = str(error)
    override = next((o for o in parsed if f"'{o.key_or_group}'" in message), None)
    if override is None:
        return _first_line(error)
    text, key = override.input_line, override.key_or_group
    if "No match in the defaults list" in message:
        return f"{text}: {key} is a preset group, not in the defaults: select it with +{text}"
    if message.startswith("Could not override"):
        known = _keys(_hydra_compose([o.input_line for o in parsed if is_group(o)]))
        close = _closest(key, known)
        if close:
            return f"{text}: no such key; did you mean {close}={_value_text(override)}?"
        return f"{text}: no such key (clm/config/config.yaml documents every key)"
    return f"{text}: {_first_line(error)}"
