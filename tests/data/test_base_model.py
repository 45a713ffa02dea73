"""The embedded base model and the general-text corpus it was pretrained on."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_zenft.data import corpus
from lightning_zenft.data.corpus import general_modules, general_probe_batches, general_text
from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
from lightning_zenft.lm import CausalLMModule


@pytest.fixture(scope="module")
def base():
    # local_files_only: loading must never reach for the network.
    tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_BASE_MODEL_DIR, local_files_only=True).eval()
    return tok, model


def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


def test_base_model_files_are_small_and_complete():
    names = {p.name for p in DEFAULT_BASE_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    size = sum(p.stat().st_size for p in DEFAULT_BASE_MODEL_DIR.iterdir() if p.is_file())
    assert size < 7 * 2**20


def test_base_model_is_pretrained_on_general_text(base):
    tok, model = base
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok("x = 1")["input_ids"][0] == tok.bos_token_id
    assert model.config.vocab_size == len(tok)
    batches = general_probe_batches(tok, n_batches=2, batch_size=4, seq_len=128)
    trained = mean_loss(model, batches)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(DEFAULT_BASE_MODEL_DIR, local_files_only=True)
    untrained = mean_loss(AutoModelForCausalLM.from_config(config).eval(), batches)
    ln_vocab = math.log(len(tok))
    assert untrained == pytest.approx(ln_vocab, abs=0.3)  # a random init is near-uniform: the reference point
    assert trained < 0.6 * ln_vocab


def test_causal_lm_module_defaults_to_base_model(base):
    _, model = base
    module = CausalLMModule()
    assert module.model_name_or_path == str(DEFAULT_BASE_MODEL_DIR)
    for (name, p), (_, q) in zip(module.model.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_corpus_split_is_disjoint_deterministic_and_skips_tests():
    train, probe = general_modules("train"), general_modules("probe")
    assert set(train).isdisjoint(probe)
    assert len(probe) > 0 and 0.01 < len(probe) / (len(train) + len(probe)) < 0.15
    corpus._modules.cache_clear()  # read the files again: same modules, same order
    assert general_modules("train") == train
    for name in train + probe:
        parts = name.split(".")
        assert not {"test", "tests", "idlelib", "idle_test", "encodings", "site-packages"} & set(parts), name
    assert general_text("probe") == general_text("probe")
    texts = general_text("train", max_chars=5000)
    assert sum(len(t) for t in texts) == 5000
    assert texts[0] == general_text("train")[0][: len(texts[0])]
    with pytest.raises(ValueError, match="split must be 'train' or 'probe', got 'val'"):
        general_text("val")


def test_probe_batches_shape_and_content(base):
    tok, _ = base
    batches = general_probe_batches(tok, n_batches=3, batch_size=2, seq_len=32)
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].shape == (2, 32)
        assert torch.equal(b["labels"], b["input_ids"]) and b["attention_mask"].all()
    # Windows come from the tokenized probe text, in order: the first starts at the first probe module's BOS.
    first = tok(general_text("probe")[0])["input_ids"][:32]
    assert batches[0]["input_ids"][0].tolist() == first
    with pytest.raises(ValueError, match="fewer than n_batches"):
        general_probe_batches(tok, n_batches=10, batch_size=10, seq_len=512, max_chars=1000)
