"""Flash attention for the XLA backend, as a transformers attention function.

On XLA, HF's `sdpa` lowers to the math form: a [B, H, S, S] score tensor per layer. At the
benchmark's 32,768 tokens that is 4 GiB per head and sequence in fp32, so nothing fits (the
capacity planner's memory model assumes an O(S) kernel). On TPU, torch_xla ships the Pallas
flash attention kernel (`torch_xla.experimental.custom_kernel.flash_attention`, needs jax);
`make_attention_function` adapts it to transformers' attention interface and the XLA backend
registers it as `ATTENTION_KEY` (`xla_attention=auto|flash|sdpa`).

What the adapter does, and why that is enough for this package:
- causal, no padding mask: training blocks are full, and the eval set's padding sits at the
  end of its last block, where causal attention keeps it from reaching any real token (the
  padding's own outputs carry label -100). No mask is built at all: transformers skips mask
  creation for attention functions it has no mask function for.
- grouped-query attention by repeating the k/v heads (the kernel takes equal head counts).
- under SPMD torch_xla runs the kernel per shard (a shard_map) with `partition_spec`: batch
  rows on the data axes and heads on "tensor", the layout the sharding rules give q/k/v.
- refused (NotImplementedError): attention dropout and sliding windows (Mixtral-8x22B has
  neither).

The Pallas kernel itself runs only on a TPU; the tests drive this adapter with a reference
kernel of the same signature on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ATTENTION_KEY = "clm_xla_pallas"  # no "flash" in it: transformers looks such keys up as hub kernels
CHOICES = ("auto", "flash", "sdpa")


def make_attention_function(kernel: Callable, partition_spec=None, mesh=None) -> Callable:
    """A transformers attention function that calls `kernel(q, k, v, causal=, sm_scale=, ...)`.

    `kernel` has torch_xla's `flash_attention` signature: q, k, v as [B, H, S, head_dim] with
    equal head counts; returns [B, H, S, head_dim].
    """

    def attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if dropout:
            raise NotImplementedError(f"{ATTENTION_KEY}: attention dropout={dropout}")
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        if window:
            raise NotImplementedError(f"{ATTENTION_KEY}: sliding_window={window}")
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = kernel(
            query, key, value, causal=True, sm_scale=scale, partition_spec=partition_spec, mesh=mesh
        )
        return out.transpose(1, 2).contiguous(), None  # [B, S, H, head_dim], as HF expects

    return attention_forward


def register(kernel: Callable, partition_spec=None, mesh=None) -> str:
    """Register the adapter around `kernel` with transformers; returns the key to select it."""
    from transformers import AttentionInterface

    AttentionInterface.register(
        ATTENTION_KEY, make_attention_function(kernel, partition_spec, mesh)
    )
    return ATTENTION_KEY


def pallas_flash_attention() -> Callable | None:
    """torch_xla's Pallas flash attention when the program is for a TPU (`clm.backends.pallas`)
    and jax is installed; else None."""
    from clm.backends import pallas

    if not (pallas.on_tpu() and pallas.jax_available()):
        return None
    try:
        from torch_xla.experimental.custom_kernel import flash_attention
    except ImportError:
        return None
    return flash_attention


def use_flash_attention(
    model: torch.nn.Module, choice: str, kernel: Callable | None, **spmd
) -> bool:
    """Switch `model` to the flash adapter per `xla_attention`; True when it was switched.

    auto: flash when `kernel` is available (a TPU with jax), else HF's sdpa. flash: the kernel
    is required (ValueError when it is missing). sdpa: leave the model as it is.
    """
    if choice not in CHOICES:
        raise ValueError(f"xla_attention={choice!r}: must be one of {', '.join(CHOICES)}")
    if choice == "sdpa" or (choice == "auto" and kernel is None):
        return False
    if kernel is None:
        raise ValueError(
            "xla_attention=flash needs torch_xla's Pallas flash attention: a TPU and jax "
            "(the TPU image has both); use xla_attention=auto or sdpa elsewhere"
        )
    if getattr(model.config, "sliding_window", None):
        raise ValueError(
            f"xla_attention=flash: the model has sliding_window={model.config.sliding_window}, "
            "which the flash adapter does not implement; use xla_attention=sdpa"
        )
    model.set_attn_implementation(register(kernel, **spmd))
    return True
