"""The fused DoRA projection against plain DoRA (norm detached) and against DoRALinear: forward and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zenft_testing import close as close_within

from lightning_zenft.adapters import DoRALinear
from lightning_zenft.kernels import quantize_nf4
from lightning_zenft.kernels.dora import dora_row_norm, fused_dora
from lightning_zenft.kernels.nf4 import dequantize_nf4_reference

DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    close_within(got, want, dtype, what, fp32_tol=3e-5, low_tol=4e-2)


def reference(x, w, a, b, m, s, bias):  # noqa: ANN001, ANN201
    """Plain DoRA in fp32: ``m / ||W + s B A||`` (detached) times ``(W + s B A) x`` plus the bias."""
    norm = torch.linalg.norm(w + s * (b @ a), dim=1).detach()
    y = (m / norm) * (F.linear(x, w) + s * F.linear(F.linear(x, a), b))
    return y if bias is None else y + bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_dora_matches_plain_dora(backend: str, dtype: torch.dtype, with_bias: bool) -> None:
    torch.manual_seed(0)
    m_tok, k, n, r, s = 13, 37, 21, 5, 1.7
    x = torch.randn(2, m_tok, k).to(dtype).requires_grad_()
    w = torch.randn(n, k).to(dtype)
    a = (torch.randn(r, k) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.3).to(dtype).requires_grad_()
    mag = (torch.rand(n) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype).requires_grad_() if with_bias else None
    y = fused_dora(x, w, a, b, mag, s, bias)
    assert y.dtype == dtype and y.shape == (2, m_tok, n)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x, a, b, mag] + ([bias] if with_bias else [])
    refs = [t.detach().float().requires_grad_() for t in leaves]
    yr = reference(refs[0], w.float(), refs[1], refs[2], refs[3], s, refs[4] if with_bias else None)
    yr.backward(dy.float())
    close(y, yr, dtype, "forward")
    for name, got, want in zip(["dx", "dA", "dB", "dm", "dbias"], leaves, refs, strict=False):
        close(got.grad, want.grad, dtype, name)


def test_row_norm_without_building_the_adapted_weight() -> None:
    torch.manual_seed(1)
    w, a, b = torch.randn(33, 20, dtype=torch.float64), torch.randn(4, 20), torch.randn(33, 4)
    want = torch.linalg.norm(w + 0.7 * (b.double() @ a.double()), dim=1)
    got = dora_row_norm(w.float(), a, b, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # an in-place change of the frozen weight is seen at once (nothing is cached)
    wf = w.float()
    dora_row_norm(wf, a, b, 0.7)
    wf.mul_(2.0)
    want2 = torch.linalg.norm(wf.double() + 0.7 * (b.double() @ a.double()), dim=1)
    torch.testing.assert_close(dora_row_norm(wf, a, b, 0.7).double(), want2, rtol=1e-5, atol=1e-5)


def test_fused_dora_equals_the_dora_layer() -> None:
    """The layer PEFT adapters load into, with trained (non-zero) B and a moved magnitude: same output and grads."""
    torch.manual_seed(2)
    layer = DoRALinear(nn.Linear(24, 18), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.2)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(18) + 0.5)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 5, 24, requires_grad=True)
    want = layer(x)
    want.sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    gx = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    base = layer.base_layer
    got = fused_dora(
        x, base.weight, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling, base.bias
    )
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_fused_dora_on_an_nf4_base(backend: str) -> None:
    torch.manual_seed(3)
    k, n, r = 64, 48, 4
    nf4 = quantize_nf4(torch.randn(n, k), dtype=torch.float32)
    w = dequantize_nf4_reference(nf4).float().view(n, k)
    x = torch.randn(9, k, requires_grad=True)
    a, b = (torch.randn(r, k) * 0.2).requires_grad_(), (torch.randn(n, r) * 0.2).requires_grad_()
    mag = (torch.rand(n) + 0.5).requires_grad_()
    y = fused_dora(x, nf4, a, b, mag, 2.0)
    y.square().sum().backward()
    refs = [t.detach().clone().requires_grad_() for t in (x, a, b, mag)]
    yr = reference(refs[0], w, refs[1], refs[2], refs[3], 2.0, None)
    yr.square().sum().backward()
    close(y, yr, torch.float32, "forward")
    for name, got, want in zip(["dx", "dA", "dB", "dm"], (x, a, b, mag), refs, strict=True):
        close(got.grad, want.grad, torch.float32, name)


def test_fused_dora_rejects_a_wrong_magnitude() -> None:
    with pytest.raises(ValueError, match=r"magnitude has shape \(5,\); expected \(6,\)"):
        fused_dora(torch.randn(2, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), torch.ones(5), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_dora_with_dropout_matches_plain_dora(backend: str, dtype: torch.dtype) -> None:
    """``W x + b + (g - 1) W D x + g s B A D x`` (DoRALinear's and PEFT's DoRA with dropout), the mask regenerated in
    backward from the same seed; eval mode turns dropout off."""
    from lightning_zenft.kernels import LoRAProjection, dropout_mask
    from lightning_zenft.kernels.lora import ProjectionPlan

    torch.manual_seed(4)
    m_tok, k, n, r, s, p = 11, 24, 19, 3, 1.3, 0.4
    x = torch.randn(m_tok, k).to(dtype).requires_grad_()
    w = torch.randn(n, k).to(dtype)
    a = (torch.randn(r, k) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.3).to(dtype).requires_grad_()
    mag = (torch.rand(n) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype).requires_grad_()
    state = torch.get_rng_state()
    y = fused_dora(x, w, a, b, mag, s, bias, dropout=p)
    torch.set_rng_state(state)
    seed = ProjectionPlan([LoRAProjection(w, bias, a, b, s, p)], training=True).seeds[0]
    mask = dropout_mask(x.shape, p, seed, x.device, dtype).float()
    assert 0 < (mask == 0).sum() < mask.numel()
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = [t.detach().float().requires_grad_() for t in (x, a, b, mag, bias)]
    xr, ar, br, mr, biasr = refs
    wf = w.float()
    gain = mr / torch.linalg.norm(wf + s * (br @ ar), dim=1).detach()
    xd = xr * mask
    yr = F.linear(xr, wf, biasr) + (gain - 1) * F.linear(xd, wf) + gain * s * F.linear(F.linear(xd, ar), br)
    yr.backward(dy.float())
    close(y, yr, dtype, "forward")
    for name, got, want in zip(["dx", "dA", "dB", "dm", "dbias"], (x, a, b, mag, bias), refs, strict=True):
        close(got.grad, want.grad, dtype, name)
    evaluated = fused_dora(x, w, a, b, mag, s, bias, dropout=p, training=False)
    close(evaluated, reference(xr, wf, ar, br, mr, s, biasr), dtype, "eval: no dropout")


def test_functional_dora_passes_every_argument_through() -> None:
    from lightning_zenft.kernels import functional as ZF

    torch.manual_seed(5)
    x, w, a, b = torch.randn(4, 12), torch.randn(6, 12), torch.randn(2, 12), torch.randn(6, 2)
    mag, bias = torch.rand(6) + 0.5, torch.randn(6)
    torch.testing.assert_close(ZF.dora(x, w, a, b, mag, 0.7, bias), reference(x, w, a, b, mag, 0.7, bias))
    # dropout in training changes the output; the same call in eval does not
    assert not torch.allclose(ZF.dora(x, w, a, b, mag, 0.7, bias, dropout=0.5), reference(x, w, a, b, mag, 0.7, bias))
    torch.testing.assert_close(
        ZF.dora(x, w, a, b, mag, 0.7, bias, dropout=0.5, training=False), reference(x, w, a, b, mag, 0.7, bias)
    )
