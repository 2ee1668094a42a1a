"""The schedules reproduce NeMo's formulas at hand-computed steps; AdamW groups are right."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import model_spec
from omegaconf import OmegaConf

from clm import optim
from clm.model import build_model


def sched(**kw):
    base = {"warmup_steps": None, "warmup_ratio": None, "min_lr": 0.0, "max_steps": 10}
    return OmegaConf.create({**base, **kw})


def test_warmup_hold_policy_hold_forever():
    f = optim.lr_schedule(sched(name="WarmupHoldPolicy", warmup_steps=4, hold_steps=10**13), 1.0)
    assert [f(s) for s in (0, 3, 4, 5, 10)] == pytest.approx([0.2, 0.8, 1.0, 1.0, 1.0])
    # NeMo checks the hold phase before max_steps: with an endless hold there is no min_lr
    assert f(11) == 1.0


def test_warmup_hold_policy_then_min_lr():
    s = sched(name="WarmupHoldPolicy", warmup_ratio=0.4, hold_steps=2, min_lr=0.1)
    f = optim.lr_schedule(s, 2.0)
    assert [f(s) for s in (0, 4, 5, 6, 10, 11)] == pytest.approx([0.4, 2.0, 2.0, 2.0, 2.0, 0.1])


def test_warmup_ratio_uses_int_of_ratio_times_max_steps():
    f = optim.lr_schedule(sched(name="WarmupHoldPolicy", warmup_ratio=0.25, hold_steps=None), 1.0)
    # int(0.25 * 10) = 2 warm-up steps
    assert [f(0), f(1), f(2), f(3)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_cosine_annealing():
    f = optim.lr_schedule(sched(name="CosineAnnealing", warmup_steps=2, constant_steps=0), 1.0)
    expected_3 = 0.5 * (1 + math.cos(math.pi * 1 / 8))
    assert [f(0), f(2), f(3), f(6), f(10), f(11)] == pytest.approx(
        [1 / 3, 1.0, expected_3, 0.5, 0.0, 0.0]
    )
    g = optim.lr_schedule(
        sched(name="CosineAnnealing", warmup_steps=2, constant_steps=0, min_lr=0.1), 1.0
    )
    assert g(6) == pytest.approx(0.55)


def test_cosine_annealing_with_constant_steps_is_megatron_style():
    f = optim.lr_schedule(sched(name="CosineAnnealing", warmup_steps=2, constant_steps=2), 1.0)
    # warm-up lr * step / warmup; cosine over 10 - 2 - 2 = 6 steps; then min_lr
    assert [f(1), f(2), f(5), f(8), f(9), f(10)] == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=3e-3)
    s = sched(name="CosineAnnealing", warmup_steps=3, constant_steps=0)
    scheduler = optim.build_scheduler(opt, s, 3e-3)
    f = optim.lr_schedule(s, 3e-3)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([f(i) for i in range(12)])


def test_no_weight_decay_on_norms_and_biases():
    model = build_model(model_spec(config_path="gpt2_tiny.json"), torch.device("cpu"), seed=0)
    decay, no_decay = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(".ln_" in names[id(p)] or "bias" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
