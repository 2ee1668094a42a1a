"""A model made a piece at a time (`clm.model.materialize`), as the XLA backend builds it: the
same weights as made whole, and never more than one piece on the host."""

from __future__ import annotations

import pytest
import torch
from conftest import model_spec

from clm import model as model_lib


class Recorder:
    """A `place` that keeps a copy of each tensor and, at each call, measures how many of the
    model's parameter elements are on the CPU and not placed yet (made, or being filled)."""

    def __init__(self, model):
        self.model = model
        self.placed: dict[str, int] = {}  # name: data_ptr of its placed copy
        self.peak = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        placed = set(self.placed.values())
        live = sum(
            p.numel()
            for p in self.model.parameters()
            if p.device.type == "cpu" and p.data_ptr() not in placed
        )
        self.peak = max(self.peak, live)
        assert name not in self.placed, f"{name} placed twice"
        copy = tensor.clone()
        self.placed[name] = copy.data_ptr()
        return copy


@pytest.mark.parametrize("config_path", ["mixtral_small.json", "gpt2_tiny.json"])
def test_random_init_in_pieces_is_the_whole_model_init(config_path):
    """The same numbers as `init_weights` on the whole model (the RNG draws in HF's order; GPT-2
    redoes a child's weight from its parent module and ties its embeddings), with at most one
    decoder layer's parameters on the host that are not placed yet."""
    cfg = model_spec(config_path=config_path)
    whole = model_lib.build_model(cfg, torch.device("cpu"), 7)
    config = model_lib.build_hf_config(cfg)
    pieces = model_lib._meta_model(config, torch.float32)
    recorder = Recorder(pieces)
    torch.manual_seed(7)
    model_lib.materialize(pieces, model_lib.random_init, recorder)

    expected, got = whole.state_dict(), pieces.state_dict()
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert all(b.device.type == "cpu" for b in pieces.buffers())  # rotary frequencies made too
    unique = {id(p): n for n, p in pieces.named_parameters()}
    assert sorted(n for n in recorder.placed if n in unique.values()) == sorted(unique.values())
    if config.tie_word_embeddings:
        assert pieces.get_output_embeddings().weight is pieces.get_input_embeddings().weight
    # the pieces: each decoder layer whole, each other module's own tensors (here, one each)
    layers = [layer for m in pieces.modules() if isinstance(m, torch.nn.ModuleList) for layer in m]
    largest_piece = max(
        max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        max(p.numel() for p in pieces.parameters()),
    )
    total = sum(p.numel() for p in pieces.parameters())
    assert 0 < recorder.peak <= largest_piece < total, (recorder.peak, largest_piece, total)


def test_build_model_places_every_tensor_once_and_keeps_the_seed():
    """build_model with a `place` gives the model `place` returned, equal to the CPU build."""
    cfg = model_spec(config_path="mixtral_small.json")
    seen = []

    def place(name, tensor):
        seen.append(name)
        return tensor.to(torch.float64)  # visibly placed: a dtype the CPU build does not use

    model = model_lib.build_model(cfg, torch.device("cpu"), 3, place)
    reference = model_lib.build_model(cfg, torch.device("cpu"), 3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert len(seen) == len(set(seen)) == len(model.state_dict()) + 2  # + 2 rotary buffers
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value.double()), name
