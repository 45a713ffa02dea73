"""PEFT's PROMPT_TUNING, PREFIX_TUNING and P_TUNING files both ways: equal logits and greedy tokens, equal counts."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from prompt_testing import generate, greedy_no_cache, randomize, rows
from safetensors.torch import load_file, save_file
from zenft_testing import load_base, tiny_model, token_batch

from lightning_zenft import (
    DEFAULT_BASE_MODEL_DIR,
    PrefixKV,
    PrefixTuningConfig,
    PromptEncoder,
    PromptTuningConfig,
    PTuningConfig,
    count_parameters,
    disable_adapters,
    find_adapters,
    inject_adapters,
    load_adapter,
    save_adapter,
)

N = 3
VARIANTS = {
    "prompt": (
        lambda: PromptTuningConfig(num_virtual_tokens=N),
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    ),
    "prefix": (
        lambda: PrefixTuningConfig(num_virtual_tokens=N),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    ),
    "prefix-mlp": (
        lambda: PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24),
        lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24
        ),
    ),
    "p-mlp": (
        lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=12),
        lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=12),
    ),
    "p-lstm": (
        lambda: PTuningConfig(num_virtual_tokens=N, encoder_type="lstm", encoder_hidden_size=6),
        lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=6, encoder_reparameterization_type="LSTM"
        ),
    ),
}
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "p": "P_TUNING"}


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_load_in_peft(saved_base, tmp_path, arch, variant):
    base_dir = saved_base(arch)
    ours = load_base(base_dir)
    inject_adapters(ours, VARIANTS[variant][0]())
    randomize(ours)
    out = save_adapter(ours, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[variant.split("-")[0]] and config["inference_mode"] is True
    assert set(load_file(out / "adapter_model.safetensors")) == {"prompt_embeddings"}  # at the top level, as PEFT's
    theirs = peft.PeftModel.from_pretrained(load_base(base_dir), out).eval()
    ids = token_batch(2, 7)
    for mask in (None, torch.ones_like(ids)):
        torch.testing.assert_close(_logits(theirs, ids, mask), _logits(ours.eval(), ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_here(saved_base, tmp_path, arch, variant):
    base_dir = saved_base(arch)
    theirs = peft.get_peft_model(load_base(base_dir), VARIANTS[variant][1]())
    randomize(theirs, seed=1)
    theirs.eval().save_pretrained(tmp_path / "peft_adapter")
    ids = token_batch(2, 7)
    expected = _logits(theirs, ids, torch.ones_like(ids))

    ours = load_base(base_dir)
    load_adapter(ours, tmp_path / "peft_adapter")
    ((_, module),) = find_adapters(ours)
    torch.testing.assert_close(_logits(ours.eval(), ids, torch.ones_like(ids)), expected, atol=1e-5, rtol=1e-5)
    # a file holds the table the model reads: the reparametrization's output, loaded as the table itself
    if isinstance(module, PrefixKV):
        assert module.prefix_projection is False
    if isinstance(module, PromptEncoder):
        assert module.encoder_type == "none"

    again = load_base(base_dir)  # a model holding the same adapter already: loaded into it
    inject_adapters(again, _config_of(module))
    load_adapter(again, tmp_path / "peft_adapter")
    torch.testing.assert_close(_logits(again.eval(), ids), _logits(ours, ids), atol=0, rtol=0)


def _config_of(module):
    if isinstance(module, PrefixKV):
        return PrefixTuningConfig(num_virtual_tokens=N)
    if isinstance(module, PromptEncoder):
        return PTuningConfig(num_virtual_tokens=N, encoder_type="none")
    return PromptTuningConfig(num_virtual_tokens=N)


@pytest.mark.parametrize(("arch", "variant"), [("llama", "prompt"), ("gpt2", "prefix-mlp"), ("llama", "p-lstm")])
def test_greedy_generation_equals_peft(saved_base, tmp_path, arch, variant):
    """PEFT's greedy tokens, decoded by full forwards of the PEFT model (PEFT 0.21's own `generate` passes the prefix
    as `past_key_values` beside transformers 5's `cache`, which then wins: its prefix-tuning generation drops the
    prefix, so it is no reference here)."""
    base_dir = saved_base(arch)
    ours = load_base(base_dir)
    inject_adapters(ours, VARIANTS[variant][0]())
    randomize(ours, scale=2.0)
    theirs = peft.PeftModel.from_pretrained(load_base(base_dir), save_adapter(ours, tmp_path / "adapter")).eval()
    ours.eval()
    changed = False
    for seq in rows(lengths=(5, 4)):
        want = greedy_no_cache(theirs, seq[None], 8)
        assert torch.equal(generate(ours, seq[None], torch.ones_like(seq[None]), 8), want)
        with disable_adapters(ours):
            changed |= not torch.equal(generate(ours, seq[None], torch.ones_like(seq[None]), 8), want)
    assert changed  # the adapter decides some of the tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_peft(arch, variant):
    ours = tiny_model(arch)
    inject_adapters(ours, VARIANTS[variant][0]())
    theirs = peft.get_peft_model(tiny_model(arch), VARIANTS[variant][1]())
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_text_initialization_is_recorded_for_peft(tmp_path):
    ours = load_base(DEFAULT_BASE_MODEL_DIR)
    inject_adapters(ours, PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="import os"))
    out = save_adapter(ours, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "import os"
    assert config["tokenizer_name_or_path"] == str(DEFAULT_BASE_MODEL_DIR)
    theirs = peft.PeftModel.from_pretrained(load_base(DEFAULT_BASE_MODEL_DIR), out).eval()
    ids = token_batch(1, 6)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours.eval(), ids), atol=1e-5, rtol=1e-5)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_files_that_do_not_fit_are_refused(saved_base, tmp_path):
    llama = load_base(saved_base("llama"))
    inject_adapters(llama, PrefixTuningConfig(num_virtual_tokens=N))
    out = save_adapter(llama, tmp_path / "prefix")
    with pytest.raises(ValueError, match=r"tensor base_model.model.prefix_tuning.prompt_embeddings .* has shape"):
        load_adapter(load_base(saved_base("gpt2")), out)  # another base's prefix
    _edit_config(out, num_transformer_submodules=2)
    with pytest.raises(ValueError, match="num_transformer_submodules=2 .*encoder-decoder"):
        load_adapter(load_base(saved_base("llama")), out)
    _edit_config(out, num_transformer_submodules=1, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="options this loader does not implement.*modules_to_save"):
        load_adapter(load_base(saved_base("llama")), out)

    prompt = load_base(saved_base("llama"))
    inject_adapters(prompt, PromptTuningConfig(num_virtual_tokens=N))
    out = save_adapter(prompt, tmp_path / "prompt")
    _edit_config(out, prompt_tuning_init="ZEROS")
    with pytest.raises(ValueError, match="prompt_tuning_init='ZEROS'"):
        load_adapter(load_base(saved_base("llama")), out)
    _edit_config(out, prompt_tuning_init="RANDOM")
    weights = out / "adapter_model.safetensors"
    save_file({"prompt_embeddings": torch.zeros(N, 32), "extra": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected \['prompt_tuning.extra'\]"):
        load_adapter(load_base(saved_base("llama")), out)

    other = load_base(saved_base("llama"))  # holds a different prompt adapter: loading must not mix them
    inject_adapters(other, PromptTuningConfig(num_virtual_tokens=N + 1))
    save_file({"prompt_embeddings": torch.zeros(N, 32)}, str(weights))
    with pytest.raises(ValueError, match="num_virtual_tokens=4 \\(wanted 3\\)"):
        load_adapter(other, out)
