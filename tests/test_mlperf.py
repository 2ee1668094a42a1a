"""MLPerf logging: logs written by MLPerfLogger, judged by the real compliance checker with our
rules (clm/mlperf_rules), for the benchmark preset (closed) and the embedded default (open)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLM, ROOT, clean_env
from hydra import compose, initialize_config_dir

from clm import config as config_lib
from clm import mlperf
from clm.spec import load_spec
from clm.tokenizer import load_tokenizer
from clm.trainer import build_eval_set

# The retired reference's hard-coded eval_samples (≈517 per document: not a count of sequences).
REFERENCE_EVAL_SAMPLES = 12694503


def compose_cfg(*overrides: str):
    config_lib.register_resolvers()
    with initialize_config_dir(config_dir=str(CLM / "config"), version_base=None):
        return compose("config", overrides=list(overrides))


def benchmark_cfg(*overrides: str):
    """The gbs256_tpu preset as the trainer sees it (global batch and cadence filled in)."""
    cfg = compose_cfg(
        "+experiment=gbs256_tpu", "++mlperf.org=test-org", "++mlperf.platform=cpu", *overrides
    )
    cfg.eval_frequency = config_lib.eval_cadence(cfg.max_length, cfg.global_train_batch_size)
    return cfg


def simulate_run(
    cfg,
    path: Path,
    eval_losses: list[float],
    *,
    eval_samples: int,
    status: str | None = "success",
    eval_every: int | None = None,
) -> mlperf.MLPerfLogger:
    """The trainer's call sequence: init, hparams, then train blocks each closed by an eval."""
    gbs = cfg.global_train_batch_size
    eval_every = eval_every or cfg.eval_frequency
    log = mlperf.MLPerfLogger(cfg, path)
    log.init_start()
    log.log_hparams(
        cfg,
        load_spec(cfg.model, cfg.max_length),
        eval_samples=eval_samples,
        train_samples=None,
        warmup_steps=config_lib.warmup_steps(cfg.sched),
    )
    log.init_stop()
    log.run_start()
    step = 0
    for loss in eval_losses:
        log.block_start(step * gbs)
        for _ in range(eval_every):
            step += 1
            log.train_loss(loss + 0.1, step * gbs)
        log.block_stop(step * gbs)
        log.eval_start(step * gbs)
        log.eval_stop(step * gbs)
        log.eval_accuracy(loss, step * gbs)
    if status is not None:
        log.run_stop(status, step * gbs)
    log.close()
    return log


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(x.removeprefix(":::MLLOG ")) for x in lines if x.startswith(":::MLLOG")]


def test_benchmark_log_passes_closed_rules(tmp_path):
    cfg = benchmark_cfg()
    path = tmp_path / "mlperf_compliance.log"
    simulate_run(cfg, path, [2.4, 2.1, 1.9, 1.79], eval_samples=388)
    ok, output = mlperf.check_log(path)
    assert ok, output
    assert "closed_mixtral_8x22b.yaml" in output  # the division's rules ran, not only common
    keys = [r["key"] for r in records(path)]
    assert keys[:2] == ["cache_clear", "init_start"]
    assert keys[-1] == "run_stop"
    values = {r["key"]: r["value"] for r in records(path)}
    assert values["submission_benchmark"] == "mixtral_8x22b"
    assert values["opt_learning_rate_warmup_steps"] == 62
    assert values["train_samples"] == 250 * 256
    assert values["moe_aux_loss_coeff"] == 0.001  # from clm/mixtral822.json
    assert values["capacity_factor"] == 1.25  # the preset's, as the model spec resolved it
    evals = [r["metadata"]["samples_count"] for r in records(path) if r["key"] == "eval_accuracy"]
    assert evals == [1536, 3072, 4608, 6144]  # 6 steps x 256 sequences apart


@pytest.mark.parametrize(
    "name, overrides, kwargs, expected",
    [
        ("no run_stop", (), {"status": None}, "occurrence of 'run_stop'"),
        ("aborted", (), {"status": "aborted", "losses": [2.4, 2.1]}, "'success'"),
        ("global batch 128", ("global_train_batch_size=128",), {}, "global_batch_size"),
        ("reference eval_samples", (), {"eval_samples": REFERENCE_EVAL_SAMPLES}, "eval_samples"),
        ("success above target", (), {"losses": [2.4, 2.1]}, "1.8"),
        ("off-cadence eval", (), {"eval_every": 5}, "24576 * 2048"),
        ("lr 4e-5", ("lr=4e-5",), {}, "opt_base_learning_rate"),
        ("CosineAnnealing", ("sched=CosineAnnealing", "sched.warmup_ratio=0.25"), {}, "decay"),
    ],
)
def test_closed_rules_reject(tmp_path, name, overrides, kwargs, expected):
    cfg = benchmark_cfg(*overrides)
    path = tmp_path / "mlperf_compliance.log"
    simulate_run(
        cfg,
        path,
        kwargs.pop("losses", [2.4, 2.1, 1.79]),
        eval_samples=kwargs.pop("eval_samples", 388),
        **kwargs,
    )
    ok, output = mlperf.check_log(path)
    assert not ok, f"{name}: checker accepted it\n{output}"
    assert "FAILED" in output and expected in output, output


def test_retired_reference_benchmark_name_is_rejected_not_a_crash(tmp_path):
    path = tmp_path / "mlperf_compliance.log"
    simulate_run(benchmark_cfg(), path, [2.0, 1.7], eval_samples=388)
    path.write_text(path.read_text().replace('"mixtral_8x22b"', '"mixture-of-expert"'))
    ok, output = mlperf.check_log(path)
    assert not ok
    assert "submission_benchmark" in output and "Traceback" not in output


def test_run_stop_is_logged_once(tmp_path):
    path = tmp_path / "mlperf_compliance.log"
    log = mlperf.MLPerfLogger(benchmark_cfg(), path)
    log.run_stop("success", 1536)
    log.run_stop("aborted", 1536)
    log.run_stop("success", 1536)
    log.close()
    stops = [r for r in records(path) if r["key"] == "run_stop"]
    assert [r["metadata"]["status"] for r in stops] == ["success"]
    with pytest.raises(ValueError, match="status"):
        log.run_stop("fail", 0)  # the retired reference's invalid status


def test_duplicate_run_stop_line_is_rejected(tmp_path):
    """Identical duplicates are only a warning to the checker; we run it with --werror."""
    path = tmp_path / "mlperf_compliance.log"
    simulate_run(benchmark_cfg(), path, [2.0, 1.7], eval_samples=388)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[-1:]) + "\n")
    ok, output = mlperf.check_log(path)
    assert not ok and "run_stop" in output, output


def test_disabled_logger_writes_nothing(tmp_path):
    path = tmp_path / "rank1" / "mlperf_compliance.log"
    cfg = benchmark_cfg()
    log = mlperf.MLPerfLogger(cfg, path, enabled=False)
    log.init_start()
    spec = load_spec(cfg.model, cfg.max_length)
    log.log_hparams(cfg, spec, eval_samples=388, train_samples=10, warmup_steps=62)
    log.init_stop()
    log.run_start()
    log.block_start(0)
    log.block_stop(256)
    log.eval_start(256)
    log.eval_stop(256)
    log.eval_accuracy(1.7, 256)
    log.train_loss(1.7, 256)
    log.run_stop("success", 256)
    log.close()
    assert not path.parent.exists()


def test_several_loggers_in_one_process_do_not_duplicate_or_print(tmp_path, capsys):
    cfg = benchmark_cfg()
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    log_a = mlperf.MLPerfLogger(cfg, first)
    log_b = mlperf.MLPerfLogger(cfg, second)
    log_a.init_start()
    log_b.init_start()
    log_b.init_stop()
    log_a.close()
    log_b.close()
    assert [r["key"] for r in records(first)] == ["cache_clear", "init_start"]
    assert [r["key"] for r in records(second)] == ["cache_clear", "init_start", "init_stop"]
    out = capsys.readouterr()
    assert ":::MLLOG" not in out.out + out.err


def test_compliance_file_env(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPLIANCE_FILE", raising=False)
    assert mlperf.compliance_path(tmp_path) == tmp_path / "mlperf_compliance.log"
    monkeypatch.setenv("COMPLIANCE_FILE", str(tmp_path / "elsewhere" / "result_0.txt"))
    path = mlperf.compliance_path(tmp_path)
    assert path == tmp_path / "elsewhere" / "result_0.txt"
    log = mlperf.MLPerfLogger(benchmark_cfg(), path)
    log.init_start()
    log.close()
    assert [r["key"] for r in records(path)] == ["cache_clear", "init_start"]


def test_bad_submission_values_fail_early():
    with pytest.raises(config_lib.ConfigError, match="mlperf.division=semi"):
        mlperf.MLPerfLogger(benchmark_cfg("++mlperf.division=semi"), "unused", enabled=False)


def test_embedded_default_log_passes_open_rules_only(tmp_path, hf_home):
    """The laptop run, logged as open, with eval_samples measured on the shipped sample."""
    cfg = compose_cfg("++mlperf.division=open", "++mlperf.platform=laptop")
    config_lib.finalize(cfg, data_parallel_size=1)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.dataset.tokenizer_sha256)
    eval_set = build_eval_set(cfg, tokenizer)
    path = tmp_path / "mlperf_compliance.log"
    simulate_run(cfg, path, [7.9, 6.3, 5.4], eval_samples=eval_set.num_real_rows)
    ok, output = mlperf.check_log(path, division="open")
    assert ok, output
    ok, output = mlperf.check_log(path, division="closed")
    assert not ok and "declares submission_division=open" in output

    # the same run claiming the closed division fails on its values
    cfg.mlperf.division = "closed"
    simulate_run(cfg, path, [7.9, 6.3, 5.4], eval_samples=eval_set.num_real_rows)
    ok, output = mlperf.check_log(path, division="closed")
    assert not ok
    assert "global_batch_size" in output and "max_sequence_length" in output, output


def test_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.log", tmp_path / "bad.log"
    simulate_run(benchmark_cfg(), good, [2.0, 1.7], eval_samples=388)
    simulate_run(benchmark_cfg(), bad, [2.0, 1.7], eval_samples=388, status="aborted")
    for path, code in ((good, 0), (bad, 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "clm.mlperf", "check", str(path)],
            cwd=ROOT,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert ("PASSED" if code == 0 else "FAILED") in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "clm.mlperf", "check", str(tmp_path / "missing.log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "no such file" in proc.stdout
