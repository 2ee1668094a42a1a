"""Build the HF model (Mixtral, or any causal LM for the dry runs) and compute its losses.

`model.config_path` builds a randomly initialized model: parameters are created on the meta
device (no memory), then materialized on the target device and initialized there, so a large
model is never built twice on the host. `model.name_or_path` without a config_path loads a
pretrained local directory (safetensors only, no remote code): meta init, then each tensor is
read from its shard straight into the parameter's memory (`SafetensorsReader`: the header's
offsets, `readinto`, no mmap and no intermediate copy unless the dtype changes). Mixtral's
original layout (`block_sparse_moe.experts.{e}.w1/w2/w3`) is fused on the fly into transformers
5's `mlp.experts.gate_up_proj` ([E, 2I, H], w1 then w3) and `down_proj` ([E, H, I]).

Where no host may hold the whole model (the XLA backend: Mixtral-8x22B is 282 GB in bf16),
`materialize` makes it a piece at a time (a decoder layer, or another module's own tensors),
randomly initialized or read from the shards, and hands each tensor to the backend's `place`
(a sharded transfer) before the next piece exists: the host's peak is one decoder layer.

Losses follow the reference: next-token NLL, token-mean over unmasked labels; in training the
Switch load-balancing loss times `router_aux_loss_coef` is added (eval reports the NLL alone).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from clm.config import resolve_config_file
from clm.data import IGNORE_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"


def build_hf_config(model_cfg: DictConfig) -> PretrainedConfig:
    if model_cfg.config_path is not None:
        path = resolve_config_file(model_cfg.config_path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if "model_type" not in values:
            raise ValueError(f"{path}: no 'model_type' key (e.g. \"mixtral\")")
        values.pop("transformers_version", None)
        config = AutoConfig.for_model(**values)
    else:
        config = _pretrained_config(model_cfg.name_or_path)
    if model_cfg.router_aux_loss_coef is not None:
        config.router_aux_loss_coef = float(model_cfg.router_aux_loss_coef)
    config.use_cache = False
    return config


def _pretrained_config(name_or_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError as e:
        raise ValueError(
            f"model.name_or_path={name_or_path}: not a local model directory and not in the "
            "local HF cache (nothing is downloaded); point it at a directory with config.json, "
            "or set model.config_path"
        ) from e


def check_safetensors(directory: Path) -> list[Path]:
    """The directory's safetensors files, each checked to be whole (header and data length).

    Reads only the headers, so a truncated or corrupt shard is named before any weight is read.
    Pickle checkpoints (*.bin) are never loaded: they can execute code.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory}: no *.safetensors files (pickle *.bin checkpoints are not loaded; "
            "convert them to safetensors)"
        )
    index = directory / INDEX_FILE
    if index.is_file():  # a shard the index names but the directory lacks
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: corrupt index ({e})") from e
        for name in sorted(named):
            if not (directory / name).is_file():
                raise ValueError(f"{directory / name}: missing shard (named in {INDEX_FILE})")
    for path in files:
        safetensors_header(path)
    return files


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset where the data starts, header) of a safetensors file, checked whole."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(header_len))
        data_end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from e
    if 8 + header_len + data_end != size:
        raise ValueError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header says "
            f"{8 + header_len + data_end})"
        )
    header.pop("__metadata__", None)
    return 8 + header_len, header


Place = Callable[[str, torch.Tensor], torch.Tensor]
# (name, shape) -> the box of that tensor a place keeps (one slice per dim), or None for all
Region = Callable[[str, tuple], "tuple[slice, ...] | None"]


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
def materialize(model: PreTrainedModel, fill, place: Place) -> None:
    """Create a meta-device model's tensors a piece at a time, never the whole model at once.

    The pieces: each element of a ModuleList (a decoder layer) with everything in it, and each
    other module's own parameters and buffers. A piece's tensors are made on the CPU, filled by
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
                new = torch.empty_like(old, device="cpu")
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
        if fresh and place is not keep:
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


_FUSED_EXPERTS = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$")


Index = tuple  # of ints and slices: a region of a tensor, as in tensor[index]


def _pieces(name: str, tensor: torch.Tensor, prefix: str) -> list[list[tuple[Index, str]]]:
    """Ways to fill `tensor` (model name `name`): lists of (region of it, checkpoint key)."""
    names = [name]
    if prefix and name.startswith(prefix + "."):
        names.append(name[len(prefix) + 1 :])  # checkpoints saved from the base model
    ways = [[((), n)] for n in names]
    ways += [[((), n.replace(".mlp.gate.", ".block_sparse_moe.gate."))] for n in names]
    fused = _FUSED_EXPERTS.match(name)
    if fused:  # Mixtral's original per-expert layout
        experts = fused.group(1) + ".block_sparse_moe.experts"
        if fused.group(2) == "gate_up_proj":  # [E, 2I, H]: w1 (gate) rows, then w3 (up) rows
            half = tensor.shape[1] // 2
            ways.append(
                [
                    ((e, slice(w * half, (w + 1) * half)), f"{experts}.{e}.w{n}.weight")
                    for e in range(tensor.shape[0])
                    for w, n in ((0, 1), (1, 3))
                ]
            )
        else:  # down_proj [E, H, I]
            ways.append([((e,), f"{experts}.{e}.w2.weight") for e in range(tensor.shape[0])])
    return ways


def _part_in_box(index: Index, box: tuple[slice, ...], shape) -> tuple[slice, ...] | None:
    """The part of tensor[index] that lies in `box` (tensor's coordinates, one slice with
    explicit bounds per dim), in tensor[index]'s own coordinates; None where they do not meet."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    part = []
    for i, b, n in zip(index, box, shape, strict=True):
        if isinstance(i, int):
            if not b.start <= i < b.stop:
                return None
            continue
        start, stop, _ = i.indices(n)
        low, high = max(start, b.start), min(stop, b.stop)
        if low >= high:
            return None
        part.append(slice(low - start, high - start))
    return tuple(part)


class SafetensorsReader:
    """Reads a model's tensors from safetensors shards, one module at a time (a `materialize`
    fill).

    Each tensor's bytes are read at the header's offsets straight into the parameter (or into a
    one-tensor buffer when the dtype differs, then cast): no mmap, no state dict, no pickle.
    `plan` names every parameter the shards lack before anything is read; a shape mismatch or
    a short read raises ValueError naming the tensor and the file. Non-persistent buffers
    (rotary frequencies) are computed by the model's own init.

    `region(name, shape)`, when given (a sharded backend's), is the box of each tensor its
    process keeps (one slice per dim, or None for all of it): only the bytes in it are read and
    the rest of the CPU tensor is left unset, so each process reads its part of the checkpoint
    (FSDP: 1/N), not all of it.
    """

    def __init__(self, files: list[Path], region: Region | None = None):
        self.directory = files[0].parent
        self.region = region
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            start, header = safetensors_header(path)
            for key, entry in header.items():
                if key in self.where:
                    raise ValueError(f"{path}: tensor {key} is also in {self.where[key][0]}")
                self.where[key] = (path, start, entry)
        # model tensor name: (the name whose `_pieces` way fills it, that way's index)
        self.ways: dict[str, tuple[str, int]] = {}
        self.prefix = ""
        self._open: dict[Path, object] = {}
        self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def plan(self, model: PreTrainedModel) -> None:
        """Choose each tensor's checkpoint keys (on the meta model); name the missing ones.

        Tied names (lm_head and the embeddings) share one choice: a checkpoint holds the
        tensor under one of them."""
        self.prefix = model.base_model_prefix
        groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():  # params, persistent
            groups.setdefault(id(tensor), []).append((name, tensor))
        missing = []
        for group in groups.values():
            choice = next(
                (
                    (name, index)
                    for name, tensor in group
                    for index, way in enumerate(_pieces(name, tensor, self.prefix))
                    if all(key in self.where for _, key in way)
                ),
                None,
            )
            if choice is None:
                missing.append(group[0][0])
            for name, _ in group:
                self.ways[name] = choice
        if missing:
            raise ValueError(
                f"{self.directory}: no weights for {len(missing)} of the model's tensors, e.g. "
                f"{', '.join(missing[:3])} (is it a checkpoint of this architecture?)"
            )

    def fill(self, owner: PreTrainedModel, module: torch.nn.Module, tensors: dict) -> None:
        for name, tensor in tensors.items():
            if name not in self.ways:  # a non-persistent buffer
                continue
            source, way = self.ways[name]
            box = self.region(name, tuple(tensor.shape)) if self.region else None
            for index, key in _pieces(source, tensor, self.prefix)[way]:
                part = _part_in_box(index, box, tensor.shape) if box else ()
                if part is None:  # none of it is kept here
                    continue
                path, start, entry = self.where[key]
                if path not in self._open:
                    self._open[path] = open(path, "rb")
                self.bytes_read += _read_tensor(
                    self._open[path], path, start, key, entry, tensor[index], part
                )
            tensor._is_hf_initialized = True  # HF's init below leaves loaded tensors alone
        if module._non_persistent_buffers_set:  # e.g. rotary inv_freq: not in checkpoints
            with hf_init.guard_torch_init_functions():
                owner._init_weights(module)


def _read_tensor(
    f, path: Path, start: int, key: str, entry: dict, region: torch.Tensor, part: tuple = ()
) -> int:
    """Checkpoint tensor `key` into `region`; with `part` (slices), only region[part]: one
    contiguous read per run of it (a dim-0 slice is one read). Returns the bytes read."""
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
    shape = list(entry["shape"])
    if list(region.shape) != shape:
        raise ValueError(
            f"{path}: tensor {key} has shape {shape}, the model expects {list(region.shape)}"
        )
    begin, end = entry["data_offsets"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != math.prod(shape) * itemsize:
        raise ValueError(
            f"{path}: tensor {key} has {end - begin} bytes, expected {math.prod(shape) * itemsize}"
        )
    if not shape:  # a scalar: one element
        shape, region = [1], region.reshape(1)
    part = [b.indices(n)[:2] for b, n in zip(part, shape, strict=False)]
    part += [(0, n) for n in shape[len(part) :]]
    # the runs: every index of the dims before the last partial one, then all the rest
    last = max((d for d, (a, b) in enumerate(part) if (a, b) != (0, shape[d])), default=0)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    read = 0
    for prefix in itertools.product(*(range(a, b) for a, b in part[:last])):
        first, stop = part[last]
        offset = sum(i * s for i, s in zip(prefix, strides, strict=False)) + first * strides[last]
        run = region[prefix][first:stop]
        direct = dtype == run.dtype and run.is_contiguous()
        target = run if direct else torch.empty(run.shape, dtype=dtype)
        buffer = target.reshape(-1).view(torch.uint8).numpy()
        f.seek(start + begin + offset * itemsize)
        if f.readinto(buffer) != buffer.nbytes:
            raise ValueError(f"{path}: truncated while reading tensor {key}")
        read += buffer.nbytes
        if not direct:
            run.copy_(target)
    return read


def is_moe(config: PretrainedConfig) -> bool:
    return getattr(config, "num_local_experts", 0) > 1


def build_model(
    model_cfg: DictConfig,
    device: torch.device,
    seed: int,
    place: Place | None = None,
    region: Region | None = None,
) -> PreTrainedModel:
    """The model on `device`, in `model.dtype`, in train mode.

    `place` (a backend's, e.g. XLA's sharded transfer): the model is made one module at a time
    on the CPU (`materialize`) and each tensor handed to `place`, so no host ever holds the
    whole model; the random init is the same as without it. With `region` too, each host reads
    only the part of each checkpoint tensor `place` keeps. Without `place`, a random model is
    initialized whole on `device`, and a pretrained one is still read module by module, each
    tensor moved to `device`.
    """
    config = build_hf_config(model_cfg)
    _configure_experts(config, model_cfg)
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.config_path is not None:
        model = _meta_model(config, dtype)
        torch.manual_seed(seed)
        if place is None:
            model.to_empty(device=device)
            with torch.no_grad():
                model.init_weights()  # also recomputes the rotary buffers lost on the meta device
        else:
            materialize(model, random_init, place)
    else:
        if place is None and torch.device(device).type != "cpu":
            place = functools.partial(_to_device, device=device)
        model = load_pretrained(model_cfg.name_or_path, config, dtype, place or keep, region)
    return _ready_to_train(model, model_cfg)


def _ready_to_train(model: PreTrainedModel, model_cfg: DictConfig) -> PreTrainedModel:
    if model_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def build_sharded_model(
    model_cfg: DictConfig,
    device: torch.device,
    seed: int,
    shard: Callable[[PreTrainedModel], PreTrainedModel],
) -> PreTrainedModel:
    """The model sharded by `shard` (FSDP2's `fully_shard`) before any weight exists.

    `shard` runs on the meta-device model, and each process allocates only its shards on
    `device` (`to_empty`). The weights are then made exactly as `build_model` makes them for
    one process, a piece (a decoder layer) at a time on the CPU (`materialize`: random init by
    the CPU generator, or read from safetensors), and each process copies its part of each
    tensor into its shard (`LocalParts`) before the next piece is made: no process or device
    ever holds the whole model, and every process gets the numbers one process would. From a
    checkpoint, each process reads only its parts' bytes.
    """
    config = build_hf_config(model_cfg)
    _configure_experts(config, model_cfg)
    model = shard(_ready_to_train(_meta_model(config, DTYPES[model_cfg.dtype]), model_cfg))
    model.to_empty(device=device)
    parts = LocalParts(model)
    build_model(model_cfg, torch.device("cpu"), seed, parts, parts.region)
    unfilled = [name for name, t in parts.targets.items() if id(t) not in parts.filled]
    if unfilled:  # to_empty left them uninitialized: never train on that
        raise RuntimeError(f"the sharded model's {', '.join(unfilled[:3])} were never filled")
    return model


class LocalParts:
    """A `materialize` place into a sharded model: this process's part of each CPU tensor is
    copied into the sharded model's tensor of the same name (a DTensor's local shard, or a
    whole unsharded buffer), and the CPU tensor dropped (a meta stand-in is returned).

    `region` is that part as a box, so a checkpoint reader reads only it."""

    def __init__(self, model: torch.nn.Module):
        self.targets = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self.filled: set[int] = set()

    def region(self, name: str, shape: tuple = ()) -> tuple[slice, ...] | None:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        target = self.targets[name]
        if not isinstance(target, DTensor):
            return None
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))

    @torch.no_grad()
    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = self.targets[name]
        box = self.region(name)
        if box is None:
            target.copy_(tensor)
        else:
            target.to_local().copy_(tensor[box])
        self.filled.add(id(target))
        return torch.empty_like(tensor, device="meta")


def _to_device(name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device)


def _configure_experts(config: PretrainedConfig, model_cfg: DictConfig) -> None:
    """Select the experts implementation (clm.moe) for MoE models."""
    if not is_moe(config):
        return
    from clm import moe

    name = moe.resolve_implementation(model_cfg.moe_implementation, model_cfg.capacity_factor)
    moe.configure_moe(config, name, float(model_cfg.capacity_factor))


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
