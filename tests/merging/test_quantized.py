"""Adapters merged into 4-bit (bitsandbytes Linear4bit) bases: dequantized or requantized, the error bounded."""

from __future__ import annotations

import copy

import pytest
import torch
from merging_helpers import logits, randomize
from torch import nn
from zenft_testing import load_base, tiny_config, token_batch

from lightning_zenft import LoRAConfig, find_adapters, inject_adapters
from lightning_zenft.adapters import DoRALinear, LoRALinear
from lightning_zenft.merging import (
    adapted_weight,
    dequantize_4bit_weight,
    export_merged,
    merge_and_unload,
    merge_into_4bit,
)
from lightning_zenft.safetensors_io import SafetensorsReader

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")


def to_4bit(linear: nn.Linear, quant_type: str = "nf4", double: bool = True, blocksize: int = 64) -> nn.Module:
    """A bitsandbytes Linear4bit holding ``linear``'s weights, quantized on CPU (its eval-time repacking off)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=double)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double, blocksize=blocksize)  # fmt: skip
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_model(model: nn.Module) -> None:
    """Every frozen linear layer (adapter bases included) but the output head becomes 4-bit."""
    adapters = dict(find_adapters(model))
    for layer in adapters.values():
        layer.base_layer = to_4bit(layer.base_layer)
    for name, module in list(model.named_modules()):
        inside = any(name.startswith(a + ".") for a in adapters)
        if type(module) is nn.Linear and not inside and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, to_4bit(module))


def _bound(merged: torch.Tensor, layer: nn.Module, quant_type: str) -> torch.Tensor:
    """Per entry: half the widest gap of the code table times the block absmax, plus the stored absmax's error."""
    state = layer.weight.quant_state
    code = functional.get_4bit_type(quant_type, device="cpu").sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    blocks = merged.reshape(-1, state.blocksize)  # (blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    if state.nested:  # double quantization: the block scales are stored in 8 bits themselves
        stored = functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    else:
        stored = state.absmax.float()
    return (half_gap * absmax + (stored.reshape(-1, 1) - absmax).abs()).expand_as(blocks).reshape(merged.shape)


@pytest.mark.parametrize(("quant_type", "double", "kind"), [("nf4", True, LoRALinear), ("nf4", False, DoRALinear),
                                                            ("fp4", True, LoRALinear)])  # fmt: skip
def test_merge_into_4bit_error_is_reported_and_bounded(quant_type, double, kind):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48)
    layer = kind(dense, r=4, alpha=8)  # injected on the dense layer, quantized afterwards, as a 4-bit plugin does
    layer.base_layer = to_4bit(dense, quant_type, double)
    randomize(layer, scale=0.2)
    weight = dequantize_4bit_weight(layer.base_layer).float()  # (out, in)
    merged = layer.merged_weight(weight)
    x = torch.randn(5, 128)
    with torch.no_grad():  # what the adapted layer computes: its dequantized base plus the update
        adapted = x @ merged.t() + layer.base_layer.bias
        if kind is LoRALinear:
            torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)
    error = merge_into_4bit(layer)
    restored = dequantize_4bit_weight(layer.base_layer).float()
    diff = restored - merged
    assert error.max_abs == pytest.approx(float(diff.abs().max()), rel=1e-6)
    assert error.relative == pytest.approx(float(diff.norm() / merged.norm()), rel=1e-6)
    assert (diff.abs() <= _bound(merged, layer.base_layer, quant_type) + 1e-6).all()
    assert 0 < error.relative < 0.15 and layer.merged
    with torch.no_grad():  # the layer now runs the requantized base alone
        torch.testing.assert_close(layer(x), x @ restored.t() + layer.base_layer.bias, atol=1e-5, rtol=1e-5)
        assert (layer(x) - adapted).abs().max() <= error.max_abs * x.abs().sum(dim=1).max()
    with pytest.raises(RuntimeError, match="already merged"):
        merge_into_4bit(layer)


def test_merge_into_4bit_refuses_what_it_cannot_merge():
    with pytest.raises(TypeError, match="not a 4-bit layer; call layer.merge"):
        merge_into_4bit(LoRALinear(nn.Linear(8, 8), r=2, alpha=2))
    with pytest.raises(TypeError, match="not a mergeable adapter layer"):
        merge_into_4bit(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="no quantized Params4bit"):
        dequantize_4bit_weight(nn.Linear(8, 8))


@pytest.fixture
def qlora_model(tmp_path):
    """A tiny Llama with LoRA on q/v/up over 4-bit bases (every other linear but the head 4-bit too).

    Every input width is a multiple of the 64-entry quantization block: bitsandbytes 0.50's CPU kernel dequantizes
    rows shorter than a block (or not a multiple of it) differently from how its quantizer packed them.
    """
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(base_dir)
    (base_dir / "tokenizer.json").write_text("{}")  # a stand-in tokenizer file to be carried over
    model = load_base(base_dir)
    inject_adapters(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize(model, seed=3)
    quantize_model(model)
    return model.eval(), base_dir


def test_dequantized_export_gives_the_adapted_4bit_models_logits(tmp_path, qlora_model):
    model, base_dir = qlora_model
    ids = token_batch()
    want = logits(model, ids)
    state_before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    report = export_merged(model, tmp_path / "fp32", dtype=torch.float32)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())  # the model is unchanged
    merged = load_base(tmp_path / "fp32")
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=1e-5)
    assert report.copied == ["tokenizer.json"] and report.errors == {}

    export_merged(model, tmp_path / "bf16", dtype=torch.bfloat16)
    reader = SafetensorsReader(tmp_path / "bf16" / "model.safetensors")
    assert {e.dtype for e in reader.entries.values()} == {torch.bfloat16}
    assert "quantization_config" not in (tmp_path / "bf16" / "config.json").read_text()

    in_place = copy.deepcopy(model)
    assert merge_and_unload(in_place) == {}
    assert not any(type(m).__name__ in ("Linear4bit", "LoRALinear") for m in in_place.modules())
    torch.testing.assert_close(logits(in_place, ids), want, atol=1e-5, rtol=1e-5)


def test_requantized_export_loads_in_transformers_as_the_requantized_model(tmp_path, qlora_model):
    from transformers import AutoModelForCausalLM

    model, _ = qlora_model
    ids = token_batch()
    report = export_merged(model, tmp_path / "q4", quantized="requantize")
    requantized = copy.deepcopy(model)
    errors = merge_and_unload(requantized, quantized="requantize")
    assert set(errors) == set(report.errors) == {n for n, _ in find_adapters(model)}
    assert all(errors[n] == report.errors[n] for n in errors)  # the same quantization, twice
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    for name, module in requantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            twin = loaded.get_submodule(name)
            twin.support_avx512bf16_for_cpu = False
            assert torch.equal(dequantize_4bit_weight(twin), dequantize_4bit_weight(module)), name
    torch.testing.assert_close(logits(loaded, ids), logits(requantized, ids), atol=1e-5, rtol=1e-5)
    for name, layer in find_adapters(model):  # each requantized weight within the analytic bound of its merge
        merged = adapted_weight(layer, torch.float32)
        restored = dequantize_4bit_weight(requantized.get_submodule(name)).float()
        assert ((restored - merged).abs() <= _bound(merged, requantized.get_submodule(name), "nf4") + 1e-6).all()
        assert errors[name].relative == pytest.approx(float((restored - merged).norm() / merged.norm()), rel=1e-6)
    assert max(e.relative for e in errors.values()) < 0.15


@pytest.mark.skipif(not functional.has_avx512bf16(), reason="bitsandbytes repacks CPU weights only with AVX512-BF16")
def test_a_weight_repacked_for_the_cpu_kernel_dequantizes_to_its_values(tmp_path):
    torch.manual_seed(1)
    dense = nn.Linear(64, 64)
    lora = LoRALinear(dense, r=2, alpha=4)
    randomize(lora)
    layer = lora.base_layer = to_4bit(dense, double=False)
    before = dequantize_4bit_weight(layer)
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer.eval()(torch.randn(2, 64))  # bitsandbytes repacks the weight in place here
    assert layer.weight.quant_state.packing_format_for_cpu
    # the repacked layer keeps its block scales in bf16: the same values to bf16's precision
    after = dequantize_4bit_weight(layer)
    assert after.dtype == before.dtype == torch.float32
    torch.testing.assert_close(after, before, atol=0, rtol=2**-8)
    assert layer.weight.quant_state.packing_format_for_cpu  # read without changing the layer
    export_merged(nn.Sequential(lora), tmp_path / "out")  # planned and written in the weight's own dtype
    written = SafetensorsReader(tmp_path / "out" / "model.safetensors").read("0.weight")
    torch.testing.assert_close(written, lora.merged_weight(after))


def test_the_dense_merge_error_points_to_what_merges_4bit_bases():
    dense = nn.Linear(64, 32)
    layer = LoRALinear(dense, r=2, alpha=4)
    randomize(layer)
    layer.base_layer = to_4bit(dense)
    model = nn.Sequential(layer)
    with pytest.raises(TypeError, match=r"lightning_zenft\.merging handles 4-bit bases"):
        layer.merge()
    merged = layer.merged_weight(dequantize_4bit_weight(layer.base_layer))
    merge_and_unload(model)  # the pointer is true: this merges it
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0].weight, merged)


def test_a_saved_4bit_checkpoint_merges_into_a_dense_model(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_zenft import save_adapter
    from lightning_zenft.merging import merge_pretrained

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(tmp_path / "dense")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization, device_map="cpu")
    q4.save_pretrained(tmp_path / "q4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    inject_adapters(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True))
    randomize(model, seed=5)
    for module in model.modules():
        module.support_avx512bf16_for_cpu = False
    save_adapter(model, tmp_path / "adapter")
    merge_pretrained(tmp_path / "q4", tmp_path / "merged", adapters=[tmp_path / "adapter"])
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    merged = load_base(tmp_path / "merged")
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    ids = token_batch()
    torch.testing.assert_close(logits(merged, ids), logits(model.eval(), ids), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_merge_into_a_cuda_4bit_base_is_within_the_bound():
    torch.manual_seed(0)
    dense = nn.Linear(32, 32)  # rows shorter than a block: the shape the CPU kernel mishandles
    layer = LoRALinear(dense, r=4, alpha=8)
    randomize(layer, scale=0.2)
    quantized = to_4bit(dense)
    layer.base_layer = quantized.to("cuda")
    layer.lora_A.cuda(), layer.lora_B.cuda()
    merged = layer.merged_weight(dequantize_4bit_weight(layer.base_layer).float())  # (out, in) on the GPU
    error = merge_into_4bit(layer)
    restored = dequantize_4bit_weight(layer.base_layer).float()
    assert restored.device.type == "cuda"
    assert ((restored - merged).abs() <= _bound(merged, layer.base_layer, "nf4") + 1e-6).all()
    assert error.relative < 0.15


def test_ia3_on_4bit_bases_with_biases_merges_the_scaled_bias(tmp_path):
    """IA3's output scaling scales the bias too: the dequantized merge, the export and the requantized merge keep it."""
    from transformers import AutoModelForCausalLM

    from lightning_zenft import IA3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).float().eval()  # k/v projections with biases
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    inject_adapters(model, IA3Config())
    quantize_model(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    ids = token_batch()
    want = logits(model, ids)
    export_merged(model, tmp_path / "fp32", dtype=torch.float32)
    torch.testing.assert_close(logits(load_base(tmp_path / "fp32"), ids), want, atol=1e-5, rtol=1e-5)
    dense = copy.deepcopy(model)
    merge_and_unload(dense)  # dequantize
    torch.testing.assert_close(logits(dense, ids), want, atol=1e-5, rtol=1e-5)
    requantized = copy.deepcopy(model)
    layers = dict(find_adapters(requantized))
    output_scaled = {n: x for n, x in layers.items() if x.base_layer.bias is not None and not x.feedforward}
    scaled = {name: layer.merged_bias(layer.base_layer.bias.detach().clone()) for name, layer in output_scaled.items()}
    assert scaled  # the k/v projections
    merge_and_unload(requantized, quantized="requantize")
    for name, bias in scaled.items():
        assert torch.equal(requantized.get_submodule(name).bias, bias), name  # exact: biases stay dense
