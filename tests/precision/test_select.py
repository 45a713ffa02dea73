"""Which layers NF4Precision quantizes: frozen base weights only, never adapter weights, the head only when named."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zenft_testing import tiny_model

pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

from lightning_zenft import LoRAConfig, inject_adapters  # noqa: E402
from lightning_zenft.adapters import adapter_parameter_names  # noqa: E402
from lightning_zenft.precision import FabricNF4Precision, plan_quantization  # noqa: E402
from lightning_zenft.precision.select import is_4bit_layer  # noqa: E402


def _adapted(arch: str = "llama", **config) -> nn.Module:
    model = tiny_model(arch)
    inject_adapters(model, LoRAConfig(r=2, **{"target_modules": "attention", **config}))
    return model


def _linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_default_targets_are_the_frozen_base_layers_without_head_or_adapter_weights():
    model = _adapted()
    plan = plan_quantization(model)
    adapter_ids = {id(model.get_parameter(n)) for n in adapter_parameter_names(model)}
    factors = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in adapter_ids}
    frozen = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    assert set(plan.targets) == frozen - factors - {"lm_head"}
    assert {n.rsplit(".", 1)[-1] for n in plan.targets} == {"base_layer", "gate_proj", "up_proj", "down_proj"}
    assert plan.kept == {"lm_head": "output head (name it in modules= to quantize it)"}
    FabricNF4Precision(compute_dtype=torch.float32).convert_module(model)
    quantized = {n for n, m in model.named_modules() if is_4bit_layer(m)}
    assert quantized == set(plan.targets)
    assert _linear_names(model) - quantized == factors | {"lm_head"}  # adapters and head stay dense
    assert all(model.get_parameter(n).dtype == torch.float32 for n in adapter_parameter_names(model))


def test_frozen_adapter_weights_are_still_never_quantized():
    model = _adapted()
    for p in model.parameters():
        p.requires_grad_(False)  # e.g. evaluating: every weight frozen
    plan = plan_quantization(model)
    assert not any(".lora_" in n for n in plan.targets)
    with pytest.raises(ValueError, match="adapter weights .* never quantized"):
        plan_quantization(model, modules=r".*lora_A")


@pytest.mark.parametrize("skip", [["down_proj", "layers.0.mlp.up_proj"], r"model\.layers\.\d\.mlp\.(down|up)_proj"])
def test_skip_modules_as_names_or_regex(skip):
    plan = plan_quantization(_adapted(), skip_modules=skip)
    kept = {n for n, why in plan.kept.items() if why == "skip_modules"}
    if isinstance(skip, list):
        assert kept == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"}
    else:
        assert kept == {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("down", "up")}
    assert not kept & set(plan.targets)


def test_names_of_layers_inside_adapters_are_the_models_own():
    # with LoRA on every linear layer, the frozen linear is `...q_proj.base_layer`; users name it `q_proj`
    model = _adapted(target_modules="all-linear")
    plan = plan_quantization(model, skip_modules=["down_proj", r"q_proj"])
    kept = {n for n, why in plan.kept.items() if why == "skip_modules"}
    assert kept == {f"model.layers.{i}.{p}.base_layer" for i in (0, 1) for p in ("mlp.down_proj", "self_attn.q_proj")}
    plan = plan_quantization(model, skip_modules=r"model\.layers\.0\.mlp\.up_proj")  # a regex of the user's name
    assert [n for n, why in plan.kept.items() if why == "skip_modules"] == ["model.layers.0.mlp.up_proj.base_layer"]
    plan = plan_quantization(model, modules=["k_proj"])
    assert plan.targets == [f"model.layers.{i}.self_attn.k_proj.base_layer" for i in (0, 1)]
    with pytest.raises(ValueError, match=r"skip_modules=\['no_such_proj'\] matches no linear layer"):
        plan_quantization(model, skip_modules=["no_such_proj"])
    assert plan_quantization(model, skip_modules=[]).targets == plan_quantization(model).targets  # nothing to skip


def test_modules_names_what_to_quantize_head_included():
    model = _adapted()
    plan = plan_quantization(model, modules=["lm_head", "gate_proj"])
    assert set(plan.targets) == {"lm_head", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"}
    FabricNF4Precision(modules=["lm_head"], compute_dtype=torch.float32).convert_module(model)
    assert is_4bit_layer(model.lm_head) and not is_4bit_layer(model.model.layers[0].mlp.gate_proj)


def test_asking_for_a_trainable_layer_or_nothing_is_an_error():
    model = _adapted(modules_to_save=["lm_head"])  # the head trains in full
    assert plan_quantization(model).kept["lm_head"] == "trainable"
    with pytest.raises(ValueError, match=r"names trainable layers \['lm_head'\]"):
        plan_quantization(model, modules=["lm_head"])
    with pytest.raises(ValueError, match="matches no linear layer"):
        plan_quantization(model, modules=["no_such_proj"])


def test_a_model_with_nothing_frozen_is_refused():
    model = tiny_model("llama")  # no adapters: every weight trains
    with pytest.raises(ValueError, match="found no frozen linear layer.*Add an adapter callback"):
        FabricNF4Precision().convert_module(model)


def test_gpt2_conv1d_layers_stay_and_say_why():
    model = _adapted("gpt2", target_modules=["c_attn"])
    plan = plan_quantization(model)
    assert plan.kept["transformer.h.0.mlp.c_fc"].startswith("GPT-2 Conv1D")
    assert plan.targets == []


def test_conversion_is_idempotent_and_checks_settings_of_4bit_layers():
    model = _adapted()
    plugin = FabricNF4Precision(compute_dtype=torch.float32)
    plugin.convert_module(model)
    packed = model.model.layers[0].mlp.up_proj.weight.data.clone()
    plugin.convert_module(model)  # already 4-bit: kept as they are
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.data, packed)
    with pytest.raises(ValueError, match="4-bit already as nf4 .* quantizes as fp4-dq"):
        FabricNF4Precision(mode="fp4-dq").convert_module(model)
