"""`xla_scan_layers`: a Mixtral decoder stack run as torch_xla's scan, one layer as a loop body.

Unrolled, the XLA program holds every decoder layer's forward and backward, and its compile
time grows with the layers: the TPU compiler took about 90 s per Mixtral-8x22B layer on a
2-core host (clm.aot; docs/PERFORMANCE.md, TPU section), over an hour for the 56 layers.
Scanned, the program holds one layer's forward and one layer's backward, each the body of a
while loop over the layers' stacked weights (torch_xla's `scan`, what torchprime does for its
models and MaxText's `scan_layers` for JAX ones), and compiles in about the time of one layer.

`scan_decoder_layers(model, ...)` swaps the forward of the model's decoder stack
(`model.model`, HF's MixtralModel) for `_scanned_forward`: embeddings, rotary tables, the scan,
the final norm, as HF's forward computes them (tested equal to it), with what HF collects by
hooks carried out of the loop instead: each layer's router logits (for the load-balancing
loss; as the scan's per-layer outputs), from which clm.moe's statistics are then recomputed. Parameter names and
modules stay as they are (checkpoints, sharding rules and optimizer state do not change); the
layers' weights are stacked into [layers, ...] tensors at each forward (a copy of the
sharded weights; their gradients flow back to each layer's parameters).

Activation checkpointing (`model.gradient_checkpointing`) becomes the scan's partitioner:
AOTAutograd's min-cut partitioner with no activation memory budget and none of its bans on
recomputation, so the forward keeps only each layer's inputs and the backward recomputes the
rest (HF's per-layer `torch.utils.checkpoint` cannot run inside the traced body). The loop
also keeps XLA from merging the recomputation back into the forward, which an unrolled
program needs an optimization barrier for.

What the body may not do: read a value on the host, hold state outside the loop, or use an
explicit attention mask (the trainer's blocks are full: causal attention needs none).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config
from functorch.compile import default_partition, min_cut_rematerialization_partition
from transformers.modeling_outputs import MoeModelOutputWithPast


def scan_decoder_layers(model: torch.nn.Module, constrain: Callable | None) -> None:
    """Run `model`'s decoder layers as one scanned loop (module docstring). `constrain(hidden)`
    lays out each layer's output (the XLA backend's data sharding), or None."""
    stack = getattr(model, "model", None)
    layers = getattr(stack, "layers", None)
    gate = getattr(getattr(layers[0], "mlp", None), "gate", None) if layers else None
    if not isinstance(layers, torch.nn.ModuleList) or gate is None:
        raise ValueError(
            f"xla_scan_layers=true scans Mixtral-style decoder layers; {type(model).__name__} "
            "has none (set xla_scan_layers=false)"
        )
    remat = bool(getattr(model, "is_activation_checkpointing", False))
    if remat:  # the scan's partitioner recomputes instead (module docstring)
        model.activation_checkpointing_disable()
    stack.forward = types.MethodType(_scanned_forward, stack)
    stack.clm_scan = {"remat": remat, "constrain": constrain}


def _scanned_forward(
    self,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    output_router_logits: bool | None = None,
    **kwargs,
) -> MoeModelOutputWithPast:
    """HF MixtralModel.forward for full causal blocks, its decoder layers scanned."""
    from transformers.masking_utils import create_causal_mask

    if attention_mask is not None or kwargs.get("inputs_embeds") is not None:
        raise NotImplementedError("xla_scan_layers: takes input_ids only, no attention mask")
    hidden = self.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(
        config=self.config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )
    if mask is not None:
        raise NotImplementedError(
            "xla_scan_layers: this attention needs an explicit mask; use xla_attention=flash "
            "or sdpa"
        )
    cos, sin = self.rotary_emb(hidden, position_ids)
    hidden, router_logits = _scan(self.layers, hidden, cos, sin, **self.clm_scan)
    return MoeModelOutputWithPast(
        last_hidden_state=self.norm(hidden),
        router_logits=tuple(router_logits.unbind(0)) if output_router_logits else None,
    )


def _scan(layers, hidden, cos, sin, remat: bool, constrain: Callable | None):
    """(last hidden states, router logits [layers, tokens, experts]); each layer's MoE
    statistics are left on its experts module, as an unscanned forward leaves them."""
    from torch_xla.experimental.scan import scan

    from clm import moe

    first = layers[0]
    names = [name for name, _ in first.named_parameters()]
    stacked = {name: torch.stack([layer.get_parameter(name) for layer in layers]) for name in names}
    captured = []  # the router's logits, by a hook on the body's (first layer's) router
    hook = first.mlp.gate.register_forward_hook(lambda m, args, out: captured.append(out[0]))

    def body(carry, params):
        hidden, cos, sin = carry
        out = torch.func.functional_call(
            first, params, (hidden,), {"position_embeddings": (cos, sin)}, strict=True
        )
        if constrain is not None:
            out = constrain(out)
        # the statistics the experts left inside the body cannot leave it (every output of
        # a scan needs a gradient): recomputed from the router logits below
        if hasattr(first.mlp.experts, moe._STATS_ATTR):
            delattr(first.mlp.experts, moe._STATS_ATTR)
        return (out, cos, sin), captured.pop()

    partition = _recompute_all if remat else default_partition
    try:
        (hidden, _, _), router_logits = scan(
            body, (hidden, cos, sin), stacked, partition_fn=partition
        )
    finally:
        hook.remove()
    for layer, logits in zip(layers, router_logits.unbind(0), strict=True):
        moe.record_stats_from_router(layer.mlp.experts, logits)
    return hidden, router_logits


@contextlib.contextmanager
def _no_activation_budget():
    """AOTAutograd's min-cut partitioner told to keep no activation it can recompute."""
    settings = {
        "activation_memory_budget": 0.0,
        "aggressive_recomputation": True,
        "recompute_views": True,
        "ban_recompute_reductions": False,
        "ban_recompute_not_in_allowlist": False,
        "ban_recompute_materialized_backward": False,
        "ban_recompute_long_fusible_chains": False,
        "ban_recompute_used_far_apart": False,
    }
    with functorch_config.patch(settings):
        yield


def _recompute_all(joint_module, joint_inputs, **kwargs):
    """A scan partitioner that saves only the body's inputs: every activation is recomputed
    in the backward, as `torch.utils.checkpoint` does around a layer."""
    with _no_activation_budget():
        return min_cut_rematerialization_partition(joint_module, joint_inputs, **kwargs)
