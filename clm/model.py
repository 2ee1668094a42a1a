"""Build the HF model (Mixtral, or any causal LM for the dry runs) and compute its losses.

`model.config_path` builds a randomly initialized model: parameters are created on the meta
device (no memory), then materialized on the target device and initialized there, so a large
model is never built twice on the host. `model.name_or_path` without a config_path loads a
pretrained local directory (safetensors only, no remote code).

Losses follow the reference: next-token NLL, token-mean over unmasked labels; in training the
Switch load-balancing loss times `router_aux_loss_coef` is added (eval reports the NLL alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from clm.config import resolve_config_file
from clm.data import IGNORE_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_hf_config(model_cfg: DictConfig) -> PretrainedConfig:
    if model_cfg.config_path is not None:
        path = resolve_config_file(model_cfg.config_path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if "model_type" not in values:
            raise ValueError(f"{path}: no 'model_type' key (e.g. \"mixtral\")")
        values.pop("transformers_version", None)
        config = AutoConfig.for_model(**values)
    else:
        config = _pretrained_config(model_cfg.name_or_path)
    if model_cfg.router_aux_loss_coef is not None:
        config.router_aux_loss_coef = float(model_cfg.router_aux_loss_coef)
    config.use_cache = False
    return config


def _pretrained_config(name_or_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError as e:
        raise ValueError(
            f"model.name_or_path={name_or_path}: not a local model directory and not in the "
            "local HF cache (nothing is downloaded); point it at a directory with config.json, "
            "or set model.config_path"
        ) from e


def check_safetensors(directory: Path) -> list[Path]:
    """The directory's safetensors files, each checked to be whole (header and data length).

    Reads only the headers, so a truncated or corrupt shard is named before any weight is read.
    Pickle checkpoints (*.bin) are never loaded: they can execute code.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory}: no *.safetensors files (pickle *.bin checkpoints are not loaded; "
            "convert them to safetensors)"
        )
    for path in files:
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(header_len))
            data_end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors file ({e})") from e
        if 8 + header_len + data_end != size:
            raise ValueError(
                f"{path}: truncated or corrupt safetensors file ({size} bytes, header says "
                f"{8 + header_len + data_end})"
            )
    return files


def load_pretrained(name_or_path: str, config: PretrainedConfig, dtype: torch.dtype):
    """A local HF checkpoint: safetensors only, no remote code, nothing downloaded."""
    if Path(name_or_path).is_dir():
        check_safetensors(Path(name_or_path))
    return AutoModelForCausalLM.from_pretrained(
        name_or_path,
        config=config,
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )


def is_moe(config: PretrainedConfig) -> bool:
    return getattr(config, "num_local_experts", 0) > 1


def build_model(model_cfg: DictConfig, device: torch.device, seed: int) -> PreTrainedModel:
    """The model on `device`, in `model.dtype`, in train mode."""
    config = build_hf_config(model_cfg)
    _configure_experts(config, model_cfg)
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.config_path is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.to_empty(device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights()  # also recomputes the rotary buffers lost on the meta device
    else:
        model = load_pretrained(model_cfg.name_or_path, config, dtype).to(device)
    if model_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def _configure_experts(config: PretrainedConfig, model_cfg: DictConfig) -> None:
    """Select the experts implementation (clm.moe) for MoE models."""
    if not is_moe(config):
        return
    from clm import moe

    name = moe.resolve_implementation(model_cfg.moe_implementation, model_cfg.capacity_factor)
    moe.configure_moe(config, name, float(model_cfg.capacity_factor))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token): for MoE, only top_k of num_experts expert weights are active."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    if not is_moe(config):
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * config.num_experts_per_tok // config.num_local_experts
    return total, active


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL over unmasked labels, number of those labels), in fp32.

    The labels are shifted (left by one, padded with the ignore index), not the logits: slicing
    the [B, S, V] logits would copy them in the forward and again in the backward (measured:
    the whole train step of the embedded default went from 0.82x to 0.99x stock HF's).
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], with_aux: bool):
    """(nll sum, target count, aux loss or None) for one batch."""
    kwargs = {"output_router_logits": True} if with_aux and is_moe(model.config) else {}
    out = model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    total, count = nll_sum(out.logits, batch["labels"])
    aux = getattr(out, "aux_loss", None) if kwargs else None
    return total, count, aux


def save_config(model: PreTrainedModel, path: Path) -> None:
    model.config.to_json_file(str(path))
