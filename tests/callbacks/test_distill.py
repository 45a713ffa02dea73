"""DistillToBase: its gradient equals autograd of task_loss + weight * KL (adapters, full fine-tuning, accumulation,
replay rows), resume, the teacher copy's placement, and errors."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from prevention_testing import LM, GradProbe, pretrained_model, task_batches
from zenft_testing import make_trainer

from lightning_zenft import DistillToBase, LoRA, Replay, disable_adapters
from lightning_zenft.data.text import CausalLMCollator

W, TAU = 0.7, 2.0


def kl_term(student_logits, base_logits, mask, weight=W, tau=TAU):
    """weight * tau^2 * mean over attended positions of KL(softmax(base / tau) || softmax(student / tau))."""
    p = torch.softmax(base_logits / tau, dim=-1)
    kl = (p * (torch.log_softmax(base_logits / tau, dim=-1) - torch.log_softmax(student_logits / tau, dim=-1))).sum(-1)
    return weight * tau * tau * (kl * mask).sum() / mask.sum()


class Reference(L.Callback):
    """At each micro-batch, before training_step: autograd of task_loss + weight * KL on a copy of the model."""

    def __init__(self, base: torch.nn.Module | None, replay: Replay | None = None) -> None:
        self.base, self.replay = base, replay
        self.grads: list[dict[str, torch.Tensor]] = []
        self.kls: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        student = copy.deepcopy(pl_module)
        out = student.model(**batch)
        with torch.no_grad():
            if self.base is None:
                with disable_adapters(student.model):
                    base = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                base = self.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = slice(None) if self.replay is None else slice(len(base) - self.replay.general_rows, len(base))
        kl = kl_term(out.logits[rows], base[rows], batch["attention_mask"][rows].float())
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.loss + kl, [p for _, p in named], allow_unused=True)
        self.grads.append({n: g for (n, _), g in zip(named, grads, strict=True) if g is not None})
        self.kls.append(kl.item() / W)


def mean_of(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_is_autograd_of_task_loss_plus_kl(tmp_path, adapters, accumulate):
    module = LM(pretrained_model(), task_batches(n=16, seed=1))
    reference = Reference(None if adapters else pretrained_model().eval())
    probe = GradProbe()
    distill = DistillToBase(weight=W, temperature=TAU)
    callbacks = ([LoRA(r=2, alpha=4)] if adapters else []) + [reference, distill, probe]
    trainer = make_trainer(tmp_path, callbacks, max_steps=2, accumulate_grad_batches=accumulate)
    trainer.fit(module)
    want = mean_of(reference.grads[accumulate:])  # the second step: the model has moved away from the base
    got = probe.grads[1]
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7)
    kl = sum(reference.kls[accumulate:]) / accumulate
    assert kl > 1e-4
    assert math.isclose(distill.last_kl.item(), kl, rel_tol=1e-4)
    assert (distill.teacher is None) == adapters  # adapters: the same model without them; full: a frozen copy


def test_replay_rows_only(tmp_path):
    class MixLM(LM):
        def train_dataloader(self):
            items = [{"input_ids": r.tolist(), "labels": r.tolist()} for b in self.batches for r in b["input_ids"]]
            return torch.utils.data.DataLoader(items, batch_size=4, collate_fn=CausalLMCollator(0))

    general = [{"input_ids": list(range(1, 1 + n)), "labels": list(range(1, 1 + n))} for n in (5, 9, 12)] * 4
    replay = Replay(general, ratio=0.5)
    reference = Reference(None, replay)
    probe = GradProbe()
    module = MixLM(pretrained_model(), task_batches(n=8, seed=1))
    callbacks = [LoRA(r=2, alpha=4), replay, reference, DistillToBase(W, TAU, batches="replay"), probe]
    make_trainer(tmp_path, callbacks, max_steps=2).fit(module)
    assert replay.general_rows == 4
    for name, value in reference.grads[1].items():
        torch.testing.assert_close(probe.grads[1][name], value, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "full"])
def test_resume_gives_the_uninterrupted_losses(tmp_path, adapters):
    batches = task_batches(n=16, seed=1)

    def callbacks():
        return ([LoRA(r=2, alpha=4)] if adapters else []) + [DistillToBase(weight=2.0, temperature=1.5)]

    straight = LM(pretrained_model(), batches)
    make_trainer(tmp_path / "a", callbacks(), max_steps=8).fit(straight)
    first = LM(pretrained_model(), batches)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(tmp_path / "b", [*callbacks(), saver], max_steps=4, enable_checkpointing=True).fit(first)
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert ("zenft_distill_teachers" in saved) == (not adapters)
    resumed = LM(pretrained_model(), batches)
    make_trainer(tmp_path / "c", callbacks(), max_steps=8).fit(resumed, ckpt_path=ckpt)
    assert first.losses + resumed.losses == straight.losses


def test_teacher_copy_placement_and_dtype(tmp_path):
    distill = DistillToBase(weight=1.0, teacher_device="cpu", teacher_dtype=torch.float64)
    module = LM(pretrained_model(), task_batches(n=4, seed=1))
    make_trainer(tmp_path, [distill], max_steps=2).fit(module)
    params = list(distill.teacher.parameters())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" and not p.requires_grad for p in params)
    base = dict(pretrained_model().named_parameters())
    for name, p in distill.teacher.named_parameters():  # still the base, though the student trained
        torch.testing.assert_close(p, base[name].double())
    assert distill.last_kl.item() > 0


def test_errors(tmp_path):
    for kwargs, match in [
        ({"weight": 0.0}, "weight=0.0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"batches": "task"}, "batches='task'"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistillToBase(**kwargs)
    from lightning.pytorch.strategies import ModelParallelStrategy

    distill = DistillToBase()
    with pytest.raises(RuntimeError, match="cannot serve ModelParallelStrategy"):
        distill.setup(SimpleNamespace(strategy=ModelParallelStrategy(), callbacks=[]), None, "fit")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="needs a Replay callback"):
        make_trainer(tmp_path, [DistillToBase(batches="replay")], max_steps=1).fit(LM(pretrained_model(), []))

    class HiddenLoss(LM):
        def training_step(self, batch, batch_idx):
            out = self.model(**batch, output_hidden_states=True)
            return out.hidden_states[-1].square().mean()  # a loss that never reaches the logits

    with pytest.raises(RuntimeError, match="no gradient to the student's logits"):
        make_trainer(tmp_path, [DistillToBase()], max_steps=1).fit(HiddenLoss(pretrained_model(), task_batches(n=4)))
    resumed = DistillToBase(weight=2.0)
    with pytest.raises(RuntimeError, match="resume with the settings"):
        resumed.load_state_dict(DistillToBase(weight=1.0).state_dict())
