"""BitFit: what trains under each option (against sets written from the model's names), its files, every error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zenft_testing import tiny_model, token_batch

from lightning_zenft import BitFitConfig, count_parameters, find_adapters, inject_adapters, load_adapter, save_adapter


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _names(model: nn.Module, keep) -> set[str]:
    return {n for n, _ in model.named_parameters() if keep(n)}


def test_default_trains_every_bias_and_nothing_else():
    model = tiny_model("gpt2")
    assert inject_adapters(model, BitFitConfig()) == [] and not list(find_adapters(model))
    biases = _names(model, lambda n: n.endswith(".bias"))
    assert biases and _trainable(model) == biases
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in biases)
    assert total == sum(p.numel() for p in model.parameters())
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == biases  # gradients reach biases only


@pytest.mark.parametrize(
    ("arch", "kwargs", "expected"),
    [
        ("gpt2", dict(trainable_norms=True), lambda n: n.endswith(".bias") or ".ln_" in n),
        ("gpt2", dict(blocks="last:1", block_parts="mlp"), lambda n: n.endswith(".bias") or ".h.1.mlp." in n),
        ("gpt2", dict(bias="none", blocks=[0]), lambda n: n.startswith("transformer.h.0.")),
        ("llama", dict(bias="none", blocks="first:1", block_parts="attention"), lambda n: ".0.self_attn." in n),
        ("llama", dict(bias="none", blocks=[-1], train_head=True), lambda n: ".layers.1." in n or "lm_head" in n),
        ("llama", dict(bias="none", blocks="all", block_parts="mlp"), lambda n: ".mlp." in n),
        ("llama", dict(bias="none", trainable_norms=True), lambda n: "norm" in n),
        ("llama", dict(bias="none", modules_to_save=["layers.0.mlp.up_proj"]), lambda n: ".0.mlp.up_proj." in n),
    ],
)
def test_options_select_what_their_names_say(arch, kwargs, expected):
    model = tiny_model(arch)
    inject_adapters(model, BitFitConfig(**kwargs))
    want = _names(model, expected)
    assert want and _trainable(model) == want


def test_tied_head_trains_the_embedding_with_a_warning():
    model = tiny_model("gpt2")  # GPT-2 ties lm_head to the token embedding
    with pytest.warns(UserWarning, match=r"lm_head\.weight is tied to transformer\.wte\.weight, which trains too"):
        inject_adapters(model, BitFitConfig(train_head=True))
    assert "transformer.wte.weight" in _trainable(model)


def test_model_without_biases():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no bias parameters .* BitFit would train nothing"):
        inject_adapters(tiny_model("llama"), BitFitConfig())
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="has no bias parameters; only the norms, head, blocks or modules asked"):
        inject_adapters(model, BitFitConfig(trainable_norms=True))
    assert _trainable(model) == _names(model, lambda n: "norm" in n)


def test_config_collects_every_problem():
    with pytest.raises(ValueError) as info:
        BitFitConfig(bias="lora_only", target_modules=["q_proj"], train_head=1, blocks="middle")  # type: ignore[arg-type]
    message = str(info.value)
    for part in ("BitFit adds no modules", "bias='lora_only'", "train_head=1", "blocks='middle'"):
        assert part in message
    for kwargs, why in [
        (dict(blocks="last:0"), "blocks='last:0' must be"),
        (dict(blocks=[]), "non-empty list"),
        (dict(blocks=[0, True]), "non-empty list of block indices"),
        (dict(blocks=[1, 1]), "lists a block twice"),
        (dict(blocks=1.5), "blocks=1.5 must be"),
        (dict(block_parts="mlp"), "block_parts='mlp' needs blocks="),
        (dict(blocks="all", block_parts="ffn"), "block_parts='ffn' must be"),
        (dict(bias="none"), "bias='none' with no other option trains nothing"),
        (dict(exclude_modules=["lm_head"]), "BitFit adds no modules"),
    ]:
        with pytest.raises(ValueError, match=why):
            BitFitConfig(**kwargs)
    assert BitFitConfig(blocks=(0, 1)).blocks == [0, 1]


def test_errors_that_need_the_model():
    for kwargs, why in [
        (dict(blocks="last:3"), r"blocks='last:3'\): the model has only 2 blocks"),
        (dict(blocks=[2, -3]), r"\[2, -3\] out of range; the model has 2 blocks \(indices 0..1, or -2..-1"),
    ]:
        with pytest.raises(ValueError, match=why):
            inject_adapters(tiny_model("gpt2"), BitFitConfig(**kwargs))

    class NoHead(nn.Module):  # no head, no attention blocks, a bias
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"train_head=True\): NoHead has no output head"):
        inject_adapters(NoHead(), BitFitConfig(train_head=True))
    with pytest.raises(ValueError, match=r"blocks='all'\): NoHead has no transformer blocks"):
        inject_adapters(NoHead(), BitFitConfig(blocks="all"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.proj = nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4)

    class NoMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

    with pytest.raises(ValueError, match=r"block_parts='mlp'\): block layers.0 has no mlp module"):
        inject_adapters(NoMLP(), BitFitConfig(blocks="all", block_parts="mlp"))


def test_files_hold_only_what_trained_and_load_back(tmp_path):
    model = tiny_model("gpt2")
    inject_adapters(model, BitFitConfig(blocks=[1], block_parts="attention"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    with pytest.raises(ValueError, match="pass method='bitfit'"):
        save_adapter(model, tmp_path / "unused")
    out = save_adapter(model, tmp_path / "bitfit", method="bitfit")
    config = json.loads((out / "adapter_config.json").read_text())
    trained = sorted(_trainable(model))
    assert config["format"] == "lightning_zenft" and config["method"] == "bitfit" and config["layers"] == {}
    assert config["trained_parameters"] == trained
    weights = out / "adapter_model.safetensors"
    assert sorted(load_file(str(weights))) == [f"base_model.model.{n}" for n in trained]

    fresh = tiny_model("gpt2")
    load_adapter(fresh, out)
    assert _trainable(fresh) == set(trained)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)

    state = load_file(str(weights))
    del state["base_model.model.transformer.h.1.attn.c_attn.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing \['transformer\.h\.1\.attn\.c_attn\.weight'\]"):
        load_adapter(tiny_model("gpt2"), out)


def test_no_warning_when_biases_exist():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_adapters(tiny_model("gpt2"), BitFitConfig(trainable_norms=True, blocks="last:1"))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_norms_named_after_attention_are_not_attention_modules(arch):
    from lightning_zenft.targets import module_candidates

    model = tiny_model(arch)  # each block holds self_attn and post_attention_layernorm
    assert module_candidates(model, "attention") == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert module_candidates(model, "block") == [f"model.layers.{i}" for i in range(2)]
