"""Asynchronous checkpoint saves (async_checkpointing; clm.checkpoint.AsyncSaver).

The state is staged to host memory at the save step and written by a background thread: the
files are those a synchronous save writes (bitwise, on XLA too), SIGTERM and the end of the run
wait for the commit, a resumed run is exact, and a failed background write stops the run with
the synchronous save's one-line error, the previous checkpoint intact.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import RUN_CLM, clean_env, sigterm_after_records
from test_xla import needs_xla, run_xla_script

from clm import checkpoint
from clm.errors import OutputWriteError
from clm.metrics import read_metrics

SMALL = ["max_length=64", "n_eval_examples=5", "target_eval_loss=0", "progress_bar=false"]


def tiny(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_saver_writes_the_state_of_the_step_and_raises_a_failure_at_wait(tmp_path):
    model, optimizer = tiny(0)
    saver = checkpoint.AsyncSaver()
    where = saver.save(tmp_path, 1, model, optimizer, {"step": 1}, keep_last_n=1)
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # training goes on: the checkpoint keeps the staged state
        for p in model.parameters():
            p.add_(1.0)
    assert saver.wait() == where == tmp_path / "step_00000001"
    assert saver.wait() is None  # nothing in flight
    other, other_optimizer = tiny(1)
    assert checkpoint.restore(where, other, other_optimizer) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(saved, other.parameters(), strict=True))

    (tmp_path / "blocked").write_text("")  # a file where step 2's directory would go
    saver.save(tmp_path / "blocked", 2, model, optimizer, {"step": 2})
    with pytest.raises(OutputWriteError, match="could not write the checkpoint"):
        saver.wait()
    saver.save(tmp_path, 3, model, optimizer, {"step": 3}, keep_last_n=1)  # the saver goes on
    saver.finish(failing=False)
    assert checkpoint.committed(tmp_path) == [tmp_path / "step_00000003"]  # pruned after commit


def command(out, *extra):
    return [sys.executable, str(RUN_CLM), f"output_dir={out}", *SMALL, *extra]


def losses(run_dir):
    keys = ("train/loss", "train/grad_norm", "eval/loss")
    return [(r["step"], k, r[k]) for r in read_metrics(run_dir) for k in keys if k in r]


def test_sigterm_then_auto_resume_is_exact_and_equals_a_synchronous_run(tmp_path):
    """SIGTERM during an async run that saves every step: the stop waits for the save of its
    step already in flight (not a second save of it), committed before exit 143; the same
    command resumes from it; every loss equals the synchronous run's, bitwise."""
    env = clean_env(tmp_path)
    args = ["max_steps=6", "eval_frequency=2", "save_frequency=1", "keep_last_n=0"]
    sync = subprocess.run(
        command(tmp_path / "sync", *args, "async_checkpointing=false"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr[-2000:]

    run = command(tmp_path / "async", *args, "async_checkpointing=true")
    run_dir = tmp_path / "async" / "embedded_default"
    # at step 1's record, five steps before the end: the signal always arrives mid-run
    returncode, stderr = sigterm_after_records(run, env, run_dir / "metrics.jsonl", records=1)
    assert returncode == 143, stderr[-2000:]
    (line,) = stderr.strip().splitlines()
    step = int(line.split("after step ")[1].split(";")[0])
    assert line.endswith(
        f"saved {run_dir}/checkpoints/step_{step:08d}; rerun the same command to resume"
    )
    assert (
        checkpoint.latest(run_dir / "checkpoints") == run_dir / "checkpoints" / f"step_{step:08d}"
    )

    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(step {step})" in again.stdout
    assert losses(run_dir) == losses(tmp_path / "sync" / "embedded_default")
    final = checkpoint.read_trainer_state(checkpoint.latest(run_dir / "checkpoints"))
    assert final["step"] == 6 and final["finished"]


def test_a_failed_background_write_stops_the_run_and_keeps_the_previous_one(tmp_path):
    args = command(tmp_path, "save_frequency=2", "async_checkpointing=true")
    env = clean_env(tmp_path)
    run_dir = tmp_path / "embedded_default"
    step2, step4 = (run_dir / "checkpoints" / f"step_0000000{n}" for n in (2, 4))
    first = subprocess.Popen(
        args + ["max_steps=400"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not step2.exists():
        time.sleep(0.02)
    first.kill()
    first.wait()

    # no file over 5 MB from here (a checkpoint's shard is ~130 MB): the step-4 write fails in
    # the background, and the step-6 save (which waits for it first) reports it
    limit = 5_000_000
    again = subprocess.run(
        args + ["max_steps=400"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert again.returncode == 1, again.stderr[-2000:]
    took_over, line = again.stderr.strip().splitlines()  # first: the killed run's lease
    assert took_over.startswith(f"warning: {run_dir}/.lease.json: took over the lease of a run ")
    assert took_over.endswith(f": process {first.pid} has exited)")
    assert line.startswith(f"error: {step4}: could not write the checkpoint (EFBIG: File too large")
    assert line.endswith(
        f"the previous checkpoint {step2} is intact; free space and rerun the same command to "
        "resume"
    )
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # training went on while step 4 was being written
    assert checkpoint.read_trainer_state(step2)["step"] == 2
    assert checkpoint.has_optimizer_state(step2)


ASYNC_XLA_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from clm import checkpoint
    from clm.backends.xla_backend import XlaBackend
    from clm.errors import OutputWriteError
    from clm.model import build_model
    from conftest import model_spec

    backend = XlaBackend(1, 1)
    model = backend.wrap_model(
        build_model(model_spec(config_path="mixtral_small.json"), backend.init_device, 0)
    )
    optimizer = backend.optimizer_class("ADAMW_TORCH_XLA")(model.parameters(), lr=1e-2)
    batch = backend.to_device({"input_ids": torch.arange(8 * 16).reshape(8, 16) % 1000})

    def step():
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        backend.step_boundary()  # launched only: staging must wait for it

    tmp = sys.argv[1]
    step()
    saver = checkpoint.AsyncSaver()
    saver.save(f"{tmp}/async", 1, model, optimizer, {"step": 1}, stage=backend.stage_checkpoint)
    for _ in range(2):  # the device trains on while the thread writes step 1
        step()
    out = {"async": str(saver.wait()), "own_group": saver.process_group is not backend.process_group}
    # the same model at step 3, saved both ways
    checkpoint.save(f"{tmp}/sync", 3, model, optimizer, {"step": 3},
                    **backend.checkpoint_options(load=False))
    saver.save(f"{tmp}/async", 3, model, optimizer, {"step": 3}, stage=backend.stage_checkpoint)
    saver.wait()
    # a write that fails in the background: no file over 1 MB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    step()
    saver.save(f"{tmp}/async", 4, model, optimizer, {"step": 4}, stage=backend.stage_checkpoint)
    try:
        saver.wait()
    except OutputWriteError as e:
        out["error"] = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    backend.close()
    print(json.dumps(out))
""")


def _load_on_cpu(path):
    from conftest import model_spec
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from clm.model import build_model

    model = build_model(model_spec(config_path="mixtral_small.json"), torch.device("cpu"), 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = checkpoint.restore(path, model, optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat = {f"model.{k}": v for k, v in model_sd.items()}
    for name, values in optim_sd["state"].items():
        flat.update({f"optim.{name}.{k}": v for k, v in values.items()})
    return state, flat


@needs_xla
def test_an_async_save_on_xla_writes_what_a_sync_save_writes(tmp_path):
    """fsdp=4: staged local shards, written by the saver's thread over its own gloo group while
    the device trains on, give the files of the synchronous SPMD save (the same chunks, the
    same values: the CPU backend loads both bitwise equal); a write that fails in the
    background raises the one-line OutputWriteError at wait, the previous checkpoint intact."""
    from torch.distributed.checkpoint import FileSystemReader

    out = run_xla_script(tmp_path, ASYNC_XLA_SCRIPT, str(tmp_path))
    assert out["async"] == f"{tmp_path}/async/step_00000001" and out["own_group"]
    sync, async_ = tmp_path / "sync" / "step_00000003", tmp_path / "async" / "step_00000003"
    chunks = [
        {
            k: getattr(v, "chunks", None)
            for k, v in FileSystemReader(str(p)).read_metadata().state_dict_metadata.items()
        }
        for p in (sync, async_)
    ]
    assert chunks[0] == chunks[1]
    assert len(chunks[0]["model.model.embed_tokens.weight"]) == 4  # a chunk per device shard
    (sync_state, sync_sd), (async_state, async_sd) = _load_on_cpu(sync), _load_on_cpu(async_)
    assert sync_state == async_state == {"step": 3}
    assert sync_sd.keys() == async_sd.keys()
    assert [k for k in sync_sd if not torch.equal(sync_sd[k], async_sd[k])] == []
    # step 1 was written while steps 2 and 3 ran: it holds step 1's weights, not later ones
    _, step1 = _load_on_cpu(tmp_path / "async" / "step_00000001")
    embed = "model.embed_tokens.weight"
    assert not torch.equal(step1[f"model.{embed}"], async_sd[f"model.{embed}"])
    assert int(step1[f"optim.{embed}.step"]) == 1
    assert int(async_sd[f"optim.{embed}.step"]) == 3

    step4 = tmp_path / "async" / "step_00000004"
    (line,) = out["error"].splitlines()  # the reason: EFBIG, or torch.save's short write
    assert line.startswith(f"{step4}: could not write the checkpoint (")
    assert f"the previous checkpoint {async_} is intact" in line
    assert checkpoint.committed(tmp_path / "async")[-1] == async_
    names = sorted(p.name for p in (tmp_path / "async").iterdir())
    assert names == ["step_00000001", "step_00000003"]  # step 4's partial directory removed
