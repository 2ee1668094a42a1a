"""Shared helpers: run `run_clm.py` in a subprocess exactly as a user would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# jax (torch_xla's Pallas and call_jax, clm.aot) on the CPU: with libtpu installed it would
# otherwise try to start a TPU runtime, asking this machine's metadata server for one
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parent.parent
CLM = ROOT / "clm"
RUN_CLM = CLM / "run_clm.py"


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HOME"] = str(tmp_path / "hf_home")  # datasets/transformers write lock files there
    # the temporary files of the processes a test starts (torchrun's torchelastic_* directories,
    # torch's) go with the test's tmp_path, which pytest removes when the test passes
    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp_path / "tmp")
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("PJRT_DEVICE", None)
    for name in [n for n in env if n.startswith("WANDB_")]:  # a developer's W&B settings
        env.pop(name)
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


def sigterm_after_records(
    args: list[str], env: dict, metrics: Path, records: int, cwd: Path | None = None
) -> tuple[int, str]:
    """Start `args`, send SIGTERM once `metrics` (a run's metrics.jsonl) holds `records` lines,
    and wait for it: (exit code, stderr)."""
    import signal
    import time

    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= records
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@contextlib.contextmanager
def paused_while_leased(proc: subprocess.Popen, directory: Path, pids=None):
    """Pause a starting run (SIGSTOP to `pids()`, default its own pid) once it holds
    `directory`'s lease (clm.lease), and resume it (SIGCONT) on leaving: a second run then
    certainly meets a live holder, which cannot finish meanwhile. Never inside one of the
    holder's lease rounds (their lock file exists only then), which would keep the second
    waiting for the lock instead of reading the lease."""
    import signal
    import time

    lease, lock = directory / ".lease.json", directory / ".lease.json.lock"
    deadline = time.time() + 300
    stopped: list[int] = []
    while not stopped:
        assert proc.poll() is None and time.time() < deadline, "the run never took its lease"
        if lease.exists():
            stopped = list(pids()) if pids else [proc.pid]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            if lock.exists():
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
                stopped = []
        time.sleep(0.01)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


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


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar as TensorBoard shows it: all of run_dir/tensorboard's event
    files read by TensorBoard's own loader, which hides the events a resumed run purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def model_cfg(**overrides):
    """A `model` config node: clm/config/model/blank_model.yaml with `config_path` unset (no
    architecture unless the test names one) and `overrides` on top."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(CLM / "config" / "model" / "blank_model.yaml")
    return OmegaConf.merge(base, {"config_path": None, **overrides})


def model_spec(max_length=None, **overrides):
    """The `clm.spec.ModelSpec` of `model_cfg(**overrides)`, as a run reads it (`max_length`:
    the run's sequence length, the experts' capacity group; None: a forward call's tokens)."""
    from clm.spec import load_spec

    return load_spec(model_cfg(**overrides), max_length)


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


GCS_BUCKET = "clm-test-bucket"


def _move_object(request, response, storage, *args, **kwargs):
    """The JSON API's objects.move (gcsfs's `mv` calls it first), which the emulator lacks:
    a copy, then a delete of the source (what the real service does atomically)."""
    from gcp_storage_emulator.handlers import objects

    params = request.params
    source = (params["bucket_name"], params["object_id"])
    try:
        moved = objects._copy(request.base_url, storage, *source, *source[:1], params["dest"])
    except objects.NotFound:
        response.status = 404
        return
    objects._delete(storage, *source)
    response.json(moved)


def _precondition_failed(request, storage) -> bool:
    """Whether a request's `ifGenerationMatch` does not hold (0: the object must not exist).

    GCS refuses such a write or delete with 412; gcp-storage-emulator (2026.7.19) ignores the
    parameter and answers 200 (e.g. `POST /upload/storage/v1/b/b/o?uploadType=media&name=lease
    &ifGenerationMatch=0` onto an existing object replaces it), so the fixture checks it itself."""
    from gcp_storage_emulator.exceptions import NotFound

    wanted = request.query.get("ifGenerationMatch")
    if not wanted:
        return False
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if name is None and isinstance(request.data, dict):  # a multipart upload names it inside
        name = request.data["meta"].get("name")
    try:
        current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
    except NotFound:
        current = "0"
    return current != wanted[0]


def _with_preconditions(handler):
    """`handler` (an upload or a delete) with GCS's generation preconditions; the emulator
    serves one request at a time, so the check and the write are one step."""
    from http import HTTPStatus

    def checked(request, response, storage, *args, **kwargs):
        _ = request.data  # read the body before answering, as the service does
        if _precondition_failed(request, storage):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json(
                {
                    "error": {
                        "code": 412,
                        "message": "At least one of the pre-conditions you specified did not hold.",
                        "errors": [{"reason": "conditionNotMet"}],
                    }
                }
            )
            return
        return handler(request, response, storage, *args, **kwargs)

    return checked


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://clm-test-bucket on a GCS JSON API emulator in this process (gcp-storage-emulator,
    in memory), reached by the real gcsfs client through STORAGE_EMULATOR_HOST, which
    subprocesses inherit (`clean_env`). Two things the emulator lacks are added here: objects.move
    and the generation preconditions (`_precondition_failed`). Yields the bucket's URL."""
    import socket

    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    route = (
        r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
        r"(?P<dest>.*[^/]+)$",
        {emulator.POST: _move_object},
    )
    checked = {objects.insert, objects.delete}  # uploads and deletes: clm.lease's preconditions
    emulator.HANDLERS = (
        route,
        *(
            (regex, {m: _with_preconditions(h) if h in checked else h for m, h in calls.items()})
            for regex, calls in emulator.HANDLERS
        ),
    )
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    gcs = emulator.create_server("localhost", port, in_memory=True, default_bucket=GCS_BUCKET)
    gcs.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://localhost:{port}"
    try:
        yield f"gs://{GCS_BUCKET}"
    finally:
        gcs.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST")
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
