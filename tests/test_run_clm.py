"""End to end: `run_clm.py` in a subprocess on the shipped sample, checking the run directory."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLM, ROOT, RUN_CLM, clean_env, paused_while_leased, run_clm

from clm.metrics import read_metrics
from clm.mlperf import check_log

FAST = ["max_length=128", "n_eval_examples=20", "target_eval_loss=0"]


def test_embedded_default_few_steps_writes_the_run_directory(tmp_path):
    """A run of the embedded default writes the whole run directory. A second run started on
    it meanwhile, as `make run` starts one (overwrite_output_dir=true), exits 2 naming the
    first and deletes nothing: the first ends normally, every record and file in place."""
    overrides = [*FAST, "max_steps=12", "eval_frequency=4", "do_first_eval=true"]
    args = [sys.executable, str(RUN_CLM), f"output_dir={tmp_path / 'runs'}", "progress_bar=false"]
    run_dir = tmp_path / "runs" / "embedded_default"
    proc = subprocess.Popen(
        args + overrides,
        cwd=ROOT,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with paused_while_leased(proc, run_dir):
        second = run_clm(tmp_path, *overrides, "overwrite_output_dir=true")
    proc.stdout, proc.stderr = proc.communicate(timeout=600)
    assert second.returncode == 2, second.stderr
    [line] = second.stderr.splitlines()
    assert line.startswith(
        f"error: run_dir={run_dir} is in use: the run of host {socket.gethostname()} pid "
        f"{proc.pid} (started "
    )
    assert line.endswith(
        f"its process is running) holds {run_dir}/.lease.json; wait for it to end, stop it "
        f"(kill {proc.pid}), or choose another exp_name"
    )
    assert proc.returncode == 0, proc.stderr
    assert not (run_dir / ".lease.json").exists()  # released at the end
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["global_train_batch_size"] == 8 and saved["run_dir"] == str(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_sec", "moe/drop_fraction"):
        assert all(key in r for r in train), key
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    assert [s for s, _ in evals] == [0, 4, 8, 12]
    losses = [loss for _, loss in evals]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.5
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 1.0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ok, output = check_log(run_dir / "mlperf_compliance.log", division="open")
    assert not ok and "aborted" in output.lower()  # max_steps without the target: aborted
    assert "Stopped at max_steps=12: 12 steps, 12,288 tokens, " in proc.stdout
    assert f"Outputs in {run_dir}" in proc.stdout


def test_target_stops_the_run_early(tmp_path):
    proc = run_clm(
        tmp_path,
        "max_length=128",
        "n_eval_examples=20",
        "target_eval_loss=10.0",
        "eval_frequency=5",
        "sched.warmup_steps=1",
        "max_steps=40",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Target eval loss 10.0 reached: 5 steps" in proc.stdout
    run_dir = tmp_path / "runs" / "embedded_default"
    records = read_metrics(run_dir)
    assert max(r["step"] for r in records) == 5
    ok, output = check_log(run_dir / "mlperf_compliance.log", division="open")
    assert ok, output
    official = official_common_rules(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mlperf_logging.compliance_checker", "--werror"]
        + ["--config", str(official), "--log_output", str(tmp_path / "checker.log")]
        + [str(run_dir / "mlperf_compliance.log")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout + proc.stderr, proc.stderr


def official_common_rules(tmp_path):
    """The installed checker's training_6.1.0/common.yaml, minus its chaining to the division
    files: those whitelist the benchmarks of MLPerf 6.1, which do not include this one."""
    import mlperf_logging.compliance_checker as checker

    source = Path(checker.__file__).parent / "training_6.1.0" / "common.yaml"
    rules = yaml.safe_load(source.read_text())
    for rule in rules:
        if rule.get("KEY", {}).get("NAME") == "submission_division":
            rule["KEY"]["POST"] = " s['compile_time_mins'] = 240 if v['value'] == 'open' else 30 "
    target = tmp_path / "official_common.yaml"
    target.write_text(yaml.safe_dump(rules))
    return target


def test_bad_input_fails_in_one_line_and_keeps_previous_run(tmp_path):
    first = run_clm(tmp_path, *FAST, "max_steps=2", "eval_frequency=2")
    assert first.returncode == 0, first.stderr
    metrics = tmp_path / "runs" / "embedded_default" / "metrics.jsonl"
    before = metrics.read_bytes()

    again = run_clm(tmp_path, *FAST, "max_steps=2")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: run_dir={metrics.parent} already holds a run (metrics.jsonl); choose another "
        "exp_name or pass overwrite_output_dir=true"
    ]
    assert metrics.read_bytes() == before

    hub_only = run_clm(
        tmp_path, "exp_name=hub", "model.config_path=null", "model.name_or_path=gpt2"
    )
    assert hub_only.returncode == 2
    assert hub_only.stderr.strip().splitlines() == [NOT_CACHED.format("gpt2")]
    assert not (tmp_path / "runs" / "hub").exists()  # refused before anything was written

    # in process: a data error is a ValueError, which run_clm prints as one line with exit 2
    from clm import config as config_lib
    from clm.trainer import run

    missing = [f"output_dir={tmp_path / 'runs'}", "exp_name=other"]
    missing.append(f"dataset.eval_dataset_path={tmp_path}")
    with pytest.raises(ValueError) as error:
        run(config_lib.compose(missing))
    assert str(error.value) == (
        f"{tmp_path}/c4-validation_24567exp.json: missing data file (also looked for .gz)"
    )


@pytest.mark.parametrize(
    "overrides,error",
    [
        (
            ["pipeline_parallelism=2"],
            "error: pipeline_parallelism=2: not implemented by run_clm.py's backends (cpu, cuda, "
            "torchrun FSDP2, xla); the NeMo path runs it (python -m clm.nemo.launch); use 1 here",
        ),
        (
            ["tensor_parallelism=2", "expert_parallelism=2", "context_parallelism=2"],
            "error: context_parallelism=2: not implemented by run_clm.py's backends",
        ),
        (
            ["tensor_parallelism=2"],
            "error: tensor_parallelism=2: backend=cpu in one process trains on one device; tensor "
            "parallelism runs on backend=xla",
        ),
        (["cache_local_dir=/tmp"], "error: cache_local_dir=/tmp: not read by this package"),
    ],
)
def test_a_key_no_backend_runs_is_refused_before_any_work(tmp_path, overrides, error):
    """Accepted and ignored, these would train one device while the MLPerf log claimed more."""
    proc = run_clm(tmp_path, "backend=cpu", *overrides)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(error), line
    assert not (tmp_path / "runs").exists()


NOT_CACHED = (
    "error: model.name_or_path={}: not a local model directory and not in the local HF cache "
    "(nothing is downloaded); for the reference's GPT-2 dry run use +experiment=dry_run_gpt2 (a "
    "tiny local GPT-2), else pass a local HF model directory (config.json and *.safetensors) or "
    "set model.config_path"
)
# the reference README's GPT-2 dry run, word for word
GPT2_LINE = (
    "model.name_or_path=gpt2 eval_frequency=3 n_eval_examples=100 per_device_train_batch_size=4 "
    "gradient_accumulation_steps=2 sched.warmup_ratio=0. max_steps=30"
).split()


def test_reference_gpt2_line_trains_gpt2_from_the_cache_or_says_what_to_do(tmp_path):
    """`python run_clm.py model.name_or_path=gpt2 ...` from clm/: one line saying what to do
    when GPT-2 is not in the local HF cache; with it there (here a small GPT-2 saved in the
    cache's layout), that GPT-2 is trained, not the embedded Mixtral under another name."""

    def gpt2_line(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "run_clm.py", *GPT2_LINE, *extra, f"output_dir={tmp_path / 'runs'}"]
            + ["progress_bar=false"],
            cwd=CLM,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )

    missing = gpt2_line()
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [NOT_CACHED.format("gpt2")]
    assert not (tmp_path / "runs").exists()

    from transformers import GPT2Config, GPT2LMHeadModel

    snapshot = tmp_path / "hf_home" / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    config = GPT2Config(vocab_size=32000, n_positions=512, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(snapshot)  # the files a download would leave
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)

    cached = gpt2_line("max_steps=2")  # a later override wins, as in Hydra
    assert cached.returncode == 0, cached.stderr
    params = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    assert f"model: {params / 1e6:.1f}M parameters ({params / 1e6:.1f}M active)" in cached.stdout
    assert "only names the tokenizer" not in cached.stdout
    run_dir = tmp_path / "runs" / "embedded_default"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["config_path"] is None
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert not any(k.startswith("moe/") for r in records for k in r)  # no experts: not Mixtral


def test_the_last_step_is_evaluated_off_the_cadence_but_not_for_mlperf(tmp_path):
    """max_steps=5 with evals every 2 steps: evals at 2 and 4 (MLPerf's), and at 5 for
    metrics.jsonl and the summary only; the summary names the step of its eval loss."""
    proc = run_clm(tmp_path, *FAST, "max_steps=5", "eval_frequency=2")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "embedded_default"
    evals = {r["step"]: r["eval/loss"] for r in read_metrics(run_dir) if "eval/loss" in r}
    assert list(evals) == [2, 4, 5]
    assert (
        f"final eval loss {evals[5]:.4f} (step 5, off the 2-step eval cadence: not an MLPerf "
        "eval)." in proc.stdout
    )
    lines = (run_dir / "mlperf_compliance.log").read_text().splitlines()
    accuracy = [json.loads(x.split(" ", 1)[1]) for x in lines if '"key": "eval_accuracy"' in x]
    assert [(e["value"], e["metadata"]["samples_count"]) for e in accuracy] == [
        (evals[2], 2 * 8),
        (evals[4], 4 * 8),
    ]
    assert sum('"key": "eval_start"' in x for x in lines) == 2
    stop = json.loads(next(x for x in lines if '"key": "run_stop"' in x).split(" ", 1)[1])
    assert stop["metadata"]["status"] == "aborted"  # max_steps; the target is 0 here anyway


def failed_checks(output: str) -> set[str]:
    return set(re.findall(r"CHECK for '(\w+)' failed", output))


def test_shrunk_benchmark_preset_fails_closed_rules_exactly_where_it_differs(tmp_path):
    """+experiment=gbs256_tpu shrunk in model, sequence length, batch and data only."""
    proc = run_clm(
        tmp_path,
        "+experiment=gbs256_tpu",
        "model.config_path=mixtral_small.json",  # model size (router_aux_loss_coef 0.02)
        "model.name_or_path=null",
        "model.dtype=float32",
        "dataset=c4_sample",  # data
        "max_length=128",  # sequence length
        "global_train_batch_size=null",  # batch: 8 sequences on one CPU
        "per_device_train_batch_size=8",
        "per_device_eval_batch_size=8",
        "eval_frequency=2",
        "max_steps=4",  # data: 4 steps (so warm-up int(0.25 * 4) = 1)
        "n_eval_examples=20",
    )
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "runs" / "convergence_exp" / "mlperf_compliance.log"
    ok, output = check_log(log, division="closed")
    assert not ok
    assert failed_checks(output) == {
        "global_batch_size",  # 8, not 256
        "max_sequence_length",  # 128, not 32768
        "opt_learning_rate_warmup_steps",  # 1, not 62
        "opt_learning_rate_training_steps",  # 4, not 250
        "moe_aux_loss_coeff",  # the small model's 0.02, not 8x22B's 0.001
        "eval_accuracy",  # off the 6-step cadence of GBS 256, and far above 1.8
        "run_stop",  # aborted: the target was not reached
    }, output


def test_crash_after_run_start_logs_one_aborted_run_stop(tmp_path):
    """A corrupt record mid-shard stops training with one line; the MLPerf log stays whole."""
    data_dir = tmp_path / "data"
    shutil.copytree(CLM / "sample_data", data_dir)
    shard = data_dir / "c4-train.00768-of-01024.json.gz"
    with gzip.open(shard, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()[:100]
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines + ["{broken"]) + "\n")
    proc = run_clm(
        tmp_path,
        "+experiment=dry_run_gpt2",  # the fastest model: ~60 steps of data before the bad line
        *FAST,
        f"dataset.train_dataset_path={data_dir}",
        "shuffle=false",
        "max_steps=1000",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {shard}:101: not a JSON line (Expecting property name enclosed in double quotes)"
    ]
    run_dir = tmp_path / "runs" / "dry_run_gpt2"
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(steps) >= 2  # it did train before reaching the bad line
    lines = (run_dir / "mlperf_compliance.log").read_text().splitlines()
    stops = [json.loads(x.split(" ", 1)[1]) for x in lines if '"key": "run_stop"' in x]
    assert len(stops) == 1 and stops[0]["metadata"]["status"] == "aborted"
    assert any('"key": "run_start"' in x for x in lines)
