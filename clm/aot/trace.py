"""The torch_xla half of `python -m clm.aot`: a run's train and eval steps, traced for a TPU.

Runs in a process of its own, `python -m clm.aot.trace WORKDIR`, which clm.aot starts on
torch_xla's CPU runtime (PJRT_DEVICE=CPU, a few virtual devices) with WORKDIR/config.yaml (the
run's finalized config) and WORKDIR/target.json ({"devices": N}). It builds the run as
`clm.trainer.run` does on backend=xla (the XLA backend's mesh, SHARDING_RULES, layer treatment
and attention kernel; `clm.model`'s model and loss; `clm.optim`'s AdamW and schedule; the
trainer's own `train_step` and `eval_step`), except that every tensor the real run would hold
on the devices is a placeholder: a tensor with a shape, a dtype and a sharding and no memory
(torch_xla's `create_placeholder_tensor`, annotated with `xs.annotate_custom_sharding`), so no
host ever holds the model. What it writes to WORKDIR:

- eval_step.hlo, train_step.hlo: the unoptimized HLO of one eval batch and of one optimizer
  step (torch_xla's `_get_xla_tensors_hlo`), in which placeholders are parameters;
- trace.json: per program, the output-to-parameter aliases (below), the parameter shapes, and
  facts about the run (kernels, FLOPs per token, tokens per step).

The steady state: the train step is step 2 onward's program, with AdamW's moments (exp_avg,
exp_avg_sq) as inputs, and its outputs are what the trainer keeps on the devices after
`torch_xla.sync()`: the updated parameters and moments, the non-finite counter and the MoE
statistics. Each output that updates an input in place (a parameter, a moment, the counter)
is aliased to that input, as torch_xla aliases them when it compiles a step (the input's
buffer is donated), so the compiler's memory report counts the state once.

Targets larger than the CPU runtime: the mesh has the target's device count while the runtime
has a few devices (`logical_devices`): torch_xla's Mesh checks the runtime's count, and the
flash attention kernel rebuilds its mesh from a string, so both read the target's count there.
(The runtime itself cannot have 128 devices or more in one process: autograd's device index is
8 bits.) `clm.backends.pallas.targeting_tpu` picks and lowers the Pallas kernels as on a TPU.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import torch
import torch_xla
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from omegaconf import DictConfig, OmegaConf
from torch_xla.core.xla_builder import create_placeholder_tensor

from clm import model as model_lib
from clm import optim
from clm.backends import Backend, pallas
from clm.backends.xla_backend import XlaBackend, _build_mesh
from clm.sharding import BATCH_AXES, mesh_shape, partition_spec
from clm.spec import load_spec
from clm.trainer import Trainer


@contextlib.contextmanager
def logical_devices(count: int):
    """Inside: torch_xla reports `count` devices to Python (`xr.global_runtime_device_count`),
    so that a mesh of the target's size can be built on a runtime with fewer devices."""
    previous = xr.global_runtime_device_count
    xr.global_runtime_device_count = lambda: count
    try:
        yield
    finally:
        xr.global_runtime_device_count = previous


class TargetBackend(XlaBackend):
    """The XLA backend of a run on `devices` devices, for tracing only: its `place` and
    `to_device` give placeholders sharded as the real ones are, and nothing is launched."""

    def __init__(self, cfg: DictConfig, devices: int):
        Backend.__init__(self, torch_xla.device())
        tensor, expert = int(cfg.tensor_parallelism), int(cfg.expert_parallelism)
        num_slices = int(cfg.num_slices)
        shape = mesh_shape(devices, tensor, expert, num_slices)
        self._use_mesh(_build_mesh(shape, num_slices), shape, num_slices, str(cfg.xla_attention))
        self.scan_layers = bool(cfg.xla_scan_layers)
        self.init_device = torch.device("cpu")
        self.process_count, self.rank, self.profile_step = 1, 0, -1
        self.process_group = None
        self.input_names: dict[int, str] = {}  # placeholder data id: what it stands for

    def placeholder(self, name: str, shape, dtype: torch.dtype, spec=None) -> torch.Tensor:
        tensor = create_placeholder_tensor(tuple(shape), dtype)
        self.input_names[data_id(tensor)] = name
        if spec is not None and any(e is not None for e in spec):
            xs.annotate_custom_sharding(tensor, self.mesh, tuple(spec))
        return tensor

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        spec = partition_spec(name, tuple(tensor.shape), self.axis_sizes)
        return self.placeholder(name, tensor.shape, tensor.dtype, spec)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in batch.items():
            spec = None
            if value.ndim >= 1 and value.shape[0] % self.data_parallel_size == 0:
                spec = (BATCH_AXES,) + (None,) * (value.ndim - 1)
            out[key] = self.placeholder(f"batch.{key}", value.shape, value.dtype, spec)
        return out

    def step_boundary(self) -> None:
        """Nothing is launched: the caller takes the traced graph."""

    def sync(self) -> None:
        pass

    def compile_count(self) -> None:
        return None

    def close(self) -> None:
        pass


def data_id(tensor: torch.Tensor) -> int:
    """The id of the device data (here: the placeholder) a tensor's value comes from."""
    ids, _ = torch_xla._XLAC._get_tensors_xla_device_data_node([tensor])
    if len(ids) != 1:
        raise RuntimeError(f"expected one device data input, found {len(ids)}")
    return int(ids[0])


def fill_adamw_state(optimizer: torch.optim.Optimizer, backend: TargetBackend, names) -> None:
    """AdamW's state as torch's AdamW keeps it after its first step (exp_avg and exp_avg_sq
    like the parameter, `step` a CPU scalar), the moments as placeholders sharded like their
    parameter. `names`: {parameter: its name}."""
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"clm.aot traces AdamW only, not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        for p in group["params"]:
            spec = partition_spec(names[p], tuple(p.shape), backend.axis_sizes)
            state = {"step": torch.tensor(1.0)}
            for key in moments:
                state[key] = backend.placeholder(f"{key}.{names[p]}", p.shape, p.dtype, spec)
            optimizer.state[p] = state


def host_batch(rows: int, length: int) -> dict[str, torch.Tensor]:
    """A batch as the data stream gives it (only its shape and dtype reach the program)."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def program(outputs: list[torch.Tensor], sources: list[int | None], backend: TargetBackend):
    """(HLO text, description) of the graph computing `outputs`; `sources[k]` is the data id
    of the input output k replaces in place (aliased), or None."""
    hlo = torch_xla._XLAC._get_xla_tensors_hlo(outputs)
    order, data = torch_xla._XLAC._get_tensors_xla_device_data_node(outputs)
    order = [int(i) for i in order]  # position = the HLO parameter number
    shapes = parameter_shapes(hlo)
    if [tuple(d.shape) for d in data] != [s for _, s in shapes]:
        raise RuntimeError("the graph's inputs are not in the order of the HLO's parameters")
    aliases = [[k, order.index(source)] for k, source in enumerate(sources) if source in order]
    names = [backend.input_names.get(i, "constant") for i in order]
    return hlo, {"aliases": aliases, "parameters": names, "outputs": len(outputs)}


def parameter_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of each parameter of the entry computation, from the module header."""
    header = hlo.split("\n", 1)[0]
    inputs = header.split("entry_computation_layout={(", 1)[1].split(")->", 1)[0]
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", inputs)
    ]


def trace(cfg: DictConfig, devices: int, workdir: Path) -> dict:
    """Trace the eval and train steps of `cfg` for `devices` TPU devices into `workdir`."""
    xr.use_spmd()
    with logical_devices(devices), pallas.targeting_tpu():
        backend = TargetBackend(cfg, devices)
        spec = load_spec(cfg.model, cfg.max_length)
        model = backend.wrap_model(model_lib.build_meta_model(spec))
        names = {p: n for n, p in model.named_parameters()}
        optimizer = optim.build_optimizer(
            model, cfg, backend.device, backend.optimizer_class(cfg.optimizer)
        )
        scheduler = optim.build_scheduler(optimizer, cfg.sched, float(cfg.lr))
        fill_adamw_state(optimizer, backend, names)
        trainer = Trainer(
            cfg=cfg,
            backend=backend,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            spec=spec,
        )
        trainer.nonfinite_steps = backend.placeholder("nonfinite_steps", (), torch.int32)
        facts = {
            "devices": devices,
            "mesh": backend.axis_sizes,
            "attention_kernel": backend.attention_kernel,
            "experts_implementation": _experts_name(spec, model),
            "parameters": sum(p.numel() for p in names),
            "flops_per_token": trainer.flops_per_token,
            "train_tokens_per_step": int(cfg.global_train_batch_size) * int(cfg.max_length),
            "eval_tokens_per_step": int(cfg.global_eval_batch_size) * int(cfg.max_length),
            "gradient_accumulation_steps": int(cfg.gradient_accumulation_steps),
        }

        # one eval batch: its accumulators are carried from the previous batch, in place
        model.eval()
        total = backend.placeholder("eval.total", (), torch.float64)
        count = backend.placeholder("eval.count", (), torch.int64)
        sources = [data_id(total), data_id(count)]
        trainer.eval_step(host_batch(cfg.global_eval_batch_size, cfg.max_length), total, count)
        hlo, facts["eval_step"] = program([total, count], sources, backend)
        (workdir / "eval_step.hlo").write_text(hlo)
        model.train()

        # one optimizer step, as from step 2 on: parameters and moments are updated in place
        updated = list(names) + [
            t for p in names for t in optimizer.state[p].values() if t.device.type == "xla"
        ]
        sources = [data_id(t) for t in updated] + [data_id(trainer.nonfinite_steps)]
        batch = host_batch(cfg.global_train_batch_size, cfg.max_length)
        trainer.train_step(batch, read=False)
        outputs = updated + [trainer.nonfinite_steps] + _moe_statistics(model)
        sources += [None] * (len(outputs) - len(sources))
        hlo, facts["train_step"] = program(outputs, sources, backend)
        (workdir / "train_step.hlo").write_text(hlo)
    return facts


def _experts_name(spec, model: torch.nn.Module) -> str | None:
    """Ours as clm_<implementation> (its registry key also spells out the MoESpec), else the
    implementation transformers picked."""
    if spec.moe is not None and spec.moe.implementation != "hf":
        return f"clm_{spec.moe.implementation}"
    return getattr(model.config, "_experts_implementation", None)


def _moe_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The MoE statistics each experts module keeps after a forward (live on the devices)."""
    from clm import moe

    return [getattr(m, moe._STATS_ATTR) for m in model.modules() if hasattr(m, moe._STATS_ATTR)]


def main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    cfg = OmegaConf.load(workdir / "config.yaml")
    target = json.loads((workdir / "target.json").read_text())
    facts = trace(cfg, int(target["devices"]), workdir)
    (workdir / "trace.json").write_text(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
