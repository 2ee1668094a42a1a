"""W&B logging: real wandb in offline mode under run_clm.py, its records read back from the
`.wandb` files (wandb's own protobuf records) and compared with metrics.jsonl; resume; a run that
fails; a broken wandb driving the real command; WANDB_MODE=disabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, RUN_CLM, clean_env, sigterm_after_records

from clm import checkpoint, wandb_log
from clm.metrics import read_metrics

SMALL = ["max_length=64", "n_eval_examples=5", "target_eval_loss=0", "progress_bar=false"]
WARNING = (
    "warning: W&B: could not start it ({}); training goes on with metrics.jsonl and TensorBoard"
)


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """clean_env with an empty HOME and TMPDIR of its own: whatever W&B writes outside the run
    directory shows up there (XDG_* unset, so ~/.cache and ~/.config are under that HOME)."""
    env = clean_env(tmp_path)
    for name in [n for n in env if n.startswith("XDG_")]:
        env.pop(name)
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()  # TMPDIR: clean_env's own, tmp_path / "tmp"
    return env


def by_step(records: list[dict]) -> dict[int, dict]:
    """metrics.jsonl as W&B keeps it: a step's train and eval records in one row."""
    rows: dict[int, dict] = {}
    for record in records:
        rows.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    return rows


def test_offline_run_holds_the_history_and_a_resume_continues_it(tmp_path):
    env = isolated_env(tmp_path)
    env.update(WANDB_MODE="offline", WANDB_PROJECT="clm-test")
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *SMALL]
    args += ["eval_frequency=2", "save_frequency=1000", "wandb.enabled=true"]
    args += ["wandb.tags=[ci,small]", "+hf_token=hf_secret123"]
    run_dir = tmp_path / "runs" / "embedded_default"
    cwd = tmp_path / "cwd"  # an empty working directory: nothing may appear there either
    cwd.mkdir()
    metrics = run_dir / "metrics.jsonl"
    returncode, stderr = sigterm_after_records(
        args + ["max_steps=400"], env, metrics, records=4, cwd=cwd
    )
    assert returncode == 143, stderr
    stopped = stderr.strip().splitlines()[-1]
    step = int(stopped.split("stopped after step ")[1].split(";")[0])
    assert "warning: W&B" not in stderr

    again = subprocess.run(
        args + [f"max_steps={step + 3}"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert f"(step {step})" in again.stdout and "warning: W&B" not in again.stderr

    parts = wandb_log.segments(run_dir / "wandb")
    assert [p.path.parent.name.startswith("offline-run-") for p in parts] == [True, True]
    first, second = parts
    run_id = checkpoint.read_trainer_state(checkpoint.latest(run_dir / "checkpoints"))[
        "wandb_run_id"
    ]
    assert first.run_id == second.run_id == run_id  # the same W&B run, its id in the checkpoint
    assert (first.resume, first.exit_code) == (False, 143)
    assert (second.resume, second.exit_code) == (True, 0)  # wandb sync appends it to the first
    # each step once: the interrupted attempt up to its checkpoint, the resumed one after it
    assert sorted(first.history) == list(range(1, step + 1))
    assert sorted(second.history) == list(range(step + 1, step + 4))
    expected = by_step(read_metrics(run_dir))
    assert {**first.history, **second.history} == expected  # every key, every value, evals too
    # evals at the cadence, and at the last step when off it (not an MLPerf eval)
    last = step + 3
    evals = list(range(2, last + 1, 2)) + ([last] if last % 2 else [])
    assert [s for s, row in expected.items() if "eval/loss" in row] == evals
    assert wandb_log.differences(run_dir) == []

    # each attempt's config is its config.yaml (resolved, the secret masked; the second
    # attempt's replaced the first's, which differed in max_steps only)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for part, max_steps in ((first, 400), (second, step + 3)):
        config = {k: v for k, v in part.config.items() if k != "_wandb"}
        assert config["max_steps"] == config["sched"]["max_steps"] == max_steps
        config["max_steps"] = config["sched"]["max_steps"] = step + 3
        assert config == saved and config["hf_token"] == "***"
        assert (part.project, part.name, part.tags) == (
            "clm-test",
            "embedded_default",
            ["ci", "small"],
        )
    # nothing outside the run directory: HOME, TMPDIR and the working directory stay empty
    for directory in ("home", "tmp", "cwd"):
        assert list((tmp_path / directory).rglob("*")) == [], directory
    assert "hf_secret123" not in "".join(
        p.read_text(errors="replace") for p in (run_dir / "wandb").rglob("*") if p.is_file()
    )


def write_stub(directory: Path, body: str) -> Path:
    """A `wandb` package that shadows the real one on PYTHONPATH."""
    (directory / "wandb").mkdir(parents=True)
    (directory / "wandb" / "__init__.py").write_text(body)
    return directory


def test_a_broken_wandb_warns_once_and_the_run_completes(tmp_path):
    stub = write_stub(
        tmp_path / "stub",
        "class Settings:\n"
        "    def __init__(self, **kwargs):\n"
        "        pass\n\n\n"
        "def init(**kwargs):\n"
        "    raise ConnectionError('no route to the W&B server')\n",
    )
    env = isolated_env(tmp_path)
    env.update(WANDB_MODE="online", PYTHONPATH=os.pathsep.join([str(stub), str(ROOT)]))
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *SMALL]
    args += ["max_steps=3", "eval_frequency=3", "save_frequency=3", "wandb.enabled=true"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        WARNING.format("ConnectionError: no route to the W&B server")
    ]
    run_dir = tmp_path / "runs" / "embedded_default"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval/loss" in r] == [3]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob("*.wandb"))
    # the id is kept anyway, so a resumed attempt with a working W&B continues it
    state = checkpoint.read_trainer_state(checkpoint.latest(run_dir / "checkpoints"))
    assert len(state["wandb_run_id"]) == 8


DISABLED_SCRIPT = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
from clm import wandb_log

run_dir = Path(sys.argv[1])
cfg = OmegaConf.create({"wandb": {
    "enabled": True, "project": "p", "entity": None, "name": "e", "tags": []}})
run = wandb_log.WandbRun(cfg, run_dir, None, resumed=False)
run.log(1, {"train/loss": 1.0})
run.finish(0)
print(run.active, "wandb" in sys.modules, sorted(p.name for p in run_dir.iterdir()))
"""


def test_wandb_mode_disabled_neither_imports_nor_writes(tmp_path):
    """WANDB_MODE=disabled wins over wandb.enabled=true: with a wandb that would fail at import
    first on the path, what run_clm.py starts on its main process stays silent, imports nothing
    and writes nothing."""
    stub = write_stub(tmp_path / "stub", "raise ImportError('this wandb is broken')\n")
    env = isolated_env(tmp_path)
    env.update(WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(stub), str(ROOT)]))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", DISABLED_SCRIPT, str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("False False []\n", "")


FAILING_LOG_STUB = """
import types


class Settings:
    def __init__(self, **kwargs):
        pass


class Run:
    settings = types.SimpleNamespace(mode="offline", sync_file="/nonexistent/run-x.wandb")
    starting_step = 0
    logged = []

    def log(self, row, step):
        if step == 3:
            raise BrokenPipeError("the service went away")
        self.logged.append(step)

    def finish(self, exit_code):
        raise AssertionError("finish after a failed log")


def init(**kwargs):
    return Run()
"""

FAILING_LOG_SCRIPT = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
import wandb
from clm import wandb_log

cfg = OmegaConf.create({"wandb": {
    "enabled": True, "project": "p", "entity": None, "name": "e", "tags": []}})
run = wandb_log.WandbRun(cfg, Path(sys.argv[1]), None, resumed=False)
for step in range(1, 6):
    run.log(step, {"train/loss": 1.0})
run.finish(0)
print(run.active, wandb.Run.logged)
"""


def test_a_wandb_that_fails_while_logging_warns_once_and_stops_calling_it(tmp_path):
    stub = write_stub(tmp_path / "stub", FAILING_LOG_STUB)
    env = isolated_env(tmp_path)
    env.update(WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(stub), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_LOG_SCRIPT, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False [1, 2]\n"
    assert proc.stderr.splitlines() == [
        "warning: W&B: logging step 3 failed (BrokenPipeError: the service went away); no more "
        "W&B logging; training goes on with metrics.jsonl and TensorBoard"
    ]


def test_a_failing_run_ends_its_wandb_run_with_its_status(tmp_path):
    """A NaN at step 2 (exit 1): the W&B run is finished, not left hanging, with exit code 1
    and the step that was logged."""
    env = isolated_env(tmp_path)
    env["WANDB_MODE"] = "offline"
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", *SMALL]
    args += ["lr=1e5", "sched.warmup_steps=0", "max_grad_norm=0", "save_frequency=0"]
    proc = subprocess.run(
        args + ["wandb.enabled=true"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: non-finite loss or gradient norm at step 2")
    )
    run_dir = tmp_path / "runs" / "embedded_default"
    (segment,) = wandb_log.segments(run_dir / "wandb")
    assert segment.exit_code == 1 and sorted(segment.history) == [1]
    assert wandb_log.differences(run_dir) == []


RESUME_SCRIPT = """
import json, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from clm import wandb_log

run_dir = Path(sys.argv[1])
cfg = OmegaConf.create({"exp_name": "e", "wandb": {
    "enabled": True, "project": "p", "entity": None, "name": "e", "tags": []}})

def write_metrics(steps):
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "train/loss": 10.0 / step}) + "\\n")
            if step % 4 == 0:
                f.write(json.dumps({"step": step, "eval/loss": 9.0 / step}) + "\\n")

def attempt(run_id, resumed, live_steps):
    run = wandb_log.WandbRun(cfg, run_dir, run_id, resumed)
    assert run.active
    for step in live_steps:
        run.log(step, {"train/loss": 10.0 / step})
    run.finish(0)
    time.sleep(1.1)  # a W&B run directory is named by the second it started
    return run

run_dir.mkdir()
# a killed attempt whose W&B tail was lost: the checkpoint is at step 5, W&B holds nothing;
# the resumed attempt fills in steps 1-5 from metrics.jsonl, then logs 6 and 7
write_metrics(range(1, 6))
first = attempt("lost", True, [6, 7])
# a killed attempt whose W&B holds steps 1-7 while its checkpoint is at step 5: the resumed
# attempt logs neither 6 nor 7 again, only 8
write_metrics(range(1, 6))
attempt("lost", True, [6, 7, 8])
print(json.dumps([sorted(s.history) for s in wandb_log.segments(run_dir / "wandb", "lost")]))
print(json.dumps(wandb_log.segments(run_dir / "wandb", "lost")[0].history))
"""


def test_a_resume_fills_in_what_wandb_lost_and_skips_what_it_holds(tmp_path):
    """WandbRun itself, with real wandb offline and no training: the two ways a hard kill leaves
    a W&B run's records (behind the checkpoint, or ahead of it)."""
    env = isolated_env(tmp_path)
    env.update(WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    steps, first = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert steps == [list(range(1, 8)), [8]]
    assert first["4"] == {"train/loss": 2.5, "eval/loss": 2.25}  # train and eval merged
    assert first["7"] == {"train/loss": 10.0 / 7}
