"""Activation layouts under torch_xla SPMD, by logical dimension names.

The XLA backend hands an `ActivationSharding` to `clm.moe` (`moe.use_sharding`), which names
its buffers' dimensions logically ("groups", "experts", "expert_slots";
`clm.sharding.ACTIVATION_AXES` maps them to mesh axes) and asks for them with
`constrain(tensor, dims)`: torch_xla's `MarkShardingFunction` (the layout of the tensor and of
its gradient; it also works inside the body of torch_xla's scan, which plain `mark_sharding`
does not). A dimension its axes do not divide stays whole.
"""

from __future__ import annotations

import math

import torch
import torch_xla.distributed.spmd as xs
from torch_xla.distributed.spmd.xla_sharding import MarkShardingFunction

from clm.sharding import ACTIVATION_AXES, axes_of


class ActivationSharding:
    def __init__(self, mesh: xs.Mesh, axis_sizes: dict[str, int]):
        self.mesh = mesh
        self.axis_sizes = axis_sizes

    def spec(self, shape, dims: tuple) -> tuple | None:
        """The partition spec of a tensor of `shape` with logical `dims`; None: replicated."""
        spec = []
        for name, size in zip(dims, shape, strict=True):
            axes = ACTIVATION_AXES.get(name) if name else None
            devices = math.prod(self.axis_sizes[a] for a in axes_of(axes))
            spec.append(axes if axes and devices > 1 and size % devices == 0 else None)
        return tuple(spec) if any(e is not None for e in spec) else None

    def constrain(self, tensor: torch.Tensor, dims: tuple) -> torch.Tensor:
        """The tensor laid out by `dims`, its gradient too (torch_xla's MarkShardingFunction,
        which also works inside a traced scan body)."""
        spec = self.spec(tensor.shape, dims)
        return tensor if spec is None else MarkShardingFunction.apply(tensor, self.mesh, spec)
