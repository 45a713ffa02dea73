"""Adapter files that cannot be loaded say which file and what is wrong; loading into a model that already holds
other adapters says to unload them; patterns that match nothing warn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from zenft_testing import load_base, token_batch

from lightning_zenft import LoRAConfig, find_adapters, inject_adapters, load_adapter, save_adapter


@pytest.fixture
def adapter_dir(saved_base, tmp_path):
    model = load_base(saved_base("llama"))
    inject_adapters(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: b"\xff" * 8 + data[8:],  # header length garbage
        lambda data: data[:8] + b"{not json" + data[17:],  # header not JSON
        lambda data: b"",
    ],
)
def test_corrupt_weights_name_the_file(saved_base, adapter_dir, corrupt):
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(ValueError, match=rf"{weights}.*not a readable safetensors file.*re-save"):
        load_adapter(load_base(saved_base("llama")), adapter_dir)


@pytest.mark.parametrize("text", ['{"peft_type": "LORA", ', "[1, 2]", "\udcff"])
def test_malformed_config_names_the_file(saved_base, adapter_dir, text):
    path = adapter_dir / "adapter_config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=rf"{path}"):
        load_adapter(load_base(saved_base("llama")), adapter_dir)


def test_loading_onto_other_adapters_says_to_unload_them(saved_base, tmp_path, adapter_dir):
    model = load_base(saved_base("llama"))
    inject_adapters(model, LoRAConfig(r=4, alpha=8, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"already holds adapters that differ.*Unload them first.*unload_adapters"):
        load_adapter(model, adapter_dir)


def test_loading_onto_adapters_with_another_alpha_is_refused(saved_base, adapter_dir):
    model = load_base(saved_base("llama"))
    inject_adapters(model, LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"alpha=16.0 \(wanted 8.0\)"):
        load_adapter(model, adapter_dir)
    same = load_base(saved_base("llama"))
    inject_adapters(same, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert load_adapter(same, adapter_dir)  # identical settings: loads into the existing layers


def test_an_adapter_for_another_base_warns(saved_base, adapter_dir):
    other = load_base(saved_base("llama", seed=1))  # same shapes, another checkpoint
    with pytest.warns(UserWarning, match=r"was saved for base model .*base-llama-0.*loaded into .*base-llama-1"):
        load_adapter(other, adapter_dir)


def test_save_writes_atomically(saved_base, tmp_path, adapter_dir, monkeypatch):
    """A save that fails half-way leaves the previous files whole and no temporary file behind."""
    import lightning_zenft.io as io

    before = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    model = load_base(saved_base("llama"))
    inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"]))

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, adapter_dir)
    assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == before


def test_pattern_keys_match_on_a_dot_boundary_and_unused_keys_warn(saved_base):
    model = load_base(saved_base("llama"))
    config = LoRAConfig(r=4, target_modules="attention", rank_pattern={"q_proj": 2, "proj": 3, r"layers\.1\..*": 6})
    with pytest.warns(UserWarning, match=r"rank_pattern key \['proj'\] matches none"):
        inject_adapters(model, config)
    ranks = {name: layer.r for name, layer in find_adapters(model)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2  # "q_proj" ends the name on a dot boundary
    assert ranks["model.layers.0.self_attn.k_proj"] == 4  # "proj" matches inside "k_proj" only: not a match
    assert ranks["model.layers.1.self_attn.k_proj"] == 6
    assert ranks["model.layers.1.self_attn.q_proj"] == 2  # the first matching key wins
    with pytest.warns(UserWarning, match=r"alpha_pattern key \['q_prj'\] matches none"):
        inject_adapters(load_base(saved_base("llama")), LoRAConfig(r=4, alpha_pattern={"q_prj": 2}))


def test_regex_that_matches_only_inside_names_hints_at_the_fix(saved_base):
    model = load_base(saved_base("llama"))
    with pytest.raises(ValueError, match=r"matches inside 4 names .*write '\.\*\(q_proj\|v_proj\)'"):
        inject_adapters(model, LoRAConfig(target_modules="q_proj|v_proj"))
    names = inject_adapters(model, LoRAConfig(target_modules=".*(q_proj|v_proj)"))
    assert len(names) == 4


def test_exclude_modules_as_a_regex_string(saved_base):
    model = load_base(saved_base("llama"))
    names = inject_adapters(model, LoRAConfig(target_modules="all-linear", exclude_modules=r".*layers\.0\..*"))
    assert names and all(".layers.1." in n for n in names)
    assert len(names) == 7


def test_pissa_with_rslora_exports_the_rank_2r_alpha(saved_base, tmp_path):
    """PiSSA exports rank 2r against the original base; with rsLoRA the file's alpha keeps the scale s, so
    alpha = s sqrt(2r), and PEFT's model from the file equals ours."""
    from peft import PeftModel

    model = load_base(saved_base("llama"))
    inject_adapters(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init="pissa", use_rslora=True))
    with torch.no_grad():
        for _, layer in find_adapters(model):
            layer.lora_B.weight.add_(0.05)
    out = save_adapter(model, tmp_path / "pissa")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is True
    assert math.isclose(config["lora_alpha"], (4 / math.sqrt(2)) * math.sqrt(4))
    assert load_file(str(out / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ].shape == (4, 32)
    peft_model = PeftModel.from_pretrained(load_base(saved_base("llama")), out).eval()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
