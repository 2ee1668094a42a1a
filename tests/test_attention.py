"""The flash-attention adapter (clm/backends/xla_attention.py) in a real tiny Mixtral, on CPU.

The Pallas kernel runs only on a TPU; here the adapter drives a reference causal attention
with the kernel's signature, written out with matmul + softmax, and the model must give the
same logits and gradients as with transformers' own eager attention.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from clm.backends import xla_attention as attention


def tiny_mixtral(**overrides) -> MixtralConfig:
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query: 2 query heads per k/v head
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    values.update(overrides)
    return MixtralConfig(**values)


class ReferenceKernel:
    """Causal attention with the Pallas kernel's signature; records what it was given."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, q, k, v, causal=False, sm_scale=1.0, partition_spec=None, mesh=None):
        self.calls.append(
            dict(q=q.shape, k=k.shape, causal=causal, scale=sm_scale, spec=partition_spec)
        )
        scores = (q @ k.transpose(-1, -2)) * sm_scale
        if causal:
            s_q, s_k = q.shape[-2], k.shape[-2]
            future = torch.ones(s_q, s_k, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(-1) @ v


def model_pair(config: MixtralConfig):
    torch.manual_seed(0)  # two configs: switching one model's attention edits its config
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    flash = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    flash.load_state_dict(reference.state_dict())
    return reference, flash


def test_flash_adapter_matches_eager_attention_in_a_mixtral():
    reference, flash = model_pair(tiny_mixtral())
    kernel = ReferenceKernel()
    spec = (("fsdp", "expert"), "tensor", None, None)
    assert attention.use_flash_attention(flash, "auto", kernel, partition_spec=spec, mesh=None)
    assert flash.config._attn_implementation == attention.ATTENTION_KEY
    assert reference.config._attn_implementation == "eager"

    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    out_ref = reference(input_ids=ids, labels=ids)
    out_flash = flash(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_flash.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ref.loss.backward()
    out_flash.loss.backward()
    for (name, p_ref), p_flash in zip(
        reference.named_parameters(), flash.parameters(), strict=True
    ):
        torch.testing.assert_close(p_flash.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)

    # one call per layer; k/v repeated to the query's 4 heads; causal; 1/sqrt(head_dim)
    assert len(kernel.calls) == 2
    head_dim = 32 // 4
    for call in kernel.calls:
        assert call["q"] == call["k"] == (3, 4, 24, head_dim)
        assert call["causal"] is True
        assert call["scale"] == pytest.approx(head_dim**-0.5)
        assert call["spec"] == spec


def test_attention_choice():
    _, model = model_pair(tiny_mixtral())
    before = model.config._attn_implementation
    assert not attention.use_flash_attention(model, "sdpa", ReferenceKernel())
    assert not attention.use_flash_attention(model, "auto", None)  # no TPU: HF's attention
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="xla_attention=flash needs"):
        attention.use_flash_attention(model, "flash", None)
    with pytest.raises(ValueError, match="xla_attention='pallas'"):
        attention.use_flash_attention(model, "pallas", ReferenceKernel())


def test_sliding_window_is_refused():
    _, model = model_pair(tiny_mixtral(sliding_window=8))
    with pytest.raises(ValueError, match="sliding_window=8"):
        attention.use_flash_attention(model, "flash", ReferenceKernel())
