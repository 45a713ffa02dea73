"""PEFT-format adapter files: ours load in HF PEFT with identical logits, and PEFT's load here with its logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from zenft_testing import load_base, token_batch

from lightning_zenft import LoRAConfig, find_adapters, inject_adapters, load_adapter, match_targets, save_adapter
from lightning_zenft.adapters import DoRALinear

CASES = [
    ("llama", dict(r=4, alpha=8, target_modules="all-linear")),
    ("qwen2", dict(r=4, alpha=16, target_modules="attention", use_dora=True)),
    ("gpt2", dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    ("mistral", dict(r=4, alpha=8, target_modules="mlp", rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3})),
    ("gpt2", dict(r=2, alpha=4, target_modules=["c_attn"], bias="lora_only", use_dora=True)),
]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Stand-in for training: every trainable tensor gets random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_ours_load_in_peft(saved_base, tmp_path, arch, kwargs):
    from peft import PeftModel

    base_dir = saved_base(arch)
    ours = load_base(base_dir)
    inject_adapters(ours, LoRAConfig(**kwargs))
    _randomize(ours)
    out = save_adapter(ours, tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ids = token_batch()
    peft_model = PeftModel.from_pretrained(load_base(base_dir), out).eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base_dir)
    assert config["use_dora"] == kwargs.get("use_dora", False)
    assert config["fan_in_fan_out"] == (arch == "gpt2")


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_peft_loads_here(saved_base, tmp_path, arch, kwargs):
    from peft import LoraConfig, get_peft_model

    base_dir = saved_base(arch)
    peft_kwargs = {("lora_alpha" if k == "alpha" else k): v for k, v in kwargs.items()}
    if kwargs["target_modules"] in ("attention", "mlp"):  # presets of ours: PEFT gets the names they resolve to
        peft_kwargs["target_modules"] = match_targets(load_base(base_dir), kwargs["target_modules"])
    peft_model = get_peft_model(load_base(base_dir), LoraConfig(**peft_kwargs))
    _randomize(peft_model, seed=1)
    peft_model.eval().save_pretrained(tmp_path / "peft_adapter")
    ids = token_batch()
    expected = _logits(peft_model, ids)

    ours = load_base(base_dir)
    names = load_adapter(ours, tmp_path / "peft_adapter")
    assert len(names) == len(list(find_adapters(ours))) > 0
    assert all(isinstance(layer, DoRALinear) == kwargs.get("use_dora", False) for _, layer in find_adapters(ours))
    torch.testing.assert_close(_logits(ours.eval(), ids), expected, atol=1e-5, rtol=1e-5)

    # and loading into a model that already has the matching adapters gives the same result
    again = load_base(base_dir)
    inject_adapters(again, LoRAConfig(**kwargs))
    load_adapter(again, tmp_path / "peft_adapter")
    torch.testing.assert_close(_logits(again.eval(), ids), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_ours(saved_base, tmp_path):
    base_dir = saved_base("llama")
    model = load_base(base_dir)
    inject_adapters(model, LoRAConfig(r=3, target_modules=["q_proj", "o_proj"], trainable_norms=True))
    _randomize(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "model.norm" in config["modules_to_save"]
    fresh = load_base(base_dir)
    load_adapter(fresh, tmp_path / "a")
    ids = token_batch()
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=1e-6, rtol=1e-6)


def test_pissa_adapter_is_exported_against_the_original_base(saved_base, tmp_path):
    from peft import PeftModel

    base_dir = saved_base("llama")
    model = load_base(base_dir)
    inject_adapters(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init="pissa"))
    _randomize(model)
    save_adapter(model, tmp_path / "pissa")
    config = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    assert config["r"] == 4  # rank 2r relative to the unmodified base
    ids = token_batch()
    peft_model = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "pissa").eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_mismatched_adapter_errors_name_the_tensor(saved_base, tmp_path):
    model = load_base(saved_base("llama"))
    inject_adapters(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 17)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight.*\(4, 17\)"):
        load_adapter(load_base(saved_base("llama")), tmp_path / "a")

    del state[key]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight'\]"):
        load_adapter(load_base(saved_base("llama")), tmp_path / "a")

    with pytest.raises(ValueError, match="matches no linear layer"):
        load_adapter(load_base(saved_base("gpt2")), tmp_path / "a")


def test_refuses_unknown_files_and_options(saved_base, tmp_path):
    model = load_base(saved_base("llama"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="peft_type='LOHA'"):
        load_adapter(model, tmp_path)
    config = {"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [0]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers_to_transform"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_adapter(model, tmp_path)


def test_save_without_adapters_errors():
    from zenft_testing import tiny_model

    with pytest.raises(ValueError, match="holds no adapter layers"):
        save_adapter(tiny_model("llama"), "unused")


def test_trained_norms_and_bias_all_load_in_peft(saved_base, tmp_path):
    from peft import PeftModel

    base_dir = saved_base("llama")
    ours = load_base(base_dir)
    inject_adapters(ours, LoRAConfig(r=2, target_modules="attention", trainable_norms=True))
    _randomize(ours)
    save_adapter(ours, tmp_path / "norms")
    peft_model = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "norms").eval()
    ids = token_batch()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)

    gpt2_dir = saved_base("gpt2")
    ours = load_base(gpt2_dir)
    inject_adapters(ours, LoRAConfig(r=2, target_modules="mlp", bias="all"))
    _randomize(ours)
    save_adapter(ours, tmp_path / "bias")
    assert json.loads((tmp_path / "bias" / "adapter_config.json").read_text())["bias"] == "all"
    peft_model = PeftModel.from_pretrained(load_base(gpt2_dir), tmp_path / "bias").eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_peft_regex_targets_and_exclusions_load_here(saved_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = saved_base("llama")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|v_proj|up_proj)", exclude_modules=["up_proj"])
    peft_model = get_peft_model(load_base(base_dir), config)
    _randomize(peft_model, seed=2)
    peft_model.eval().save_pretrained(tmp_path / "regex")
    ours = load_base(base_dir)
    names = load_adapter(ours, tmp_path / "regex")
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"} and len(names) == 4
    ids = token_batch()
    torch.testing.assert_close(_logits(ours.eval(), ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)
