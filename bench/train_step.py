"""Whole train-step tokens/s of the embedded default model: clm's step against stock HF's.

The config is clm/config composed by Hydra as `run_clm.py` composes it (no overrides unless
given on the command line: the embedded default, `model.config_path=mixtral_small.json`,
max_length 256, 8 rows per step, fp32), then validated and finalized for one device.

- ours: `clm.model.build_model` (our experts default, `dropless`), `clm.optim.build_optimizer`
  and `build_scheduler` (AdamW, weight decay on matrices only), and the real
  `clm.trainer.Trainer.train_step` (forward, NLL over the step's target count, router aux loss,
  backward, clip, optimizer and schedule step, the logged scalars and MoE metrics).
- hf: stock `MixtralForCausalLM` built from the same JSON (transformers' default experts
  implementation, `grouped_mm`), loaded with ours' initial weights, `labels=` loss with
  `output_router_logits=True` (HF adds the aux loss), `torch.nn.utils.clip_grad_norm_`,
  `torch.optim.AdamW` (same lr, betas, eps, weight decay on every parameter) with the same
  warm-up schedule (a torch LambdaLR), in a plain loop that reads the loss each step.

Mixtral configs only (the HF side is `MixtralForCausalLM`), one device, no accumulation.
Both train on the same real batches: the shipped C4 sample tokenized and packed by
`clm.data.TrainStream`, prepared before timing. Each repetition runs `--steps` steps of each
side back to back (the order alternates between repetitions); tokens/s is per repetition, and
the printed ratio is the median over repetitions of ours/hf from the same repetition.

    PYTHONPATH=. python bench/train_step.py
    PYTHONPATH=. python bench/train_step.py --reps 3 --steps 2 model.moe_implementation=hf
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, MixtralForCausalLM

from clm import config as config_lib
from clm import model as model_lib
from clm import optim
from clm.backends import select_backend
from clm.spec import load_spec
from clm.tokenizer import load_tokenizer
from clm.trainer import Trainer, build_train_stream


def compose_cfg(overrides: list[str]):
    """clm/config composed as run_clm.py composes it, validated and finalized for one device."""
    config_lib.register_resolvers()
    with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    config_lib.validate(cfg)
    return cfg


def real_batches(cfg, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` global batches of the shipped sample, as the trainer's stream yields them."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.dataset.tokenizer_sha256)
    batches = build_train_stream(cfg, tokenizer).batches(cfg.global_train_batch_size)
    return [next(batches) for _ in range(count)]


class Ours:
    """clm's model, optimizer, schedule and the real Trainer.train_step."""

    name = "ours"

    def __init__(self, cfg, spec, backend):
        model = backend.build_model(spec, cfg.seed)
        adamw = backend.optimizer_class(cfg.optimizer)
        optimizer = optim.build_optimizer(model, cfg, backend.device, adamw)
        scheduler = optim.build_scheduler(optimizer, cfg.sched, float(cfg.lr))
        # train_step touches none of the stream, eval set, metrics writer or MLPerf logger
        self.trainer = Trainer(
            cfg=cfg,
            backend=backend,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            spec=spec,
        )
        self.model = model

    def step(self, batch) -> float:
        return self.trainer.train_step(batch)["train/loss"]


class StockHF:
    """Stock MixtralForCausalLM + torch.optim.AdamW in a plain loop."""

    name = "hf"

    def __init__(self, cfg, spec, backend, init_state: dict[str, torch.Tensor]):
        config = AutoConfig.for_model(**spec.hf_values())  # the same JSON, HF's own experts
        config.router_aux_loss_coef, config.use_cache = spec.aux_loss_coef, False
        torch.manual_seed(cfg.seed)
        model = MixtralForCausalLM(config).to(backend.device, model_lib.DTYPES[cfg.model.dtype])
        model.load_state_dict(init_state)
        model.train()
        self.model = model
        self.device = backend.device
        self.max_norm = float(cfg.max_grad_norm) if cfg.max_grad_norm else float("inf")
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=float(cfg.lr),
            betas=(float(cfg.adam_beta1), float(cfg.adam_beta2)),
            eps=float(cfg.adam_epsilon),
            weight_decay=float(cfg.weight_decay),
        )
        # the same warm-up schedule as ours (a torch LambdaLR), so the two losses compare
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.sched, float(cfg.lr))

    def step(self, batch) -> float:
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        out = self.model(input_ids=input_ids, labels=labels, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())


def run_steps(side, batches, backend) -> float:
    """Seconds for one step per batch, device work included."""
    backend.sync()
    start = time.perf_counter()
    for batch in batches:
        side.step(batch)
    backend.sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side and rep")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run_clm.py")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose_cfg(args.overrides)
    backend = select_backend(cfg)
    config_lib.finalize(cfg, backend.data_parallel_size)
    spec = load_spec(cfg.model, cfg.max_length)
    if cfg.gradient_accumulation_steps != 1 or backend.data_parallel_size != 1:
        raise SystemExit("the stock HF loop is one device, one micro-batch per step")
    if cfg.model.dtype != "float32":
        print(f"note: model.dtype={cfg.model.dtype}; the HF side uses the same dtype")
    setup = time.perf_counter()
    batches = real_batches(cfg, args.warmup + args.steps)
    ours = Ours(cfg, spec, backend)
    init_state = {k: v.detach().clone() for k, v in ours.model.state_dict().items()}
    hf = StockHF(cfg, spec, backend, init_state)
    del init_state
    setup = time.perf_counter() - setup
    experts = (
        f"clm_{spec.moe.implementation}",
        getattr(hf.model.config, "_experts_implementation", None),
    )
    total, active = model_lib.count_parameters(ours.model)
    rows, length = cfg.global_train_batch_size, cfg.max_length
    tokens = rows * length * args.steps
    print(
        f"# torch {torch.__version__}, {backend.device_description()}, {cfg.model.dtype}; "
        f"{cfg.model.config_path}: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active); "
        f"{rows} x {length} tokens per step; experts: ours {experts[0]}, hf {experts[1]}; "
        f"{args.warmup} warm-up + {args.reps} x {args.steps} timed steps per side "
        f"(setup {setup:.1f} s)",
        flush=True,
    )

    sides = (ours, hf)
    warm = batches[: args.warmup]
    timed = batches[args.warmup :]
    for side in sides:
        run_steps(side, warm, backend)
    rates: dict[str, list[float]] = {side.name: [] for side in sides}
    for rep in range(args.reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            rates[side.name].append(tokens / run_steps(side, timed, backend))
    # Same batches, same starting weights: the two losses should stay close.
    losses = {side.name: side.step(timed[0]) for side in sides}
    ratios = [o / h for o, h in zip(rates["ours"], rates["hf"], strict=True)]

    print("| side | median tokens/s | max tokens/s | median s/step | ours / hf (median) |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("ours", "ours (clm)"), ("hf", "stock HF")):
        median = statistics.median(rates[name])
        ratio = f"{statistics.median(ratios):.2f}x" if name == "ours" else "1.00x"
        print(
            f"| {label} | {median:,.0f} | {max(rates[name]):,.0f} "
            f"| {rows * length / median:.3f} | {ratio} |"
        )
    print(
        f"\nper-rep ours/hf: {' '.join(f'{r:.2f}' for r in ratios)}; "
        f"loss after the run: ours {losses['ours']:.4f}, hf {losses['hf']:.4f}"
    )


if __name__ == "__main__":
    main()
