"""NF4 dequantization against bitsandbytes' layout, LoRA on an NF4 base, and the GLU kernels, against PyTorch."""

from __future__ import annotations

import pytest
import torch

from lightning_zenft.kernels import (
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    fused_lora,
    glu,
    glu_reference,
    lora_reference,
    quantize_nf4,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 layout reference")


def _bnb_weight(w: torch.Tensor, nested: bool) -> tuple[torch.Tensor, object]:
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    packed.quant_state = state  # what bitsandbytes' Params4bit carries
    return packed, state


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_dequant_matches_bitsandbytes(backend: str, nested: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(65, 33)  # odd count: the last byte holds one code
    packed, state = _bnb_weight(w, nested)
    nf4 = NF4Weight.from_bnb(packed, dtype=torch.float32)
    want = bnb_functional.dequantize_4bit(packed, state).float()
    torch.testing.assert_close(dequantize_nf4(nf4).view(65, 33), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(nf4.dense(), want, rtol=0, atol=1e-6)


def test_nf4_bf16_output_and_own_quantizer_match_bitsandbytes(backend: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(17, 31)
    packed, state = _bnb_weight(w, nested=False)
    ours = quantize_nf4(w, dtype=torch.bfloat16)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
    got = dequantize_nf4(ours).view(17, 31).float()
    # one bf16 rounding step of the fp32 value (Triton's interpreter truncates where the GPU rounds)
    want = dequantize_nf4_reference(NF4Weight.from_bnb(packed, dtype=torch.float32))
    torch.testing.assert_close(got, want, rtol=2**-7, atol=0)


def test_nf4_rejects_inconsistent_storage() -> None:
    with pytest.raises(ValueError, match="bytes for shape"):
        NF4Weight(torch.zeros(3, dtype=torch.uint8), torch.ones(1), (4, 4))
    with pytest.raises(ValueError, match="double quantization"):
        NF4Weight(torch.zeros(8, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8), (4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_on_nf4_base(backend: str, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    m, k, n, r = 7, 33, 65, 3
    nf4 = quantize_nf4(torch.randn(n, k), dtype=dtype)
    dense = dequantize_nf4_reference(nf4).float()  # what the kernel must multiply by
    x = torch.randn(m, k).to(dtype).requires_grad_()
    a = (torch.randn(r, k) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype)
    y = fused_lora(x, nf4, a, b, 1.25, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, ar, br = (t.detach().float().requires_grad_() for t in (x, a, b))
    yr = lora_reference(xr, dense, ar, br, 1.25, bias.float())
    yr.backward(dy.float())
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for got, want in ((y, yr), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        scale = want.abs().max().clamp_min(1.0)
        assert (got.float() - want).abs().max() <= tol * scale


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_matches_reference(backend: str, act: str, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    g = (torch.randn(7, 65) * 3).to(dtype).requires_grad_()
    u = torch.randn(7, 65).to(dtype).requires_grad_()
    h = glu(g, u, act)
    dh = torch.randn_like(h)
    h.backward(dh)
    gr, ur = (t.detach().float().requires_grad_() for t in (g, u))
    hr = glu_reference(gr, ur, act)
    hr.backward(dh.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((h, hr), (g.grad, gr.grad), (u.grad, ur.grad)):
        scale = want.abs().max().clamp_min(1.0)
        assert (got.float() - want).abs().max() <= tol * scale
