"""Target selection across architectures, freezing, per-layer overrides and counts equal to HF PEFT's."""

from __future__ import annotations

import pytest
import torch
from zenft_testing import tiny_model

from lightning_zenft import LoRAConfig, count_parameters, find_adapters, inject_adapters, match_targets, unload_adapters
from lightning_zenft.adapters import DoRALinear, LoRALinear

ATTENTION_LEAVES = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "gemma": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense"},
    "gpt2": {"attn.c_attn", "attn.c_proj"},
}
MLP_LEAVES = {
    "llama": {"gate_proj", "up_proj", "down_proj"},
    "mistral": {"gate_proj", "up_proj", "down_proj"},
    "qwen2": {"gate_proj", "up_proj", "down_proj"},
    "gemma": {"gate_proj", "up_proj", "down_proj"},
    "phi": {"fc1", "fc2"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
}


def _leaves(names, arch):
    depth = 2 if arch == "gpt2" else 1
    return {".".join(n.split(".")[-depth:]) for n in names}


@pytest.mark.parametrize("arch", list(ATTENTION_LEAVES))
def test_presets(arch):
    model = tiny_model(arch)
    attention = match_targets(model, "attention")
    mlp = match_targets(model, "mlp")
    every = match_targets(model, "all-linear")
    assert _leaves(attention, arch) == ATTENTION_LEAVES[arch]
    assert _leaves(mlp, arch) == MLP_LEAVES[arch]
    n_layers = 2
    per_layer = len(ATTENTION_LEAVES[arch]) + len(MLP_LEAVES[arch])
    assert len(every) == n_layers * per_layer
    assert set(every) == set(attention) | set(mlp)
    assert not any(n.endswith("lm_head") for n in every)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_all_linear_equals_peft_targets(arch):
    from peft import LoraConfig, get_peft_model

    ours = set(match_targets(tiny_model(arch), "all-linear"))
    peft_model = get_peft_model(tiny_model(arch), LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs


def test_names_suffixes_regex_and_exclude():
    model = tiny_model("llama")
    assert match_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert match_targets(model, ["layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert match_targets(model, r".*\.1\..*_proj") == [n for n in match_targets(model, "all-linear") if ".1." in n]
    assert match_targets(model, "down_proj") == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    kept = match_targets(model, "attention", exclude_modules=["o_proj"])
    assert not any(n.endswith("o_proj") for n in kept) and len(kept) == 6
    # a suffix must align on a dot: "proj" is no module name
    with pytest.raises(ValueError):
        match_targets(model, ["proj"])


def test_bad_target_lists_existing_linear_layers():
    model = tiny_model("llama")
    with pytest.raises(ValueError) as info:
        match_targets(model, ["query", "value"])
    message = str(info.value)
    assert "['query', 'value']" in message
    for leaf in ("q_proj", "k_proj", "gate_proj", "down_proj", "lm_head"):
        assert leaf in message


def test_inject_freezes_base_and_applies_patterns():
    model = tiny_model("llama")
    config = LoRAConfig(r=4, alpha=8, rank_pattern={"o_proj": 2, r"layers\.1\.mlp\..*": 6}, alpha_pattern={"q_proj": 3})
    names = inject_adapters(model, config)
    layers = dict(find_adapters(model))
    assert set(layers) == set(names)
    assert layers["model.layers.0.self_attn.o_proj"].r == 2
    assert layers["model.layers.1.mlp.up_proj"].r == 6
    assert layers["model.layers.0.mlp.up_proj"].r == 4
    assert layers["model.layers.0.self_attn.q_proj"].alpha == 3
    assert layers["model.layers.0.self_attn.k_proj"].alpha == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_trainable_options():
    model = tiny_model("gpt2")
    inject_adapters(model, LoRAConfig(r=2, target_modules=["c_attn"], bias="lora_only", trainable_norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.mlp.c_fc.bias" not in trainable
    assert "transformer.ln_f.weight" in trainable and "transformer.h.1.ln_2.bias" in trainable
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'no_such_head' matches no module"):
        inject_adapters(model, LoRAConfig(r=2, modules_to_save=["no_such_head"]))


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("llama", dict(r=4, target_modules="all-linear")),
        ("qwen2", dict(r=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
        ("gpt2", dict(r=4, target_modules="all-linear", use_rslora=True)),
        ("llama", dict(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2}, bias="all")),
    ],
)
def test_parameter_counts_equal_peft(arch, kwargs):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    inject_adapters(model, LoRAConfig(**kwargs))
    ours = count_parameters(model)
    peft_kwargs = {("lora_alpha" if k == "alpha" else k): v for k, v in kwargs.items()}
    theirs = get_peft_model(tiny_model(arch), LoraConfig(**peft_kwargs)).get_nb_trainable_parameters()
    assert ours == theirs


@pytest.mark.parametrize("use_dora", [False, True])
def test_unload_merges_back_into_plain_model(use_dora):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 8))
    inject_adapters(model, LoRAConfig(r=4, use_dora=use_dora))
    for _, layer in find_adapters(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    with torch.no_grad():
        adapted = model(ids).logits
    unload_adapters(model, merge=True)
    assert not any(isinstance(m, LoRALinear | DoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_config_collects_every_problem():
    with pytest.raises(ValueError) as info:
        LoRAConfig(r=0, dropout=2.0, init="svd", bias="some")  # type: ignore[arg-type]
    message = str(info.value)
    for part in ("r=0", "dropout=2.0", "init='svd'", "bias='some'"):
        assert part in message
