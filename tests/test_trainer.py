"""Model build, loss arithmetic and the optimizer step, in process on tiny real models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CLM
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from clm import config as config_lib
from clm import data, optim
from clm import model as model_lib
from clm import spec as spec_lib
from clm.backends.torch_backend import TorchBackend
from clm.metrics import MetricsWriter
from clm.mlperf import MLPerfLogger
from clm.spec import load_spec
from clm.trainer import Trainer

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
    backend = TorchBackend(CPU)
    return Trainer(cfg, backend, model, opt, sched, None, eval_set, metrics, mlperf, spec=spec)


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
