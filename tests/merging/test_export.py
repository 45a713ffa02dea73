"""export_merged: what save_pretrained writes for the merged model, streamed, with the model left unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from merging_helpers import adapted, logits
from torch import nn
from zenft_testing import load_base, tiny_model, token_batch

from lightning_zenft import unload_adapters
from lightning_zenft.merging import export_merged, merge_and_unload
from lightning_zenft.merging.streaming import INDEX_FILE, PretrainedWeights


def _tensors(directory):
    weights = PretrainedWeights(directory)
    return {key: weights.read(key) for key in weights.keys()}


@pytest.mark.parametrize(
    ("arch", "lora"),
    [("gpt2", dict(r=4, use_dora=True, bias="lora_only")), ("llama", dict(r=4, use_rslora=True)),
     ("qwen2", dict(r=2, target_modules="attention", modules_to_save=["lm_head"]))],
)  # fmt: skip
def test_export_writes_what_save_pretrained_writes_for_the_merged_model(tmp_path, arch, lora):
    tiny_model(arch).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    model = adapted(tmp_path / "base", seed=4, **lora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_batch()
    want = logits(model, ids)
    report = export_merged(model, tmp_path / "out")
    # the model is unchanged: same tensors, adapters still there and unmerged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert logits(model, ids).equal(want)
    reference = copy.deepcopy(model)
    unload_adapters(reference, merge=True)
    reference.save_pretrained(tmp_path / "reference")
    ours, theirs = _tensors(tmp_path / "out"), _tensors(tmp_path / "reference")
    assert ours.keys() == theirs.keys()  # tied weights once, adapter layers gone, as transformers writes them
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6, msg=key)
    assert report.copied == ["tokenizer_config.json"]  # from config._name_or_path, the base directory
    assert {p.name for p in (tmp_path / "out").iterdir()} == {p.name for p in (tmp_path / "reference").iterdir()} | {
        "tokenizer_config.json"
    }
    torch.testing.assert_close(logits(load_base(tmp_path / "out"), ids), want, atol=1e-5, rtol=1e-5)


def test_export_shards_casts_and_takes_a_merged_layer_as_it_is(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model = adapted(tmp_path / "base", r=4)
    ids = token_batch()
    want = logits(model, ids)
    export_merged(model, tmp_path / "sharded", max_shard_size="20KB", source_dir=tmp_path / "base")
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(logits(load_base(tmp_path / "sharded"), ids), want, atol=1e-5, rtol=1e-5)
    export_merged(model, tmp_path / "bf16", dtype=torch.bfloat16)
    bf16, fp32 = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "sharded")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()) for k in fp32)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    layer = model.model.layers[0].self_attn.q_proj
    layer.merge()
    export_merged(model, tmp_path / "part-merged")
    torch.testing.assert_close(logits(load_base(tmp_path / "part-merged"), ids), want, atol=1e-5, rtol=1e-5)
    merge_and_unload(model)  # in place, for dense bases: the model becomes the merged plain model
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=1e-5)


class _PrefixLike(nn.Module):
    """A stand-in for an adapter that adds computation no weight expresses (prefix tuning, bottleneck adapters)."""

    def __init__(self) -> None:
        super().__init__()
        self.disabled = False
        self.extra = nn.Parameter(torch.zeros(4))

    def adapter_params(self) -> list[str]:
        return ["extra"]


def test_export_refusals(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    tied = adapted(tmp_path / "base", r=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"the adapted layer lm_head shares its weight with \['transformer\.wte"):
        export_merged(tied, tmp_path / "out")
    model = adapted(tmp_path / "base", r=2)
    with pytest.raises(ValueError, match="quantized='keep'"):
        export_merged(model, tmp_path / "out", quantized="keep")
    model.transformer.extra = _PrefixLike()
    with pytest.raises(TypeError, match="_PrefixLike adapters cannot be merged"):
        export_merged(model, tmp_path / "out")
    del model.transformer.extra
    model._weight_conversions = ["a rule"]  # what transformers records for models whose weights it converts
    with pytest.raises(ValueError, match="renamed or fused by transformers.*merge_and_unload"):
        export_merged(model, tmp_path / "out")
    del model._weight_conversions
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_merged(model, tmp_path / "out")

    def stop(name: str) -> None:
        raise RuntimeError(f"stopped at {name}")

    with pytest.raises(RuntimeError, match="stopped at"):
        export_merged(model, tmp_path / "out", overwrite=True, on_tensor=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"] and not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])  # c_attn and Qwen2's k/v projections carry a bias
def test_export_of_ia3_scales_the_bias_of_output_scaled_layers(tmp_path, arch):
    from lightning_zenft import IA3Config, inject_adapters

    tiny_model(arch).save_pretrained(tmp_path / "base")
    model = load_base(tmp_path / "base")
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # a freshly initialized model's biases are zero, which any scaling keeps
    inject_adapters(model, IA3Config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))  # trained vectors, not the ones they start at
    ids = token_batch()
    want = logits(model, ids)
    export_merged(model, tmp_path / "out")
    reference = copy.deepcopy(model)
    unload_adapters(reference, merge=True)  # the layers' own merge, biases included
    torch.testing.assert_close(logits(reference, ids), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(load_base(tmp_path / "out"), ids), want, atol=1e-5, rtol=1e-5)
