"""Reading HF safetensors checkpoints tensor by tensor, into tensors a model already has.

No mmap, no state dict, no pickle: each tensor's bytes are read at the header's offsets straight
into the parameter's memory (`readinto`; through a one-tensor buffer only when the dtype
changes). A sharded backend's `region` narrows each read to the part of the tensor its process
keeps. Mixtral's original layout (`block_sparse_moe.experts.{e}.w1/w2/w3`) is fused on the fly
into transformers 5's `mlp.experts.gate_up_proj` ([E, 2I, H], w1 then w3) and `down_proj`
([E, H, I]).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers import initialization as hf_init

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
# (name, shape) -> the box of a tensor that its process keeps (one slice per dim), None for all
Region = Callable[[str, tuple], "tuple[slice, ...] | None"]


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
