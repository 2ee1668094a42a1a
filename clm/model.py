"""Build the HF model (Mixtral, or any causal LM for the dry runs) and compute its losses.

The model is built from the run's `clm.spec.ModelSpec`: the HF config from the JSON values it
read, the experts as its MoESpec says (`clm.moe.configure_moe`). A spec without `pretrained`
(`model.config_path`) builds a randomly initialized model: parameters are created on the meta
device (no memory), then materialized on the target device and initialized there, so a large
model is never built twice on the host. With `pretrained` (`model.name_or_path` without a
config_path) it loads a pretrained local directory (safetensors only, no remote code): meta
init, then each tensor is read from its shard straight into the parameter's memory
(`clm.safetensors_reader`).

Where no host may hold the whole model, `materialize` makes it a piece at a time (a decoder
layer, or another module's own tensors), randomly initialized or read from the shards, and
hands each tensor to a `place` before the next piece exists, so the host's peak is one decoder
layer: the XLA backend's sharded transfer, or the copy of each process's part into a model FSDP2
sharded on the meta device (each backend's `build_model`, clm/backends/, passes its `place`).
A `region` (the part each process keeps) narrows the checkpoint reads to that part.

Losses follow the reference: next-token NLL, token-mean over unmasked labels; in training the
Switch load-balancing loss times `router_aux_loss_coef` is added (eval reports the NLL alone).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from clm.data import IGNORE_INDEX
from clm.safetensors_reader import Region, SafetensorsReader, check_safetensors
from clm.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_hf_config(spec: ModelSpec) -> PretrainedConfig:
    """The HF config of `spec`: transformers' own from the JSON values the spec read (for a
    pretrained directory what `AutoConfig.from_pretrained` gives), no KV cache, and the
    experts pointed at our implementation of the spec's MoESpec. Only attributes HF defines
    are set: the MoE settings travel with the experts function (`clm.moe.configure_moe`)."""
    config = AutoConfig.for_model(**spec.hf_values())
    if spec.pretrained is not None:
        config.name_or_path = spec.pretrained  # as from_pretrained sets it
    if spec.moe is not None:
        from clm import moe

        config.router_aux_loss_coef = spec.moe.aux_loss_coef  # the model.* override, if any
        moe.configure_moe(config, spec.moe)
    config.use_cache = False
    return config


Place = Callable[[str, torch.Tensor], torch.Tensor]


def keep(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The `place` that leaves each tensor where it was made (the CPU)."""
    return tensor


def load_pretrained(
    name_or_path: str,
    config: PretrainedConfig,
    dtype: torch.dtype,
    place: Place = keep,
    region: Region | None = None,
):
    """A local HF checkpoint: safetensors only, no remote code, nothing downloaded.

    A directory is read module by module (`materialize`, `SafetensorsReader`), each tensor
    handed to `place` once read: the host holds one module's tensors beyond what `place` keeps.
    With `region` (the part of each tensor `place` keeps), only that part is read.
    A name found only in the local HF cache goes through transformers' `from_pretrained` (the
    whole model on the CPU first).
    """
    if Path(name_or_path).is_dir():
        files = check_safetensors(Path(name_or_path))
        model = _meta_model(config, dtype)
        with SafetensorsReader(files, region) as reader:
            reader.plan(model)  # every missing tensor is named before anything is read
            materialize(model, reader.fill, place)
        return model
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        config=config,
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    if place is not keep:
        with torch.no_grad():
            place_all(model, place)
    return model


def _meta_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def materialize(
    model: PreTrainedModel, fill, place: Place, device: torch.device | str = "cpu"
) -> None:
    """Create a meta-device model's tensors a piece at a time, never the whole model at once.

    The pieces: each element of a ModuleList (a decoder layer) with everything in it, and each
    other module's own parameters and buffers. A piece's tensors are made on `device` (the CPU
    unless a random init runs on a GPU), filled by
    `fill(owner, module, {name: tensor})` module by module (`owner`: the PreTrainedModel whose
    `_init_weights` applies), handed to `place(name, tensor)` (e.g. a sharded transfer to the
    devices) and dropped, so the host's peak is one decoder layer (Mixtral-8x22B: 2.5G
    parameters), whatever the model's size. Modules are filled children first, the order of
    HF's `initialize_weights`, and a layer is placed only after all its modules are filled (a
    parent's init may redo a child's tensor, as GPT-2's does), so a random init draws the same
    numbers as `init_weights` on the whole model (tested). A tensor shared by modules (tied
    embeddings) is made and placed once.
    """
    placed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor): (it, placed)

    def make(module: torch.nn.Module, prefix: str) -> dict:
        fresh = {}
        for slots in (module._parameters, module._buffers):
            for name, old in slots.items():
                if old is None or old.device.type != "meta":
                    continue
                if id(old) in placed:  # tied to a tensor placed already
                    slots[name] = placed[id(old)][1]
                    continue
                new = torch.empty_like(old, device=device)
                if isinstance(old, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                slots[name] = new
                fresh[prefix + name] = (slots, name, old, new)
        return fresh

    def place_piece(fresh: dict) -> None:
        for full, (slots, name, old, new) in fresh.items():
            value = place(full, new.detach())
            if isinstance(new, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=new.requires_grad)
            value._is_hf_initialized = True  # a later init (HF's, a parent's) leaves it alone
            slots[name] = value
            placed[id(old)] = (old, value)
        if fresh and place is not keep and torch.device(device).type == "cpu":
            _return_freed_memory()

    def visit(module, prefix: str, owner: PreTrainedModel, piece: dict | None) -> None:
        for name, child in module.named_children():
            child_owner = child if isinstance(child, PreTrainedModel) else owner
            if piece is None and isinstance(module, torch.nn.ModuleList):  # a layer: one piece
                layer: dict = {}
                visit(child, f"{prefix}{name}.", child_owner, layer)
                place_piece(layer)
            else:
                visit(child, f"{prefix}{name}.", child_owner, piece)
        fresh = make(module, prefix)
        if fresh or piece is not None:  # in a layer, a parent's init may redo its children's
            fill(owner, module, {full: item[3] for full, item in fresh.items()})
        if piece is None:
            place_piece(fresh)
        else:
            piece.update(fresh)

    visit(model, "", model, None)


def _return_freed_memory() -> None:
    """Hand the host memory of placed pieces back to the OS (glibc only; elsewhere nothing).

    glibc keeps freed heap memory in its arenas, and a piece's buffers are not reused by the
    next piece: measured on torch_xla's CPU runtime, the RSS grew by one piece per piece, to
    twice the model, until `malloc_trim`.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def random_init(owner: PreTrainedModel, module: torch.nn.Module, tensors: dict) -> None:
    """A `materialize` fill: HF's own initialization of the module (`_init_weights`)."""
    with hf_init.guard_torch_init_functions():
        owner._initialize_weights(module)


def place_all(model: torch.nn.Module, place: Place) -> None:
    """Hand every tensor of a materialized model to `place` (tied ones once), in place."""
    placed: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for slots in (module._parameters, module._buffers):
            for name, old in slots.items():
                if old is None:
                    continue
                if id(old) not in placed:
                    value = place(f"{prefix}.{name}" if prefix else name, old.detach())
                    if isinstance(old, torch.nn.Parameter):
                        value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
                    placed[id(old)] = value
                slots[name] = placed[id(old)]


def is_moe(config: PretrainedConfig) -> bool:
    """A built model's MoE test, on HF's own attribute (the spec's rule: `moe` is not None)."""
    return getattr(config, "num_local_experts", 0) > 1


def build_model(
    spec: ModelSpec,
    device: torch.device,
    seed: int,
    place: Place | None = None,
    region: Region | None = None,
) -> PreTrainedModel:
    """The model of `spec` on `device`, in the spec's dtype, in train mode.

    The dropping experts' capacity group is the spec's (`MoESpec.group_tokens`: the trainer's
    max_length, one sequence; None: all the tokens of a forward call).

    `place` (a backend's, e.g. XLA's sharded transfer): the model is made one module at a time
    (`materialize`; a random init on `device`, a checkpoint read on the CPU) and each tensor
    handed to `place`, so no host ever holds the whole model; the random init is the same as
    without it. With `region` too, each host reads
    only the part of each checkpoint tensor `place` keeps. Without `place`, a random model is
    initialized whole on `device`, and a pretrained one is still read module by module, each
    tensor moved to `device`.
    """
    config = build_hf_config(spec)
    dtype = DTYPES[spec.dtype]
    if spec.pretrained is None:
        model = _meta_model(config, dtype)
        torch.manual_seed(seed)
        if place is None:
            model.to_empty(device=device)
            with torch.no_grad():
                model.init_weights()  # also recomputes the rotary buffers lost on the meta device
        else:
            materialize(model, random_init, place, device)
    else:
        if place is None and torch.device(device).type != "cpu":
            place = functools.partial(_to_device, device=device)
        model = load_pretrained(spec.pretrained, config, dtype, place or keep, region)
    return _ready_to_train(model, spec)


def _ready_to_train(model: PreTrainedModel, spec: ModelSpec) -> PreTrainedModel:
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def build_meta_model(spec: ModelSpec) -> PreTrainedModel:
    """The model on the meta device (no memory), configured and in train mode as `build_model`
    leaves it: what a sharded backend partitions before any weight exists."""
    return _ready_to_train(_meta_model(build_hf_config(spec), DTYPES[spec.dtype]), spec)


def _to_device(name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token): for MoE, only top_k of num_experts expert weights are active."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    if not is_moe(config):
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * config.num_experts_per_tok // config.num_local_experts
    return total, active


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL over unmasked labels, number of those labels), in fp32.

    The labels are shifted (left by one, padded with the ignore index), not the logits: slicing
    the [B, S, V] logits would copy them in the forward and again in the backward (measured:
    the whole train step of the embedded default went from 0.82x to 0.99x stock HF's).
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], with_aux: bool):
    """(nll sum, target count, aux loss or None) for one batch."""
    kwargs = {"output_router_logits": True} if with_aux and is_moe(model.config) else {}
    out = model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    total, count = nll_sum(out.logits, batch["labels"])
    aux = getattr(out, "aux_loss", None) if kwargs else None
    return total, count, aux


def save_config(model: PreTrainedModel, path: Path) -> None:
    model.config.to_json_file(str(path))
