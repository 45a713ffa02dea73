"""L2SP's added gradient (dense, LoRA from r x r products, PiSSA anchors), and both penalties on DoRA layers."""

from __future__ import annotations

import math

import pytest
import torch
from prevention_testing import LM, GradProbe, general_batches, pretrained_model, task_batches
from zenft_testing import make_trainer

from lightning_zenft import EWC, L2SP, DoRA, LoRA


def run(tmp_path, callbacks, steps=3, lr=3e-2):
    module = LM(pretrained_model(), task_batches(n=16, seed=1), lr=lr)
    before, after = GradProbe(), GradProbe()
    trainer = make_trainer(tmp_path, [*callbacks[:-1], before, callbacks[-1], after], max_steps=steps)
    trainer.fit(module)
    return module, trainer, before, after


def test_dense_l2sp_gradient_and_value(tmp_path):
    start = {n: p.detach().clone() for n, p in LM(pretrained_model(), []).named_parameters()}
    module, trainer, before, after = run(tmp_path, [L2SP(strength=0.7)])
    added = before.added(after, 2)
    total = 0.0
    for name, theta in before.params[2].items():
        torch.testing.assert_close(added[name], 0.7 * (theta - start[name]), rtol=1e-5, atol=1e-8)
        total += 0.5 * 0.7 * (theta - start[name]).square().sum().item()
    assert math.isclose(trainer.callback_metrics["l2sp/penalty"].item(), total, rel_tol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_lora_l2sp_is_the_norm_of_the_effective_change(tmp_path, init):
    l2sp = L2SP(strength=5.0)
    module, trainer, before, after = run(tmp_path, [LoRA(r=2, alpha=4, init=init), l2sp])
    assert (init == "pissa") == bool(l2sp.lowrank_anchors)  # PiSSA starts at B0 != 0: its factors are the anchor
    step = 2
    added = before.added(after, step)
    total = 0.0
    for name in l2sp.targets.lowrank:
        layer = module.get_submodule(name)
        a = before.params[step][name + ".lora_A.weight"].clone().requires_grad_(True)
        b = before.params[step][name + ".lora_B.weight"].clone().requires_grad_(True)
        a0, b0 = l2sp.lowrank_anchors.get(name, (torch.zeros_like(a), torch.zeros_like(b)))
        delta = layer.scaling * (b @ a - b0 @ a0)  # (out, in)
        value = 0.5 * 5.0 * delta.square().sum()
        want_a, want_b = torch.autograd.grad(value, (a, b))
        torch.testing.assert_close(added[name + ".lora_A.weight"], want_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(added[name + ".lora_B.weight"], want_b, rtol=1e-4, atol=1e-6)
        total += value.item()
    assert math.isclose(trainer.callback_metrics["l2sp/penalty"].item(), total, rel_tol=1e-4)


def dora_weight(layer, a, b, m):
    """DoRA's effective weight, with the row norm treated as a constant in backward as the layer does."""
    adapted = layer.base_layer.weight + layer.scaling * (b @ a)  # (out, in)
    norm = torch.linalg.norm(adapted, dim=1).detach()  # (out,)
    return (m / norm)[:, None] * adapted


@pytest.mark.parametrize("penalty", ["ewc", "l2sp"])
def test_dora_penalties_act_on_the_merged_weight_change(tmp_path, penalty):
    callback = EWC(general_batches(n=4, seed=3), strength=300.0) if penalty == "ewc" else L2SP(strength=3.0)
    module, _, before, after = run(tmp_path, [DoRA(r=2, alpha=4, target_modules="attention"), callback])
    targets = callback.targets
    assert len(targets.mergeable) == 8 and not targets.lowrank
    step = 2
    added = before.added(after, step)
    for name in targets.mergeable:
        layer = module.get_submodule(name)
        keys = [name + k for k in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")]
        a, b, m = (before.params[step][k].clone().requires_grad_(True) for k in keys)
        anchor = callback.mergeable_anchors[name]
        then = dora_weight(layer, anchor["lora_A.weight"], anchor["lora_B.weight"], anchor["lora_magnitude_vector"])
        delta = dora_weight(layer, a, b, m) - then.detach()
        if penalty == "ewc":
            row, col = callback.fisher.factors[name]
            value = 0.5 * 300.0 * (row[:, None] * col[None, :] * delta.square()).sum()
        else:
            value = 0.5 * 3.0 * delta.square().sum()
        wants = torch.autograd.grad(value, (a, b, m))
        for key, want in zip(keys, wants, strict=True):
            torch.testing.assert_close(added[key], want, rtol=1e-3, atol=1e-7)


def test_bf16_weights_get_the_penalty_in_their_gradient_dtype(tmp_path):
    l2sp = L2SP(strength=0.7)
    module = LM(pretrained_model(), task_batches(n=16, seed=1), lr=3e-2)
    before, after = GradProbe(), GradProbe()
    make_trainer(tmp_path, [before, l2sp, after], max_steps=3, precision="bf16-true").fit(module)
    for name, theta in before.params[2].items():
        assert theta.dtype == torch.bfloat16 and l2sp.anchors[name].dtype == torch.float32
        grad, pull = before.grads[2][name].float(), 0.7 * (theta.float() - l2sp.anchors[name])  # fp32 math
        got = after.grads[2][name]
        assert got.dtype == torch.bfloat16
        assert ((got.float() - (grad + pull)).abs() <= 2**-8 * (grad.abs() + pull.abs())).all(), name  # bf16 rounding
