"""The model spec: the model's JSON and `model.*` keys read once into typed, frozen objects.

    spec = load_spec(cfg.model, cfg.max_length)

`load_spec` finds the architecture JSON (`model.config_path`, else config.json of the local
directory or HF-cache id `model.name_or_path`), reads it once, checks it once and resolves the
experts implementation once (the auto rule: `resolve_implementation`). Everything downstream
takes the result instead of reading the JSON or the `model.*` keys again: the model build
(`clm.model`) and its experts (`clm.moe`), the FLOPs behind MFU (`clm.metrics`), the MLPerf
hyperparameters (`clm.mlperf`), the planner and the memory check (`clm.plan`, `clm.memory`) and
the NeMo recipe (`clm.nemo.recipe`). Why: the same JSON used to be parsed in five places, the
capacity factor validated in three and the auto rule written twice, and the MoE settings
reached the experts as attributes set on the HF config, which HF does not define and which
then travelled into every saved config.json. The shape follows nanoGPT's `GPTConfig` (parsed
once, passed down) and torchtitan's `MoEArgs` (the MoE settings as one typed object).

Plain Python, no torch: the planner and `run_clm.py`'s early checks use it before (or
without) importing torch. The sizes are what transformers builds from the same JSON: a key the
JSON leaves out takes HF's default for its model_type (`DEFAULTS`; tests compare them with
transformers' classes); other model types must spell their sizes out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from omegaconf import DictConfig

from clm.config import ConfigError, resolve_config_file
from clm.model_math import capacity

# The experts implementations of `model.moe_implementation` (clm/moe.py documents each); the
# key may also be null or "auto", resolved by `resolve_implementation`.
IMPLEMENTATIONS = ("hf", "dense", "dropping", "dropless")

# HF's defaults (transformers 5) for the keys a JSON may leave out, by model_type.
DEFAULTS = {
    "mixtral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "tie_word_embeddings": False,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "tie_word_embeddings": False,
    },
    "gpt2": {
        "vocab_size": 50257,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "n_inner": None,
        "tie_word_embeddings": True,
    },
}
# GPT-2's own names for the sizes (its config's attribute_map)
ALIASES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "intermediate_size": "n_inner",
}


@dataclass(frozen=True)
class MoESpec:
    """How the experts run: Mixtral's sparse MLP of `num_experts` experts, `top_k` per token.

    `implementation` is resolved (one of IMPLEMENTATIONS, never auto); `capacity_factor` > 0
    bounds each expert's tokens per capacity group (`capacity`), 0 is dropless;
    `group_tokens` is the capacity group (one sequence: the trainer's max_length), None: all
    the tokens of a forward call; `aux_loss_coef` weighs the router's load-balancing loss.
    Every instance is checked here, once: the experts code trusts it.
    """

    num_experts: int
    top_k: int
    implementation: str = "dropless"
    capacity_factor: float = 0.0
    group_tokens: int | None = None
    aux_loss_coef: float = 0.0

    def __post_init__(self):
        check_experts(self.implementation, self.capacity_factor)
        if self.group_tokens is not None and int(self.group_tokens) < 1:
            raise ConfigError(f"capacity group of {self.group_tokens} tokens: must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.top_k}: must be in [1, num_local_experts="
                f"{self.num_experts}]"
            )

    def capacity(self, group_tokens: int) -> int:
        """Slots per expert in a capacity group of `group_tokens` tokens (`model_math`)."""
        return capacity(group_tokens, self.top_k, self.num_experts, self.capacity_factor)


def resolve_implementation(name: str | None, capacity_factor: float) -> str:
    """The auto rule for `model.moe_implementation` null or "auto": dropping when
    `capacity_factor` > 0, else dropless. Any other name is kept (`check_experts` judges it)."""
    if name is None or name == "auto":
        return "dropping" if capacity_factor > 0 else "dropless"
    return name


def check_experts(implementation: str, capacity_factor: float) -> None:
    """The rules of `model.moe_implementation` (resolved) and `model.capacity_factor`; checked
    for every model, MoE or not, so a bad key never waits for a MoE model to fail."""
    allowed = ", ".join(("auto",) + IMPLEMENTATIONS)
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(
            f"model.moe_implementation={implementation!r}: must be null or one of {allowed}"
        )
    if not float(capacity_factor) >= 0:  # also rejects NaN
        raise ConfigError(f"model.capacity_factor={capacity_factor}: must be >= 0 (0: dropless)")
    if implementation == "dropping" and capacity_factor == 0:
        raise ConfigError(
            "model.moe_implementation='dropping' needs model.capacity_factor > 0 "
            "(0 means dropless), e.g. 1.25"
        )


@dataclass(frozen=True)
class ModelSpec:
    """One run's model: the architecture's sizes, how it is built, and its MoE (None: dense).

    `values` is the JSON as read (read-only; clm.model builds the HF config from it, the NeMo
    recipe reads the keys it translates); `name` is its file name, for messages. `pretrained`
    is where the weights are loaded from (`model.name_or_path` without a config_path); None: a
    random init.
    """

    name: str
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    max_positions: int | None
    moe: MoESpec | None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    pretrained: str | None = None
    values: Mapping = field(default_factory=dict, repr=False, hash=False)

    @property
    def aux_loss_coef(self) -> float:
        """The load-balancing loss weight the trainer adds (0 for a dense model)."""
        return self.moe.aux_loss_coef if self.moe is not None else 0.0

    @property
    def capacity_factor(self) -> float:
        """The experts' capacity factor (0: dropless, and for a dense model)."""
        return self.moe.capacity_factor if self.moe is not None else 0.0

    def hf_values(self) -> dict:
        """A fresh, mutable copy of the JSON values to build the HF config from."""
        values = copy.deepcopy(dict(self.values))
        values.pop("transformers_version", None)
        return values


def load_spec(model_cfg: DictConfig, max_length: int | None = None) -> ModelSpec:
    """The spec of the `model` config node; `max_length` (the trainer's sequence length) is
    checked against the model's positions and is the experts' capacity group. ConfigError,
    one line naming the key or the file, for anything wrong."""
    path, pretrained = model_json_path(model_cfg)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(values, dict) or "model_type" not in values:
        raise ConfigError(f"{path}: no 'model_type' key (e.g. \"mixtral\")")
    return spec_from_values(values, model_cfg, max_length, name=path.name, pretrained=pretrained)


def model_json_path(model_cfg: DictConfig) -> tuple[Path, str | None]:
    """(the architecture JSON, the pretrained weights' name_or_path or None)."""
    if model_cfg.get("config_path") is not None:
        return resolve_config_file(model_cfg.config_path), None
    name = model_cfg.get("name_or_path")
    if name is None:
        raise ConfigError("model.config_path and model.name_or_path are both null: set one")
    name = str(name)
    found = _pretrained_config_json(name)
    if found is None:
        raise ConfigError(
            f"model.name_or_path={name}: not a local model directory and not in the local HF "
            "cache (nothing is downloaded); for the reference's GPT-2 dry run use "
            "+experiment=dry_run_gpt2 (a tiny local GPT-2), else pass a local HF model directory "
            "(config.json and *.safetensors) or set model.config_path"
        )
    return found, name


def _pretrained_config_json(name_or_path: str) -> Path | None:
    """config.json of a local model directory, or of a model id in the local HF cache (what
    clm.model then loads with local_files_only)."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / "config.json"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except ValueError:  # not a valid model id (e.g. a path that does not exist)
        return None
    return Path(cached) if isinstance(cached, str) else None


def spec_from_values(
    values: Mapping,
    model_cfg: DictConfig,
    max_length: int | None = None,
    *,
    name: str = "model JSON",
    pretrained: str | None = None,
) -> ModelSpec:
    """The spec of an architecture given as JSON values (what `load_spec` read) and the
    `model` config node: the one place the sizes, the checks and the auto rule live."""
    model_type = str(values.get("model_type"))
    defaults = DEFAULTS.get(model_type, {})

    def get(key: str, default_when_unknown=None):
        for k in (key, ALIASES.get(key)):
            if k is not None and k in values:
                return values[k]
        for k in (key, ALIASES.get(key)):
            if k is not None and k in defaults:
                return defaults[k]
        return default_when_unknown

    def size(key: str) -> int:
        value = get(key)
        if value is None:
            raise ConfigError(
                f"{name}: no {key} (model_type={model_type!r} has no default here: spell the "
                "sizes out)"
            )
        return int(value)

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    kv_heads = get("num_key_value_heads")
    ffn = get("intermediate_size")
    positions = get("max_position_embeddings")
    if max_length is not None and positions is not None and int(max_length) > int(positions):
        raise ConfigError(
            f"max_length={max_length}: above the model's max_position_embeddings={positions} "
            f"({name})"
        )
    aux = model_cfg.get("router_aux_loss_coef")
    if aux is None:
        aux = get("router_aux_loss_coef", 0.0) or 0.0
    return ModelSpec(
        name=name,
        model_type=model_type,
        vocab=size("vocab_size"),
        hidden=hidden,
        layers=size("num_hidden_layers"),
        heads=heads,
        kv_heads=int(heads if kv_heads is None else kv_heads),
        head_dim=int(values.get("head_dim") or hidden // heads),
        ffn=int(4 * hidden if ffn is None else ffn),  # GPT-2's n_inner null: 4 x hidden
        tied=bool(get("tie_word_embeddings", False)),
        max_positions=None if positions is None else int(positions),
        moe=_moe_spec(get, name, model_cfg, max_length, float(aux)),
        dtype=str(model_cfg.get("dtype", "float32")),
        gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing", False)),
        pretrained=pretrained,
        values=MappingProxyType(dict(values)),
    )


def _moe_spec(
    get, name: str, model_cfg: DictConfig, max_length: int | None, aux: float
) -> MoESpec | None:
    """Mixtral's experts (`num_local_experts` > 1), else None. The auto rule is resolved and
    the MoE keys are checked here for every model."""
    capacity_factor = model_cfg.get("capacity_factor", 0)
    implementation = resolve_implementation(model_cfg.get("moe_implementation"), capacity_factor)
    check_experts(implementation, capacity_factor)  # the keys as given, named in the message
    experts = get("num_local_experts")
    if not experts or int(experts) <= 1:
        return None
    top_k = get("num_experts_per_tok")
    if top_k is None:
        raise ConfigError(f"{name}: num_local_experts without num_experts_per_tok")
    return MoESpec(
        num_experts=int(experts),
        top_k=int(top_k),
        implementation=implementation,
        capacity_factor=float(capacity_factor),
        group_tokens=None if max_length is None else int(max_length),
        aux_loss_coef=aux,
    )
