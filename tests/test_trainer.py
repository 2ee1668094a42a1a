"""Model build, loss arithmetic, the optimizer step and the whole loop, in process on tiny real
models."""

from __future__ import annotations

import contextlib
import copy
import json
import signal

import golden
import pytest
import torch
from conftest import CLM
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from clm import checkpoint, data, optim
from clm import config as config_lib
from clm import model as model_lib
from clm import spec as spec_lib
from clm.backends import select_backend
from clm.backends.torch_backend import TorchBackend
from clm.checkpointer import prepare_run_dir
from clm.errors import Preempted
from clm.metrics import MetricsWriter, read_metrics
from clm.mlperf import MLPerfLogger, compliance_path
from clm.spec import load_spec
from clm.tokenizer import load_tokenizer
from clm.trainer import Trainer, build_eval_set, build_train_stream

CPU = torch.device("cpu")


def tiny_cfg(*overrides):
    config_lib.register_resolvers()
    with initialize_config_dir(str(CLM / "config"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "max_length=32",
                "model.moe_implementation=dense",
                "+model.tiny=true",
                *overrides,
            ],
        )
    config_lib.finalize(cfg, 1)
    return cfg


def tiny_mixtral(cfg, seed=0):
    """mixtral_small.json shrunk further so each test runs in well under a second: (its spec,
    the model built from it)."""
    from omegaconf import open_dict

    with open_dict(cfg.model):
        cfg.model.pop("tiny", None)
    path, _ = spec_lib.model_json_path(cfg.model)
    values = json.loads(path.read_text())
    values.update(hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    values.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    spec = spec_lib.spec_from_values(values, cfg.model, cfg.max_length, name="tiny")
    return spec, model_lib.build_model(spec, CPU, seed)


def random_eval_set(rows, length, real_tokens, vocab=512, pad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (real_tokens,), generator=g).tolist()
    blocks = [ids[i : i + length] for i in range(0, len(ids), length)]
    input_ids = torch.full((rows, length), pad)
    labels = torch.full((rows, length), data.IGNORE_INDEX)
    for i, b in enumerate(blocks):
        input_ids[i, : len(b)] = torch.tensor(b)
        labels[i, : len(b)] = torch.tensor(b)
    return data.EvalSet(input_ids, labels, num_documents=1, num_real_rows=len(blocks))


def make_trainer(cfg, spec, model, eval_set=None, tmp_path=None):
    opt = optim.build_optimizer(model, cfg, CPU)
    sched = optim.build_scheduler(opt, cfg.sched, float(cfg.lr))
    metrics = MetricsWriter(tmp_path, enabled=False)
    mlperf = MLPerfLogger(cfg, None, enabled=False)
    return Trainer(
        cfg=cfg,
        backend=TorchBackend(CPU),
        model=model,
        optimizer=opt,
        scheduler=sched,
        eval_set=eval_set,
        metrics=metrics,
        mlperf=mlperf,
        spec=spec,
    )


def test_meta_init_matches_a_normally_built_model():
    """build_model (meta device, then init_weights) against transformers' own eager model of the
    same config: the same parameters, norms exactly as HF makes them, every other weight drawn
    as HF draws it (its spread within 10%, centred); and deterministic per seed."""
    cfg = tiny_cfg()
    spec = load_spec(cfg.model, cfg.max_length)
    built = model_lib.build_model(spec, CPU, seed=3)
    again = model_lib.build_model(spec, CPU, seed=3)
    hf = model_lib.build_hf_config(spec)
    eager = AutoModelForCausalLM.from_config(hf)
    reference = dict(eager.named_parameters())
    assert [n for n, _ in built.named_parameters()] == list(reference)
    for (name, a), b in zip(built.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name  # deterministic per seed
        want = reference[name].detach()
        assert a.shape == want.shape, name
        if torch.all(want == 1):  # RMSNorm weights
            assert torch.equal(a, want), name
        else:
            assert a.std().item() == pytest.approx(want.std().item(), rel=0.1), name
            assert abs(a.mean().item()) < 0.1 * a.std().item(), name
    rotary = dict(built.named_buffers())["model.rotary_emb.inv_freq"]
    assert torch.equal(rotary, dict(eager.named_buffers())["model.rotary_emb.inv_freq"])
    std = built.model.layers[0].mlp.experts.gate_up_proj.std().item()
    assert std == pytest.approx(hf.initializer_range, rel=0.05)


def test_parameter_counts():
    cfg = tiny_cfg()
    model = model_lib.build_model(load_spec(cfg.model), CPU, seed=0)
    total, active = model_lib.count_parameters(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert total == sum(p.numel() for p in model.parameters())
    assert active == total - experts * 6 // 8  # top-2 of 8 experts


def test_eval_loss_is_an_exact_token_mean_not_a_mean_of_means():
    cfg = tiny_cfg("per_device_eval_batch_size=2")
    spec, model = tiny_mixtral(cfg)
    eval_set = random_eval_set(rows=6, length=32, real_tokens=32 * 3 + 5)  # a short last block
    trainer = make_trainer(cfg, spec, model, eval_set)
    loss = trainer.evaluate()
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=eval_set.input_ids).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            eval_set.labels[:, 1:].reshape(-1),
            ignore_index=data.IGNORE_INDEX,
        )
        mean_of_means = (
            sum(
                model_lib.nll_sum(logits[i : i + 2], eval_set.labels[i : i + 2])[0]
                / model_lib.nll_sum(logits[i : i + 2], eval_set.labels[i : i + 2])[1]
                for i in range(0, 4, 2)
            )
            / 2
        )
    assert loss == pytest.approx(nll.item(), rel=1e-5)
    assert abs(loss - mean_of_means.item()) > 1e-4  # the wrong formula gives another number


def test_padding_rows_carry_zero_weight():
    cfg = tiny_cfg("per_device_eval_batch_size=1")
    spec, model = tiny_mixtral(cfg)
    short = random_eval_set(rows=3, length=32, real_tokens=70)
    padded = random_eval_set(rows=8, length=32, real_tokens=70)
    assert make_trainer(cfg, spec, model, short).evaluate() == pytest.approx(
        make_trainer(cfg, spec, model, padded).evaluate(), rel=1e-6
    )


def test_accumulation_gives_the_same_step_as_one_big_batch(tmp_path):
    """The NLL is normalized by the whole global batch's token count, whatever the split.

    The load-balancing loss is per micro-batch (as in Megatron), so it is switched off here.
    """
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 512, (8, 32), generator=g)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][5, 20:] = data.IGNORE_INDEX  # uneven token counts across micro-batches
    results = []
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = tiny_cfg(
            f"per_device_train_batch_size={micro}", f"gradient_accumulation_steps={accum}"
        )
        spec, model = tiny_mixtral(cfg, seed=1)
        trainer = make_trainer(cfg, spec, model, tmp_path=tmp_path)
        trainer.aux_coef = 0.0
        values = trainer.train_step(copy.deepcopy(batch))
        results.append((values, [p.detach().clone() for p in model.parameters()]))
    (v0, p0), *rest = results
    for values, params in rest:
        assert values["train/loss"] == pytest.approx(v0["train/loss"], rel=1e-5)
        assert values["train/grad_norm"] == pytest.approx(v0["train/grad_norm"], rel=1e-4)
        for a, b in zip(params, p0, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # 0.5% of one lr=2e-3 step


def test_aux_loss_in_training_only():
    cfg = tiny_cfg()
    _, model = tiny_mixtral(cfg)
    batch = {"input_ids": torch.randint(3, 512, (2, 32))}
    batch["labels"] = batch["input_ids"]
    _, _, aux = model_lib.forward(model, batch, with_aux=True)
    assert aux is not None and aux.item() > 0
    assert model_lib.forward(model, batch, with_aux=False)[2] is None


# tests/test_xla.py's CPU reference run (tests/golden/cpu_4_steps.json): the embedded default
# model, 8 rows x 64 tokens, evals at steps 2 and 4, saves at steps 2 and 4
GOLDEN_CPU_RUN = [
    "backend=cpu",
    "max_length=64",
    "n_eval_examples=5",
    "max_steps=4",
    "eval_frequency=2",
    "target_eval_loss=0",
    "per_device_train_batch_size=8",
    "save_frequency=2",
]


@contextlib.contextmanager
def trainer_as_run_builds_it(output_dir, *overrides):
    """A Trainer built in this process the way clm.trainer.run builds one on backend=cpu (the
    same config, run directory decision, seed, data, model, optimizer and restore; no lease, no
    memory check, no W&B), with keyword arguments; its writers closed on leaving."""
    cfg = config_lib.compose([f"output_dir={output_dir}", "progress_bar=false", *overrides])
    config_lib.validate(cfg)
    backend = select_backend(cfg)
    config_lib.finalize(cfg, backend.data_parallel_size)
    run_dir, resume_from, resume_step = prepare_run_dir(cfg, backend)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.dataset.tokenizer_sha256)
    eval_set = build_eval_set(cfg, tokenizer)
    train_stream = build_train_stream(cfg, tokenizer)
    spec = load_spec(cfg.model, cfg.max_length)
    model = backend.build_model(spec, cfg.seed)
    adamw = backend.optimizer_class(cfg.optimizer)
    optimizer = optim.build_optimizer(model, cfg, backend.device, adamw)
    metrics = MetricsWriter(run_dir, purge_step=resume_step + 1 if resume_from else None)
    mlperf = MLPerfLogger(cfg, compliance_path(run_dir))
    trainer = Trainer(
        cfg=cfg,
        backend=backend,
        model=model,
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, cfg.sched, float(cfg.lr)),
        train_stream=train_stream,
        eval_set=eval_set,
        metrics=metrics,
        mlperf=mlperf,
        spec=spec,
    )
    trainer.restore(resume_from)
    try:
        yield trainer
    finally:
        metrics.close()
        mlperf.close()


def test_a_trainer_driven_in_process_stops_on_sigterm_resumes_and_is_golden(tmp_path, capsys):
    """The loop, its checkpointer and its metrics processor in this process: SIGTERM after step 3
    saves step 3 and raises Preempted; a Trainer built again resumes from it and finishes. The
    run's records are those of the subprocess run in tests/golden/cpu_4_steps.json, bitwise."""
    handler = signal.getsignal(signal.SIGTERM)
    with trainer_as_run_builds_it(tmp_path, *GOLDEN_CPU_RUN) as trainer:
        take_step = trainer._step

        def step_then_sigterm(batches):
            take_step(batches)
            if trainer.step == 3:  # delivered to the checkpointer's handler, like a preemption
                signal.raise_signal(signal.SIGTERM)

        trainer._step = step_then_sigterm
        with pytest.raises(Preempted) as stopped:
            trainer.train()
    save_dir = tmp_path / "embedded_default" / "checkpoints"
    assert str(stopped.value) == (
        f"SIGTERM: stopped after step 3; saved {save_dir / 'step_00000003'}; rerun the same "
        "command to resume"
    )
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler  # the checkpointer's handler is gone
    assert [p.name for p in checkpoint.committed(save_dir)] == ["step_00000002", "step_00000003"]
    first = read_metrics(tmp_path / "embedded_default")
    assert [r["step"] for r in first] == [1, 2, 2, 3]

    with trainer_as_run_builds_it(tmp_path, *GOLDEN_CPU_RUN) as trainer:
        assert (trainer.step, trainer.tokens_seen) == (3, 3 * 8 * 64)
        summary = trainer.train()
    out = capsys.readouterr().out
    assert f"restored {save_dir / 'step_00000003'} (step 3)" in out
    assert "data stream: epoch 0, " in out
    assert (summary.status, summary.steps, summary.resumed_at) == ("max_steps reached", 4, 3)
    assert summary.tokens == 4 * 8 * 64
    records = read_metrics(tmp_path / "embedded_default")
    assert golden.differences("cpu_4_steps", records) == []
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    assert summary.eval_losses == evals and evals[-1] == (4, summary.final_eval_loss)
    for record in (r for r in records if "train/loss" in r):
        assert record["train/tokens_seen"] == record["step"] * 8 * 64
        assert record["perf/tokens_per_sec"] > 0 and record["perf/tflops_per_device"] > 0
    assert [p.name for p in checkpoint.committed(save_dir)] == ["step_00000003", "step_00000004"]
    assert checkpoint.read_trainer_state(save_dir / "step_00000004")["finished"] is True
