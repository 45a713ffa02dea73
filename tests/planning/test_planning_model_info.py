"""Resolving --model: real saved Hugging Face directories and size strings."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zenft.planning.model_info import (
    ModelResolutionError,
    llama_param_count,
    parse_size,
    resolve_model,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256)  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_directory_gives_exact_count_and_shape(tmp_path, tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied))
    model.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    info = resolve_model(tmp_path)
    assert info.n_params == expected
    assert (info.hidden_size, info.num_layers, info.intermediate_size) == (64, 2, 128)
    assert (info.num_heads, info.num_kv_heads, info.head_dim, info.vocab_size) == (4, 2, 16, 256)
    assert info.tie_word_embeddings is tied and info.source == "config"
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert info.linear_params == linear
    # Without weight files the count comes from the shape formula, which must agree.
    for file in tmp_path.glob("*.safetensors"):
        file.unlink()
    assert resolve_model(str(tmp_path)).n_params == expected


@pytest.mark.parametrize(
    ("text", "count"),
    [("7B", 7_000_000_000), ("0.6B", 600_000_000), ("1.1b", 1_100_000_000), ("500M", 500_000_000),
     ("8B", 8_000_000_000), (" 32b ", 32_000_000_000)],
)  # fmt: skip
def test_size_strings(text, count):
    assert parse_size(text) == count
    info = resolve_model(text)
    assert info.n_params == count and info.source == "size"
    shaped = llama_param_count(
        info.hidden_size,
        info.num_layers,
        info.intermediate_size,
        info.num_heads,
        info.num_kv_heads,
        info.head_dim,
        info.vocab_size,
        info.tie_word_embeddings,
    )
    assert abs(shaped - count) / count < 0.1  # the guessed shape has about the stated size


def test_tinyllama_shape_count_is_exact():
    # hidden 2048, 22 layers, MLP 5632, 32 heads, 4 kv heads, vocab 32000: the published 1,100,048,384.
    assert llama_param_count(2048, 22, 5632, 32, 4, 64, 32000, tied=False) == 1_100_048_384


def test_bad_model_values_name_the_way_out(tmp_path):
    with pytest.raises(ModelResolutionError, match="neither a directory with a config.json nor a size like '7B'"):
        resolve_model("seven-billion")
    with pytest.raises(ModelResolutionError, match="without a config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelResolutionError, match="too small"):
        resolve_model("1M")
    (tmp_path / "config.json").write_text('{"model_type": "odd"}')
    with pytest.raises(ModelResolutionError, match="hidden_size"):
        resolve_model(tmp_path)
