"""Capacity planner: does a run's config fit a slice, and how long will it take? No device needed.

    python -m clm.plan +experiment=gbs256_tpu slice=v5p-512
    python -m clm.plan +experiment=gbs256_tpu slice=v5p-64          # exits 1: does not fit

It takes the Hydra overrides of a run, composes, validates and finalizes them with the same
`clm.config` helpers as `run_clm.py`, and adds planner-only arguments (removed before composing,
since the config is struct-mode). `num_slices=K` (slices joined over the data-center network,
default 1) is the run's own config key, so the planner checks it as the run would.

    slice=NAME        v5p-N, v4-N (N counts TensorCores, 2 per chip: v5p-128 is 64 chips),
                      v5e-N or v5litepod-N, v6e-N (N counts chips), h100-N, h200-N (N GPUs;
                      "8xH100" and "H100 x 8" work too). Required.
    mfu=F             model FLOPs utilization assumed for the time estimate (default 0.35)
    hbm_reserve=F     share of HBM left to the runtime, the compiled program and fragmentation
                      (default 0.10)
    attention=flash|math   flash (default): an O(S) attention kernel; math: the S x S scores
                      are materialized (what a plain softmax(QK^T)V lowering does)

Exit status: 0 fits, 1 does not fit (the report names what overflows and by how much), 2 a usage
or configuration error (one line on stderr, like run_clm).

Why an estimate rather than a measurement: sizing a pod before renting it. The memory model
counts, per device, what clm's code keeps alive at the peak of a training step (see
`Memory`); XLA's own memory report on the real slice is the ground truth. Parameter counts
are exact (tests compare them with the built HF model), and so are the bytes of parameters,
gradients and AdamW state on one device (tests compare them with a real optimizer step).
Only torch-free modules are imported: no torch, no torch_xla, no accelerator.

Why this module is long: one self-contained tool without torch: the slice tables, the parameter
and FLOPs counts, the per-device memory model and the report all read the same few sizes;
`clm.memory` and `clm.aot` reuse its memory model, so it stays one import.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from clm import config as config_lib
from clm import model_math
from clm.config import ConfigError
from clm.sharding import MESH_AXES, axes_of, mesh_shape, partition_spec
from clm.spec import ModelSpec, load_spec

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PLANNER_KEYS = ("slice", "mfu", "hbm_reserve", "attention")
DEFAULT_MFU = 0.35
DEFAULT_HBM_RESERVE = 0.10
ATTENTION = ("flash", "math")


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Chip:
    label: str
    units_per_chip: int  # what the slice name counts per chip: TensorCores (v4, v5p) or 1
    hbm_bytes: float
    peak_tflops: float  # dense bf16, per chip (the MFU denominator, as clm.metrics.PEAK_TFLOPS)
    chips_per_host: int
    max_chips: int  # the largest single slice (a TPU pod) or a generous GPU cluster


# Public specifications (per chip):
#   v4   275 TFLOP/s bf16, 32 GiB HBM2, 2 TensorCores per chip; 4 chips per host; v4-8 = 4 chips
#        (cloud.google.com/tpu/docs/v4)
#   v5p  459 TFLOP/s bf16, 95 GiB HBM2e that a program may allocate (96 GiB physical, less what
#        the TPU system and libtpu reserve), 2 TensorCores per chip; topology table: 2x2x1 = 8
#        cores = 4 chips = 1 host, so v5p-128 = 4x4x4 = 64 chips (cloud.google.com/tpu/docs/v5p)
#   v5e  197 TFLOP/s bf16, 16 GB HBM2, 1 TensorCore per chip; v5litepod-N = N chips
#        (cloud.google.com/tpu/docs/v5e)
#   v6e  918 TFLOP/s bf16, 32 GB HBM, 1 TensorCore per chip; v6e-N = N chips
#        (cloud.google.com/tpu/docs/v6e)
#   H100 SXM5  989 TFLOP/s dense bf16 (1,979 with 2:4 sparsity), 80 GB HBM3 (NVIDIA datasheet)
#   H200 SXM   989 TFLOP/s dense bf16, 141 GB HBM3e (NVIDIA datasheet)
# v5e/v6e slices of up to 8 chips are one host; larger ones have 4 chips per host.
CHIPS = {
    "v4": Chip("TPU v4", 2, 32 * GIB, 275.0, 4, 4096),
    "v5p": Chip("TPU v5p", 2, 95 * GIB, 459.0, 4, 8960),
    "v5e": Chip("TPU v5e", 1, 16e9, 197.0, 4, 256),
    "v6e": Chip("TPU v6e", 1, 32e9, 918.0, 4, 256),
    "h100": Chip("NVIDIA H100 SXM", 1, 80e9, 989.0, 8, 16384),
    "h200": Chip("NVIDIA H200 SXM", 1, 141e9, 989.0, 8, 16384),
}
ALIASES = {"v5litepod": "v5e"}
SLICE_HELP = (
    "use v5p-N or v4-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N or v6e-N (N chips), "
    "h100-N or h200-N (N GPUs)"
)


@dataclass(frozen=True)
class Slice:
    name: str
    kind: str
    chips: int  # per slice

    @property
    def chip(self) -> Chip:
        return CHIPS[self.kind]

    @property
    def is_tpu(self) -> bool:
        return not self.kind.startswith("h")

    @property
    def hosts(self) -> int:
        if self.kind in ("v5e", "v6e") and self.chips <= 8:
            return 1
        return math.ceil(self.chips / self.chip.chips_per_host)


def parse_slice(text: str) -> Slice:
    """`v5p-128` -> 64 v5p chips. ConfigError (one line) for anything else."""
    norm = re.sub(r"\s+", "", text.strip().lower())
    kind = count = None
    if m := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e|h100|h200)-(\d+)", norm):
        kind, count = m.group(1), int(m.group(2))
    elif m := re.fullmatch(r"(h100|h200)x(\d+)", norm):
        kind, count = m.group(1), int(m.group(2))
    elif m := re.fullmatch(r"(\d+)x(h100|h200)", norm):
        kind, count = m.group(2), int(m.group(1))
    if kind is None:
        raise ConfigError(f"slice={text}: unknown slice; {SLICE_HELP}")
    kind = ALIASES.get(kind, kind)
    units = CHIPS[kind].units_per_chip
    if count < 1:
        raise ConfigError(f"slice={text}: N must be >= 1; {SLICE_HELP}")
    if count % units:
        raise ConfigError(
            f"slice={text}: {kind}-N counts TensorCores, {units} per chip: N must be a multiple "
            f"of {units}"
        )
    return Slice(text, kind, count // units)


def slice_name(kind: str, chips: int) -> str:
    return f"{kind}-{chips * CHIPS[kind].units_per_chip}"


# --------------------------------------------------------------------------- the model


def check_plannable(spec: ModelSpec) -> ModelSpec:
    """The model as clm.spec read it, if the estimate knows it (HF Mixtral); else ConfigError
    (the memory check then leaves the run alone)."""
    if spec.model_type != "mixtral" or spec.moe is None:
        raise ConfigError(
            f"{spec.name}: model_type={spec.model_type!r}: clm.plan knows Mixtral (model_type "
            "mixtral, 2 or more experts) only"
        )
    return spec


def parameters(m: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of HF MixtralForCausalLM (transformers 5 names and shapes, fused experts)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    experts = m.moe.num_experts
    params = [("model.embed_tokens.weight", (m.vocab, m.hidden))]
    for i in range(m.layers):
        p = f"model.layers.{i}."
        params += [
            (p + "self_attn.q_proj.weight", (q, m.hidden)),
            (p + "self_attn.k_proj.weight", (kv, m.hidden)),
            (p + "self_attn.v_proj.weight", (kv, m.hidden)),
            (p + "self_attn.o_proj.weight", (m.hidden, q)),
            (p + "mlp.gate.weight", (experts, m.hidden)),
            (p + "mlp.experts.gate_up_proj", (experts, 2 * m.ffn, m.hidden)),
            (p + "mlp.experts.down_proj", (experts, m.hidden, m.ffn)),
            (p + "input_layernorm.weight", (m.hidden,)),
            (p + "post_attention_layernorm.weight", (m.hidden,)),
        ]
    params.append(("model.norm.weight", (m.hidden,)))
    if not m.tied:
        params.append(("lm_head.weight", (m.vocab, m.hidden)))
    return params


def count_parameters(m: ModelSpec) -> tuple[int, int]:
    """(total, active per token), by the rule of clm.model.count_parameters."""
    numel = {name: math.prod(shape) for name, shape in parameters(m)}
    total = sum(numel.values())
    expert = sum(n for name, n in numel.items() if ".experts." in name)
    return total, total - expert + expert * m.moe.top_k // m.moe.num_experts


def flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token, by the formula clm.metrics reports MFU with (so MFUs compare)."""
    _, active = count_parameters(m)
    return model_math.flops_per_token(
        active, m.vocab * m.hidden, m.tied, m.layers, m.hidden, seq_len
    )


def expert_slots_per_token(m: ModelSpec, tokens: int, xla: bool = False) -> float:
    """Rows the experts compute per token in a capacity group of `tokens` tokens: E*C/T
    (dropping), K (dropless, hf), E (dense; and dropless under XLA, which runs it as capacity
    C = the sequence's tokens: clm.moe). The implementation is the spec's, auto rule resolved."""
    moe, impl = m.moe, m.moe.implementation
    if impl == "dropping":
        return moe.num_experts * moe.capacity(tokens) / tokens
    if impl == "dense" or (impl == "dropless" and xla):
        return float(moe.num_experts)
    return float(moe.top_k)


# --------------------------------------------------------------------------- sharding


def shard_factor(spec: tuple, axis_sizes: dict[str, int], exclude: str | None = None) -> int:
    """Devices one tensor is split over (leaving out the `exclude` axis)."""
    return math.prod(axis_sizes.get(a, 1) for e in spec for a in axes_of(e) if a != exclude)


# --------------------------------------------------------------------------- memory


@dataclass
class Memory:
    """Bytes per device at the peak of a training step.

    Persistent: parameters, gradients (same dtype and sharding as the parameters) and AdamW's
    exp_avg and exp_avg_sq (torch keeps them in the parameter dtype; the per-tensor `step`
    scalars are left out). Transient, at the worse of two moments:
      backward of one decoder layer: the layer-input checkpoints of every layer (per-layer
        gradient checkpointing; without it, every layer's saved activations), that layer's
        recomputed activations, the gradients of its expert intermediates, and the FSDP
        all-gathered layer weights plus their unsharded gradients;
      the loss: the checkpoints plus the logits (activation dtype), their fp32 log-softmax
        saved for backward and its fp32 gradient.
    """

    params: float
    grads: float
    optimizer: float
    checkpoints: float
    layer_activations: float
    layer_gradients: float
    gathered: float
    logits: float

    @property
    def state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def backward_peak(self) -> float:
        return self.checkpoints + self.layer_activations + self.layer_gradients + self.gathered

    @property
    def loss_peak(self) -> float:
        return self.checkpoints + self.logits

    @property
    def peak(self) -> float:
        return self.state + max(self.backward_peak, self.loss_peak)


def layer_activation_bytes(
    m: ModelSpec,
    act: int,
    slots: float,
    tensor: int,
    seq_len: int,
    rows: int,
    attention: str,
    xla: bool = False,
) -> tuple[float, float]:
    """(saved activations, gradients in flight) of one decoder layer for `rows` sequences.

    What autograd keeps in HF Mixtral's decoder layer with clm.moe's experts, per token (`act`
    bytes per activation element, 4 where HF upcasts to fp32; head and ffn dims split over
    `tensor`); tests check it against the tensors a CPU forward actually saves:
      each RMSNorm: its fp32 input, the normalized value and the output;
      attention: q and k after RoPE, v, the kernel's output and log-sum-exp, and the output's
        contiguous copy that o_proj keeps;
      router: fp32 logits, top-k weights and indices;
      experts (clm.moe dropping path): the dispatched input [slots, D], gate_up output
        [slots, 2F], silu(gate) and the gated activation [slots, F], the per-assignment
        outputs [K, D] and the int64 routing and slot maps (the indexed copies keep only their
        indices).
    In the experts' backward the gradients of the [slots, 2F] and [slots, F] intermediates are
    alive together with all of that.
    """
    d, q, kv, f = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn
    norms = 2 * (4 * d + 2 * act * d)
    # the kernel's softmax statistics: a float per head (torch_xla's Pallas kernel on XLA keeps
    # two, l and m, each broadcast over a 128-lane tile)
    statistics = (2 * 4 * 128 if xla else 4) * m.heads / tensor
    attn = act * (q + 2 * kv) / tensor + 2 * act * q / tensor + statistics
    top_k = m.moe.top_k
    router = 4 * m.moe.num_experts + (4 + 8 + 4) * top_k
    experts = act * slots * (d + 4 * f / tensor) + act * top_k * d + 8 * (slots + 3 * top_k)
    tokens = rows * seq_len
    saved = tokens * (norms + attn + router + experts)
    grads = tokens * act * slots * 3 * f / tensor
    if attention == "math":  # scores and probabilities per head, and one gradient of them
        scores = rows * (m.heads / tensor) * seq_len * seq_len * act
        saved += 2 * scores
        grads += scores
    return saved, grads


def memory_per_device(
    m: ModelSpec,
    axis_sizes: dict[str, int],
    rows: int,
    seq_len: int,
    attention: str,
    xla: bool = False,
    scanned: bool = False,
) -> Memory:
    """Per-device bytes for `rows` sequences per device per micro-batch (see `Memory`), in the
    spec's dtype, with its gradient checkpointing and experts.

    `xla`: the program XLA compiles (TPU): dropless experts as capacity C = the sequence, the
    flash kernel's statistics as torch_xla keeps them. `scanned` (`xla_scan_layers`): the
    stack of layer inputs the scan keeps for the backward is held twice at the end of the
    forward loop (measured by clm.aot: XLA writes it into a second buffer rather than in
    place).

    The dropping experts' capacity is per sequence (clm.moe's capacity groups, as the trainer
    sets them), so their buffers per token do not depend on the device count."""
    param_bytes = DTYPE_BYTES[m.dtype]
    act = param_bytes  # activations in the model dtype
    fsdp, tensor = axis_sizes.get("fsdp", 1), axis_sizes.get("tensor", 1)
    local = 0.0
    gathered_layer = 0.0
    output = "model.embed_tokens.weight" if m.tied else "lm_head.weight"
    logits_shard = 1
    for name, shape in parameters(m):
        spec = partition_spec(name, shape, axis_sizes)
        numel = math.prod(shape)
        local += numel / shard_factor(spec, axis_sizes)
        axes = {a for e in spec for a in axes_of(e)}
        if name.startswith("model.layers.0.") and fsdp > 1 and "fsdp" in axes:
            # FSDP all-gathers the layer's weights over "fsdp" only: other axes stay split
            gathered_layer += numel / shard_factor(spec, axis_sizes, exclude="fsdp")
        if name == output:  # the logits are split like the output projection's vocab dim
            logits_shard = math.prod(axis_sizes.get(a, 1) for a in axes_of(spec[0]))
    params = local * param_bytes
    slots = expert_slots_per_token(m, seq_len, xla)
    saved, grads = layer_activation_bytes(m, act, slots, tensor, seq_len, rows, attention, xla)
    tokens = rows * seq_len
    if m.gradient_checkpointing:
        checkpoints = m.layers * tokens * m.hidden * act * (2 if scanned else 1)
        layer_activations = saved
    else:  # every layer's activations stay until its backward
        checkpoints = (m.layers - 1) * saved
        layer_activations = saved
    logits = tokens * m.vocab / logits_shard * (act + 4 + 4)
    return Memory(
        params=params,
        grads=params,
        optimizer=2 * params,
        checkpoints=checkpoints,
        layer_activations=layer_activations,
        layer_gradients=grads,
        gathered=2 * gathered_layer * param_bytes,
        logits=logits,
    )


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    overrides: list[str]
    slice: Slice
    num_slices: int
    model: ModelSpec
    total_params: int
    active_params: int
    dtype: str
    axis_sizes: dict[str, int]
    data_parallel: int
    per_device_batch: int
    accumulation: int
    accumulation_derived: bool
    global_batch: int
    seq_len: int
    memory: Memory
    usable_hbm: float
    hbm_reserve: float
    attention: str
    flops_per_token: float
    mfu: float
    eval_frequency: int
    max_steps: int
    gradient_checkpointing: bool
    experts_slots: float
    smallest_fit: tuple[str, int, int] | None  # (slice name, chips, accumulation)
    config: DictConfig | None = None  # the run's finalized config on this slice

    @property
    def devices(self) -> int:
        return self.slice.chips * self.num_slices

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable_hbm

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def step_seconds(self) -> float:
        peak = self.devices * self.slice.chip.peak_tflops * 1e12
        return self.flops_per_step / (peak * self.mfu)


def split_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(Hydra overrides, planner-only arguments): the planner's keys never reach Hydra."""
    overrides, planner = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in PLANNER_KEYS:
            planner[key] = value
        else:
            overrides.append(arg)
    return overrides, planner


def compose(overrides: list[str]) -> DictConfig:
    """The run's config, composed from clm/config as run_clm.py does (with its one-line errors)."""
    return config_lib.compose(overrides)


def _number(planner: dict[str, str], key: str, default: float, ok, rule: str) -> float:
    raw = planner.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw}: not a number ({rule})") from None
    if not ok(value):
        raise ConfigError(f"{key}={raw}: {rule}")
    return value


def _mesh(devices: int, tensor: int, expert: int, num_slices: int = 1) -> dict[str, int]:
    """The mesh's axis sizes by name; ConfigError when tensor x expert does not divide, or
    num_slices does not divide fsdp (the XLA backend's rule)."""
    return dict(zip(MESH_AXES, mesh_shape(devices, tensor, expert, num_slices), strict=True))


def _accumulation(cfg: DictConfig, data_parallel: int, user_set: bool) -> tuple[int, bool]:
    """The accumulation a fixed global batch needs on this many devices (unless the user set it)."""
    gbs = cfg.global_train_batch_size
    per_step = int(cfg.per_device_train_batch_size) * data_parallel
    if gbs is None or user_set or int(gbs) % per_step:
        return int(cfg.gradient_accumulation_steps), False
    needed = int(gbs) // per_step
    return needed, needed != int(cfg.gradient_accumulation_steps)


def plan(argv: list[str]) -> Plan:
    """Compose the run's config for the slice and estimate memory, compute and time."""
    overrides, planner = split_args(argv)
    if "slice" not in planner:
        raise ConfigError(f"slice=NAME is required (e.g. slice=v5p-512); {SLICE_HELP}")
    slice_ = parse_slice(planner["slice"])
    mfu = _number(planner, "mfu", DEFAULT_MFU, lambda v: 0 < v <= 1, "must be in (0, 1]")
    reserve = _number(
        planner, "hbm_reserve", DEFAULT_HBM_RESERVE, lambda v: 0 <= v < 1, "must be in [0, 1)"
    )
    attention = planner.get("attention", "flash")
    if attention not in ATTENTION:
        raise ConfigError(f"attention={attention}: must be one of {', '.join(ATTENTION)}")

    cfg = compose(overrides)
    config_lib.validate(cfg)
    num_slices = int(cfg.num_slices)
    model = check_plannable(load_spec(cfg.model, cfg.max_length))
    user_set = any(o.lstrip("+~").split("=")[0] == "gradient_accumulation_steps" for o in overrides)
    devices = slice_.chips * num_slices
    mesh = _mesh(devices, int(cfg.tensor_parallelism), int(cfg.expert_parallelism), num_slices)
    dp = mesh["fsdp"] * mesh["expert"]
    accumulation, derived = _accumulation(cfg, dp, user_set)
    batch_fixed = cfg.global_train_batch_size is not None
    with open_dict(cfg):
        cfg.gradient_accumulation_steps = accumulation
    config_lib.finalize(cfg, dp)  # checks the global batch; derives the eval cadence

    seq, rows = int(cfg.max_length), int(cfg.per_device_train_batch_size)
    memory = _memory_for(cfg, model, mesh, attention, slice_.is_tpu)
    usable = slice_.chip.hbm_bytes * (1 - reserve)
    total, active = count_parameters(model)
    return Plan(
        overrides=overrides,
        slice=slice_,
        num_slices=num_slices,
        model=model,
        total_params=total,
        active_params=active,
        dtype=cfg.model.dtype,
        axis_sizes=mesh,
        data_parallel=dp,
        per_device_batch=rows,
        accumulation=accumulation,
        accumulation_derived=derived,
        global_batch=int(cfg.global_train_batch_size),
        seq_len=seq,
        memory=memory,
        usable_hbm=usable,
        hbm_reserve=reserve,
        attention=attention,
        flops_per_token=flops_per_token(model, seq),
        mfu=mfu,
        eval_frequency=int(cfg.eval_frequency),
        max_steps=int(cfg.max_steps),
        gradient_checkpointing=bool(cfg.model.gradient_checkpointing),
        experts_slots=expert_slots_per_token(model, seq, slice_.is_tpu),
        smallest_fit=_smallest_fit(
            cfg, model, slice_, num_slices, usable, attention, user_set, batch_fixed
        ),
        config=cfg,
    )


def _memory_for(cfg, model, mesh, attention, xla: bool) -> Memory:
    rows, seq = int(cfg.per_device_train_batch_size), int(cfg.max_length)
    scanned = xla and bool(cfg.get("xla_scan_layers", False))
    return memory_per_device(model, mesh, rows, seq, attention, xla, scanned)


def _smallest_fit(cfg, model, slice_, num_slices, usable, attention, user_set, batch_fixed):
    """The smallest slice of the same kind (powers of two of chips) on which this config fits,
    keeping a global batch the config fixes (finalize has filled it in by now)."""
    first = 4 if slice_.chip.units_per_chip == 2 else 1  # v4-8 / v5p-8 are the smallest
    chips = first
    while chips <= slice_.chip.max_chips:
        try:
            mesh = _mesh(
                chips * num_slices,
                int(cfg.tensor_parallelism),
                int(cfg.expert_parallelism),
                num_slices,
            )
        except ConfigError:
            chips *= 2
            continue
        dp = mesh["fsdp"] * mesh["expert"]
        accumulation, _ = _accumulation(cfg, dp, user_set)
        rows = int(cfg.per_device_train_batch_size) * dp * accumulation
        batch_ok = not batch_fixed or rows == int(cfg.global_train_batch_size)
        candidate = Slice(slice_name(slice_.kind, chips), slice_.kind, chips)
        if batch_ok and _memory_for(cfg, model, mesh, attention, slice_.is_tpu).peak <= usable:
            return candidate.name, chips, accumulation
        chips *= 2
    return None


# --------------------------------------------------------------------------- report


def _row(label: str, value: float) -> str:
    return f"{label:<42}{value / GIB:8.2f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(p: Plan) -> str:
    m, mem, chip = p.model, p.memory, p.slice.chip
    if not p.slice.is_tpu:
        units, host_word = "GPUs", "node"
    elif chip.units_per_chip == 2:
        units, host_word = f"{p.slice.kind}-N counts TensorCores, 2 per chip", "host"
    else:
        units, host_word = f"{p.slice.kind}-N counts chips", "host"
    hosts = p.slice.hosts * p.num_slices
    slices = f" x {p.num_slices} slices" if p.num_slices > 1 else ""
    mesh = " x ".join(f"{k}={v}" for k, v in p.axis_sizes.items())
    act = "every layer's activations kept (no gradient checkpointing)"
    if p.gradient_checkpointing:
        act = f"per-layer checkpoints: {m.layers} x {p.per_device_batch * p.seq_len} tokens"
    acc = str(p.accumulation) + (" (derived: add it to the run)" if p.accumulation_derived else "")
    lines = [
        f"config    {' '.join(p.overrides) or '(defaults)'}",
        f"slice     {p.slice.name}{slices}: {p.devices} {chip.label} devices ({units}), "
        f"{hosts} {host_word}{'s' if hosts > 1 else ''}; {chip.hbm_bytes / GIB:.1f} GiB HBM, "
        f"{chip.peak_tflops:g} TFLOP/s bf16 each",
        f"model     {m.name}: {p.total_params:,} parameters ({p.total_params / 1e9:.2f} B), "
        f"{p.active_params:,} active per token (top-{m.moe.top_k} of {m.moe.num_experts} experts); "
        f"{p.dtype}",
        f"mesh      {mesh}; data-parallel {p.data_parallel}",
        f"batch     global {p.global_batch} sequences = {p.per_device_batch} per device x "
        f"{p.data_parallel} data-parallel x gradient_accumulation_steps={acc}; "
        f"{p.tokens_per_step:,} tokens per step",
        "",
        "memory per device (GiB)",
        _row(f"  parameters ({p.dtype})", mem.params),
        _row(f"  gradients ({p.dtype})", mem.grads),
        _row(f"  AdamW exp_avg + exp_avg_sq ({p.dtype})", mem.optimizer),
        f"  activations: {act}",
        _row(
            (
                "    layer inputs kept for the backward"
                if p.gradient_checkpointing
                else "    the other layers' activations"
            ),
            mem.checkpoints,
        ),
        _row(
            (
                "    one layer's recomputed activations"
                if p.gradient_checkpointing
                else "    the last layer's activations"
            ),
            mem.layer_activations,
        )
        + f"  (experts: {p.experts_slots:.2f} rows per token; attention={p.attention})",
        _row("    its experts' gradients in flight", mem.layer_gradients),
        _row("    FSDP-gathered layer weights + grads", mem.gathered),
        _row("    (at the loss instead: logits", mem.logits) + ")",
        _row("  peak", mem.peak),
        _row(f"  usable: {1 - p.hbm_reserve:.0%} of {chip.hbm_bytes / GIB:.1f} GiB", p.usable_hbm),
    ]
    if p.fits:
        lines.append(f"  fits: {(p.usable_hbm - mem.peak) / GIB:.1f} GiB to spare per device")
    else:
        lines.append("  " + overflow_reason(p))
    if p.smallest_fit:
        name, chips, acc_needed = p.smallest_fit
        lines.append(
            f"  smallest {p.slice.kind} slice that fits: {name} ({chips} devices"
            + (f" x {p.num_slices} slices" if p.num_slices > 1 else "")
            + f", gradient_accumulation_steps={acc_needed})"
        )
    else:
        lines.append(f"  no {p.slice.kind} slice up to {chip.max_chips} devices fits this config")
    lines += [f"  {line}" for line in tpu_caveats(p)]
    step = p.step_seconds
    lines += [
        "",
        f"compute   {p.flops_per_token:.3e} FLOPs per token (6 x active matmul parameters + "
        f"attention 12 x {m.layers} x {m.hidden} x {p.seq_len}); {p.flops_per_step:.3e} per step",
        f"time      {_duration(step)} per step at MFU {p.mfu:g} "
        f"({p.devices} x {chip.peak_tflops:g} TFLOP/s)",
        f"schedule  eval every {p.eval_frequency} steps; max_steps={p.max_steps}: "
        f"{_duration(step * p.max_steps)} of training steps (evals not included)",
        f"assumes   AdamW moments and activations in {p.dtype}; sharding by the XLA backend's "
        f"SHARDING_RULES; attention={p.attention} ("
        + ("no S x S scores kept" if p.attention == "flash" else "S x S scores materialized")
        + f"); {p.hbm_reserve:.0%} of HBM reserved; MFU {p.mfu:g}. An estimate: "
        + (
            "`python -m clm.aot` with the same arguments gives the TPU compiler's own figures"
            if p.slice.is_tpu
            else "XLA's memory report of a real step is the ground truth"
        ),
    ]
    return "\n".join(lines)


# How far this model was measured from the TPU compiler on the configurations the preset uses
# (docs/PERFORMANCE.md, "clm.plan against the compiler": 0.92 to 1.17).
CALIBRATED_WITHIN = 0.10


def tpu_caveats(p: Plan) -> list[str]:
    """What the memory model leaves out on TPUs, each measured with clm.aot: a verdict closer to
    the limit than the model's error, and the configurations it does not model."""
    if not p.slice.is_tpu or p.config is None:
        return []
    notes = []
    if p.fits and p.usable_hbm - p.memory.peak < CALIBRATED_WITHIN * p.memory.peak:
        notes.append(
            "at the edge: less to spare than this model's error against the TPU compiler "
            f"(up to {CALIBRATED_WITHIN:.0%}); check with python -m clm.aot"
        )
    if not p.config.get("xla_scan_layers", False):
        notes.append(
            "not modelled: unrolled layers (xla_scan_layers=false), where the TPU compiler keeps "
            "every layer's FSDP-gathered weights from the forward to the backward (8 layers of "
            "Mixtral-8x22B at 8,192 tokens: 82.4 GiB measured, 16.9 estimated)"
        )
    experts = p.model.moe.num_experts
    if p.experts_slots == experts and experts > p.model.moe.top_k:
        notes.append(
            "over-counted: dropless experts (one slot per token per expert), whose intermediates "
            "the TPU compiler does not all keep (8 layers at 32,768 tokens: 62.1 GiB measured, "
            "82.0 estimated)"
        )
    return notes


def overflow_reason(p: Plan) -> str:
    """One line: by how much the peak exceeds usable HBM, and the biggest contributors."""
    mem = p.memory
    over = mem.peak - p.usable_hbm
    transient = (
        ("layer inputs kept for the backward", mem.checkpoints),
        ("recomputed layer activations", mem.layer_activations),
        ("experts' gradients", mem.layer_gradients),
        ("gathered layer weights + grads", mem.gathered),
    )
    if mem.loss_peak > mem.backward_peak:
        transient = (("layer inputs", mem.checkpoints), ("logits", mem.logits))
    parts = [("parameters + gradients + AdamW state", mem.state), *transient]
    parts.sort(key=lambda kv: -kv[1])
    biggest = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts[:3])
    if mem.state >= max(mem.checkpoints, mem.layer_activations, mem.logits):
        hint = "more devices shrink the parameters, gradients and AdamW state"
    else:
        hint = (
            "activations depend on the tokens per device (per_device_train_batch_size x "
            "max_length), not on the device count"
        )
    return (
        f"DOES NOT FIT: the peak of {mem.peak / GIB:.1f} GiB exceeds the usable "
        f"{p.usable_hbm / GIB:.1f} GiB by {over / GIB:.1f} GiB ({over / p.usable_hbm:.0%}); "
        f"largest parts (GiB): {biggest}; {hint}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        p = plan(argv)
    except Exception as e:  # noqa: BLE001 - usage_error picks the user's mistakes
        if (message := config_lib.usage_error(e)) is None:
            raise
        print(message, file=sys.stderr)
        return 2
    print(render(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
