"""Penalty values against their formulas and gradients against autograd, dense and low-rank; Fisher files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_zenft import LoRALinear
from lightning_zenft.regularizers import (
    Fisher,
    ewc_gradient,
    ewc_penalty,
    find_targets,
    l2sp_gradient,
    l2sp_penalty,
    load_fisher,
    lowrank_penalty,
    save_fisher,
    weighted_delta_penalty,
)
from lightning_zenft.regularizers.targets import effective_weight_columns


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dense_penalties_and_their_gradients():
    theta, anchor, fisher = rand(6, 5, seed=0), rand(6, 5, seed=1), rand(6, 5, seed=2).abs()
    leaf = theta.clone().requires_grad_(True)
    value = ewc_penalty(leaf, anchor, fisher, strength=3.0)
    torch.testing.assert_close(value.double(), 1.5 * (fisher * (theta - anchor) ** 2).sum(), rtol=1e-6, atol=0)
    (want,) = torch.autograd.grad(value, leaf)
    torch.testing.assert_close(ewc_gradient(theta, anchor, fisher, 3.0).double(), want.double(), rtol=1e-6, atol=1e-7)
    leaf = theta.clone().requires_grad_(True)
    value = l2sp_penalty(leaf, anchor, strength=0.5)
    torch.testing.assert_close(value.double(), 0.25 * ((theta - anchor) ** 2).sum(), rtol=1e-6, atol=0)
    (want,) = torch.autograd.grad(value, leaf)
    torch.testing.assert_close(l2sp_gradient(theta, anchor, 0.5).double(), want.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fisher", [True, False], ids=["ewc", "l2sp"])
@pytest.mark.parametrize("anchored", [True, False], ids=["anchor", "zero-anchor"])
def test_lowrank_penalty_equals_the_dense_formula_and_autograd(fisher, anchored):
    out, inp, r, s, strength = 7, 9, 3, 0.75, 2.5
    a, b = rand(r, inp, seed=0), rand(out, r, seed=1)
    row = rand(out, seed=2).abs() if fisher else None
    col = rand(inp, seed=3).abs() if fisher else None
    a0, b0 = (rand(r, inp, seed=4), rand(out, r, seed=5)) if anchored else (None, None)
    value, grad_a, grad_b = lowrank_penalty(a, b, s, row, col, a0, b0, strength=strength)
    la, lb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    delta = s * (lb @ la - (b0 @ a0 if anchored else 0))  # (out, in): the dense change
    weight = row[:, None] * col[None, :] if fisher else torch.ones(out, inp, dtype=torch.float64)
    want = 0.5 * strength * (weight * delta**2).sum()
    want_a, want_b = torch.autograd.grad(want, (la, lb))
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad_a.double(), want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b.double(), want_b, rtol=1e-5, atol=1e-6)


def test_lowrank_penalty_needs_both_anchors():
    with pytest.raises(ValueError, match="both anchor_a and anchor_b"):
        lowrank_penalty(torch.ones(2, 3), torch.ones(4, 2), 1.0, anchor_a=torch.ones(2, 3))


def test_weighted_delta_penalty_formula():
    delta, row, col = rand(4, 3, seed=0), rand(4, seed=1).abs(), rand(3, seed=2).abs()
    want = 0.5 * 2.0 * (row[:, None] * col[None, :] * delta**2).sum()
    torch.testing.assert_close(weighted_delta_penalty(delta, row, col, 2.0).double(), want, rtol=1e-6, atol=0)


def test_targets_and_effective_weight_columns():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(6, 4), r=2, alpha=4)
    nn.init.normal_(lora.lora_B.weight)
    model = nn.Sequential(lora, nn.Linear(4, 2))
    targets = find_targets(model)
    assert list(targets.lowrank) == ["0"] and sorted(targets.dense) == ["1.bias", "1.weight"]
    cols = torch.tensor([0, 3, 5])
    want = (lora.base_layer.weight + lora.delta_weight())[:, cols].T  # (c, out)
    torch.testing.assert_close(effective_weight_columns(lora, cols), want, rtol=1e-5, atol=1e-6)
    zero_b = {"lora_B.weight": torch.zeros_like(lora.lora_B.weight)}
    torch.testing.assert_close(
        effective_weight_columns(lora, cols, zero_b), lora.base_layer.weight[:, cols].T, rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------------------- Fisher files
def test_fisher_file_round_trip_is_atomic(tmp_path):
    fisher = Fisher({"a.weight": torch.rand(3, 2)}, {"layer": (torch.rand(4), torch.rand(5))}, tokens=11)
    path = tmp_path / "sub" / "fisher.safetensors"
    save_fisher(fisher, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fisher.safetensors"]  # no temporary file left
    back = load_fisher(path)
    assert back.tokens == 11 and back.estimator == "sampled"
    torch.testing.assert_close(back.diagonal["a.weight"], fisher.diagonal["a.weight"])
    torch.testing.assert_close(back.factors["layer"][1], fisher.factors["layer"][1])


def test_fisher_file_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="save_fisher"):
        load_fisher(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"weights/x": torch.ones(2)}, str(bad))
    with pytest.raises(ValueError, match="'weights/x' is not a Fisher entry"):
        load_fisher(bad)
    half = tmp_path / "half.safetensors"
    save_file({"factor_row/l": torch.ones(2)}, str(half))
    with pytest.raises(ValueError, match="lack a row or a column"):
        load_fisher(half)
    nan = tmp_path / "nan.safetensors"
    save_file({"diagonal/w": torch.tensor([1.0, float("nan")])}, str(nan))
    with pytest.raises(FloatingPointError, match="'w'"):
        load_fisher(nan)


def test_online_combination_keeps_row_and_column_sums():
    old = Fisher({"w": torch.ones(2)}, {"l": (torch.tensor([1.0, 2.0]), torch.tensor([0.25, 0.75]))}, tokens=3)
    new = Fisher({"w": torch.full((2,), 3.0)}, {"l": (torch.tensor([4.0, 0.0]), torch.tensor([0.5, 0.5]))}, tokens=5)
    both = old.combined(new, decay=0.5)
    torch.testing.assert_close(both.diagonal["w"], torch.full((2,), 3.5))
    want = 0.5 * old.factor_matrix("l") + new.factor_matrix("l")
    got = both.factor_matrix("l")
    torch.testing.assert_close(got.sum(1), want.sum(1))
    torch.testing.assert_close(got.sum(0), want.sum(0))
    assert both.tokens == 8
    with pytest.raises(ValueError, match="different parameters"):
        old.combined(Fisher({"v": torch.ones(2)}), decay=1.0)


def test_an_adapter_that_is_neither_low_rank_nor_mergeable_is_held_on_its_own_parameters():
    class Gate(nn.Module):
        """A made-up adapter: scales a frozen layer's output by a trainable vector (no weight change expresses it)."""

        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base_layer = base.requires_grad_(False)
            self.gate = nn.Parameter(torch.ones(base.out_features))
            self.disabled = False

        def adapter_params(self) -> list[str]:
            return ["gate"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base_layer(x) * (1 if self.disabled else self.gate)

    model = nn.Sequential(Gate(nn.Linear(4, 3)), LoRALinear(nn.Linear(3, 2), r=1, alpha=1))
    targets = find_targets(model)
    assert list(targets.dense) == ["0.gate"] and list(targets.lowrank) == ["1"] and not targets.mergeable
