"""Module kinds of the seam: attention/mlp/block candidates, several kinds at once, kind-name presets, candidates on an
adapted model, and the install/remove hooks of modules that need something outside themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zenft_testing import tiny_model

from lightning_zenft import BottleneckConfig, LoReFTConfig, inject_adapters, match_targets, unload_adapters
from lightning_zenft.inject import AdapterPlan, LayerPlan, build_plan, plan_adapters
from lightning_zenft.registry import Method
from lightning_zenft.targets import module_candidates

EXPECTED = {  # arch -> (attention, mlp, block) names of layer 0
    "llama": ("model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0"),
    "gpt2": ("transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.0"),
    "phi": ("model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0"),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_candidates_of_each_kind_and_of_two_kinds(arch):
    model = tiny_model(arch)
    attention, mlp, block = EXPECTED[arch]
    layer1 = [n.replace(".0", ".1", 1) for n in (attention, mlp, block)]
    assert module_candidates(model, "attention") == [attention, layer1[0]]  # not Llama's post_attention_layernorm
    assert module_candidates(model, "mlp") == [mlp, layer1[1]]
    assert module_candidates(model, "block") == [block, layer1[2]]
    both = [attention, mlp, layer1[0], layer1[1]]
    assert module_candidates(model, ("attention", "mlp")) == both  # module order
    kinds = ("attention", "mlp")
    assert match_targets(model, "all", kind=kinds) == both
    assert match_targets(model, "attention", kind=kinds) == [attention, layer1[0]]  # a kind's name is a preset
    assert match_targets(model, "mlp", kind=kinds) == [mlp, layer1[1]]
    assert match_targets(model, [mlp], kind=kinds) == [mlp]
    assert match_targets(model, "all", exclude_modules=[mlp], kind=kinds) == [attention, layer1[0], layer1[1]]


def test_bad_kinds_and_unmatched_targets_are_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown module kind 'layer'"):
        module_candidates(model, "layer")
    with pytest.raises(ValueError, match="unknown module kind \\('linear', 'mlp'\\)"):
        module_candidates(model, ("linear", "mlp"))
    with pytest.raises(ValueError, match="matches no attention or mlp module .* Use 'all', 'attention', 'mlp'"):
        match_targets(model, ["q_proj"], kind=("attention", "mlp"))
    with pytest.raises(ValueError, match="has no block modules to adapt"):
        match_targets(nn.Sequential(nn.Linear(4, 4)), "all", kind="block")


def test_candidates_on_an_adapted_model_count_wrapped_modules_at_their_place():
    model = tiny_model("llama")
    inject_adapters(model, LoReFTConfig())  # wraps the blocks
    assert module_candidates(model, "block") == []  # adapted: not candidates for new adapters
    assert module_candidates(model, "block", include_adapted=True) == ["model.layers.0", "model.layers.1"]
    assert plan_adapters(model, LoReFTConfig(), include_adapted=True).mismatches(model) == []
    other = tiny_model("gpt2")
    inject_adapters(other, BottleneckConfig())
    assert module_candidates(other, ("attention", "mlp"), include_adapted=True) == [
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
    ]


class _Hooked(nn.Module):
    """A wrapping adapter that installs a hook on the model (the contract of ``install``/``remove``)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.disabled = False
        self.scale = nn.Parameter(torch.ones(()))
        self.installed_on: nn.Module | None = None
        self.handle = None

    def adapter_params(self) -> list[str]:
        return ["scale"]

    def install(self, model: nn.Module) -> None:
        self.installed_on = model
        self.handle = model.register_forward_pre_hook(lambda module, args: None)

    def remove(self) -> None:
        self.handle.remove()
        self.installed_on = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale


def test_build_plan_installs_and_unload_removes_wrapping_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    method = Method("hooked_test", LoReFTConfig, _Hooked, "linear", (_Hooked,))  # not registered: built directly
    build_plan(model, AdapterPlan(method, None, [LayerPlan("0", {})]))
    layer = model[0]
    assert isinstance(layer, _Hooked) and layer.installed_on is model and len(model._forward_pre_hooks) == 1
    unload_adapters(model, merge=False)
    assert isinstance(model[0], nn.Linear) and layer.installed_on is None and len(model._forward_pre_hooks) == 0
