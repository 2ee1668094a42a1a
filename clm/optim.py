"""AdamW and the two learning-rate schedules of the reference, as plain functions.

The reference imported NeMo for WarmupHoldPolicy and CosineAnnealing; these are the same
formulas (NeMo's `nemo/core/optim/lr_scheduler.py`), where `step` is the number of optimizer
steps already taken (PyTorch's `last_epoch`):

    warm-up (0 < step <= warmup):  lr * (step + 1) / (warmup + 1)
    WarmupHoldPolicy:              lr until max_steps (hold_steps defaults to forever)
    CosineAnnealing:               min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (step - warmup)
                                       / (max_steps - warmup)))
    step > max_steps:              min_lr

With `constant_steps` > 0 NeMo's CosineAnnealing becomes Megatron's: warm-up lr * step / warmup,
cosine over max_steps - warmup - constant steps, then min_lr; reproduced here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from clm.config import constant_steps, warmup_steps


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings, expert tensors), none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module,
    cfg: DictConfig,
    device: torch.device,
    adamw: type[torch.optim.Optimizer] = torch.optim.AdamW,
):
    """AdamW with the config's hyperparameters; `adamw` is the backend's class for `optimizer`.

    The XLA backend gives torch_xla's syncfree AdamW for ADAMW_TORCH_XLA (the same update rule,
    written so that a skipped step needs no host sync); elsewhere both names are torch's AdamW,
    fused on CUDA.
    """
    kwargs = {"fused": True} if device.type == "cuda" and adamw is torch.optim.AdamW else {}
    return adamw(
        param_groups(model, float(cfg.weight_decay)),
        lr=float(cfg.lr),
        betas=(float(cfg.adam_beta1), float(cfg.adam_beta2)),
        eps=float(cfg.adam_epsilon),
        **kwargs,
    )


def _warmup_hold(step: int, lr: float, warmup: int, hold_until: int, max_steps: int, min_lr):
    if warmup > 0 and step <= warmup:
        return lr * (step + 1) / (warmup + 1)
    if warmup <= step < hold_until:
        return lr
    if step > max_steps:
        return min_lr
    return lr


def _cosine(step: int, lr: float, warmup: int, constant: int, max_steps: int, min_lr: float):
    decay = max_steps - constant - warmup
    if constant > 0:
        # NeMo switches to Megatron's variant (warm-up lr * step / warmup) with constant steps
        if step > max_steps:
            return min_lr
        if warmup > 0 and step <= warmup:
            return lr * step / warmup
        if step > warmup + decay:
            return min_lr
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))
    if warmup > 0 and step <= warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > max_steps:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))


def lr_schedule(sched: DictConfig, lr: float) -> Callable[[int], float]:
    """step -> learning rate for the configured schedule."""
    warmup = warmup_steps(sched)
    max_steps = int(sched.max_steps)
    min_lr = float(sched.min_lr)
    if sched.name == "WarmupHoldPolicy":
        if sched.get("hold_steps") is not None:
            hold_until = int(sched.hold_steps) + warmup
        elif sched.get("hold_ratio") is not None:
            hold_until = int(float(sched.hold_ratio) * max_steps) + warmup
        else:
            hold_until = 0
        return lambda step: _warmup_hold(step, lr, warmup, hold_until, max_steps, min_lr)
    constant = constant_steps(sched)
    return lambda step: _cosine(step, lr, warmup, constant, max_steps, min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, sched: DictConfig, lr: float):
    """A LambdaLR whose factor is the schedule divided by the base lr."""
    schedule = lr_schedule(sched, lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / lr)
