"""LoRA on mixture-of-experts models: the stacked 3-D expert weights are adapted per expert (as HF PEFT's
``target_parameters``), files move both ways with PEFT, and no MLP is skipped silently."""

from __future__ import annotations

import json

import pytest
import torch
from zenft_testing import load_base, token_batch

from lightning_zenft import (
    LoRAConfig,
    find_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload_adapters,
)
from lightning_zenft.adapters.lora_param import LoRAParameter


def _mixtral(tmp_path, seed: int = 0):
    import transformers as tf

    path = tmp_path / f"mixtral-{seed}"
    if not path.exists():
        torch.manual_seed(seed)
        config = tf.MixtralConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        )
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=token_batch() if ids is None else ids).logits


def test_presets_adapt_the_expert_weights(tmp_path):
    model = load_base(_mixtral(tmp_path))
    names = inject_adapters(model, LoRAConfig(r=2, target_modules="mlp"))
    assert names == [
        f"model.layers.{i}.mlp.experts{inner}" for i in range(2) for inner in (".base_layer", "")
    ]  # gate_up_proj innermost, as PEFT nests them
    outer = model.model.layers[0].mlp.experts
    assert isinstance(outer, LoRAParameter) and outer.parameter_name == "down_proj"
    assert outer.base_layer.parameter_name == "gate_up_proj" and outer.lora_A.weight.shape == (2 * 4, 48)
    all_linear = inject_adapters(load_base(_mixtral(tmp_path)), LoRAConfig(r=2, target_modules="all-linear"))
    assert len(all_linear) == 2 * 4 + 4  # q/k/v/o per layer, and the two expert weights per layer


def test_forward_equals_per_expert_reference_and_merges(tmp_path):
    model = load_base(_mixtral(tmp_path))
    inject_adapters(model, LoRAConfig(r=2, alpha=6, target_modules="mlp"))
    _randomize(model)
    reference = load_base(_mixtral(tmp_path))
    with torch.no_grad():
        for i in range(2):
            experts = model.model.layers[i].mlp.experts
            for layer in (experts, experts.base_layer):
                e, r = layer.num_experts, layer.r
                a = layer.lora_A.weight.reshape(e, r, layer.in_features)  # (E, r, in)
                b = layer.lora_B.weight.reshape(layer.out_features, r, e)  # (out, r, E)
                delta = torch.stack([b[:, :, k] @ a[k] for k in range(e)]) * layer.scaling  # (E, out, in)
                getattr(reference.model.layers[i].mlp.experts, layer.parameter_name).add_(delta)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    unload_adapters(model, merge=True)
    assert not list(find_adapters(model))
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapters(tmp_path):
    model = load_base(_mixtral(tmp_path))
    inject_adapters(model, LoRAConfig(r=2, target_modules="all-linear"))
    _randomize(model)
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts.base_layer.lora_A" in n for n in grads) and all("lora_" in n for n in grads)


def test_files_move_both_ways_with_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _mixtral(tmp_path)
    ours = load_base(base)
    inject_adapters(ours, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    _randomize(ours)
    out = save_adapter(ours, tmp_path / "ours")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"][:2] == ["model.layers.0.mlp.experts.gate_up_proj",
                                               "model.layers.0.mlp.experts.down_proj"]  # fmt: skip
    peft_model = PeftModel.from_pretrained(load_base(base), out).eval()
    torch.testing.assert_close(_logits(peft_model), _logits(ours), atol=1e-5, rtol=1e-5)

    theirs = get_peft_model(
        load_base(base),
        LoraConfig(
            r=2,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        ),  # fmt: skip
    )
    _randomize(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "theirs")
    here = load_base(base)
    load_adapter(here, tmp_path / "theirs")
    torch.testing.assert_close(_logits(here), _logits(theirs), atol=1e-5, rtol=1e-5)


def test_expert_weights_refuse_dropout_and_dora_clearly(tmp_path):
    model = load_base(_mixtral(tmp_path))
    with pytest.raises(ValueError, match=r"cannot adapt the expert weights .*exclude_modules=\['down_proj', "):
        inject_adapters(model, LoRAConfig(r=2, dropout=0.1, target_modules="all-linear"))
    names = inject_adapters(
        model, LoRAConfig(r=2, dropout=0.1, target_modules="all-linear", exclude_modules=["gate_up_proj", "down_proj"])
    )
    assert len(names) == 8 and not any("experts" in n for n in names)
    with pytest.raises(ValueError, match="DoRA cannot adapt the expert parameter"):
        inject_adapters(load_base(_mixtral(tmp_path)), LoRAConfig(r=2, target_modules="mlp", use_dora=True))


def test_fused_kernels_fall_back_on_expert_weights_with_a_warning(tmp_path):
    from lightning_zenft.fusion import fuse_lora_layers, unfuse_lora_layers

    model = load_base(_mixtral(tmp_path))
    inject_adapters(model, LoRAConfig(r=2, target_modules="all-linear"))
    with pytest.warns(UserWarning, match=r"mlp\.experts keeps the unfused LoRA forward: LoRAParameter has no fused"):
        report = fuse_lora_layers(model)
    assert len(report.layers) == 8 and len(report.skipped) == 4
    unfuse_lora_layers(model)


def test_a_feed_forward_module_nothing_adapts_is_named_in_a_warning():
    from torch import nn

    class OddMLP(nn.Module):  # weights used directly, in no nn.Linear and no 3-D stack
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.w

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Sequential(nn.Linear(8, 8))
            self.mlp = OddMLP()

    model = nn.Sequential(Block())
    with pytest.warns(UserWarning, match=r"adapts nothing inside the feed-forward modules \['0\.mlp'\]"):
        names = inject_adapters(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert names == ["0.attn.0"]
