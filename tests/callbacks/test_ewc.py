"""The EWC callback: the gradient it adds, what it protects, its Fisher sources, online EWC, resume, errors."""

from __future__ import annotations

import copy
import csv
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from prevention_testing import LM, GradProbe, general_batches, mean_loss, pretrained_model, task_batches
from zenft_testing import make_trainer

from lightning_zenft import EWC, L2SP, LoRA
from lightning_zenft.regularizers import ewc_penalty, fisher_diagonal

FISHER_DATA = general_batches(n=8, seed=3)


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_added_gradient_is_the_penalty_gradient_and_the_logged_value_is_the_penalty(tmp_path, accumulate):
    module = LM(pretrained_model(), task_batches(n=16, seed=1))
    start = params_of(module)
    ewc = EWC(FISHER_DATA, strength=500.0)
    before, after = GradProbe(), GradProbe()
    trainer = make_trainer(tmp_path, [before, ewc, after], max_steps=3, accumulate_grad_batches=accumulate)
    trainer.fit(module)
    reference = fisher_diagonal(copy.deepcopy(pretrained_model()), FISHER_DATA, "sampled")
    for name, value in reference.diagonal.items():
        torch.testing.assert_close(ewc.fisher.diagonal["model." + name], value)  # at the anchor, on fisher_data
        torch.testing.assert_close(ewc.anchors["model." + name], start["model." + name])
    for step in range(3):
        added = before.added(after, step)
        total = 0.0
        for name, theta in before.params[step].items():
            leaf = theta.clone().requires_grad_(True)
            value = ewc_penalty(leaf, start[name], ewc.fisher.diagonal[name], strength=500.0)
            (want,) = torch.autograd.grad(value, leaf)
            torch.testing.assert_close(added[name], want, rtol=1e-5, atol=1e-8)
            total += value.item()
    logged = trainer.callback_metrics
    assert math.isclose(logged["ewc/penalty"].item(), total, rel_tol=1e-5)
    step_loss = sum(module.losses[-accumulate:]) / accumulate  # what the optimizer step's gradient is the mean of
    assert math.isclose(logged["ewc/share"].item(), total / (step_loss + total), rel_tol=1e-4)


def test_ewc_and_l2sp_reduce_drift_and_the_general_loss_rise(tmp_path):
    general = general_batches(n=16, seed=7)
    base = pretrained_model()
    before = mean_loss(base, general)
    results = {}
    for label, callbacks in [("none", []), ("ewc", [EWC(FISHER_DATA, strength=1000.0)]), ("l2sp", [L2SP(1.0)])]:
        module = LM(pretrained_model(), task_batches(n=32, seed=1))
        start = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
        make_trainer(tmp_path, callbacks, max_steps=12).fit(module)
        drift = (torch.cat([p.detach().flatten() for p in module.parameters()]) - start).norm().item()
        results[label] = (mean_loss(module.model, general) - before, drift)
    rise_none, drift_none = results["none"]
    assert rise_none > 1.0  # the narrow task wrecks general modelling
    for label in ("ewc", "l2sp"):
        rise, drift = results[label]
        assert rise < 0.25 * rise_none, (label, results)
        assert drift < 0.6 * drift_none, (label, results)


def lora_run(tmp_path, callbacks, steps=3):
    module = LM(pretrained_model(), task_batches(n=16, seed=1), lr=3e-2)
    trainer = make_trainer(tmp_path, [LoRA(r=2, alpha=4), *callbacks], max_steps=steps)
    trainer.fit(module)
    return module, trainer


def test_lora_penalty_acts_on_the_effective_weight_change_with_the_base_fisher(tmp_path):
    ewc = EWC(FISHER_DATA, strength=2000.0)
    before, after = GradProbe(), GradProbe()
    module, _ = lora_run(tmp_path, [before, ewc, after])
    assert not ewc.fisher.diagonal and len(ewc.fisher.factors) == 14  # 7 projections x 2 layers, all factored
    assert ewc.anchors == {} and ewc.lowrank_anchors == {}  # B starts at 0: nothing to store
    for name, (row, col) in ewc.fisher.factors.items():
        layer = module.get_submodule(name)
        assert row.shape == (layer.out_features,) and col.shape == (layer.in_features,)
    step = 2
    added = before.added(after, step)
    for name, (row, col) in ewc.fisher.factors.items():
        layer = module.get_submodule(name)
        a = before.params[step][name + ".lora_A.weight"].clone().requires_grad_(True)
        b = before.params[step][name + ".lora_B.weight"].clone().requires_grad_(True)
        delta = layer.scaling * (b @ a)  # (out, in): the dense change the factored penalty stands for
        value = 0.5 * 2000.0 * (row[:, None] * col[None, :] * delta.square()).sum()
        want_a, want_b = torch.autograd.grad(value, (a, b))
        torch.testing.assert_close(added[name + ".lora_A.weight"], want_a, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(added[name + ".lora_B.weight"], want_b, rtol=1e-4, atol=1e-8)


def test_lora_ewc_holds_the_general_loss(tmp_path):
    general = general_batches(n=16, seed=7)
    before = mean_loss(pretrained_model(), general)
    plain, _ = lora_run(tmp_path, [], steps=12)
    held, _ = lora_run(tmp_path, [EWC(FISHER_DATA, strength=3000.0)], steps=12)
    rise_plain = mean_loss(plain.model, general) - before
    rise_held = mean_loss(held.model, general) - before
    assert rise_plain > 0.5
    assert rise_held < 0.5 * rise_plain, (rise_plain, rise_held)


# ------------------------------------------------------------------------------------------------- resume
def make_callbacks(kind: str) -> list[L.Callback]:
    if kind == "ewc":
        return [EWC(FISHER_DATA, strength=800.0)]
    if kind == "ewc-lora":
        return [LoRA(r=2, alpha=4), EWC(FISHER_DATA, strength=800.0)]
    if kind == "l2sp":
        return [L2SP(strength=2.0)]
    return [LoRA(r=2, alpha=4, init="pissa"), L2SP(strength=2.0)]  # PiSSA: B0 != 0, the anchor factors are stored


@pytest.mark.parametrize("kind", ["ewc", "ewc-lora", "l2sp", "l2sp-pissa"])
def test_resume_gives_the_uninterrupted_losses(tmp_path, kind):
    batches = task_batches(n=16, seed=1)  # 4 batches: an epoch ends every 4 steps
    straight = LM(pretrained_model(), batches)
    make_trainer(tmp_path / "a", make_callbacks(kind), max_steps=8).fit(straight)

    first = LM(pretrained_model(), batches)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(tmp_path / "b", [*make_callbacks(kind), saver], max_steps=4, enable_checkpointing=True).fit(first)
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = LM(pretrained_model(), batches)
    callbacks = make_callbacks(kind)
    make_trainer(tmp_path / "c", callbacks, max_steps=8).fit(resumed, ckpt_path=ckpt)
    assert first.losses + resumed.losses == straight.losses
    penalty = callbacks[-1]
    assert penalty.task_count == 1


# ------------------------------------------------------------------------------------------ Fisher sources
def test_online_ewc_accumulates_the_fisher_and_moves_the_anchor(tmp_path):
    for online in (True, False):
        ewc = EWC(FISHER_DATA, strength=100.0, online=online, decay=0.5)
        module = LM(pretrained_model(), task_batches(n=8, seed=1))
        make_trainer(tmp_path, [ewc], max_steps=2).fit(module)
        first = {k: v.clone() for k, v in ewc.fisher.diagonal.items()}
        start_two = params_of(module)
        second = fisher_diagonal(copy.deepcopy(module.model), FISHER_DATA, "sampled")
        make_trainer(tmp_path, [ewc], max_steps=2).fit(module)
        assert ewc.task_count == 2
        for inner, value in second.diagonal.items():
            name = "model." + inner
            want = 0.5 * first[name] + value if online else value
            torch.testing.assert_close(ewc.fisher.diagonal[name], want)
            torch.testing.assert_close(ewc.anchors[name], start_two[name])


def test_fisher_file_round_trip_and_mismatch(tmp_path):
    ewc = EWC(FISHER_DATA, strength=100.0)
    make_trainer(tmp_path, [ewc], max_steps=1).fit(LM(pretrained_model(), task_batches(n=4, seed=1)))
    path = tmp_path / "fisher.safetensors"
    ewc.save_fisher(path)
    loaded = EWC(path, strength=100.0)
    make_trainer(tmp_path, [loaded], max_steps=1).fit(LM(pretrained_model(), task_batches(n=4, seed=1)))
    for name, value in ewc.fisher.diagonal.items():
        torch.testing.assert_close(loaded.fisher.diagonal[name], value)
    with pytest.raises(ValueError, match="fisher.safetensors does not match"):
        lora_run(tmp_path, [EWC(path, strength=1.0)], steps=1)
    given = EWC(ewc.fisher, strength=100.0)
    make_trainer(tmp_path, [given], max_steps=1).fit(LM(pretrained_model(), task_batches(n=4, seed=1)))
    assert given.fisher.diagonal.keys() == ewc.fisher.diagonal.keys()


# ------------------------------------------------------------------------------------------------- strength
class ScaleAt(L.Callback):
    def __init__(self, target, step: int, factor: float) -> None:
        self.target, self.step, self.factor, self.returned = target, step, factor, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            self.returned = self.target.scale_strength(self.factor)


def test_scale_strength_multiplies_logs_and_takes_effect(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    ewc = EWC(FISHER_DATA, strength=100.0)
    scaler = ScaleAt(ewc, step=2, factor=3.0)
    before, after = GradProbe(), GradProbe()
    module = LM(pretrained_model(), task_batches(n=16, seed=1))
    logger = CSVLogger(tmp_path, name="log")
    trainer = make_trainer(tmp_path, [scaler, before, ewc, after], max_steps=3, logger=logger, log_every_n_steps=1)
    trainer.fit(module)
    assert scaler.returned == ewc.strength == 300.0
    name = next(iter(ewc.fisher.diagonal))
    diff = before.params[2][name] - ewc.anchors[name]
    torch.testing.assert_close(before.added(after, 2)[name], 300.0 * ewc.fisher.diagonal[name] * diff)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["ewc/strength"]) for r in rows if r.get("ewc/strength")] == [300.0]
    assert len([r for r in rows if r.get("ewc/penalty")]) == 3  # log_every_n_steps=1: a value at every step
    ewc.strength = 5.0
    assert ewc.strength == 5.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="factor"):
            ewc.scale_strength(bad)
        with pytest.raises(ValueError, match="strength"):
            ewc.strength = bad


# --------------------------------------------------------------------------------------------------- errors
def test_argument_errors(tmp_path):
    for kwargs, match in [
        ({"strength": 0.0}, "strength=0.0"),
        ({"strength": -2.0}, "strength=-2.0"),
        ({"strength": float("inf")}, "strength=inf"),
        ({"decay": 0.0}, "decay=0.0"),
        ({"decay": 1.5}, "decay=1.5"),
        ({"estimator": "avalanche"}, "estimator='avalanche'"),
        ({"samples": 0}, "samples=0"),
        ({"unit": "word"}, "unit='word'"),
        ({"estimator": "exact", "unit": "sequence"}, "unit='sequence'"),
        ({"max_batches": 0}, "max_batches=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            EWC(FISHER_DATA, **kwargs)
    with pytest.raises(ValueError, match="does not exist"):
        EWC(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="strength=0"):
        L2SP(strength=0)


def test_strategy_and_setup_errors(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    ewc = EWC(FISHER_DATA)
    fake = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[ewc])
    with pytest.raises(RuntimeError, match="FSDPStrategy \\(FSDP1\\).*ModelParallelStrategy"):
        ewc.setup(fake, None, "fit")  # type: ignore[arg-type]
    two = [EWC(FISHER_DATA), EWC(FISHER_DATA)]
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning's own check, on our state_key
        make_trainer(tmp_path, two, max_steps=1)
    named = [EWC(FISHER_DATA, name="general"), EWC(general_batches(n=4, seed=9), name="code")]
    make_trainer(tmp_path, named, max_steps=1).fit(LM(pretrained_model(), task_batches(n=4)))
    assert named[0].state_key != named[1].state_key

    class Frozen(LM):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)  # legal, although nothing trains

    frozen = Frozen(pretrained_model(), task_batches(n=4))
    frozen.model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable parameter"):
        make_trainer(tmp_path, [EWC(FISHER_DATA)], max_steps=1).fit(frozen)


def test_fisher_data_errors(tmp_path):
    masked = [dict(b, labels=torch.full_like(b["labels"], -100)) for b in FISHER_DATA]
    with pytest.raises(ValueError, match="no target tokens"):
        make_trainer(tmp_path, [EWC(masked)], max_steps=1).fit(LM(pretrained_model(), task_batches(n=4)))
    broken = LM(pretrained_model(), task_batches(n=4))
    with torch.no_grad():
        broken.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf: \\['model.lm_head.weight'\\]"):
        make_trainer(tmp_path, [EWC(FISHER_DATA)], max_steps=1).fit(broken)
