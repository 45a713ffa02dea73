"""Model code that reads a projection's ``weight`` (T5 casts to ``wo.weight.dtype``) works with LoRA layers, fused."""

from __future__ import annotations

import warnings

import torch
from transformers import T5Config, T5ForConditionalGeneration

from lightning_zenft import LoRAConfig, inject_adapters
from lightning_zenft.adapters import LoRALinear
from lightning_zenft.fusion import fuse_lora_layers, unfuse_lora_layers


def t5(gated: bool) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def test_lora_layers_expose_the_base_weight_and_bias() -> None:
    layer = LoRALinear(torch.nn.Linear(6, 4), r=2, alpha=2)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert "weight" not in dict(layer.named_parameters(recurse=False)) and "weight" not in layer.state_dict()


def test_t5_with_lora_on_every_linear_layer_matches_the_base_at_init_and_trains() -> None:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    for gated in (False, True):
        model = t5(gated)
        want = model(input_ids=ids, labels=ids).loss
        inject_adapters(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
        loss = model(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss, want)  # B = 0 at init: the base model's output
        loss.backward()
        wo = model.encoder.block[0].layer[1].DenseReluDense.wo
        assert isinstance(wo, LoRALinear) and wo.lora_B.weight.grad.abs().sum() > 0


def test_fused_t5_matches_unfused() -> None:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    losses, grads = [], []
    for fused in (False, True):
        model = t5(gated=True).train()
        inject_adapters(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
        torch.manual_seed(3)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
        if fused:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the gated MLP holds a dropout: its layers are fused one by one
                report = fuse_lora_layers(model)
            assert len(report.layers) == sum(isinstance(m, LoRALinear) for m in model.modules())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if fused:
            assert unfuse_lora_layers(model) == len(report.layers)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
