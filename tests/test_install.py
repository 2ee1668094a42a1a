"""The installed package: `pip install .` into a fresh directory, then its `clm-train` console
script from another directory, with nothing of this checkout on the path."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, clean_env

from clm.metrics import read_metrics


def test_console_script_trains_from_any_directory(tmp_path):
    source = tmp_path / "source"  # pip builds in the source tree: not in this checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "clm", source / "clm", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
        + [str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0 and "setuptools" in install.stderr:
        pytest.skip(f"pip could not get the build backend here: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr[-2000:]

    env = clean_env(tmp_path)
    env["PYTHONPATH"] = str(site)  # the installed copy only (the venv supplies the dependencies)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def clm_train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(site / "bin" / "clm-train"), *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    job = clm_train("--cfg", "job", "--resolve")
    assert job.returncode == 0, job.stderr
    dataset = yaml.safe_load(job.stdout)["dataset"]
    assert dataset["train_dataset_path"] == str(site / "clm" / "sample_data")  # package data

    proc = clm_train("max_steps=1", "max_length=32", "n_eval_examples=2", "progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = elsewhere / "runs" / "embedded_default"  # runs land in the working directory
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["dataset"]["eval_dataset_path"] == str(site / "clm" / "sample_data")

    bad = clm_train("maxlength=128")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "error: maxlength=128: no such key; did you mean max_length=128?"
    ]
