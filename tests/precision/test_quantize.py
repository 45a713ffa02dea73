"""4-bit weights: the settings, the round-trip error against the blockwise-absmax bound, the layer against dense."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

from lightning_zenft.precision import QuantSpec, dequantize, quantize_weight, to_linear4bit  # noqa: E402
from lightning_zenft.precision._bnb import import_bitsandbytes  # noqa: E402
from lightning_zenft.precision.quantize import MODES, resolve_dtype  # noqa: E402


def _gaussian(out: int = 96, inp: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_error_within_the_blockwise_bound(mode):
    """|w - c[q] a'| <= a * (largest gap between levels) / 2 + |a - a'| for every weight of its block."""
    spec = QuantSpec.from_mode(mode, compute_dtype=torch.float32)
    w = _gaussian()
    q = quantize_weight(w, spec)
    state = q.quant_state
    assert (state.quant_type, bool(state.nested), state.blocksize) == (spec.quant_type, spec.double_quant, 64)
    got = dequantize(q)
    blocks = w.reshape(-1, 64)  # (blocks, 64)
    true_scale = blocks.abs().amax(dim=1)  # (blocks,)
    stored_scale = (got.reshape(-1, 64).abs().amax(dim=1) / state.code.abs().max()).clamp_min(0)  # lower bound of a'
    levels = state.code.float().sort().values
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    if spec.double_quant:  # a' = the dequantized 8-bit scale; recover it from the state
        scale = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        scale = state.absmax
    assert torch.all(stored_scale <= scale + 1e-7)
    bound = true_scale * half_gap + (true_scale - scale).abs()  # (blocks,)
    err = (blocks - got.reshape(-1, 64)).abs().amax(dim=1)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-9)
    if not spec.double_quant:
        torch.testing.assert_close(scale, true_scale)


def test_nf4_beats_fp4_on_normal_weights_and_dq_costs_little():
    w = _gaussian(256, 512, seed=1)
    err = {}
    for mode in MODES:
        q = quantize_weight(w, QuantSpec.from_mode(mode, compute_dtype=torch.float32))
        err[mode] = float(torch.linalg.norm(w - dequantize(q)) / torch.linalg.norm(w))
    assert err["nf4"] < err["fp4"] and err["nf4-dq"] < err["fp4-dq"]  # NF4's levels are normal quantiles
    assert abs(err["nf4-dq"] - err["nf4"]) < 0.01 * err["nf4"]


def test_dequantize_in_the_compute_dtype_rounds_the_exact_values():
    w = _gaussian()
    q = quantize_weight(w, QuantSpec.from_mode("nf4", compute_dtype=torch.bfloat16))
    exact = dequantize(q, torch.float32)
    assert dequantize(q).dtype == torch.bfloat16
    assert torch.equal(dequantize(q), exact.to(torch.bfloat16))


@pytest.mark.parametrize("mode", MODES)
def test_linear4bit_forward_and_input_gradient_equal_the_dense_layer(mode):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = to_linear4bit(linear, QuantSpec.from_mode(mode, compute_dtype=torch.float32))
    assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit)
    assert layer.bias is linear.bias and not layer.weight.requires_grad
    dense = nn.Linear(128, 64)
    with torch.no_grad():
        dense.weight.copy_(dequantize(layer.weight))
        dense.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-6, atol=1e-6)


def test_cpu_inference_keeps_the_standard_layout():
    """bitsandbytes repacks a CPU layer's weight in eval + no_grad; ours keep the layout checkpoints read."""
    layer = to_linear4bit(nn.Linear(128, 64), QuantSpec()).eval()
    before = layer.weight.data.clone()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert torch.equal(layer.weight.data, before)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_settings_forms_and_errors():
    assert QuantSpec.from_mode("nf4", double_quant=True).mode == "nf4-dq"
    assert QuantSpec.from_mode("fp4-dq", double_quant=True, compute_dtype="bf16").compute_dtype == torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="'nf4-dq' and double_quant=False disagree"):
        QuantSpec.from_mode("nf4-dq", double_quant=False)
    with pytest.raises(ValueError, match="mode='int8'.*8-bit is not offered"):
        QuantSpec.from_mode("int8")
    with pytest.raises(ValueError, match="blocksize=48"):
        QuantSpec.from_mode("nf4", blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype='float64'"):
        QuantSpec.from_mode("nf4", compute_dtype="float64")
    with pytest.raises(ValueError, match="compute_dtype=torch.int8"):
        resolve_dtype(torch.int8)
    with pytest.raises(ValueError, match="quant_type='int4'"):
        QuantSpec("int4")
    with pytest.raises(ValueError, match="floating .out, in. weight"):
        quantize_weight(torch.ones(4, 64, dtype=torch.int32), QuantSpec())
    with pytest.raises(TypeError, match="Params4bit"):
        dequantize(torch.zeros(4, 4))


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    import_bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what Python does when the package is absent
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning_zenft\[bnb\]'"):
            import_bitsandbytes()
        from lightning_zenft import NF4Precision

        with pytest.raises(ModuleNotFoundError, match="bitsandbytes"):
            NF4Precision()
    finally:
        import_bitsandbytes.cache_clear()
