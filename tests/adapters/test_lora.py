"""LoRALinear against the formula y = W x + b + s B A dropout(x), on nn.Linear and GPT-2 Conv1D."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_zenft import LoRALinear, disable_adapters, merge_adapters, unmerge_adapters


def _trained(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    """Give B nonzero values, as after training, so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    return layer


def _reference(x, weight_out_in, bias, a, b, scaling):
    return F.linear(x, weight_out_in, bias) + scaling * (x @ a.t()) @ b.t()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_formula_linear(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 10)
    layer = _trained(LoRALinear(base, r=4, alpha=12, use_rslora=use_rslora))
    expected_scaling = 12 / math.sqrt(4) if use_rslora else 12 / 4
    assert layer.scaling == pytest.approx(expected_scaling)
    x = torch.randn(3, 5, 24)
    ref = _reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, expected_scaling)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_forward_matches_formula_conv1d():
    torch.manual_seed(0)
    base = Conv1D(nf=10, nx=24)  # weight (in, out)
    nn.init.normal_(base.weight, std=0.1)
    nn.init.normal_(base.bias)
    layer = _trained(LoRALinear(base, r=3, alpha=6))
    assert (layer.in_features, layer.out_features) == (24, 10)
    x = torch.randn(4, 24)
    ref = _reference(x, base.weight.t(), base.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_starts_at_base_and_only_adapter_trains():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    expected = base(x).detach()
    layer = LoRALinear(base, r=4, alpha=8)
    torch.testing.assert_close(layer(x), expected)  # B = 0 at init
    layer(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    # dL/dA = s B^T (dL/dy) x = 0 while B = 0
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0


def test_gradients_match_autograd_reference():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    layer = _trained(LoRALinear(base, r=2, alpha=4))
    x = torch.randn(7, 12, requires_grad=True)
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    layer(x).pow(2).sum().backward()
    _reference(x2, base.weight, base.bias, a, b, 2.0).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad)


def test_dropout_applies_to_adapter_path_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = _trained(LoRALinear(base, r=4, alpha=8, dropout=0.5)).train()
    x = torch.randn(6, 16)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    ref = base(x) + 2.0 * (dropped @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(out, ref)
    layer.eval()
    torch.testing.assert_close(
        layer(x), _reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_exact(kind):
    torch.manual_seed(0)
    base = nn.Linear(20, 12) if kind == "linear" else Conv1D(nf=12, nx=20)
    nn.init.normal_(base.weight, std=0.2)
    original = base.weight.detach().clone()
    layer = _trained(LoRALinear(base, r=4, alpha=8)).eval()
    x = torch.randn(3, 20)
    unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    delta = 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # (out, in)
    torch.testing.assert_close(base.weight.detach(), original + (delta.t() if kind == "conv1d" else delta))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_disable_adapters_context_gives_base_output_even_when_merged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    base_out = model(x).detach()
    model[0] = _trained(LoRALinear(model[0], r=2, alpha=2))
    model[2] = _trained(LoRALinear(model[2], r=2, alpha=2), seed=1)
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base_out)
    assert merge_adapters(model) == 2
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base_out, atol=1e-5, rtol=1e-5)
    assert model[0].merged and not model[0].disabled
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert unmerge_adapters(model) == 2


def test_init_schemes():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64), r=16, alpha=16, init="gaussian")
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    kaiming = LoRALinear(nn.Linear(256, 64), r=16, alpha=16)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert kaiming.lora_A.weight.abs().max().item() <= bound
    assert kaiming.lora_A.weight.abs().max().item() > 0.9 * bound


def test_pissa_init_keeps_output_and_takes_top_singular_directions():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    w = base.weight.detach().clone()
    x = torch.randn(5, 32)
    before = base(x).detach()
    layer = LoRALinear(base, r=4, alpha=8, init="pissa")
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight(), top, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(base.weight.detach(), w - top, atol=1e-5, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="dropout=1.5"):
        LoRALinear(nn.Linear(4, 4), r=1, alpha=1, dropout=1.5)
    with pytest.raises(TypeError, match="Embedding is not a linear layer"):
        LoRALinear(nn.Embedding(4, 4), r=1, alpha=1)


@pytest.mark.parametrize("cls", ["lora", "dora"])
def test_disabled_pissa_layer_computes_the_original_base(cls):
    """PiSSA rewrites the base weight to its residual; disabled, the layer still computes what the model did before
    the adapter was added (the original weight), as every disabled adapter must."""
    from lightning_zenft.adapters import DoRALinear, LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    original = nn.Linear(16, 12)
    original.load_state_dict(base.state_dict())
    layer = (LoRALinear if cls == "lora" else DoRALinear)(base, r=3, alpha=6, use_rslora=True, init="pissa")
    with torch.no_grad():
        layer.lora_B.weight.add_(0.1)  # trained
    x = torch.randn(5, 16)
    layer.disabled = True
    torch.testing.assert_close(layer(x), original(x), atol=1e-5, rtol=1e-5)
    layer.disabled = False
    assert not torch.allclose(layer(x), original(x), atol=1e-3)
