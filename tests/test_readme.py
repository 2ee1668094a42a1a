"""README.md's commands, then those of the docs/ pages it sends a user to, page by page in
order, on a fresh copy of the checkout: a new user's first hour. Every command of the pages'
bash blocks is either run (run_clm.py commands shrunk only by max_steps, appended last, which
Hydra lets win) or skipped with the reason it cannot run here (a GPU, a TPU, docker, a cluster,
the benchmark's data or weights). The walk lists the commands it expects on each page in order,
so a change that adds, drops, moves or reorders one fails here until the walk says what to do
with it; a docs page with commands that the walk does not cover must say why (NOT_WALKED).

A shell is modelled as a user's would be: `cd DIR` lines change the directory for the lines
after them (and for the pages after them), `(cd DIR && ...)` does not; `python` is this venv's
interpreter; `make` runs with PY set to it (`-o .venv/.installed`: the venv exists, nothing is
installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import golden
import pytest
import yaml
from conftest import ROOT, clean_env

from clm.metrics import read_metrics

CHECKOUT_FILES = ("Makefile", "README.md", "pyproject.toml", "requirements.lock")
CHECKOUT_DIRS = ("clm", "scripts", "docs", "docker", "helm-context")


def readme_commands(text: str) -> list[str]:
    """The commands of a page's ```bash blocks, in order: continuation lines joined, comments
    and blank lines dropped, spaces collapsed."""
    commands = []
    for block in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S):
        body = textwrap.dedent(block.group(2)).replace("\\\n", " ")
        for line in body.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line)
            line = re.sub(r"\s+", " ", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


class Shell:
    """Runs the pages' commands in a copy of the checkout, as a user's shell would."""

    def __init__(self, root: Path, tmp_path: Path):
        self.root = root
        self.cwd = root
        self.env = clean_env(tmp_path)
        self.env.pop("PYTHONPATH", None)  # the copy's clm, found as a user's would be
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"

    def command(self, line: str, max_steps: int | None = None) -> str:
        if max_steps is None:
            return line
        if line.startswith("make run"):
            return f"make -o .venv/.installed run PY={sys.executable} ARGS=max_steps={max_steps}"
        if line.endswith(")"):  # (cd clm && python run_clm.py ...)
            return f"{line[:-1]} max_steps={max_steps})"
        return f"{line} max_steps={max_steps}"

    def run(self, line: str, max_steps: int | None = None, **kwargs):
        if match := re.fullmatch(r"cd (\S+)( && (.*))?", line):  # a shell's cd persists
            self.cwd = (self.cwd / match.group(1)).resolve()
            if not match.group(3):
                return None
            line = match.group(3)
        return subprocess.run(
            ["bash", "-c", self.command(line, max_steps)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
            **kwargs,
        )


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"
    return proc


# --------------------------------------------------------------------------- the steps


def make_run_interrupted_then_resumed(shell: Shell, line: str) -> None:
    """`make run`, Ctrl-C (SIGINT to the terminal's process group) after two steps, and `make
    run` again: one line and a checkpoint, then a resume from it to the end, each step once."""
    proc = subprocess.Popen(
        ["bash", "-c", shell.command(line, max_steps=4)],
        cwd=shell.cwd,
        env=shell.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    metrics = shell.root / "runs" / "embedded_default" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    stopped = [x for x in stderr.splitlines() if x.startswith("stopped:")]
    assert len(stopped) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    match = re.fullmatch(r"stopped: SIGINT: stopped after step (\d+); .*", stopped[0])
    assert match, stopped[0]
    step = int(match[1])
    checkpoint = f"runs/embedded_default/checkpoints/step_{step:08d}"
    assert stopped[0].endswith(f"saved {checkpoint}; rerun the same command to resume")
    assert step < 4

    again = ok(shell.run(line, max_steps=4))
    assert f"restored {checkpoint} (step {step})" in again.stdout
    assert f"(resumed at step {step})" in again.stdout
    records = read_metrics(metrics.parent)
    golden.check("make_run_max_steps_4", records)  # the resumed run's numbers are these
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [4]  # the last step's

    # the compliance check the Quick start's table names: the shrunk run stopped at max_steps
    check = shell.run(
        f"make -o .venv/.installed check-log PY={sys.executable} "
        "LOG=runs/embedded_default/mlperf_compliance.log DIVISION=open"
    )
    assert check.returncode != 0 and "FAILED" in check.stdout + check.stderr


def gpt2_dry_run_from_inside_clm(shell: Shell, line: str) -> None:
    """The reference's way, from clm/: the tiny GPT-2 with gradient accumulation 2."""
    ok(shell.run(line, max_steps=3))
    records = read_metrics(shell.root / "clm" / "runs" / "dry_run_gpt2")
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 3 and train[-1]["train/tokens_seen"] == 3 * 8 * 256  # 4 rows x 2
    assert [r["step"] for r in records if "eval/loss" in r] == [3]
    assert all(r["train/lr"] == 2e-3 for r in train)  # sched.warmup_ratio=0.
    assert train[-1]["train/loss"] < train[0]["train/loss"]


def composed_config(shell: Shell, line: str) -> None:
    job = yaml.safe_load(ok(shell.run(line)).stdout)
    assert job["model"]["config_path"] == "mixtral822.json" and job["max_length"] == 32768


def mixtral80_dry_run(shell: Shell, line: str) -> None:
    """Refused before anything is built where clm.plan's estimate does not fit (a laptop)."""
    from clm import config as config_lib
    from clm import memory, plan
    from clm.spec import load_spec

    cfg = config_lib.compose(["model.config_path=mixtral80.json", "per_device_train_batch_size=4"])
    spec = load_spec(cfg.model, cfg.max_length)
    estimate = plan.memory_per_device(spec, {}, 4, 256, "flash").peak
    available = memory.host_available_bytes()
    if available is None or estimate <= available * (1 - plan.DEFAULT_HBM_RESERVE):
        pytest.skip("fits this host's memory: 1.7B parameters would train for many minutes")
    proc = shell.run(line, max_steps=1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [error] = proc.stderr.splitlines()
    assert error.startswith("error: memory: this run needs about ")
    assert error.endswith("check_memory=false starts anyway")
    assert not (shell.cwd / "runs" / "dry_run_mixtral80").exists()


def xla_on_virtual_devices(shell: Shell, line: str) -> None:
    ok(shell.run(line, max_steps=2))
    records = read_metrics(shell.root / "runs" / "xla")
    assert [r["step"] for r in records if "eval/loss" in r] == [2]


def wandb_offline_run(shell: Shell, line: str) -> None:
    """`make run` with W&B offline, shrunk to 6 steps (the line's 30 would cost the walk a
    minute and test nothing more): the offline run in the run directory, its history read back
    by the next line of docs/WANDB.md."""
    assert "max_steps=30" in line
    line = line.replace("max_steps=30", "max_steps=6")
    ok(shell.run(line.replace("make run", f"make -o .venv/.installed run PY={sys.executable}")))
    assert list((shell.root / "runs" / "embedded_default" / "wandb").glob("offline-run-*"))


def wandb_history_equals_metrics(shell: Shell, line: str) -> None:
    ok(shell.run(line))  # exit 0: the offline run's history equals metrics.jsonl


def nemo_sample_prepared(shell: Shell, line: str) -> None:
    ok(shell.run(line))
    assert (
        shell.root / "runs" / "c4-megatron-sample" / "c4-validation_24567exp_text_document.idx"
    ).is_file()


def nemo_sample_dry_run(shell: Shell, line: str) -> None:
    settings = json.loads(ok(shell.run(line)).stdout)
    assert settings["train"]["train_iters"] == 250


def planner(expected_rc: int):
    def step(shell: Shell, line: str) -> None:
        proc = shell.run(line)
        assert proc.returncode == expected_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "memory per device (GiB)" in proc.stdout

    return step


def plain(shell: Shell, line: str) -> None:
    ok(shell.run(line, max_steps=1))


def change_directory(shell: Shell, line: str) -> None:
    shell.run(line)


def skip(reason: str):
    def step(shell: Shell, line: str) -> str:
        return reason

    return step


GPU = skip("needs NVIDIA GPUs, the NeMo container or a Slurm/Kubernetes cluster")
TPU_CLOUD = skip(
    "needs gcloud, xpk and a GCP project with TPUs (tests/test_tpu_ops.py runs both scripts "
    "with stand-ins for gcloud, xpk, kubectl and docker)"
)
WEIGHTS = skip("needs Mixtral-8x22B's weights under /data (and ~300 GB of memory)")

# Page by page, in the order a user meets them: (the command, as a regular expression; what the
# walk does with it), in the page's order. One shell walks them all: state carries over (the
# W&B lines read the run `make run` wrote; the NeMo dry run reads the data prepared before it).
WALK = {
    "README.md": [
        (r"make run", make_run_interrupted_then_resumed),
        (r"make test", skip("the test suite itself")),
        (r"source \.venv/bin/activate", skip("the walk runs this venv's python already")),
        (r"python clm/run_clm.py exp_name=first_run", plain),
        (
            r"\(cd clm && python run_clm.py \+experiment=dry_run_gpt2\)",
            gpt2_dry_run_from_inside_clm,
        ),
        (r"python clm/run_clm.py \+experiment=gbs256_tpu --cfg job", composed_config),
        (r"cd clm", change_directory),
        (
            r"python run_clm.py model.config_path=mixtral822.json .*",
            skip("Mixtral-8x22B on a TPU pod"),
        ),
        (r"python run_clm.py model.config_path=mixtral80.json .*", mixtral80_dry_run),
        (r"cd \.\.", change_directory),
    ],
    "docs/CHECKPOINTS.md": [
        (r"python scripts/convert_checkpoint.py hf-to-dcp /data/.*", WEIGHTS),
        (
            r"python clm/run_clm.py \+experiment=gbs256_tpu checkpoint_manager_path=/data/.*",
            WEIGHTS,
        ),
        (r"python scripts/convert_checkpoint.py dcp-to-hf runs/<exp>/.*", WEIGHTS),
    ],
    "docs/WANDB.md": [
        (
            r'WANDB_MODE=offline make run ARGS="wandb\.enabled=true max_steps=30"',
            wandb_offline_run,
        ),
        (r"python -m clm\.wandb_log runs/embedded_default", wandb_history_equals_metrics),
        (r"wandb sync .*", skip("uploads to W&B: needs the network and an account")),
    ],
    "docs/BACKENDS.md": [
        (r"PJRT_DEVICE=TPU python clm/run_clm.py .*", skip("needs a TPU")),
        (
            r"PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python clm/run_clm.py backend=xla .*",
            xla_on_virtual_devices,
        ),
    ],
    "docs/NEMO.md": [
        (r"docker build .*", skip("needs docker")),
        (r"docker push .*", skip("needs docker and a registry")),
        (
            r"python -m clm.nemo.prepare_data --output-dir /data/.*",
            skip("needs C4's shards in /data/c4"),
        ),
        (
            r"python -m clm.nemo.launch --dry-run .* nemo.data_dir=/data/.*",
            skip("needs /data/c4's prepared data"),
        ),
        (
            r"python -m clm.nemo.prepare_data --output-dir runs/c4-megatron-sample .*",
            nemo_sample_prepared,
        ),
        (
            r"python -m clm.nemo.launch --dry-run .* nemo.data_dir=runs/c4-megatron-sample",
            nemo_sample_dry_run,
        ),
        (r".*sbatch .*", GPU),
        (r"helm install .*", GPU),
        (r"kubectl get pods .*", GPU),
        (r"kubectl get jobs .*", GPU),
        (r"kubectl logs .*", GPU),
    ],
    "docs/TPU.md": [
        (r"source \.venv/bin/activate", skip("the walk runs this venv's python already")),
        (r"python -m clm.plan \+experiment=gbs256_tpu slice=v5p-512", planner(0)),
        (r"python -m clm.plan \+experiment=gbs256_tpu slice=v5p-256", planner(0)),
        (r"python -m clm.plan \+experiment=gbs256_tpu slice=v5p-64", planner(1)),
        (
            r"python -m clm\.aot \+experiment=gbs256_tpu slice=v5p-512 --json aot\.json",
            skip(
                "compiles the 141B-parameter program for 256 TPU chips: minutes; "
                "tests/test_aot.py"
            ),
        ),
        (r".*bash docker/tpu/build_and_push_image.sh", TPU_CLOUD),
        (r".*bash docker/tpu/build_and_push_image.sh", TPU_CLOUD),
        (r"python scripts/convert_checkpoint.py hf-to-dcp /data/.*", WEIGHTS),
        (r"gcloud storage cp .*", TPU_CLOUD),
        (r"pip install xpk", skip("installs a package from the network")),
        *[(r"(export .*|.*scripts/tpu/xpk\.sh .*|xpk storage .*)", TPU_CLOUD)] * 8,
        *[(r"(export .*|.*scripts/tpu/gce\.sh .*)", TPU_CLOUD)] * 8,
        (r"export HF_HOME=/tmp .* PJRT_DEVICE=TPU .*", skip("a TPU host's environment")),
        (
            r"python clm/run_clm.py \+experiment=gbs256_tpu output_dir=/app/output .*",
            skip("needs a TPU pod"),
        ),
        (r"make check-log LOG=results/<\.\.\.>/.*", skip("checks a pod run's results")),
    ],
}

# docs/ pages whose bash blocks the walk leaves out, and why
NOT_WALKED = {
    "docs/MLPERF.md": (
        "checks finished runs' logs; the walk checks the embedded default's log after its "
        "`make run` (README's outputs table)"
    ),
    "docs/PERFORMANCE.md": (
        "the measurements' own commands, each beside its figures (minutes each, and they "
        "need a model written to /tmp)"
    ),
}


def page_commands(page: str) -> list[str]:
    return readme_commands((ROOT / page).read_text())


def walked() -> list[tuple[str, str, object]]:
    """(page, command, step) in walking order, after checking each page's commands against
    its walk."""
    steps = []
    for page, walk in WALK.items():
        commands = page_commands(page)
        unknown = [
            (i, c, p)
            for i, (c, (p, _)) in enumerate(zip(commands, walk, strict=False))
            if not re.fullmatch(p, c)
        ]
        assert not unknown and len(commands) == len(walk), (
            f"{page}'s commands changed: tell the walk what to do with each "
            f"(first mismatch: {unknown[:1]}; {len(commands)} commands, {len(walk)} in the walk)"
        )
        steps += [(page, c, step) for c, (_, step) in zip(commands, walk, strict=True)]
    return steps


def test_every_page_with_commands_is_walked_or_says_why_not():
    pages = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    with_commands = {page for page in pages if page_commands(page)}
    assert with_commands - WALK.keys() - NOT_WALKED.keys() == set(), (
        "these pages have bash commands the walk neither runs nor excuses: add them to WALK "
        "(in the order a user meets them) or to NOT_WALKED with the reason"
    )
    assert set(WALK) <= set(pages) and set(NOT_WALKED) <= set(pages)


def test_readme_commands_in_order_on_a_fresh_checkout(tmp_path):
    steps = walked()
    root = tmp_path / "checkout"
    root.mkdir()
    for name in CHECKOUT_FILES:
        shutil.copy(ROOT / name, root)
    for name in CHECKOUT_DIRS:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shell = Shell(root, tmp_path)
    report = []
    for page, command, step in steps:
        start = time.perf_counter()
        try:
            reason = step(shell, command)
        except pytest.skip.Exception as e:
            reason = str(e)
        outcome = f"skipped: {reason}" if reason else f"ran in {time.perf_counter() - start:.1f} s"
        report.append(f"{page}: {command[:60]}: {outcome}")
    print("\n".join(report))  # pytest -s shows it
