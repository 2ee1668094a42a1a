"""clm.moe: the spec plumbing, equivalence with HF's experts code, drop order, metrics, XLA."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MixtralConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from clm import moe
from clm.model_math import capacity
from clm.spec import IMPLEMENTATIONS, MoESpec

ROOT = Path(__file__).resolve().parent.parent
OURS = ("dense", "dropping", "dropless")
TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(**overrides) -> MixtralConfig:
    kwargs = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
    }
    return MixtralConfig(**{**kwargs, **overrides})


def no_drop_factor(config) -> float:
    """E / K: capacity = T, so `dropping` cannot drop anything."""
    return config.num_local_experts / config.num_experts_per_tok


def spec_for(config, implementation: str, capacity_factor: float = 0.0, **kwargs) -> MoESpec:
    """The MoESpec of `config`'s experts (as clm.spec reads them from a JSON)."""
    return MoESpec(
        config.num_local_experts,
        config.num_experts_per_tok,
        implementation,
        capacity_factor,
        **kwargs,
    )


def key_for(config, implementation: str, capacity_factor: float = 0.0) -> str:
    """The experts-function key of one of our implementations for `config`'s experts."""
    return moe.experts_key(spec_for(config, implementation, capacity_factor))


def build_model(config, implementation: str, capacity_factor: float = 0.0, seed: int = 0):
    """A fresh MixtralForCausalLM (own config copy: models share their config object)."""
    config = copy.deepcopy(config)
    moe.configure_moe(config, spec_for(config, implementation, capacity_factor))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def make_experts(
    dim, ffn, num_experts, top_k, implementation, capacity_factor=0.0, seed=0, group_tokens=None
):
    config = tiny_config(
        hidden_size=dim,
        intermediate_size=ffn,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )
    spec = spec_for(config, implementation, capacity_factor, group_tokens=group_tokens)
    moe.configure_moe(config, spec)
    torch.manual_seed(seed)
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.5)
    torch.nn.init.normal_(experts.down_proj, std=0.5)
    return experts


def random_routing(tokens, num_experts, top_k, seed=0, skew=0.0):
    """Top-k routing as MixtralTopKRouter computes it, from random logits (+ a skew)."""
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(tokens, num_experts, generator=gen)
    logits_TE = logits_TE + skew * torch.arange(num_experts, 0, -1)
    weights_TK, index_TK = torch.softmax(logits_TE, -1).topk(top_k, dim=-1)
    return index_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


def run_experts(experts, implementation_key, x_TD, index_TK, weights_TK):
    """Output and grads (x, routing weights, gate_up, down) under one experts function."""
    experts = copy.deepcopy(experts)
    experts.config._experts_implementation = implementation_key
    x_TD = x_TD.detach().clone().requires_grad_(True)
    weights_TK = weights_TK.detach().clone().requires_grad_(True)
    out_TD = experts(x_TD, index_TK, weights_TK)
    gen = torch.Generator().manual_seed(123)
    out_TD.backward(torch.randn(out_TD.shape, generator=gen))
    grads = [x_TD.grad, weights_TK.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    return out_TD.detach(), grads


def assert_same(result, reference):
    (out, grads), (ref_out, ref_grads) = result, reference
    torch.testing.assert_close(out, ref_out, **TOL)
    names = ("x", "weights", "gate_up", "down")
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, **TOL, msg=f"grad {name}")


def python_reference(experts, x_TD, index_TK, weights_TK, capacity):
    """Slow dropping MoE: walk (token, k) in order, an expert takes its first `capacity`."""
    num_tokens, top_k = index_TK.shape
    taken = [0] * experts.num_experts
    rows, kept = [], []
    for t in range(num_tokens):
        row = torch.zeros_like(x_TD[t])
        for k in range(top_k):
            e = int(index_TK[t, k])
            kept.append(taken[e] < capacity)
            if kept[-1]:
                taken[e] += 1
                gate, up = (experts.gate_up_proj[e] @ x_TD[t]).chunk(2)
                hidden = torch.nn.functional.silu(gate) * up
                row = row + weights_TK[t, k] * (experts.down_proj[e] @ hidden)
        rows.append(row)
    return torch.stack(rows), torch.tensor(kept).view(num_tokens, top_k)


# --------------------------------------------------------------------------- config


def test_capacity_formula():
    assert capacity(10, 2, 8, 1.25) == 4  # ceil(3.125)
    assert capacity(4096, 2, 8, 1.25) == 1280
    # 50 * 2 / 11 * 1.1 is 10.000000000000002 in floats; the intended value is exactly 10.
    assert capacity(50, 2, 11, 1.1) == 10
    assert capacity(4, 2, 8, 100.0) == 4  # never more slots than tokens
    assert capacity(1, 1, 8, 0.01) == 1


def test_configure_moe_selects_implementation(tmp_path):
    config = tiny_config()
    default = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    hf_default = default.config._experts_implementation
    assert hf_default == "grouped_mm"  # what "hf" means with transformers 5 on CPU
    default.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 8))
    for implementation in IMPLEMENTATIONS:
        spec = spec_for(config, implementation, 1.25)
        built = build_model(config, implementation, 1.25)
        loaded_config = copy.deepcopy(config)
        moe.configure_moe(loaded_config, spec)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, config=loaded_config)
        for model in (built, loaded):
            expected = moe.experts_key(spec) or hf_default
            assert model.config._experts_implementation == expected
            # the spec travels with the experts function, never on the config: HF's keys only
            assert model.config.to_dict().keys() == config.to_dict().keys()
            experts = model.model.layers[0].mlp.experts
            assert moe.spec_of(experts) == (None if implementation == "hf" else spec)
            model(ids)
            recorded = moe.moe_metrics(model)
            assert bool(recorded) == (implementation != "hf"), implementation
    for name in ("dense", "dropping", "dropless"):  # registration is idempotent
        spec = spec_for(config, name, 1.25)
        key = moe.experts_key(spec)
        assert moe.experts_key(spec) == key and key.startswith(f"clm_{name}(")
        assert ALL_EXPERTS_FUNCTIONS[key].spec == spec
        assert ALL_EXPERTS_FUNCTIONS[key].forward is moe._EXPERTS_FUNCTIONS[name]


def test_dense_models_get_no_experts_settings():
    """A dense model's spec has no MoE (whatever model.moe_implementation says), and its HF
    config is transformers' own."""
    from conftest import model_cfg

    from clm.model import build_hf_config
    from clm.spec import spec_from_values

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, use_cache=False)
    cfg = model_cfg(capacity_factor=1.25, moe_implementation="dropping")
    spec = spec_from_values(config.to_dict(), cfg)
    assert spec.moe is None and spec.aux_loss_coef == 0.0 and spec.capacity_factor == 0.0
    built = build_hf_config(spec)
    assert built.to_dict() == config.to_dict()
    assert built._experts_implementation == config._experts_implementation
    model = AutoModelForCausalLM.from_config(built)
    model(torch.randint(0, 32, (1, 4)))
    assert moe.moe_metrics(model) == {}


def test_unsupported_layout_raises():
    experts = make_experts(16, 8, 4, 2, "dropping", 1.0)
    experts.has_bias = True
    index_TK, weights_TK = random_routing(4, 4, 2)
    with pytest.raises(NotImplementedError, match="has_bias"):
        experts(torch.randn(4, 16), index_TK, weights_TK)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("seed", range(8))
def test_experts_match_hf_without_drops(seed, monkeypatch):
    """Random shapes (odd ones too), T from 1: ours == HF eager (== HF grouped_mm if usable)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    num_experts = pick([2, 4, 8])
    top_k = pick([k for k in (1, 2, 3) if k <= num_experts])
    tokens, dim, ffn = pick([1, 3, 17, 40]), pick([8, 12, 13]), pick([4, 7, 24])
    experts = make_experts(dim, ffn, num_experts, top_k, "dense", seed=seed)
    x_TD = torch.randn(tokens, dim, generator=gen)
    index_TK, weights_TK = random_routing(tokens, num_experts, top_k, seed=seed)
    reference = run_experts(experts, "eager", x_TD, index_TK, weights_TK)
    if dim % 4 == 0 and ffn % 4 == 0:  # torch._grouped_mm's 16-byte strides
        assert_same(run_experts(experts, "grouped_mm", x_TD, index_TK, weights_TK), reference)
    for name in OURS:
        key = key_for(experts.config, name, no_drop_factor(experts.config))
        backends = ("grouped_mm", "loop") if name == "dropless" else ("grouped_mm",)
        for backend in backends:
            monkeypatch.setattr(moe, "CPU_DROPLESS_BACKEND", backend)
            assert_same(run_experts(experts, key, x_TD, index_TK, weights_TK), reference)


def test_routing_ties_and_idle_expert():
    """Equal top-2 weights, every token on the same pair, experts 2..7 idle: grads exactly 0."""
    tokens, num_experts = 9, 8
    experts = make_experts(16, 8, num_experts, 2, "dropping", no_drop_factor(tiny_config()))
    x_TD = torch.randn(tokens, 16)
    index_TK = torch.tensor([[0, 1], [1, 0]] * 4 + [[0, 1]])
    weights_TK = torch.full((tokens, 2), 0.5)
    reference = run_experts(experts, "eager", x_TD, index_TK, weights_TK)
    for name in OURS:
        key = key_for(experts.config, name, no_drop_factor(experts.config))
        out, grads = run_experts(experts, key, x_TD, index_TK, weights_TK)
        assert_same((out, grads), reference)
        assert torch.count_nonzero(grads[2][2:]) == 0 and torch.count_nonzero(grads[3][2:]) == 0


def test_model_matches_hf_including_tied_router():
    """Whole MixtralForCausalLM: logits, loss, aux loss and every parameter's gradient."""
    config = tiny_config(output_router_logits=True)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    for tie in (False, True):
        results = {}
        for implementation in IMPLEMENTATIONS:
            model = build_model(config, implementation, no_drop_factor(config))
            if tie:  # all router probabilities equal: top-2 picks among an 8-way tie
                for layer in model.model.layers:
                    layer.mlp.gate.weight.data.zero_()
            out = model(ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            results[implementation] = (out.logits, out.loss, out.aux_loss, grads)
        logits, loss, aux_loss, grads = results["hf"]
        for implementation in OURS:
            other = results[implementation]
            torch.testing.assert_close(other[0], logits, **TOL)
            torch.testing.assert_close(other[1], loss, **TOL)
            torch.testing.assert_close(other[2], aux_loss, **TOL)
            assert other[3].keys() == grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(other[3][name], grad, **TOL, msg=name)


def test_bf16_keeps_dtype_and_stays_close():
    experts = make_experts(16, 32, 8, 2, "dense", no_drop_factor(tiny_config()))
    x_TD = torch.randn(24, 16)
    index_TK, weights_TK = random_routing(24, 8, 2)
    reference = run_experts(experts, "eager", x_TD, index_TK, weights_TK)[0]
    experts_bf16 = copy.deepcopy(experts).to(torch.bfloat16)
    for name in OURS:
        key = key_for(experts.config, name, no_drop_factor(experts.config))
        experts_bf16.config._experts_implementation = key
        out = experts_bf16(x_TD.to(torch.bfloat16), index_TK, weights_TK)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


def test_dropless_uses_grouped_mm_kernel_when_strides_allow(monkeypatch):
    """The CUDA path (torch._grouped_mm) runs on CPU for aligned shapes, the loop otherwise."""
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    for dim, expected_calls in ((16, 2), (13, 0)):
        calls.clear()
        experts = make_experts(dim, 8, 8, 2, "dropless")
        index_TK, weights_TK = random_routing(10, 8, 2)
        out = experts(torch.randn(10, dim, requires_grad=True), index_TK, weights_TK)
        out.sum().backward()
        assert len(calls) == expected_calls
        assert experts.gate_up_proj.grad is not None


# --------------------------------------------------------------------------- dropping


@pytest.mark.parametrize("capacity_factor,skew", [(0.5, 0.0), (1.0, 1.0), (1.25, 2.0)])
def test_dropping_matches_python_reference(capacity_factor, skew):
    tokens, num_experts, top_k, dim = 23, 4, 2, 8
    experts = make_experts(dim, 6, num_experts, top_k, "dropping", capacity_factor)
    x_TD = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1))
    index_TK, weights_TK = random_routing(tokens, num_experts, top_k, skew=skew)
    capacity = math.ceil(tokens * top_k / num_experts * capacity_factor)

    _, kept_S, load_E = moe.dispatch_plan(index_TK, num_experts, capacity)
    reference_experts = copy.deepcopy(experts)
    x_ref = x_TD.clone().requires_grad_(True)
    w_ref = weights_TK.clone().requires_grad_(True)
    ref_out, ref_kept = python_reference(reference_experts, x_ref, index_TK, w_ref, capacity)
    assert torch.equal(kept_S.view(tokens, top_k), ref_kept)
    assert 0 < (~ref_kept).sum() < ref_kept.numel()  # some, not all, dropped

    ref_out.backward(torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(123)))
    ref_grads = [x_ref.grad, w_ref.grad, reference_experts.gate_up_proj.grad]
    ref_grads.append(reference_experts.down_proj.grad)
    key = experts.config._experts_implementation  # clm_dropping(..., capacity_factor=...)
    result = run_experts(experts, key, x_TD, index_TK, weights_TK)
    assert_same(result, (ref_out.detach(), ref_grads))
    out, grads = result
    all_dropped = ~ref_kept.any(1)
    assert torch.equal(out[all_dropped], torch.zeros_like(out[all_dropped]))
    assert torch.equal(grads[0][all_dropped], torch.zeros_like(grads[0][all_dropped]))

    # Metrics: fraction dropped, and load counted before dropping.
    drop = (~ref_kept).float().mean().item()
    load = torch.bincount(index_TK.flatten(), minlength=num_experts).float()
    assert torch.equal(load_E, load.int())
    with torch.no_grad():
        experts(x_TD, index_TK, weights_TK)
    metrics = moe.moe_metrics(experts)
    assert metrics["moe/drop_fraction"] == pytest.approx(drop)
    assert metrics["moe/load_max_over_mean"] == pytest.approx((load.max() / load.mean()).item())


def test_dropped_assignment_gets_no_gradient_from_its_token():
    """Backward from one partially dropped token reaches its kept expert, never its dropped one."""
    experts = make_experts(8, 6, 4, 2, "dropping", 0.5)
    # capacity = ceil(6 * 2 / 4 * 0.5) = 2: expert 0 keeps tokens 0 and 1, drops 2..5.
    index_TK = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3]])
    weights_TK = torch.tensor([[0.6, 0.4]]).expand(6, 2).contiguous()
    x_TD = torch.randn(6, 8)
    out_TD = experts(x_TD, index_TK, weights_TK)
    kept_expert = int(index_TK[4, 1])
    out_TD[4].sum().backward()
    assert torch.count_nonzero(experts.gate_up_proj.grad[0]) == 0
    assert torch.count_nonzero(experts.down_proj.grad[0]) == 0
    assert torch.count_nonzero(experts.gate_up_proj.grad[kept_expert]) > 0
    expected = python_reference(experts, x_TD, index_TK, weights_TK, 2)[0][4]
    torch.testing.assert_close(out_TD[4].detach(), expected.detach(), **TOL)


def test_aux_loss_and_metrics_in_a_model():
    """Aux loss comes from the router's full probabilities: the same under dropping and hf."""
    config = tiny_config(output_router_logits=True, num_hidden_layers=1)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    hf = build_model(config, "hf")
    assert moe.moe_metrics(hf) == {}
    dropping = build_model(config, "dropping", 0.5)
    assert moe.moe_metrics(dropping) == {}  # no forward yet
    captured = []
    experts = dropping.model.layers[0].mlp.experts
    experts.register_forward_pre_hook(lambda module, args: captured.append(args[1]))
    hf_out, drop_out = hf(ids), dropping(ids)
    torch.testing.assert_close(drop_out.aux_loss, hf_out.aux_loss, **TOL)
    assert not torch.allclose(drop_out.logits, hf_out.logits)  # tokens were dropped
    index_TK = captured[-1]
    _, kept_S, load_E = moe.dispatch_plan(index_TK, 8, capacity(ids.numel(), 2, 8, 0.5))
    metrics = moe.moe_metrics(dropping)
    assert metrics["moe/drop_fraction"] == pytest.approx(1 - kept_S.float().mean().item())
    assert metrics["moe/drop_fraction"] > 0.3  # capacity 0.5: at least half can't fit
    ratio = (load_E.max() / load_E.float().mean()).item()
    assert metrics["moe/load_max_over_mean"] == pytest.approx(ratio)
    assert not getattr(experts, moe._STATS_ATTR).requires_grad


def test_static_load_balancing_loss_matches_hf(monkeypatch):
    from transformers.models.mixtral import modeling_mixtral

    hf_loss = modeling_mixtral.load_balancing_loss_func
    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        expected = hf_loss(logits, 8, 2, **kwargs)
        torch.testing.assert_close(moe.load_balancing_loss(logits, 8, 2, **kwargs), expected)
    assert moe.load_balancing_loss(None, 8, 2) == hf_loss(None, 8, 2) == 0

    config = tiny_config(output_router_logits=True)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    expected = build_model(config, "dropping", 1.25)(ids, labels=ids).aux_loss
    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func", hf_loss)  # restored after
    moe.use_static_load_balancing_loss()
    assert modeling_mixtral.load_balancing_loss_func is moe.load_balancing_loss
    torch.testing.assert_close(build_model(config, "dropping", 1.25)(ids).aux_loss, expected)


# --------------------------------------------------------------------------- XLA

XLA_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["PJRT_DEVICE"] = "CPU"
    import torch, torch_xla
    import torch_xla.debug.metrics as met
    from transformers import AutoModelForCausalLM, MixtralConfig
    from clm import moe
    from clm.spec import MoESpec

    def compiles():
        data = met.metric_data("CompileTime")
        return data[0] if data else 0

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True)
    moe.use_static_load_balancing_loss()  # HF's histc-based aux loss fails on XLA
    device = torch_xla.device()
    for implementation, capacity_factor in [("dropping", 1.25), ("dense", 0), ("dropless", 0)]:
        moe.configure_moe(config, MoESpec(8, 2, implementation, capacity_factor))
        torch.manual_seed(0)
        cpu_model = AutoModelForCausalLM.from_config(config)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(cpu_model.state_dict())
        model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(i, length=16):
            ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(i))
            loss = model(ids.to(device), labels=ids.to(device)).loss  # includes the aux loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch_xla.sync()
            return ids, float(loss.cpu()), moe.moe_metrics(model)  # .item() counts as aten::

        ids, loss, _ = step(0)
        expected = float(cpu_model(ids, labels=ids).loss)
        assert abs(loss - expected) < 1e-4, (implementation, loss, expected)
        step(1)
        warm = compiles()
        drops = [step(i)[2]["moe/drop_fraction"] for i in range(2, 5)]
        steady = compiles()
        print(implementation, warm, steady, drops, flush=True)
        assert warm > 0 and steady == warm, (implementation, warm, steady)
        assert (max(drops) > 0) == (implementation == "dropping"), drops
        if implementation == "dropping":
            step(5, length=24)  # a new shape must compile: the counter is live
            assert compiles() > steady
    fallbacks = [n for n in met.counter_names() if n.startswith("aten::")]
    assert not fallbacks, fallbacks  # no op fell back to CPU / forced a device sync
    print("OK")
    """)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch_xla")
def test_xla_static_shapes_zero_recompiles(tmp_path):
    script = tmp_path / "xla_moe.py"
    script.write_text(XLA_SCRIPT)
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("groups", [2, 4])
def test_capacity_is_per_group_of_tokens(groups):
    """With capacity groups (one sequence each, as the trainer sets them), each group is the
    python reference on its own tokens: its own capacity, its own queue; the whole call is
    not one queue (so dropping differs from the ungrouped call)."""
    group_tokens, num_experts, top_k, dim = 12, 4, 2, 8
    tokens = groups * group_tokens
    experts = make_experts(dim, 6, num_experts, top_k, "dropping", 0.75, group_tokens=group_tokens)
    x_TD = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(2))
    index_TK, weights_TK = random_routing(tokens, num_experts, top_k, skew=1.5)
    slots = math.ceil(group_tokens * top_k / num_experts * 0.75)
    reference = copy.deepcopy(experts)
    x_ref = x_TD.clone().requires_grad_(True)
    w_ref = weights_TK.clone().requires_grad_(True)
    parts = [
        python_reference(reference, x_ref[g], index_TK[g], w_ref[g], slots)
        for g in (slice(i * group_tokens, (i + 1) * group_tokens) for i in range(groups))
    ]
    ref_out = torch.cat([out for out, _ in parts])
    ref_kept = torch.cat([kept for _, kept in parts])
    ungrouped = python_reference(copy.deepcopy(experts), x_TD, index_TK, weights_TK, slots)
    assert not torch.equal(ungrouped[1], ref_kept)  # the grouping matters on this routing
    ref_out.backward(torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(123)))
    ref_grads = [x_ref.grad, w_ref.grad, reference.gate_up_proj.grad, reference.down_proj.grad]
    result = run_experts(
        experts, experts.config._experts_implementation, x_TD, index_TK, weights_TK
    )
    assert_same(result, (ref_out.detach(), ref_grads))
    _, kept_S, _ = moe.dispatch_plan(index_TK, num_experts, slots, groups)
    assert torch.equal(kept_S.view(tokens, top_k), ref_kept)
    with pytest.raises(ValueError, match="capacity groups of 12"):
        experts(torch.randn(tokens + 1, dim), *random_routing(tokens + 1, num_experts, top_k))


def test_trained_models_group_capacity_by_sequence():
    """The trainer's spec has max_length: capacity is counted per sequence, and the experts of
    the built model run with that spec (nothing of it is stored on the HF config)."""
    from conftest import model_spec

    from clm.model import build_model

    for max_length in (64, None):
        spec = model_spec(max_length, config_path="mixtral_small.json", capacity_factor=1.25)
        model = build_model(spec, torch.device("cpu"), 0)
        for layer in model.model.layers:
            assert moe.spec_of(layer.mlp.experts) == spec.moe
        assert spec.moe.group_tokens == max_length
        assert "clm" not in model.config.to_json_string()


def test_experts_of_two_specs_in_one_process_each_run_their_own():
    """The settings travel with each model's experts function: two dropping models of different
    capacity factors, run alternately, each drop as their own spec's capacity says."""
    config = tiny_config(num_hidden_layers=1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    models = {factor: build_model(config, "dropping", factor) for factor in (0.5, 2.0)}
    captured = []
    for model in models.values():
        experts = model.model.layers[0].mlp.experts
        experts.register_forward_pre_hook(lambda m, args: captured.append(args[1]))
    for _ in range(2):
        for factor, model in models.items():
            captured.clear()
            model(ids)
            _, kept_S, _ = moe.dispatch_plan(captured[0], 8, capacity(32, 2, 8, factor))
            drop = 1 - kept_S.float().mean().item()
            assert moe.moe_metrics(model)["moe/drop_fraction"] == pytest.approx(drop)
    assert moe.moe_metrics(models[0.5])["moe/drop_fraction"] > 0


def test_experts_refuse_a_spec_of_other_sizes():
    """An experts module run with the spec of another model: named, not silently used."""
    experts = make_experts(16, 8, 4, 2, "dropless")
    experts.config._experts_implementation = moe.experts_key(MoESpec(8, 2, "dropless"))
    index_TK, weights_TK = random_routing(4, 4, 2)
    with pytest.raises(ValueError, match="module of 4 experts, top-2 routing: its spec is for 8"):
        experts(torch.randn(4, 16), index_TK, weights_TK)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_expert_slot_copies_are_the_same_in_jax():
    """clm.expert_slots' jax scatter and gather (what XLA runs) equal its torch ones, dropped
    assignments (expert E, out of range) included, and each is the other's adjoint."""
    import jax.numpy as jnp
    import numpy as np

    from clm import expert_slots

    num_experts, groups, capacity, dim, per_group = 4, 3, 5, 6, 10
    gen = torch.Generator().manual_seed(0)
    top_k_index_TK = torch.randint(0, num_experts, (groups * per_group, 1), generator=gen)
    rank_S, kept_S, _ = moe.dispatch_plan(top_k_index_TK, num_experts, capacity, groups)
    expert_GM = torch.where(kept_S, top_k_index_TK.reshape(-1), num_experts).view(groups, -1)
    slot_GM = torch.where(kept_S, rank_S, 0).view(groups, -1)
    assert (expert_GM == num_experts).any()  # some dropped
    x_GMD = torch.randn(groups, per_group, dim, generator=gen)
    y_EGCD = torch.randn(num_experts, groups, capacity, dim, generator=gen)
    e, s = jnp.asarray(expert_GM.int().numpy()), jnp.asarray(slot_GM.int().numpy())
    jax_x = expert_slots._jax_to_slots(jnp.asarray(x_GMD.numpy()), e, s, num_experts, capacity)
    jax_y = expert_slots._jax_from_slots(jnp.asarray(y_EGCD.numpy()), e, s)
    torch_x = expert_slots.to_slots(x_GMD, expert_GM, slot_GM, num_experts, capacity)
    torch_y = expert_slots.from_slots(y_EGCD, expert_GM, slot_GM)
    assert np.array_equal(np.asarray(jax_x), torch_x.numpy())
    assert np.array_equal(np.asarray(jax_y), torch_y.numpy())
    # adjoint: <to_slots(x), y> == <x, from_slots(y)>
    torch.testing.assert_close((torch_x * y_EGCD).sum(), (x_GMD * torch_y).sum())
