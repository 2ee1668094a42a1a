"""Faults: each drives run_clm.py in a subprocess and checks exit code, message and kept files."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import CLM, RUN_CLM, clean_env, run_clm, sigterm_after_records

from clm import checkpoint, data
from clm import config as config_lib
from clm.metrics import read_metrics

SMALL = ["max_length=64", "n_eval_examples=5", "target_eval_loss=0"]


def mlperf_stops(run_dir):
    lines = (run_dir / "mlperf_compliance.log").read_text().splitlines()
    return [json.loads(x.split(" ", 1)[1]) for x in lines if '"key": "run_stop"' in x]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_clm(
        tmp_path, *SMALL, "lr=1e5", "sched.warmup_steps=0", "max_grad_norm=0", "save_frequency=1"
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: non-finite loss or gradient norm at step 2: loss="
        + proc.stderr.split("loss=")[1].split(",")[0]
        + ", grad_norm=nan"
    ]
    run_dir = tmp_path / "runs" / "embedded_default"
    assert [s["metadata"]["status"] for s in mlperf_stops(run_dir)] == ["aborted"]
    kept = checkpoint.committed(run_dir / "checkpoints")
    assert [p.name for p in kept] == ["step_00000001"]
    assert checkpoint.read_trainer_state(kept[0])["step"] == 1


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path}", *SMALL]
    args += ["max_steps=400", "save_frequency=1000", "progress_bar=false"]
    env = clean_env(tmp_path)
    metrics = tmp_path / "embedded_default" / "metrics.jsonl"
    returncode, stderr = sigterm_after_records(args, env, metrics, records=3)
    assert returncode == 143, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("stopped: SIGTERM: stopped after step ")
    step = int(line.split("after step ")[1].split(";")[0])
    assert line.endswith(
        f"saved {tmp_path}/embedded_default/checkpoints/step_{step:08d}; "
        "rerun the same command to resume"
    )
    again = subprocess.run(
        args[:-3] + ["max_steps=" + str(step + 2), "save_frequency=1000", "progress_bar=false"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert f"(step {step})" in again.stdout
    steps = [r["step"] for r in read_metrics(tmp_path / "embedded_default") if "train/loss" in r]
    assert steps == list(range(1, step + 3))


def test_ctrl_c_or_a_kill_before_the_first_step_leaves_a_directory_the_same_command_accepts(
    tmp_path,
):
    """Ctrl-C while the run starts up: one line, exit 130. Killed before its first step (the
    mixtral80 dry run killed for memory did that): an empty metrics.jsonl and no checkpoint,
    which the same command then replaces instead of refusing as "already holds a run"."""
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path}", "max_steps=1"]
    args += ["n_eval_examples=5", "progress_bar=false"]
    env = clean_env(tmp_path)
    run_dir = tmp_path / "embedded_default"

    def start_and_signal_when(path, signum, command=args):
        # SIGINT as a terminal delivers it, also where this suite runs in a background job
        # (whose shell ignores SIGINT, an ignored signal its children inherit)
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 300
        while time.time() < deadline and not path.exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signum)
        try:
            return proc, *proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:  # it did not stop: never leave it waiting on the pipe
                proc.kill()
                proc.wait()

    # Ctrl-C while the eval set loads: its file is a named pipe nobody writes, so the run is
    # held there (after the run directory's preparation wrote the MLPerf log) until the signal
    stalled = tmp_path / "stalled_eval"
    stalled.mkdir()
    os.mkfifo(stalled / data.VALIDATION_FILE)
    interrupted = [*args, f"dataset.eval_dataset_path={stalled}"]
    proc, _, stderr = start_and_signal_when(
        run_dir / "mlperf_compliance.log", signal.SIGINT, interrupted
    )
    assert proc.returncode == 130
    assert stderr.splitlines() == [
        "stopped: SIGINT (Ctrl-C) outside the training loop; nothing was saved: rerun the same "
        "command (it resumes from the latest checkpoint, if any)"
    ]
    metrics = run_dir / "metrics.jsonl"
    proc, _, _ = start_and_signal_when(metrics, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert metrics.read_text() == "" and not (run_dir / "checkpoints").exists()

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1]
    log = (run_dir / "mlperf_compliance.log").read_text()
    assert log.count('"key": "init_start"') == 1  # the killed run's leftovers were replaced


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_written(tmp_path):
    """4096 sequences of 4096 tokens per step on the embedded model: clm.plan's estimate far
    exceeds any host's memory, so the run stops before building anything, naming the estimate,
    the free memory and the smaller micro-batch (same global batch) that would fit."""
    from clm.trainer import run

    big = ["per_device_train_batch_size=4096", "max_length=4096", "max_steps=1"]
    with pytest.raises(config_lib.ConfigError) as error:  # in process: run_clm prints one line
        run(config_lib.compose([f"output_dir={tmp_path / 'runs'}", *big]))
    line = str(error.value)
    match = re.fullmatch(
        r"memory: this run needs about ([\d.]+) GiB per device by clm\.plan's estimate "
        r"\(parameters, gradients and AdamW state [\d.]+ GiB in float32\) but cpu \(.*\) has "
        r"([\d.]+) GiB free \(([\d.]+) GiB usable\); these overrides would fit: "
        r"per_device_train_batch_size=(\d+) gradient_accumulation_steps=(\d+) \(([\d.]+) GiB\); "
        r"check_memory=false starts anyway",
        line,
    )
    assert match, line
    need, free, usable, rows, accumulation, fits = map(float, match.groups())
    assert need > free > usable >= fits and rows * accumulation == 4096
    assert not (tmp_path / "runs").exists()

    # check_memory=false: the same estimate as a warning, and the run goes on (stopped here)
    forced = subprocess.Popen(
        [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *big]
        + ["check_memory=false", "progress_bar=false"],
        env=clean_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    warning = forced.stderr.readline()
    running = forced.poll() is None
    forced.kill()
    forced.wait()
    assert warning.startswith("warning: memory: this run needs about ")
    assert warning.rstrip().endswith("GiB usable); check_memory=false: starting anyway")
    assert running


def test_the_memory_check_names_what_would_fit(monkeypatch):
    """The reference's mixtral80 dry run (1.7B parameters, fp32 AdamW: 25.5 GiB of state) with
    22 GiB free, as on the 24 GiB laptop of issue 18: only bfloat16 fits; with 2 GiB free
    nothing does and the message says to use a smaller model."""
    from clm import memory
    from clm.backends.torch_backend import TorchBackend
    from clm.spec import load_spec

    cfg = config_lib.compose(["+experiment=dry_run_mixtral80"])
    config_lib.finalize(cfg, 1)
    spec = load_spec(cfg.model, cfg.max_length)
    backend = TorchBackend(torch.device("cpu"))
    for free, fits in (
        (22, "these overrides would fit: model.dtype=bfloat16 ("),
        (2, "nothing smaller fits here (even model.gradient_checkpointing=true "),
    ):
        monkeypatch.setattr(memory, "free_bytes", lambda _backend, gib=free: gib * 2**30)
        with pytest.raises(config_lib.ConfigError) as error:
            memory.check(cfg, backend, spec)
        message = str(error.value)
        assert message.startswith("memory: this run needs about 26.")
        assert f"has {free:.1f} GiB free ({free * 0.9:.1f} GiB usable); {fits}" in message
    monkeypatch.setattr(memory, "free_bytes", lambda _backend: 40 * 2**30)
    memory.check(cfg, backend, spec)  # fits: no error


def test_skip_bad_records_counts_them(tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(CLM / "sample_data", data_dir)
    shard = data_dir / "c4-train.00768-of-01024.json.gz"
    with gzip.open(shard, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    lines[3:3] = ["{not json", '{"url": "no text"}']
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    common = [*SMALL, f"dataset.train_dataset_path={data_dir}", "shuffle=false", "max_steps=2"]
    strict = run_clm(tmp_path, *common)
    assert strict.returncode == 2
    assert (
        strict.stderr.strip()
        == f"error: {shard}:4: not a JSON line (Expecting property name enclosed in double quotes)"
    )
    lenient = run_clm(tmp_path, *common, "exp_name=lenient", "dataset.skip_bad_records=true")
    assert lenient.returncode == 0, lenient.stderr
    records = read_metrics(tmp_path / "runs" / "lenient")
    # counted as the stream consumes them (as a checkpoint's data position does): step 1's
    # 8 x 64 tokens all come from the first document, step 2's go past the 2 bad records
    assert [r["data/skipped_records"] for r in records if "train/loss" in r] == [0, 2]


def test_secrets_never_reach_the_saved_config(tmp_path):
    proc = run_clm(tmp_path, *SMALL, "max_steps=1", "+hf_token=hf_abc123", "+mlperf.api_key=k9")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "runs" / "embedded_default" / "config.yaml").read_text()
    assert "hf_abc123" not in text and "k9" not in text and "hf_abc123" not in proc.stdout
    saved = yaml.safe_load(text)
    assert saved["hf_token"] == "***" and saved["mlperf"]["api_key"] == "***"
    assert saved["dataset"]["tokenizer_sha256"].startswith("dadfd56d")  # not a secret


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_backend_cuda_without_a_gpu(tmp_path):
    from clm.trainer import run

    message = "backend=cuda: no CUDA device is visible (torch.cuda.is_available())"
    with pytest.raises(config_lib.ConfigError, match=re.escape(message) + "$"):
        run(config_lib.compose(["backend=cuda", f"output_dir={tmp_path / 'runs'}"]))
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_max_length_above_the_model(tmp_path):
    cfg_error = run_clm(tmp_path, "max_length=8192")
    assert cfg_error.returncode == 2
    assert cfg_error.stderr.strip() == (
        "error: max_length=8192: above the model's max_position_embeddings=4096 "
        "(mixtral_small.json)"
    )


def test_redaction_rule():
    values = {"hf_token": "x", "tokens_seen": 3, "tokenizer": "t", "pad_token_id": 2}
    assert config_lib.redacted({**values, "db_password": "p"}) == {
        **values,
        "hf_token": "***",
        "db_password": "***",
    }


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk (Python ignores
    SIGXFSZ, so the write returns the error instead of killing the process)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path):
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path}", *SMALL, "progress_bar=false"]
    env = clean_env(tmp_path)
    run_dir = tmp_path / "embedded_default"
    first = subprocess.Popen(
        args + ["max_steps=400", "save_frequency=2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_00000002").exists():
        time.sleep(0.05)
    first.kill()
    first.wait()

    def rerun(max_steps: int, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            args + [f"max_steps={max_steps}", "save_frequency=2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            **kwargs,
        )

    # the same command again, now unable to write any file over 5 MB (a checkpoint is ~130 MB)
    again = rerun(400, preexec_fn=_file_size_limit(5_000_000))
    assert again.returncode == 1, again.stderr[-2000:]
    step2, step4 = (run_dir / "checkpoints" / f"step_0000000{n}" for n in (2, 4))
    took_over, *lines = again.stderr.strip().splitlines()  # the killed run's lease
    assert took_over.startswith(f"warning: {run_dir}/.lease.json: took over the lease of a run ")
    assert took_over.endswith(f": process {first.pid} has exited)")
    assert lines == [
        f"error: {step4}: could not write the checkpoint (EFBIG: File too large; "
        + again.stderr.split("File too large; ")[1].split(")")[0]
        + f"); the previous checkpoint {step2} is intact; "
        "free space and rerun the same command to resume"
    ]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert checkpoint.read_trainer_state(step2)["step"] == 2
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # the records written before the failure are kept
    assert [s["metadata"]["status"] for s in mlperf_stops(run_dir)] == ["aborted"]
    # with space again, the same command resumes from step 2
    third = rerun(5)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "(step 2)" in third.stdout


METRICS_SCRIPT = """
import sys
from clm.errors import OutputWriteError
from clm.metrics import MetricsWriter, read_metrics
run_dir = sys.argv[1]
writer = MetricsWriter(run_dir)
for step in (1, 2, 3):
    writer.log(step, {"train/loss": 1.0 / step})
import resource
size = writer.path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, size + 1000))  # events file fits
try:
    writer.log(4, {"note": "x" * 5000})
except OutputWriteError as e:
    print(e)
writer.close()
print([r["step"] for r in read_metrics(run_dir)])
"""


def test_metrics_that_cannot_be_written_keep_the_earlier_records(tmp_path):
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = str(CLM.parent)
    proc = subprocess.run(
        [sys.executable, "-c", METRICS_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    error, steps = proc.stdout.strip().splitlines()
    assert error.startswith(f"{tmp_path / 'metrics.jsonl'}: could not append the step-4 record")
    assert "EFBIG" in error and error.endswith("the records before it are intact")
    assert steps == "[1, 2, 3]"  # the partial fourth line was cut off


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_metrics_are_on_disk_before_a_checkpoint_commits(tmp_path):
    """A power cut right after a checkpoint commits loses no metrics.jsonl record up to its
    step: the file is fsynced before the rename that commits the checkpoint (strace's record
    of the system calls, in order, with each descriptor's path)."""
    trace = tmp_path / "trace.txt"
    strace = ["strace", "-f", "-y", "-qq", "-e", "signal=none", "-o", str(trace)]
    strace += ["-e", "trace=fsync,fdatasync,rename,renameat,renameat2"]
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path}", *SMALL, "progress_bar=false"]
    proc = subprocess.run(
        strace + args + ["max_steps=2", "save_frequency=2", "eval_frequency=2"],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = trace.read_text().splitlines()
    synced = [i for i, c in enumerate(calls) if "sync(" in c and "metrics.jsonl>" in c]
    commit = [i for i, c in enumerate(calls) if "rename" in c and "step_00000002.partial" in c]
    assert synced and commit, "\n".join(calls[-40:])
    assert synced[0] < commit[0]
