"""DoRALinear against DoRA's definition W' = m (W + s B A) / ||W + s B A||_row (Liu et al. 2024)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_zenft import DoRALinear


def _trained(layer: DoRALinear) -> DoRALinear:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))
    return layer


def _reference_weight(w, a, b, m, s):
    directed = w + s * (b @ a)
    return m[:, None] * directed / torch.linalg.norm(directed, dim=1, keepdim=True)


def test_magnitude_starts_at_row_norm_and_output_at_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    before = base(x).detach()
    layer = DoRALinear(base, r=4, alpha=8)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), torch.linalg.norm(base.weight.detach(), dim=1))
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_matches_definition(kind):
    torch.manual_seed(0)
    base = nn.Linear(16, 8) if kind == "linear" else Conv1D(nf=8, nx=16)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias)
    layer = _trained(DoRALinear(base, r=4, alpha=8, use_rslora=True))
    w = base.weight.detach().t() if kind == "conv1d" else base.weight.detach()
    ref_w = _reference_weight(w, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, ref_w, base.bias), atol=1e-5, rtol=1e-5)


def test_gradients_treat_norm_as_constant():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = _trained(DoRALinear(base, r=3, alpha=3))
    x = torch.randn(5, 10)
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    w = base.weight.detach()
    directed = w + layer.scaling * (b @ a)
    ref_w = m[:, None] * directed / torch.linalg.norm(directed, dim=1, keepdim=True).detach()
    F.linear(x, ref_w, base.bias).pow(2).sum().backward()
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m.grad, atol=1e-5, rtol=1e-4)


def test_dropout_path_matches_definition():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    layer = _trained(DoRALinear(base, r=2, alpha=4, dropout=0.3)).train()
    x = torch.randn(4, 12)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.3, training=True)
    w = base.weight.detach()
    norm = torch.linalg.norm(w + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, dim=1)
    gain = layer.lora_magnitude_vector / norm
    ref = (
        base(x)
        + (gain - 1) * F.linear(xd, w)
        + gain * layer.scaling * ((xd @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t())
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge(kind):
    torch.manual_seed(0)
    base = nn.Linear(16, 8) if kind == "linear" else Conv1D(nf=8, nx=16)
    nn.init.normal_(base.weight, std=0.2)
    original = base.weight.detach().clone()
    layer = _trained(DoRALinear(base, r=4, alpha=8)).eval()
    x = torch.randn(3, 16)
    expected = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), original, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
