"""Checkpoints: atomic commit, pruning, clear errors, and exact resume after SIGKILL."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import fsspec
import golden
import pytest
import torch
from conftest import ROOT, RUN_CLM, clean_env, tensorboard_scalars

from clm import checkpoint
from clm.config import CLM_DIR
from clm.metrics import read_metrics


def tiny(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_commit_prune_and_restore_exactly(tmp_path):
    model, opt = tiny(0)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, {"step": step}, keep_last_n=2)
    # a save that crashed half-way: a real save's files, its largest shard cut in half and the
    # metadata (written last) not there yet
    partial = tmp_path / "step_00000009.partial"
    shutil.copytree(tmp_path / "step_00000003", partial)
    shard = max((f for f in partial.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (partial / ".metadata").unlink()
    assert [p.name for p in checkpoint.committed(tmp_path)] == ["step_00000002", "step_00000003"]
    assert checkpoint.latest(tmp_path).name == "step_00000003"

    other, other_opt = tiny(1)
    state = checkpoint.restore(checkpoint.latest(tmp_path), other, other_opt)
    assert state == {"step": 3}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(4, 8)
    for m, o in ((model, opt), (other, other_opt)):
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)  # the optimizer moments came back too

    # the same step saved again replaces the crashed attempt's files
    checkpoint.save(tmp_path, 9, model, opt, {"step": 9}, keep_last_n=2)
    assert [p.name for p in checkpoint.committed(tmp_path)] == ["step_00000003", "step_00000009"]
    assert not partial.exists()
    assert checkpoint.restore(checkpoint.latest(tmp_path), other, other_opt) == {"step": 9}


def test_corrupt_checkpoint_names_the_path_and_the_previous_one_loads(tmp_path):
    model, opt = tiny(0)
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, opt, {"step": step})
    shard = next((tmp_path / "step_00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(checkpoint.CheckpointError, match="step_00000002: unreadable checkpoint"):
        checkpoint.restore(tmp_path / "step_00000002", *tiny(1))
    assert checkpoint.restore(tmp_path / "step_00000001", *tiny(1)) == {"step": 1}
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.restore(tmp_path, *tiny(1))


def url_root(request, tmp_path, protocol: str) -> str:
    """A fresh checkpoint root: memory:// and file:// are real fsspec filesystems; gs:// is the
    real gcsfs client against a GCS API emulator (conftest `gcs_bucket`)."""
    if protocol == "gs":
        return f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}/ckpts"
    return f"memory://{tmp_path.name}/ckpts" if protocol == "memory" else f"file://{tmp_path}/c"


@pytest.mark.parametrize("protocol", ["memory", "file", "gs"])
def test_url_save_dir_commits_by_marker_prunes_and_restores(request, tmp_path, protocol):
    """On an fsspec URL (gs:// in production) a checkpoint counts once its COMMITTED marker
    exists: no rename there."""
    root = url_root(request, tmp_path, protocol)
    fs, path = fsspec.core.url_to_fs(root)
    model, opt = tiny(0)
    for step in (1, 2, 3):
        checkpoint.save(root, step, model, opt, {"step": step}, keep_last_n=2)
    # the same step again (the end-of-run save): written aside, then copied over
    checkpoint.save(root + "/", 3, model, opt, {"step": 3, "finished": True}, keep_last_n=2)
    checkpoint.save(root, 4, model, opt, {"step": 4}, keep_last_n=0)
    fs.rm(f"{path}/step_00000004/{checkpoint.COMMIT_MARKER}")  # as if it crashed before it
    assert fs.exists(f"{path}/step_00000004/.metadata")
    assert checkpoint.committed(root) == [f"{root}/step_00000002", f"{root}/step_00000003"]
    assert not fs.exists(f"{path}/step_00000001") and not fs.exists(f"{path}/step_00000003.partial")

    other, other_opt = tiny(1)
    state = checkpoint.restore(checkpoint.latest(root), other, other_opt)
    assert state == {"step": 3, "finished": True}
    assert checkpoint.read_trainer_state(f"{root}/step_00000002") == {"step": 2}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    checkpoint.save(root, 4, model, opt, {"step": 4}, keep_last_n=2)  # replaces the leftover
    assert checkpoint.latest(root) == f"{root}/step_00000004"
    checkpoint.remove_tree(root)
    assert checkpoint.committed(root) == [] and not fs.exists(path)


ARGS = [
    "max_length=128",
    "n_eval_examples=20",
    "target_eval_loss=0",
    "max_steps=14",
    "eval_frequency=4",
    "save_frequency=4",
    "keep_last_n=0",
    "progress_bar=false",
]


def command(out, train_data=None):
    data = [f"dataset.train_dataset_path={train_data}"] if train_data else []
    return [sys.executable, str(RUN_CLM), f"output_dir={out}", *ARGS, *data]


def corrupt_consumed_records(position):
    """Make every record the checkpointed steps consumed unparsable (same line count): a resume
    that replayed (re-read and re-tokenized) them would stop with a DataError."""
    assert position["epoch"] == 0 and position["shard"] == 0, position  # no earlier shard
    shard = position["shard_file"]
    with gzip.open(shard, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    consumed = position["line"]
    assert 0 < consumed < len(lines)
    lines[:consumed] = ["{consumed: not JSON any more"] * consumed
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def float32(value: float) -> float:
    """A float as TensorBoard stores a scalar."""
    return struct.unpack("f", struct.pack("f", value))[0]


def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    env = clean_env(tmp_path)
    train_data = tmp_path / "train_data"  # a copy: the resume below corrupts what it consumed
    train_data.mkdir()
    for shard in (CLM_DIR / "sample_data").glob("c4-train.*"):
        shutil.copy(shard, train_data)
    # the uninterrupted run's numbers: tests/golden/embedded_default_14_steps.json (bitwise on
    # the machine class that wrote it, see tests/golden.py)

    killed = tmp_path / "killed"
    run_dir = killed / "embedded_default"
    proc = subprocess.Popen(
        command(killed, train_data), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while time.time() < deadline:  # kill after the step-4 save, in the middle of step 5-7
        metrics = run_dir / "metrics.jsonl"
        if (run_dir / "checkpoints" / "step_00000004").exists() and metrics.exists():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x]
            if steps and max(steps) >= 5:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step_00000012").exists()
    resume_from = checkpoint.latest(run_dir / "checkpoints")
    corrupt_consumed_records(checkpoint.read_trainer_state(resume_from)["data"])

    again = subprocess.run(
        command(killed, train_data), env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    # the killed run's lease is stale at once (its process is gone): taken over, one warning
    [warning] = [line for line in again.stderr.splitlines() if "lease" in line]
    assert warning.startswith(f"warning: {run_dir}/.lease.json: took over the lease of a run ")
    assert f"that is gone (host {socket.gethostname()} pid {proc.pid}, started " in warning
    assert warning.endswith(f": process {proc.pid} has exited)")
    assert f"restored {resume_from} (step " in again.stdout
    assert "data stream: epoch 0, " in again.stdout  # from the saved position, not a replay
    assert "Stopped at max_steps=14: 14 steps, 14,336 tokens, " in again.stdout
    assert "in this process (resumed at step " in again.stdout

    resumed = read_metrics(run_dir)
    golden.check("embedded_default_14_steps", resumed)  # same floats, same steps, each once
    # TensorBoard too: the killed run's steps after the checkpoint are hidden, not doubled
    for key in ("train/loss", "eval/loss"):
        want = [(r["step"], float32(r[key])) for r in resumed if key in r]
        assert tensorboard_scalars(run_dir, key) == want, key
    # the resumed segment's MLPerf log is whole: one run_start, one run_stop
    log = (run_dir / "mlperf_compliance.log").read_text()
    assert log.count('"key": "run_start"') == 1 and log.count('"key": "run_stop"') == 1
    assert list(run_dir.glob("mlperf_compliance.log.before-resume-at-step-*"))
    final = checkpoint.read_trainer_state(checkpoint.latest(run_dir / "checkpoints"))
    assert final["step"] == 14 and final["finished"]

    # a finished run is not resumed again: the same command is refused, nothing touched
    before = (run_dir / "metrics.jsonl").read_bytes()
    third = subprocess.run(command(killed), env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 2 and "already holds a run" in third.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    # overwrite_output_dir=true after a finished run starts afresh, as `make run` does
    fresh = subprocess.run(
        command(killed) + ["overwrite_output_dir=true", "max_steps=4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert "restored" not in fresh.stdout
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.committed(run_dir / "checkpoints")] == ["step_00000004"]


# Runs run_clm.py as the user's command does (runpy, as __main__) with one function wrapped so
# that the process SIGKILLs itself at a chosen point, once the step-4 checkpoint is committed:
# the wrapper picks the moment; the kill, the files it leaves and the resume are real.
KILL_AT = """
import os, runpy, signal, sys
from pathlib import Path

point, after, root = sys.argv[1], Path(sys.argv[2]), sys.argv[3]  # then run_clm.py's argv
sys.path.insert(0, root)
calls = 0


def kill_on(n):
    global calls
    if after.exists():
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)


if point == "data":  # mid-batch: the loader has produced 3 of the next step's rows
    from clm import data

    next_block = data._StreamingBlocks.__next__

    def __next__(self):
        kill_on(4)
        return next_block(self)

    data._StreamingBlocks.__next__ = __next__
elif point == "eval":  # after the first batch of the next eval
    from clm import data

    eval_batches = data.EvalSet.batches

    def batches(self, rows):
        for batch in eval_batches(self, rows):
            yield batch
            kill_on(1)

    data.EvalSet.batches = batches
elif point == "save":  # the next save's shard file half written: 10 tensors in, no metadata
    from torch.distributed.checkpoint import filesystem

    write_item = filesystem._write_item

    def _write_item(*args, **kwargs):
        kill_on(10)
        return write_item(*args, **kwargs)

    filesystem._write_item = _write_item
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_while_loading_data_then_evaluating_then_saving_each_resumed_exactly(tmp_path):
    """SIGKILL at three more points, each followed by the same command: inside the data loader
    (mid-batch, after the step-4 save), inside the step-8 eval (after its first batch), inside
    the step-8 save (its shard file half written, no metadata). Each resume starts from the
    latest committed checkpoint (step 4), and the run's logged values end up the uninterrupted
    run's (tests/golden/embedded_default_14_steps.json)."""
    env = clean_env(tmp_path)
    script = tmp_path / "kill_at.py"
    script.write_text(KILL_AT)
    args = command(tmp_path / "killed")
    run_dir = tmp_path / "killed" / "embedded_default"
    checkpoints = run_dir / "checkpoints"

    def kill_at(point: str, after: str) -> list[int]:
        """Run the command until it kills itself at `point` once checkpoint `after` exists;
        the steps it logged."""
        wrapped = [sys.executable, str(script), point, str(checkpoints / after), str(ROOT)]
        proc = subprocess.run(
            wrapped + args[1:], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]

    steps = kill_at("data", "step_00000004")
    assert max(steps) in (4, 5) and checkpoint.latest(checkpoints).name == "step_00000004"

    steps = kill_at("eval", "step_00000004")  # resumed at 4; the step-8 eval precedes its save
    evals = [r["step"] for r in read_metrics(run_dir) if "eval/loss" in r]
    assert max(steps) == 8 and evals == [4]

    steps = kill_at("save", "step_00000004")  # resumed at 4 again: the step-8 save is cut
    assert max(steps) == 8
    partial = checkpoints / "step_00000008.partial"
    [shard] = partial.glob("*.distcp")  # some tensors in, no metadata, no trainer state
    assert 0 < shard.stat().st_size and not (partial / ".metadata").exists()
    assert not (partial / checkpoint.TRAINER_FILE).exists()
    latest = checkpoint.latest(checkpoints)
    assert latest.name == "step_00000004"

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"restored {latest} (step " in again.stdout
    assert "Stopped at max_steps=14: 14 steps, 14,336 tokens, " in again.stdout
    golden.check("embedded_default_14_steps", read_metrics(run_dir))
    assert not list(checkpoints.glob("*.partial"))


@pytest.mark.parametrize("protocol", ["file", "gs"])
def test_a_run_saves_to_and_restores_from_a_url(request, tmp_path, protocol):
    """save_dir and checkpoint_manager_path as fsspec URLs that two processes share (file://,
    and gs:// on the GCS API emulator): saved, pruned, restored, going on exactly."""
    url = url_root(request, tmp_path, protocol)
    env = clean_env(tmp_path)
    base = [sys.executable, str(RUN_CLM), *ARGS, "max_steps=3", "keep_last_n=2"]
    first = subprocess.run(
        [*base, f"output_dir={tmp_path / 'a'}", f"save_dir={url}", "save_frequency=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    assert checkpoint.committed(url) == [f"{url}/step_00000002", f"{url}/step_00000003"]
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/.lease.json")  # the save_dir's lease, released at the end
    step2 = f"{url}/step_00000002"

    second = subprocess.run(
        [*base, f"output_dir={tmp_path / 'b'}", f"checkpoint_manager_path={step2}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr
    assert f"restored {step2} (step 2)" in second.stdout
    assert "data stream: epoch 0, " in second.stdout
    expected = read_metrics(tmp_path / "a" / "embedded_default")
    resumed = read_metrics(tmp_path / "b" / "embedded_default")
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        want = [(r["step"], r[key]) for r in expected if key in r and r["step"] > 2]
        assert [(r["step"], r[key]) for r in resumed if key in r] == want, key


class Payload:
    """Pickles as a call of `call(arg)`: what a crafted checkpoint would run when unpickled."""

    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("protocol", ["local", "file"])
def test_a_crafted_metadata_pickle_is_refused_and_never_runs(tmp_path, call, protocol):
    """DCP's `.metadata` is a pickle: restore unpickles it with DCP's own classes only."""
    import builtins

    model, opt = tiny(0)
    root = tmp_path if protocol == "local" else f"file://{tmp_path}"
    where = checkpoint.save(root, 1, model, opt, {"step": 1})
    sentinel = tmp_path / "ran"
    if call == "os.system":
        payload = Payload(os.system, f"touch {sentinel}")
        refused = f"{os.system.__module__}.system"  # posix.system
    else:
        payload = Payload(builtins.eval, f"open({str(sentinel)!r}, 'w').close()")
        refused = "builtins.eval"
    metadata = tmp_path / "step_00000001" / ".metadata"
    real = checkpoint._reader(checkpoint.location(where)).read_metadata()
    real.planner_data = payload  # anywhere inside real metadata
    metadata.write_bytes(pickle.dumps(real))
    for attempt in (
        lambda: checkpoint.restore(where, *tiny(1)),
        lambda: checkpoint.restore(where, tiny(1)[0], None),
        lambda: checkpoint.has_optimizer_state(where),
    ):
        with pytest.raises(checkpoint.CheckpointError) as raised:
            attempt()
        (line,) = str(raised.value).splitlines()
        assert line.startswith(f"{where}/.metadata: refused to load {refused} "), line
        assert not sentinel.exists()


def test_optimizer_values_in_the_shards_load_as_plain_values_only(tmp_path):
    """Non-tensor state (AdamW's hyperparameters) is a pickle inside the shards too; DCP's
    default planner loads it with weights_only=False, ours with weights_only=True."""
    import builtins

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = tiny(0)
    sentinel = tmp_path / "ran"
    model_sd, optim_sd = get_state_dict(model, opt)
    optim_sd["param_groups"][0]["lr"] = Payload(builtins.eval, f"open({str(sentinel)!r}, 'w')")
    with checkpoint._quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "c"))
    with pytest.raises(checkpoint.CheckpointError, match=r"other than plain data \(refused"):
        checkpoint.restore(tmp_path / "c", *tiny(1))
    assert not sentinel.exists()
