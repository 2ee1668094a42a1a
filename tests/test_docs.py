"""The README and docs/ as text: nothing a user relied on is lost when text moves between
them, every link between them lands on a file and a heading that exist, and the module map in
docs/ARCHITECTURE.md names every module of clm/. Plain text checks, no runs (the commands
themselves are walked by tests/test_readme.py)."""

from __future__ import annotations

import re

from conftest import ROOT
from test_readme import readme_commands

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Every command of README.md's bash blocks, and the commands written inline in its prose, on
# the day its long sections moved into docs/ (README.md went from 834 lines to under 200). Each
# must still be shown somewhere: the bash ones in a bash block of README.md or a docs/ page, the
# inline ones anywhere in their text. A command changed on purpose (a flag renamed, a script
# replaced) changes here too, in the same commit.
README_COMMANDS_BEFORE_THE_SPLIT = (
    "make run",
    "make test",
    "python scripts/convert_checkpoint.py hf-to-dcp /data/Mixtral-8x22B-v0.1 /data/ckpt/mixtral822",
    "python clm/run_clm.py +experiment=gbs256_tpu checkpoint_manager_path=/data/ckpt/mixtral822",
    "python scripts/convert_checkpoint.py dcp-to-hf runs/<exp>/checkpoints /data/hf-out --config clm/mixtral822.json",
    "source .venv/bin/activate",
    "python clm/run_clm.py exp_name=first_run",
    "(cd clm && python run_clm.py +experiment=dry_run_gpt2)",
    "python clm/run_clm.py +experiment=gbs256_tpu --cfg job",
    "cd clm",
    "python run_clm.py model.config_path=mixtral822.json per_device_train_batch_size=1 optimizer=ADAMW_TORCH_XLA checkpoint_manager_path=gs://<bucket>/mixtral822/ model.name_or_path=mistralai/Mixtral-8x22B-v0.1 dataset.dataset_name=c4_mlperf max_steps=250 max_grad_norm=1.0 seed=4321 model.dtype=bfloat16 output_dir=/app/output max_length=32768 dataset.streaming=True tensor_parallelism=1 exp_name=convergence_exp model.capacity_factor=1.25 lr=2e-5 sched=WarmupHoldPolicy",
    "python run_clm.py model.config_path=mixtral80.json eval_frequency=3 n_eval_examples=100 per_device_train_batch_size=4 max_steps=30",
    "cd ..",
    'WANDB_MODE=offline make run ARGS="wandb.enabled=true max_steps=30"',
    "python -m clm.wandb_log runs/embedded_default",
    "wandb sync runs/embedded_default/wandb",
    "PJRT_DEVICE=TPU python clm/run_clm.py +experiment=gbs256_tpu backend=xla",
    "PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python clm/run_clm.py backend=xla max_length=64 exp_name=xla per_device_train_batch_size=2 max_steps=4 eval_frequency=2 n_eval_examples=5 save_frequency=0",
    "docker build -t <registry_path_image_name>:<image_tag> -f nemo_example.Dockerfile .",
    "docker push <registry_path_image_name>:<image_tag>",
    "python -m clm.nemo.prepare_data --output-dir /data/c4-megatron --workers 16 +experiment=gbs256_gpu dataset.train_dataset_path=/data/c4 dataset.eval_dataset_path=/data/c4",
    "python -m clm.nemo.launch --dry-run --world-size 128 +experiment=gbs256_gpu nemo.data_dir=/data/c4-megatron",
    "python -m clm.nemo.prepare_data --output-dir runs/c4-megatron-sample +experiment=gbs256_gpu dataset=c4_sample",
    "python -m clm.nemo.launch --dry-run --world-size 128 +experiment=gbs256_gpu dataset=c4_sample nemo.data_dir=runs/c4-megatron-sample",
    "CONT=<registry_path_image_name>:<image_tag> DATA_DIR=/lustre/c4-megatron RESULTS_DIR=/lustre/results sbatch --nodes=16 scripts/gpu/run.sub +experiment=gbs256_gpu",
    "helm install <username_workload_job_name> helm-context/",
    'kubectl get pods | grep "<some_part_of_username_workload_job_name>"',
    'kubectl get jobs | grep "<some_part_of_username_workload_job_name>"',
    'kubectl logs "<pod_name>"',
    "python -m clm.plan +experiment=gbs256_tpu slice=v5p-512",
    "python -m clm.plan +experiment=gbs256_tpu slice=v5p-256",
    "python -m clm.plan +experiment=gbs256_tpu slice=v5p-64",
    "python -m clm.aot +experiment=gbs256_tpu slice=v5p-512 --json aot.json",
    "bash docker/tpu/build_and_push_image.sh",
    "IMAGE=<registry>/<project>/<name>:<tag> bash docker/tpu/build_and_push_image.sh",
    "gcloud storage cp -r /data/ckpt/mixtral822 gs://<bucket>/ckpt/",
    "pip install xpk",
    "export PROJECT_ID=<project> ZONE=<zone> CLUSTER=mlperf-moe TPU_TYPE=v5p-512 NUM_SLICES=1",
    'XPK_ARGS="--reservation=<name>" scripts/tpu/xpk.sh cluster',
    "xpk storage attach ckpt --type=gcsfuse --bucket=<bucket> --mount-point=/ckpt --readonly=true --auto-mount=true --size=1 --cluster=$CLUSTER --project=$PROJECT_ID --zone=$ZONE",
    "export IMAGE=<image from step 2> RESULTS_URI=gs://<bucket>/results PYTHON=.venv/bin/python",
    "scripts/tpu/xpk.sh run checkpoint_manager_path=/ckpt/ckpt/mixtral822",
    "scripts/tpu/xpk.sh status",
    "scripts/tpu/xpk.sh logs",
    "scripts/tpu/xpk.sh delete",
    "export PROJECT_ID=<project> ZONE=<zone> TPU_NAME=$USER-mlperf TPU_TYPE=v5p-512 IMAGE=<image>",
    "scripts/tpu/gce.sh create",
    "scripts/tpu/gce.sh pull",
    'DOCKER_RUN_ARGS="-v /mnt/ckpt:/ckpt:ro" PYTHON=.venv/bin/python scripts/tpu/gce.sh run checkpoint_manager_path=/ckpt/mixtral822',
    "scripts/tpu/gce.sh logs",
    "scripts/tpu/gce.sh metrics",
    "scripts/tpu/gce.sh fetch results",
    "scripts/tpu/gce.sh stop",
    "export HF_HOME=/tmp HYDRA_FULL_ERROR=1 WANDB_MODE=offline PJRT_DEVICE=TPU XLA_USE_SPMD=1 XLA_IR_DEBUG=1 XLA_HLO_DEBUG=1",
    "python clm/run_clm.py +experiment=gbs256_tpu output_dir=/app/output <your overrides>",
    "make check-log LOG=results/<...>/convergence_exp/mlperf_compliance.log DIVISION=closed",
)
README_INLINE_COMMANDS_BEFORE_THE_SPLIT = (
    "python run_clm.py +experiment=gbs256_tpu",
    'make run ARGS="max_steps=50 lr=1e-3"',
    "tensorboard --logdir runs",
    "wandb sync runs/embedded_default/wandb",
    "make check-log LOG=runs/embedded_default/mlperf_compliance.log DIVISION=open",
    "pip install .",
    "python run_clm.py model.name_or_path=gpt2 eval_frequency=3 ...",
    "python scripts/measure_load_rss.py <dir> --xla 4",
    "python scripts/measure_load_rss.py <dir> --fsdp 4",
    "torchrun --nproc_per_node=8 clm/run_clm.py backend=cuda per_device_train_batch_size=… [expert_parallelism=2] …",
    "torchrun --nproc_per_node=2 clm/run_clm.py backend=cpu ...",
    "PYTHONPATH=. python bench/aux_loss_ranks.py --steps 20",
    "tensorboard --logdir runs/<exp_name>/profile",
    "python -m clm.mlperf check",
    "gcloud auth configure-docker <registry host>",
    "scripts/tpu/xpk.sh help",
    "scripts/tpu/gce.sh help",
    "scripts/tpu/xpk.sh run wandb.enabled=true",
    "EXPERIMENT=dry_run_mixtral80 TPU_TYPE=v5p-8 scripts/tpu/gce.sh run",
    "tensorboard --logdir results",
    "wandb sync results/<...>/convergence_exp/wandb",
    'gcloud storage cp -r "$RESULTS_URI" results/',
    "scripts/tpu/gce.sh fetch results",
    "pip install -r requirements.lock && pip install -e .",
    "python clm/run_clm.py +experiment=gbs256_tpu dataset.train_dataset_path=<dir> dataset.eval_dataset_path=<dir>",
    'make test ARGS="-k data"',
)


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^( *)```.*?^\1```", "", text, flags=re.M | re.S)


def test_no_command_of_the_readme_before_the_split_is_lost():
    texts = [page.read_text() for page in PAGES]
    shown = {command for text in texts for command in readme_commands(text)}
    lost = [c for c in README_COMMANDS_BEFORE_THE_SPLIT if c not in shown]
    assert not lost, f"no longer in a bash block of README.md or docs/*.md: {lost}"
    everything = re.sub(r"\s+", " ", "\n".join(texts))
    lost = [c for c in README_INLINE_COMMANDS_BEFORE_THE_SPLIT if c not in everything]
    assert not lost, f"no longer in README.md or docs/*.md: {lost}"


def anchors(page) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    to hyphens, a repeated one suffixed -1, -2, ..."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def test_links_between_the_readme_and_docs_resolve():
    broken = []
    for page in PAGES:
        prose = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))  # code spans are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_module_map_names_every_module_of_clm():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"^\| `([\w/]+\.py)`", text, re.M))
    unnamed = {"__init__.py", "aot/__main__.py"}  # empty; named in aot/__init__.py's line
    clm = ROOT / "clm"
    modules = {str(path.relative_to(clm)) for path in clm.rglob("*.py")} - unnamed
    missing = sorted(modules - named)
    assert not missing, f"docs/ARCHITECTURE.md has no line for {missing}: add one per module"
    gone = sorted(named - modules)
    assert not gone, f"docs/ARCHITECTURE.md names modules that no longer exist: {gone}"
