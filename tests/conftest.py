"""Shared helpers: run `run_clm.py` in a subprocess exactly as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLM = ROOT / "clm"
RUN_CLM = CLM / "run_clm.py"


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HOME"] = str(tmp_path / "hf_home")  # datasets/transformers write lock files there
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("PJRT_DEVICE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_python(tmp_path: Path, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python argv...` from the repository root with the clean environment."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_clm(tmp_path: Path, *overrides: str, cwd: Path = ROOT, timeout: int = 600):
    """`python clm/run_clm.py overrides...` with output under tmp_path; returns CompletedProcess."""
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", "progress_bar=false"]
    return subprocess.run(
        args + list(overrides),
        cwd=cwd,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def model_cfg(**overrides):
    """A `model` config node (the keys of clm/config/model/blank_model.yaml)."""
    from omegaconf import OmegaConf

    base = {
        "config_path": None,
        "name_or_path": None,
        "dtype": "float32",
        "capacity_factor": 0,
        "moe_implementation": None,
        "router_aux_loss_coef": None,
        "gradient_checkpointing": False,
    }
    return OmegaConf.create({**base, **overrides})


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_home"


def tiny_mixtral_config():
    """A 2-layer, 8-expert Mixtral with the real vocabulary: HF checkpoints for the import tests."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        use_cache=False,
    )
