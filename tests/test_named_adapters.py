"""Several adapters on one base: switching gives each adapter's own outputs (equal to a model holding only that
adapter), the base is never copied, and files load and save under names."""

from __future__ import annotations

import pytest
import torch
from zenft_testing import load_base, token_batch

from lightning_zenft import (
    LoRAConfig,
    active_adapter,
    add_adapter,
    delete_adapter,
    disable_adapters,
    find_adapters,
    inject_adapters,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)

CONFIGS = {
    "attn": LoRAConfig(r=2, alpha=4, target_modules="attention"),
    "mlp": LoRAConfig(r=3, alpha=3, target_modules="mlp", use_dora=True),
    "biased": LoRAConfig(r=2, target_modules=["q_proj"], trainable_norms=True),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=token_batch() if ids is None else ids).logits


def _reference(saved_base, name: str, trained: dict[str, torch.Tensor]) -> torch.Tensor:
    """A fresh base holding only adapter ``name``, with its trained values: what the named adapter must compute."""
    model = load_base(saved_base("llama"))
    inject_adapters(model, CONFIGS[name])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, value in trained.items():
            params[pname].copy_(value)
    assert set(trained) == {n for n, p in params.items() if p.requires_grad}
    return _logits(model)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_switching_gives_each_adapter_its_own_outputs(saved_base):
    model = load_base(saved_base("llama"))
    base = _logits(model)
    base_ids = {n: id(p) for n, p in model.named_parameters()}
    trained = {}
    for seed, name in enumerate(CONFIGS):
        add_adapter(model, name, CONFIGS[name], activate=True)
        _randomize(model, seed)  # stands in for training the active adapter
        trained[name] = _trained(model)
    assert active_adapter(model) == "biased" and list_adapters(model) == ["biased", "attn", "mlp"]
    for name in reversed(CONFIGS):
        set_adapter(model, name)
        assert active_adapter(model) == name and _trained(model).keys() == trained[name].keys()
        torch.testing.assert_close(_logits(model), _reference(saved_base, name, trained[name]), atol=1e-6, rtol=1e-6)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)
    delete_adapter(model, "biased")
    delete_adapter(model, "attn")  # the active one: the model then holds the base alone
    assert active_adapter(model) is None and list_adapters(model) == ["mlp"]
    torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)  # norms trained by "biased" restored too
    set_adapter(model, "mlp")
    torch.testing.assert_close(_logits(model), _reference(saved_base, "mlp", trained["mlp"]), atol=1e-6, rtol=1e-6)
    wrapped = {n.replace(".base_layer", ""): id(p) for n, p in model.named_parameters() if "base_layer" in n}
    assert all(base_ids[n] == i for n, i in wrapped.items())  # the same base tensors, never copied


def test_files_load_and_save_under_names(saved_base, tmp_path):
    trained = {}
    for seed, name in enumerate(("attn", "mlp")):
        model = load_base(saved_base("llama"))
        inject_adapters(model, CONFIGS[name])
        _randomize(model, seed)
        trained[name] = (_logits(model), save_adapter(model, tmp_path / name))
    model = load_base(saved_base("llama"))
    load_adapter(model, trained["attn"][1], adapter_name="attn")
    load_adapter(model, trained["mlp"][1], adapter_name="mlp")
    assert active_adapter(model) == "attn"  # the first one loaded; "mlp" waits aside
    torch.testing.assert_close(_logits(model), trained["attn"][0], atol=1e-6, rtol=1e-6)
    out = save_adapter(model, tmp_path / "again", adapter_name="mlp")  # an inactive one
    assert active_adapter(model) == "attn"
    fresh = load_base(saved_base("llama"))
    load_adapter(fresh, out)
    torch.testing.assert_close(_logits(fresh), trained["mlp"][0], atol=1e-6, rtol=1e-6)


def test_named_adapter_errors(saved_base):
    model = load_base(saved_base("llama"))
    add_adapter(model, "a", CONFIGS["attn"])
    with pytest.raises(ValueError, match="named 'a' exists already"):
        add_adapter(model, "a", CONFIGS["mlp"])
    with pytest.raises(KeyError, match=r"no adapter named 'b'; this model has \['a'\]"):
        set_adapter(model, "b")
    with pytest.raises(ValueError, match="without dots"):
        add_adapter(model, "x.y", CONFIGS["mlp"])
    pissa = load_base(saved_base("llama"))
    inject_adapters(pissa, LoRAConfig(r=2, target_modules=["q_proj"], init="pissa"))
    add_adapter_args = ("other", CONFIGS["mlp"])
    with pytest.raises(RuntimeError, match="rewrote the base weights .*PiSSA"):
        add_adapter(pissa, *add_adapter_args)
    assert len(list(find_adapters(pissa))) == 2  # nothing changed by the refused call


def test_an_adapter_injected_without_a_name_is_the_default(saved_base):
    model = load_base(saved_base("llama"))
    inject_adapters(model, CONFIGS["attn"])
    _randomize(model, 0)
    trained = _logits(model)
    add_adapter(model, "mlp", CONFIGS["mlp"])
    assert list_adapters(model) == ["default", "mlp"]
    set_adapter(model, "mlp")
    set_adapter(model, "default")
    torch.testing.assert_close(_logits(model), trained, atol=0, rtol=0)


def _every_method():
    from lightning_zenft import (
        BitFitConfig,
        BottleneckConfig,
        IA3Config,
        LoReFTConfig,
        MAMConfig,
        ParallelAdapterConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PTuningConfig,
    )

    return {
        "lora": LoRAConfig(r=2, target_modules="attention"),
        "dora": LoRAConfig(r=2, target_modules="mlp", use_dora=True),
        "ia3": IA3Config(),
        "bitfit": BitFitConfig(bias="none", trainable_norms=True),
        "bottleneck": BottleneckConfig(bottleneck_size=4),
        "parallel": ParallelAdapterConfig(bottleneck_size=4),
        "loreft": LoReFTConfig(r=2),
        "prompt": PromptTuningConfig(num_virtual_tokens=3),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
        "p_tuning": PTuningConfig(num_virtual_tokens=3),
        "mam": MAMConfig(num_virtual_tokens=3, bottleneck_size=4),
    }


@pytest.mark.parametrize("name", list(_every_method()))
def test_every_method_switches_with_its_own_outputs(saved_base, name):
    """Each method as a named adapter beside a LoRA one: switching back and forth gives each its own outputs (those
    of a fresh base holding only it, with the same values), and no adapter gives the base's."""
    config = _every_method()[name]
    ids = token_batch()
    model = load_base(saved_base("llama"))
    base = _logits(model, ids)
    add_adapter(model, "other", CONFIGS["attn"], activate=True)
    _randomize(model, 5)
    other = _logits(model, ids)
    add_adapter(model, name, config, activate=True)
    _randomize(model, 6)
    trained = _trained(model)
    mine = _logits(model, ids)

    reference = load_base(saved_base("llama"))
    inject_adapters(reference, config)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for pname, value in trained.items():
            params[pname].copy_(value)
    assert trained.keys() == {n for n, p in params.items() if p.requires_grad}
    torch.testing.assert_close(mine, _logits(reference, ids), atol=1e-6, rtol=1e-6)

    set_adapter(model, "other")
    torch.testing.assert_close(_logits(model, ids), other, atol=0, rtol=0)
    set_adapter(model, name)
    torch.testing.assert_close(_logits(model, ids), mine, atol=0, rtol=0)
    delete_adapter(model, name)
    delete_adapter(model, "other")
    torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
