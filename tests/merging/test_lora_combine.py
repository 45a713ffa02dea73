"""Several LoRA adapters into one: exact products + SVD (error reported), A/B merged as PEFT's add_weighted_adapter."""

from __future__ import annotations

import json

import pytest
import torch
from merging_helpers import logits, make_adapter, randomize
from safetensors.torch import load_file
from zenft_testing import load_base, tiny_model, token_batch

from lightning_zenft import load_adapter
from lightning_zenft.merging import (
    combine_adapters,
    combine_lora_factors,
    combine_lora_products,
    load_adapter_layers,
    low_rank,
    merge_pretrained,
)

peft = pytest.importorskip("peft")


def _factors(seed: int, out: int = 12, inp: int = 10, r: int = 3, s: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), s


def test_products_are_exact_and_svd_error_is_the_singular_value_tail():
    f1, f2 = _factors(0), _factors(1, r=2, s=2.0)
    delta = combine_lora_products([f1, None, f2], [0.7, 5.0, -1.2])
    want = 0.7 * f1[2] * f1[1] @ f1[0] - 1.2 * f2[2] * f2[1] @ f2[0]
    torch.testing.assert_close(delta, want)
    sigma = torch.linalg.svdvals(want)
    for rank in (1, 3, 5, 50):
        a, b, error = low_rank(want, rank)
        r = min(rank, sigma.numel())
        assert a.shape == (r, 10) and b.shape == (12, r)
        tail = float(torch.sqrt((sigma[r:] ** 2).sum() / (sigma**2).sum()))
        assert error == pytest.approx(tail, abs=1e-6)
        assert float(torch.linalg.norm(want - b @ a) / torch.linalg.norm(want)) == pytest.approx(error, abs=1e-6)
    assert low_rank(want, 5)[2] < 1e-6  # rank 3 + rank 2: exact at rank 5


def test_factors_scale_a_and_b_by_the_root_of_weight_times_scaling():
    f1 = _factors(2)
    a, b = combine_lora_factors([f1], [-3.0])  # one adapter: B A must be w s B1 A1 exactly
    torch.testing.assert_close(b @ a, -3.0 * f1[2] * (f1[1] @ f1[0]))
    with pytest.raises(ValueError, match="needs one rank per layer"):
        combine_lora_factors([f1, _factors(3, r=2)], [1.0, 1.0])
    with pytest.raises(ValueError, match="no adapter adapts this layer"):
        combine_lora_products([None, None], [1.0, 1.0])


@pytest.fixture
def peft_pair(tmp_path):
    """A PEFT model with adapters 'first' and 'second' (same rank, other alphas and layers), saved in two dirs."""
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = get_peft_model(load_base(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           adapter_name="first")  # fmt: skip
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"]))
    for name, seed in (("first", 1), ("second", 2)):
        model.set_adapter(name)
        randomize(model, seed)
    model.save_pretrained(tmp_path / "saved")
    return model, base_dir, tmp_path / "saved" / "first", tmp_path / "saved" / "second"


def _peft_layers(model, name):
    out = {}
    for module_name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[module_name] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach())
    return out


@pytest.mark.parametrize(
    ("ours", "theirs", "density"),
    [
        ("task_arithmetic", "linear", None),
        ("ties", "ties", 0.5),
        ("magnitude_prune", "magnitude_prune", 0.3),
    ],  # fmt: skip
)
def test_factors_equal_peft_add_weighted_adapter(tmp_path, peft_pair, ours, theirs, density):
    model, _, path_a, path_b = peft_pair
    weights = [0.8, -1.5]
    model.add_weighted_adapter(["first", "second"], weights, "m", combination_type=theirs, density=density)
    report = combine_adapters([path_a, path_b], tmp_path / "m", weights=weights, method=ours, density=density,
                              combine="factors")  # fmt: skip
    tensors = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    expected = _peft_layers(model, "m")
    assert set(report.ranks) == set(expected) and report.max_error == 0.0
    for name, (a, b) in expected.items():
        torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_A.weight"], a)
        torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_B.weight"], b)


def test_products_with_svd_equal_peft_svd(tmp_path, peft_pair):
    model, _, path_a, path_b = peft_pair
    model.add_weighted_adapter(
        ["first", "second"], [1.0, 0.5], "m", combination_type="ties_svd", density=0.4, svd_rank=3
    )
    report = combine_adapters([path_a, path_b], tmp_path / "m", weights=[1.0, 0.5], method="ties", density=0.4,
                              rank=3)  # fmt: skip
    tensors = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    for name, (a, b) in _peft_layers(model, "m").items():
        ours = tensors[f"base_model.model.{name}.lora_B.weight"] @ tensors[f"base_model.model.{name}.lora_A.weight"]
        torch.testing.assert_close(ours, b @ a, atol=1e-5, rtol=1e-4)  # the factors differ, the products agree
    assert set(report.ranks.values()) == {3} and 0 < report.max_error < 1


def test_combined_adapter_loads_here_and_in_peft_with_the_merged_logits(tmp_path):
    from peft import PeftModel

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    _, a = make_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    _, b = make_adapter(base, tmp_path / "b", seed=2, r=2, alpha=8, target_modules=["v_proj", "o_proj"],
                        use_rslora=True)  # fmt: skip
    report = combine_adapters([a, b], tmp_path / "ab", weights=[1.0, 0.5])  # rank: each layer's largest input rank
    assert report.ranks == {f"model.layers.{i}.self_attn.{p}": r for i in (0, 1) for p, r in
                            [("q_proj", 4), ("v_proj", 4), ("o_proj", 2)]}  # fmt: skip
    assert report.errors["model.layers.0.self_attn.q_proj"] < 1e-6  # one rank-4 input: nothing cut
    assert report.errors["model.layers.0.self_attn.v_proj"] > 1e-3  # rank 4 + rank 2 cut back to 4
    config = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and config["base_model_name_or_path"] == str(base)

    ids = token_batch()
    ours = load_base(base)
    load_adapter(ours, tmp_path / "ab")
    theirs = PeftModel.from_pretrained(load_base(base), tmp_path / "ab").eval()
    torch.testing.assert_close(logits(ours.eval(), ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)
    merge_pretrained(base, tmp_path / "merged", adapters=[tmp_path / "ab"])
    torch.testing.assert_close(logits(load_base(tmp_path / "merged"), ids), logits(ours, ids), atol=1e-5, rtol=1e-5)
    # and the exact route, both adapters' products merged into the base, is what a high enough rank reproduces
    combine_adapters([a, b], tmp_path / "ab6", weights=[1.0, 0.5], rank=6)
    merge_pretrained(base, tmp_path / "exact", adapters=[a, b], weights=[1.0, 0.5])
    with_rank6 = load_base(base)
    load_adapter(with_rank6, tmp_path / "ab6")
    torch.testing.assert_close(logits(with_rank6.eval(), ids), logits(load_base(tmp_path / "exact"), ids),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_refusals(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    _, lora = make_adapter(base, tmp_path / "lora", r=4, target_modules=["q_proj"])
    _, lora2 = make_adapter(base, tmp_path / "lora2", r=2, target_modules=["q_proj"])
    _, dora = make_adapter(base, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    _, head = make_adapter(base, tmp_path / "head", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(
        TypeError, match=r"layer model\.layers\.0\.self_attn\.q_proj: a DoRALinear's update is not s B A"
    ):
        combine_adapters([lora, dora], tmp_path / "x")
    with pytest.raises(ValueError, match=r"also trains \['lm_head\.weight'\] in full"):
        combine_adapters([lora, head], tmp_path / "x")
    with pytest.raises(ValueError, match="needs one rank per layer"):
        combine_adapters([lora, lora2], tmp_path / "x", combine="factors")
    with pytest.raises(ValueError, match="keeps the adapters' rank"):
        combine_adapters([lora, lora], tmp_path / "x", combine="factors", rank=2)
    with pytest.raises(ValueError, match="got 1 weights for 2 adapters"):
        combine_adapters([lora, lora2], tmp_path / "x", weights=[1.0])
    with pytest.raises(ValueError, match="combine='sum'"):
        combine_adapters([lora, lora2], tmp_path / "x", combine="sum")
    config = json.loads((lora2 / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (lora2 / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="made for different bases"):
        combine_adapters([lora, lora2], tmp_path / "x")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        combine_adapters([lora], tmp_path / "x")
    assert not any((tmp_path / "x").iterdir())


def test_adapter_files_build_the_layers_that_saved_them(tmp_path):
    base = tmp_path / "base"
    tiny_model("gpt2").save_pretrained(base)
    model, path = make_adapter(base, tmp_path / "a", r=4, use_dora=True, rank_pattern={"c_proj": 2})
    adapter = load_adapter_layers(path)
    assert adapter.fan_in_fan_out
    from lightning_zenft.adapters import find_adapters

    for name, layer in find_adapters(model):
        built = adapter.layers[name]
        assert type(built) is type(layer) and built.r == layer.r and built.scaling == layer.scaling
        assert built.base_layer.weight.device.type == "meta"  # no memory for the base
        weight = layer.base_layer.weight.detach().t()  # (out, in)
        torch.testing.assert_close(built.merged_weight(weight), layer.merged_weight(weight))
        assert adapter.expected_shape(name) == tuple(layer.base_layer.weight.shape)


def test_adapter_files_refuse_what_they_cannot_build(tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    _, path = make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    cases = [
        ({**config, "r": 8}, tensors, "config says r=8"),
        (config, {**tensors, "base_model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)},
         "lora_embedding_A tensor, which merging does not implement"),
        (config, {k: v for k, v in tensors.items() if "layers.0" not in k or "lora_B" not in k}, "needs lora_A"),
        (config, {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)},
         "does not hold"),
        (config, {}, "holds no lora_A/lora_B tensors"),
    ]  # fmt: skip
    for i, (cfg, tens, match) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tens, str(bad / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=match):
            load_adapter_layers(bad)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter_layers(tmp_path / "nothing")
