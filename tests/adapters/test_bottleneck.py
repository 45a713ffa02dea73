"""Serial (Houlsby) and parallel (He et al.) bottleneck adapters against the papers' formulas, written here anew."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zenft_testing import tiny_model, token_batch

from lightning_zenft import (
    BottleneckAdapterLayer,
    BottleneckConfig,
    ParallelAdapterConfig,
    ParallelAdapterLayer,
    disable_adapters,
    find_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload_adapters,
)

ACT = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: every trainable tensor gets random values (up is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _branch(weights: dict[str, torch.Tensor], act: str, x: torch.Tensor) -> torch.Tensor:
    """``W_up act(W_down x + b_down) + b_up`` (the papers' bottleneck), from plain tensors."""
    z = ACT[act](x @ weights["adapter_down.weight"].T + weights["adapter_down.bias"])
    return z @ weights["adapter_up.weight"].T + weights["adapter_up.bias"]


def _reference(base: nn.Module, adapted: nn.Module, parallel: bool) -> list:
    """Forward hooks on ``base`` that apply each adapter of ``adapted`` by the formula, with its trained values."""
    handles = []
    for name, layer in find_adapters(adapted):
        weights = {k: v.detach().clone() for k, v in layer.export_state()[0].items()}
        act, scale = layer.non_linearity, getattr(layer, "scaling", 1.0)

        def hook(module, args, kwargs, output, weights=weights, act=act, scale=scale):
            h = output[0] if isinstance(output, tuple) else output
            if parallel:
                x = args[0] if args else kwargs["hidden_states"]
                new = h + scale * _branch(weights, act, x)  # y = f(x) + s up(act(down(x)))
            else:
                new = h + _branch(weights, act, h)  # y = h + up(act(down(h))), h = f(x)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handles.append(base.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    return handles


CASES = [
    ("llama", BottleneckConfig(reduction_factor=4)),
    ("gpt2", BottleneckConfig(bottleneck_size=3, non_linearity="tanh", target_modules="attention")),
    ("llama", ParallelAdapterConfig(bottleneck_size=5, scaling=2.5)),
    ("gpt2", ParallelAdapterConfig(target_modules="all", non_linearity="silu", reduction_factor=8)),
    ("phi", ParallelAdapterConfig(target_modules="attention", non_linearity="gelu", reduction_factor=2)),
]


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_model_equals_the_formula_on_every_target(arch, config):
    model = tiny_model(arch)
    names = inject_adapters(model, config)
    kinds = {"all": ("attn", "mlp"), "attention": ("attn",), "mlp": ("mlp",)}[config.target_modules]
    assert len(names) == 2 * len(kinds) and all(n.rsplit(".", 1)[-1].endswith(kinds) for n in names)
    _randomize(model)
    reference = tiny_model(arch)
    parallel = isinstance(config, ParallelAdapterConfig)
    handles = _reference(reference, model, parallel)
    ids, mask = token_batch(3, 10), torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
        base = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapters change the output
    for handle in handles:
        handle.remove()


def test_bottleneck_sizes_and_initialization_are_the_identity():
    mlp = tiny_model("llama").model.layers[0].mlp  # 32 -> 64 -> 32
    x = torch.randn(2, 5, 32)
    sizes = [({}, 2), ({"reduction_factor": 4}, 8), ({"reduction_factor": 0.5}, 64), ({"bottleneck_size": 7}, 7)]
    for kwargs, size in sizes:
        serial = BottleneckAdapterLayer(mlp, **kwargs)
        parallel = ParallelAdapterLayer(mlp, **kwargs)
        assert serial.bottleneck_size == parallel.bottleneck_size == size
        assert serial.adapter_down.weight.shape == (size, 32) and serial.adapter_up.weight.shape == (32, size)
        with torch.no_grad():
            assert torch.equal(serial(x), mlp(x)) and torch.equal(parallel(x), mlp(x))  # up = 0: exactly the base
        assert serial.adapter_down.weight.abs().sum() > 0  # down is random, so up gets a gradient at the first step
    attention = tiny_model("gpt2").transformer.h[0].attn  # c_attn 32 -> 96, c_proj 32 -> 32
    layer = ParallelAdapterLayer(attention, bottleneck_size=4)
    assert (layer.in_features, layer.out_features) == (32, 32)


def test_gradients_reach_only_the_adapters():
    model = tiny_model("llama")
    inject_adapters(model, BottleneckConfig(reduction_factor=8))
    _randomize(model)
    ids = token_batch()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable == {f"{n}.{p}" for n, layer in find_adapters(model) for p in layer.adapter_params()}
    assert len(trainable) == 4 * 4  # 2 layers x (attention, mlp) x (down, up) x (weight, bias)


def test_dropout_acts_on_the_activations():
    mlp = tiny_model("llama").model.layers[0].mlp
    layer = ParallelAdapterLayer(mlp, bottleneck_size=6, dropout=0.5, scaling=1.5)
    _randomize(layer)
    weights = {k: v.detach() for k, v in layer.export_state()[0].items()}
    x = torch.randn(2, 4, 32)
    layer.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    z = F.dropout(torch.relu(x @ weights["adapter_down.weight"].T + weights["adapter_down.bias"]), 0.5, training=True)
    want = mlp(x) + 1.5 * (z @ weights["adapter_up.weight"].T + weights["adapter_up.bias"])
    torch.testing.assert_close(got, want)
    layer.eval()
    torch.testing.assert_close(layer(x), mlp(x) + 1.5 * _branch(weights, "relu", x))


def test_disabled_runs_the_base_and_attention_weights_pass_through():
    model = tiny_model("llama")
    inject_adapters(model, BottleneckConfig(target_modules="attention", bottleneck_size=4))
    _randomize(model)
    ids = token_batch()
    base = tiny_model("llama")
    with torch.no_grad():
        with disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
        layer = model.model.layers[0].self_attn
        hidden = torch.randn(2, 12, 32)
        position = model.model.rotary_emb(hidden, torch.arange(12)[None])
        kwargs = dict(hidden_states=hidden, position_embeddings=position, attention_mask=None)
        out, weights = layer(**kwargs)
        base_out, base_weights = layer.base_layer(**kwargs)
    assert weights is base_weights or torch.equal(weights, base_weights)
    assert not torch.equal(out, base_out)


def test_generate_equals_the_reference_model():
    config = ParallelAdapterConfig(target_modules="all", bottleneck_size=4, scaling=2.0)
    model = tiny_model("llama")
    inject_adapters(model, config)
    _randomize(model, seed=3)
    reference = tiny_model("llama")
    _reference(reference, model, parallel=True)
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
        want = reference.generate(ids, **kwargs)
        base = tiny_model("llama").generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)


@pytest.mark.parametrize("config", [BottleneckConfig(), ParallelAdapterConfig()])
def test_merging_is_refused_and_leaves_the_model_alone(config):
    model = tiny_model("llama")
    inject_adapters(model, config)
    _randomize(model)
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
    name = type(next(layer for _, layer in find_adapters(model))).__name__
    with pytest.raises(TypeError, match=f"{name} adapters cannot be merged .* no weight change expresses"):
        merge_adapters(model)
    with pytest.raises(TypeError, match="cannot be merged"):
        unload_adapters(model, merge=True)
    assert not hasattr(BottleneckAdapterLayer, "merge") and not hasattr(ParallelAdapterLayer, "merge")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    unload_adapters(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model("llama")(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "config",
    [BottleneckConfig(bottleneck_size=3, non_linearity="silu"), ParallelAdapterConfig(reduction_factor=4, scaling=3.0)],
)
def test_own_format_round_trip(tmp_path, config):
    model = tiny_model("gpt2")
    inject_adapters(model, config)
    _randomize(model)
    out = save_adapter(model, tmp_path / "adapter")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["format"] == "lightning_zenft" and saved["method"] == type(config).method
    assert set(saved["layers"]) == {n for n, _ in find_adapters(model)}
    settings = next(iter(saved["layers"].values()))["settings"]
    assert settings == next(layer for _, layer in find_adapters(model)).settings()
    fresh = tiny_model("gpt2")
    load_adapter(fresh, out)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    other = tiny_model("gpt2")
    inject_adapters(other, type(config)(bottleneck_size=5))
    with pytest.raises(ValueError, match="already holds adapters that differ"):
        load_adapter(other, out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(reduction_factor=0), "reduction_factor=0 must be a positive number"),
        (dict(bottleneck_size=0), "bottleneck_size=0 must be a positive integer"),
        (dict(bottleneck_size=2.5), "bottleneck_size=2.5 must be a positive integer"),
        (dict(reduction_factor=4, bottleneck_size=8), "both set the bottleneck size; give one"),
        (dict(non_linearity="swish"), "non_linearity='swish' must be one of"),
        (dict(dropout=1.0), "dropout=1.0 must be in"),
        (dict(target_modules="all-linear"), "'all-linear' selects linear layers; .* use 'all', 'attention', 'mlp'"),
        (dict(bias="lora_only"), "bias='lora_only' trains the biases of adapted linear layers"),
    ],
)
@pytest.mark.parametrize("config_cls", [BottleneckConfig, ParallelAdapterConfig])
def test_config_errors(config_cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_cls(**kwargs)


def test_parallel_scaling_error_and_every_problem_at_once():
    with pytest.raises(ValueError, match="scaling=0 must be a positive number"):
        ParallelAdapterConfig(scaling=0)
    with pytest.raises(ValueError, match="reduction_factor=-1 .*; non_linearity='x'"):
        BottleneckConfig(reduction_factor=-1, non_linearity="x")


def test_module_errors():
    mlp = tiny_model("llama").model.layers[0].mlp
    with pytest.raises(ValueError, match="reduction_factor=3 does not divide .* width 32 .*bottleneck_size=10"):
        BottleneckAdapterLayer(mlp, reduction_factor=3)
    with pytest.raises(ValueError, match="reduction_factor=64 does not divide"):
        BottleneckAdapterLayer(mlp, reduction_factor=64)
    with pytest.raises(ValueError, match="both set the bottleneck size"):
        ParallelAdapterLayer(mlp, reduction_factor=2, bottleneck_size=3)
    with pytest.raises(ValueError, match="non_linearity='swish'"):
        ParallelAdapterLayer(mlp, non_linearity="swish")
    with pytest.raises(ValueError, match="holds none; target attention or feed-forward modules"):
        BottleneckAdapterLayer(nn.LayerNorm(32))
    layer = ParallelAdapterLayer(mlp)
    with pytest.raises(TypeError, match="reads the input of LlamaMLP from its first argument \\('x'\\)"):
        layer()
    wide = BottleneckAdapterLayer(nn.Sequential(nn.Linear(8, 8), nn.Flatten()), bottleneck_size=2)
    with pytest.raises(RuntimeError, match="built for outputs of width 8 .* returned width 24"):
        wide(torch.randn(2, 3, 8))
    odd = BottleneckAdapterLayer(_ReturnsDict(), bottleneck_size=2)
    with pytest.raises(TypeError, match="returned a dict; target modules of another kind"):
        odd(torch.randn(2, 8))


class _ReturnsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": self.proj(x)}
