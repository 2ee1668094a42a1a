"""The torchrun path (clm/backends/fsdp_backend.py) on 2 CPU processes over gloo.

Every run (but the dead-peer test's, below) is a real `torchrun --standalone --nproc_per_node=2
clm/run_clm.py backend=cpu ...` against a 1-process run of the same global batch (8 rows x 64
tokens): 2 processes x 4 rows.
The load-balancing loss is off in the parity runs (`model.router_aux_loss_coef=0`): with several
processes each computes it on its own rows (the mean over ranks, as Megatron does), which is not
the same number as one loss over all rows; `test_shards_and_aux_loss_semantics` checks that
mean exactly instead.

Measured on this model (fp32, 6 steps): train and eval losses within 1.9e-6 of the 1-process
run (1.8e-7 relative), gradient norms within 2.4e-6 (5.7e-7 relative), with FSDP alone and with
expert parallelism 2 plus activation checkpointing. A resumed 2-process run is bitwise equal to
the uninterrupted one.

A dead or hung peer (clm/watchdog.py) is tried on two processes started one by one with
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as on two nodes with a
launcher each: under torchrun the agent itself sends the survivor SIGTERM when a worker dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import golden
import pytest
from conftest import ROOT, RUN_CLM, clean_env, paused_while_leased

from clm import checkpoint
from clm.metrics import read_metrics
from clm.mlperf import check_log

# the same global batch in every run; checkpoints every 2 steps for the resume test
COMMON = [
    "backend=cpu",
    "max_length=64",
    "n_eval_examples=5",
    "max_steps=6",
    "eval_frequency=2",
    # evals at steps 2, 4, 6 give 10.14, 9.66, 9.23: the target is reached at the last step,
    # so the MLPerf log is a complete, successful run
    "target_eval_loss=9.4",
    "save_frequency=2",
    "keep_last_n=0",
    "model.router_aux_loss_coef=0",
    "progress_bar=false",
]
ONE_PROCESS = ["per_device_train_batch_size=8"]
TWO_PROCESSES = ["per_device_train_batch_size=4"]
# fp32; the measured differences are 25-35x smaller (see the module docstring)
LOSS_TOLERANCE = 5e-5
GRAD_NORM_RTOL = 2e-5


def env_for(tmp_path) -> dict[str, str]:
    env = clean_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores; the 1-process run matches it
    return env


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(tmp_path, nproc: int, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    launcher = torchrun() if nproc == 2 else [sys.executable]
    args = [*launcher, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *COMMON, *overrides]
    return subprocess.run(
        args, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=600, **kwargs
    )


def run_script(tmp_path, script: str, *overrides: str) -> dict:
    """`python -c script overrides...` in 2 torchrun processes; rank 0's `RESULT {json}`."""
    env = env_for(tmp_path)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [*torchrun(), "--no-python", sys.executable, "-c", script, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # a failing rank's own error comes first; torchrun's summary of it last
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def run_dir(tmp_path):
    return tmp_path / "runs" / "embedded_default"


@pytest.fixture(scope="module")
def one_dir(tmp_path_factory):
    """The run directory of the uninterrupted 1-process run."""
    tmp = tmp_path_factory.mktemp("one")
    proc = run(tmp, 1, *ONE_PROCESS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir(tmp)


@pytest.fixture(scope="module")
def one(one_dir):
    return read_metrics(one_dir)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(process, run directory) of the uninterrupted 2-process run."""
    tmp = tmp_path_factory.mktemp("two")
    proc = run(tmp, 2, *TWO_PROCESSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, run_dir(tmp)


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    keys = [(r["step"], k) for r in want for k in ("train/loss", "eval/loss") if k in r]
    assert keys == [(r["step"], k) for r in got for k in ("train/loss", "eval/loss") if k in r]
    assert [s for s, k in keys if k == "eval/loss"] == [2, 4, 6]
    for g, w in zip(got, want, strict=True):
        for key in ("train/loss", "eval/loss"):
            if key in w:
                assert abs(g[key] - w[key]) <= LOSS_TOLERANCE, (w["step"], key, g[key], w[key])
        if "train/grad_norm" in w:
            assert g["train/grad_norm"] == pytest.approx(w["train/grad_norm"], rel=GRAD_NORM_RTOL)
        if "train/lr" in w:
            assert g["train/lr"] == w["train/lr"]


def test_two_processes_match_one(two, one):
    proc, directory = two
    assert "float32 on 2 processes (gloo, FSDP2) on cpu" in proc.stdout
    assert "global batch 8 x 64 tokens" in proc.stdout
    assert proc.stdout.count("Target eval loss 9.4 reached: 6 steps") == 1  # rank 0 only
    assert_same_run(read_metrics(directory), one)


def test_two_processes_are_golden(two):
    """The 2-rank run's numbers, bitwise, against tests/golden/ (a refactor keeps them)."""
    golden.check("torchrun_2_ranks_6_steps", read_metrics(two[1]))


def test_rank_zero_writes_the_logs_and_every_rank_the_checkpoint(two):
    _, directory = two
    records = read_metrics(directory)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # once each
    assert sorted(p.name for p in directory.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "mlperf_compliance.log",
        "tensorboard",
    ]
    log = directory / "mlperf_compliance.log"
    ok, output = check_log(log, division="open")
    assert ok, output
    text = log.read_text()
    assert text.count('"key": "run_start"') == 1 and text.count('"key": "run_stop"') == 1
    assert text.count('"key": "eval_accuracy"') == 3
    last = checkpoint.latest(directory / "checkpoints")
    assert last.name == "step_00000006" and checkpoint.read_trainer_state(last)["finished"]
    # one DCP shard file per rank
    assert len(list(last.glob("*.distcp"))) == 2


def test_expert_parallel_and_activation_checkpointing_match_one_process(tmp_path, one):
    proc = run(
        tmp_path,
        2,
        *TWO_PROCESSES,
        "expert_parallelism=2",
        "model.gradient_checkpointing=true",
        "save_frequency=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (gloo, FSDP2, expert parallel 2 x data 1)" in proc.stdout
    records = read_metrics(run_dir(tmp_path))
    assert_same_run(records, one)
    assert all(r["moe/drop_fraction"] == 0.0 for r in records if "train/loss" in r)


@pytest.mark.parametrize("saved_by,resumed_by", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_process_count(
    tmp_path, one_dir, two, saved_by, resumed_by
):
    """Step 2's checkpoint of a 2-process run goes on in 1 process, and a 1-process run's in 2
    (the same global batch: 8 rows, 4 per rank): steps 3-6 are the uninterrupted run's, within
    the same tolerances as two processes against one."""
    saved = {1: one_dir, 2: two[1]}[saved_by] / "checkpoints" / "step_00000002"
    rows = ONE_PROCESS if resumed_by == 1 else TWO_PROCESSES
    proc = run(tmp_path, resumed_by, *rows, f"checkpoint_manager_path={saved}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"restored {saved} (step 2" in proc.stdout
    resumed = read_metrics(run_dir(tmp_path))
    want = [r for r in read_metrics(one_dir) if r["step"] > 2]
    assert [r["step"] for r in resumed if "train/loss" in r] == [3, 4, 5, 6]
    for got, ref in zip(resumed, want, strict=True):
        for key in ("train/loss", "eval/loss"):
            if key in ref:
                assert abs(got[key] - ref[key]) <= LOSS_TOLERANCE, (ref["step"], key)
        if "train/grad_norm" in ref:
            assert got["train/grad_norm"] == pytest.approx(
                ref["train/grad_norm"], rel=GRAD_NORM_RTOL
            )


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def test_sigterm_to_one_rank_then_the_same_command_resumes_exactly(tmp_path, two):
    """SIGTERM reaches one worker only: both stop after the same step, save, and resume.

    Before that, the same command started again while the run holds its run directory's lease:
    both of its ranks exit 2 at once (rank 0 naming the holder, rank 1 learning of it from rank
    0 instead of waiting at a barrier), and the first run goes on untouched (bitwise below)."""
    _, straight = two
    args = [*torchrun(), str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *COMMON, *TWO_PROCESSES]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    directory = run_dir(tmp_path)
    with paused_while_leased(proc, directory, pids=lambda: _children(proc.pid)):
        second = run(tmp_path, 2, *TWO_PROCESSES, "overwrite_output_dir=true")
        holder = json.loads((directory / ".lease.json").read_text())["pid"]
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    named = [line for line in errors if line.startswith(f"error: run_dir={directory} is in use: ")]
    assert len(errors) == 2 and len(named) == 1, second.stderr[-3000:]
    assert f"the run of host {socket.gethostname()} pid {holder} (started " in named[0]
    assert holder in _children(proc.pid)  # the first run's rank 0
    errors.remove(named[0])
    assert errors == [
        f"error: run_dir={directory}: the main process did not take the run directory's lease "
        "(its error says why: the holder, or what could not be written)"
    ]
    deadline = time.time() + 300
    while not (directory / "checkpoints" / "step_00000002").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint at step 2"
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.count("stopped: SIGTERM: stopped after step") == 2, err[-3000:]
    stopped_at = checkpoint.latest(directory / "checkpoints")
    state = checkpoint.read_trainer_state(stopped_at)
    assert 2 <= state["step"] < 6 and not state["finished"]

    again = run(tmp_path, 2, *TWO_PROCESSES)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"restored {stopped_at} (step {state['step']})" in again.stdout
    expected, resumed = read_metrics(straight), read_metrics(directory)
    for key in ("train/loss", "train/grad_norm", "train/lr", "eval/loss"):
        want = [(r["step"], r[key]) for r in expected if key in r]
        got = [(r["step"], r[key]) for r in resumed if key in r]
        assert got == want, key  # bitwise: the same floats, each step once
    log = (directory / "mlperf_compliance.log").read_text()
    assert log.count('"key": "run_start"') == 1 and log.count('"key": "run_stop"') == 1


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from hydra import compose, initialize_config_dir
    from clm import config as config_lib, model as model_lib, optim
    from clm.backends import select_backend
    from clm.backends.fsdp_backend import FsdpBackend
    from clm.spec import load_spec
    from clm.trainer import Trainer

    config_lib.register_resolvers()
    with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
        cfg = compose("config", overrides=sys.argv[1:])
    backend = select_backend(cfg)
    config_lib.finalize(cfg, backend.data_parallel_size)
    spec = load_spec(cfg.model)
    model = backend.build_model(spec, 0)
    ref = model_lib.build_model(spec, torch.device("cpu"), 0)
    ref_params = dict(ref.named_parameters())
    out = {"rank": backend.rank, "params": {}}
    for name, p in model.named_parameters():
        # this rank's shard holds exactly its slice of the one-process model's weights
        local = torch.distributed.tensor.DTensor.full_tensor(p)
        out["params"][name] = {
            "global": list(p.shape), "local": list(p.to_local().shape),
            "placements": [type(x).__name__ + str(x.dim) for x in p.placements],
            "mesh": list(p.device_mesh.mesh_dim_names), "dtype": str(p.dtype),
            "equal": torch.equal(local, ref_params[name].detach()),
        }

    # one train_step, no clipping, against the unsharded model: the aux loss is the mean
    # of the ranks' aux losses, the NLL the token mean of the whole global batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (8, cfg.max_length), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["labels"][5, 10:] = -100  # uneven token counts across the ranks
    opt = optim.build_optimizer(model, cfg, backend.device)
    sched = optim.build_scheduler(opt, cfg.sched, float(cfg.lr))
    trainer = Trainer(cfg=cfg, backend=backend, model=model, optimizer=opt, scheduler=sched,
                      spec=spec)
    values = trainer.train_step(backend.local_rows(batch))
    halves = [model_lib.forward(ref, {k: v[i:i + 4] for k, v in batch.items()}, True)
              for i in (0, 4)]
    nll = sum(h[0] for h in halves)
    count = sum(h[1] for h in halves)
    aux = sum(h[2] for h in halves) / 2
    (nll / count + trainer.aux_coef * aux).backward()
    ref_norm = sum(p.grad.double().square().sum() for p in ref.parameters()).sqrt()
    out["train"] = {k: values[k] for k in ("train/loss", "train/grad_norm", "train/aux_loss")}
    out["ref"] = {"train/loss": float(nll / count), "train/grad_norm": float(ref_norm),
                  "train/aux_loss": float(aux)}

    if len(sys.argv) > 1 and "expert_parallelism=1" in sys.argv:
        with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
            cfg16 = compose("config", overrides=sys.argv[1:] + ["model.dtype=bfloat16"])
        backend16 = FsdpBackend(cfg16, "cpu")
        model16 = backend16.build_model(load_spec(cfg16.model), 0)
        # the sharded parameters (what AdamW updates), before a forward swaps in bf16 copies
        dtypes = sorted({str(p.dtype) for p in model16.parameters()})
        logits = model16(input_ids=ids[:4]).logits
        out["bf16"] = {"params": dtypes, "logits": str(logits.dtype),
                       "description": backend16.device_description()}
    backend.barrier()
    if backend.rank == 0:
        print("RESULT " + json.dumps(out))
    backend.close()
    """)


@pytest.mark.parametrize("expert_parallelism", [1, 2])
def test_shards_and_aux_loss_semantics(tmp_path, expert_parallelism):
    """Each rank holds half of every parameter; one step's numbers against the whole model."""
    out = run_script(
        tmp_path,
        SCRIPT,
        "backend=cpu",
        "max_length=32",
        "per_device_train_batch_size=4",
        "max_grad_norm=0",
        f"expert_parallelism={expert_parallelism}",
    )
    params = out["params"]
    layer = {n: p for n, p in params.items() if n.startswith("model.layers.0.")}
    assert len(layer) == 9  # attention q k v o, two norms, router, two expert tensors
    for name, p in params.items():
        local, full = p["local"], p["global"]
        expert = ".experts." in name and expert_parallelism == 2
        if expert:  # experts split on E over ep (2) and FSDP on dim 1 over dp_shard (1)
            assert p["mesh"] == ["dp_shard", "ep"] and p["placements"] == ["Shard1", "Shard0"]
        else:  # FSDP over both ranks on dim 0
            assert p["mesh"] == ["dp"] and p["placements"] == ["Shard0"], name
        assert local == [full[0] // 2, *full[1:]], (name, local, full)
        assert p["dtype"] == "torch.float32"
        assert p["equal"], name  # the gathered shards are bitwise the one-process weights
    # with ep=2 the expert weights [8, 512, 128] leave 4 experts on each rank
    assert params["model.layers.0.mlp.experts.gate_up_proj"]["local"] == [4, 512, 128]
    train, ref = out["train"], out["ref"]
    assert train["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6)
    assert train["train/aux_loss"] == pytest.approx(ref["train/aux_loss"], rel=1e-6)
    assert train["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-5)
    if expert_parallelism == 1:
        bf16 = out["bf16"]
        assert bf16["params"] == ["torch.float32"]  # fp32 master weights
        assert bf16["logits"] == "torch.bfloat16"  # bf16 compute
        assert "bf16 compute, fp32 master weights" in bf16["description"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tensor_parallelism=2", "tensor_parallelism=2: not supported by the torchrun"),
        ("model.dtype=float16", "model.dtype=float16: the torchrun (FSDP2) backend trains"),
    ],
)
def test_unsupported_settings_are_config_errors(monkeypatch, override, message):
    from hydra import compose, initialize_config_dir

    from clm import config as config_lib
    from clm.backends import select_backend

    config_lib.register_resolvers()
    with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
        cfg = compose("config", overrides=["backend=cpu", override])
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any rendezvous
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        select_backend(cfg)


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from hydra import compose, initialize_config_dir
    from torch.distributed.tensor import DTensor
    from clm import config as config_lib, model as model_lib
    from clm.backends import select_backend
    from clm.spec import load_spec

    config_lib.register_resolvers()
    with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
        cfg = compose("config", overrides=sys.argv[1:])
    backend = select_backend(cfg)
    spec = load_spec(cfg.model)
    model = backend.build_model(spec, 0)
    whole = model_lib.build_model(spec, torch.device("cpu"), 0)
    expected = dict(whole.named_parameters()) | dict(whole.named_buffers())
    differ, local = [], 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, DTensor):
            local += t.to_local().numel()
            t = t.full_tensor()
        if not torch.equal(t, expected[name].detach()):
            differ.append(name)
    total = sum(p.numel() for p in whole.parameters())
    backend.barrier()  # no rank tears the group down while another is still gathering
    if backend.rank == 0:
        print("RESULT " + json.dumps({"differ": differ, "local": local, "total": total}))
    backend.close()
    """)


@pytest.mark.parametrize("expert_parallelism", [1, 2])
def test_pretrained_checkpoint_is_read_into_the_shards(tmp_path, expert_parallelism):
    """model.name_or_path=<HF dir> under torchrun: the gathered shards are bitwise the weights
    one process reads, and each rank holds half of them."""
    from conftest import tiny_mixtral_config
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    AutoModelForCausalLM.from_config(tiny_mixtral_config()).save_pretrained(
        hf_dir, max_shard_size="1MB"
    )
    assert len(list(hf_dir.glob("*.safetensors"))) > 1
    out = run_script(
        tmp_path,
        LOAD_SCRIPT,
        "backend=cpu",
        "model.config_path=null",
        f"model.name_or_path={hf_dir}",
        "model.capacity_factor=0",
        f"expert_parallelism={expert_parallelism}",
    )
    assert out["differ"] == []
    assert out["local"] == out["total"] // 2


# --- a dead or hung peer (clm/watchdog.py) -----------------------------------------------------
# a short floor, so that a hung peer is found in seconds; the first step, eval and save of each
# process (and every collective's timeout) get FIRST
FIRST = 30
WATCHDOG = ["step_timeout_s=5", f"first_step_timeout_s={FIRST}"]
RESUME_HINT = " (rerun the same command on every process to resume from the latest checkpoint)"


def start_ranks(tmp_path, port: int, name: str) -> list[tuple[subprocess.Popen, object]]:
    """The same command on two processes, each started on its own with the variables torchrun
    sets (as on two nodes with a launcher each): no agent stops the survivor for us. Returns
    (process, path of its stdout and stderr, as "<name>.<rank>.out|err") per rank."""
    env = env_for(tmp_path)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_RANK="0")
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *COMMON]
    ranks = []
    for rank in (0, 1):
        logs = tmp_path / f"{name}.{rank}"
        with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
            proc = subprocess.Popen(
                [*args, *TWO_PROCESSES, *WATCHDOG],
                cwd=ROOT,
                env={**env, "RANK": str(rank)},
                stdout=out,
                stderr=err,
            )
        ranks.append((proc, logs))
    return ranks


def wait_until(condition, ranks, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        alive = all(proc.poll() is None for proc, _ in ranks)
        assert alive and time.monotonic() < deadline, (what, read_logs(ranks))
        time.sleep(0.02)


def read_logs(ranks) -> str:
    return "\n".join(
        f"{logs}.{kind}: {open(f'{logs}.{kind}').read()[-2000:]}"
        for _, logs in ranks
        for kind in ("out", "err")
    )


def logged_steps(metrics) -> list[int]:
    """The steps of the complete lines of a metrics.jsonl being written."""
    if not metrics.exists():
        return []
    text = metrics.read_text()
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


def one_error_line(path) -> str:
    """A survivor's stderr: one line, no traceback."""
    lines = open(path).read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def same_values(got: list[dict], want: list[dict], steps) -> None:
    """Bitwise the same logged values at `steps`, each step's records once."""
    for key in ("train/loss", "train/grad_norm", "train/lr", "eval/loss"):
        expected = [(r["step"], r[key]) for r in want if key in r and r["step"] in steps]
        assert [(r["step"], r[key]) for r in got if key in r and r["step"] in steps] == expected
        assert expected or key == "eval/loss", key


def aborted_once(log) -> bool:
    stops = [line for line in log.read_text().splitlines() if '"key": "run_stop"' in line]
    return len(stops) == 1 and '"status": "aborted"' in stops[0]


def test_a_killed_or_stopped_rank_ends_the_other_in_bounded_time_and_the_same_command_resumes(
    tmp_path, two
):
    """Two processes started one by one (no torchrun agent): kill -9 of rank 1 after step 2's
    checkpoint, rank 0's next collective fails: one line naming rank 1 (its heartbeat stopped),
    exit 1. The same command resumes from step 2 (exactly the uninterrupted run's values);
    SIGSTOP of rank 1 at step 4: rank 0's watchdog ends it within its bound, naming rank 1;
    SIGCONT of rank 1 then: rank 0, its store's host, is gone, so it says so and exits 1. The
    same command again finishes the run: every value bitwise the uninterrupted run's, each step
    once; each interrupted MLPerf log ends with one aborted run_stop."""
    _, straight = two
    want = read_metrics(straight)
    directory = run_dir(tmp_path)
    metrics, saves = directory / "metrics.jsonl", directory / "checkpoints"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # every run: the same command, the same port
    ranks = []
    try:
        # kill -9 of rank 1
        ranks = start_ranks(tmp_path, port, "killed")
        wait_until(
            lambda: (saves / "step_00000002").exists() and max(logged_steps(metrics) or [0]) >= 3,
            ranks,
            "step 3 after the checkpoint of step 2",
        )
        killed = time.monotonic()
        ranks[1][0].kill()
        assert ranks[0][0].wait(timeout=FIRST + 60) == 1
        assert time.monotonic() - killed <= FIRST + 30  # the largest bound + 30 s
        line = one_error_line(f"{ranks[0][1]}.err")
        assert re.fullmatch(
            r"error: (step \d+|the .+ after step \d+|the .+ at step \d+): a collective failed "
            rf"while waiting for .+ \(.+\); rank 1 \(pid {ranks[1][0].pid} on .+\) sent no "
            rf"heartbeat for [\d.]+ s: lost or hung{re.escape(RESUME_HINT)}",
            line,
        ), line
        assert checkpoint.latest(saves).name == "step_00000002"
        assert aborted_once(directory / "mlperf_compliance.log")
        same_values(read_metrics(directory), want, {1, 2, 3})  # flushed before the exit

        # the same command resumes; SIGSTOP of rank 1 (a hung peer) once it logged step 3
        ranks = start_ranks(tmp_path, port, "stopped")
        restored = f"restored {saves / 'step_00000002'} (step 2)"
        wait_until(
            lambda: restored in open(f"{ranks[0][1]}.out").read()
            and max(logged_steps(metrics) or [0]) >= 3,
            ranks,
            "step 3 of the resumed run",
        )
        stopped = time.monotonic()
        os.kill(ranks[1][0].pid, signal.SIGSTOP)
        assert ranks[0][0].wait(timeout=FIRST + 60) == 1
        waited = time.monotonic() - stopped
        line = one_error_line(f"{ranks[0][1]}.err")
        found = re.fullmatch(
            r"error: (step \d+|the .+ after step \d+|the .+ at step \d+): no progress for "
            r"[\d.]+ s \(bound ([\d.]+) s\) while waiting for .+; rank 1 \(pid "
            rf"{ranks[1][0].pid} on .+\) sent no heartbeat for [\d.]+ s: lost or hung"
            + re.escape(RESUME_HINT),
            line,
        )
        assert found, line
        assert waited <= float(found.group(2)) + 30
        assert aborted_once(directory / "mlperf_compliance.log")
        os.kill(ranks[1][0].pid, signal.SIGCONT)
        assert ranks[1][0].wait(timeout=60) == 1
        line = one_error_line(f"{ranks[1][1]}.err")
        assert re.fullmatch(
            r"error: .+; the heartbeat store at 127\.0\.0\.1:\d+, hosted by rank 0, does not "
            r"answer \(Connection refused\): rank 0 is lost or hung" + re.escape(RESUME_HINT),
            line,
        ), line
        same_values(read_metrics(directory), want, {3})  # what the resumed run logged

        # the same command finishes the run
        ranks = start_ranks(tmp_path, port, "finished")
        assert [proc.wait(timeout=300) for proc, _ in ranks] == [0, 0], read_logs(ranks)
    finally:
        for proc, _ in ranks:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()
    assert f"restored {saves / 'step_00000002'} (step 2)" in open(f"{ranks[0][1]}.out").read()
    same_values(read_metrics(directory), want, range(1, 7))
    log = (directory / "mlperf_compliance.log").read_text()
    assert log.count('"key": "run_start"') == 1 and log.count('"key": "run_stop"') == 1
    assert '"status": "success"' in log
