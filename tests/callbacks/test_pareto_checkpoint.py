"""ParetoCheckpoint: the choice on scripted histories, and the kept checkpoint of a real run."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from forgetting_testing import TASK_STRIDE, CounterLM, stride_rows, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_zenft import ForgettingMonitor, LoRA, ParetoCheckpoint
from lightning_zenft.callbacks.pareto_checkpoint import pareto_choice, pareto_front
from lightning_zenft.data.probes import LMProbe


def _pt(step, task, drop, within=None):
    return {"step": step, "task": task, "drop": drop, "within_limits": drop <= 5.0 if within is None else within}


SCRIPT = [  # task accuracy rises while the general probe drops
    _pt(1, 20.0, 0.5),
    _pt(2, 40.0, 1.0),
    _pt(3, 55.0, 4.0),
    _pt(4, 70.0, 6.0),  # best task, beyond the limit
    _pt(5, 55.0, 3.0),  # ties step 3 on the task with a smaller drop
    _pt(6, 30.0, 0.2),
]


def test_choice_on_a_scripted_history():
    assert pareto_choice(SCRIPT, "max") == 4  # step 5: best task within 5 points, tie broken by the smaller drop
    assert pareto_choice(SCRIPT, "max", max_drop=2.0) == 1  # a stricter limit of its own: step 2
    assert pareto_choice(SCRIPT, "max", max_drop=10.0) == 3  # a looser one: step 4
    losses = [dict(p, task=100.0 - p["task"]) for p in SCRIPT]  # the same as a loss (lower is better)
    assert pareto_choice(losses, "min") == 4
    assert pareto_choice([_pt(1, 50.0, 9.0), _pt(2, 60.0, 8.0)], "max") is None  # nothing within the limit
    assert pareto_choice([_pt(1, 50.0, 1.0), _pt(2, 50.0, 1.0)], "max") == 0  # full tie: the earlier step
    assert pareto_front(SCRIPT, "max") == [1, 3, 4, 5]  # step 1 is dominated by step 6, step 3 by step 5


class WeightRecorder(Callback):
    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params[trainer.global_step] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad
        }


def test_keeps_the_best_task_checkpoint_within_the_limit(tmp_path, caplog):
    monitor = ForgettingMonitor(
        probes={"general": LMProbe.from_rows(list(stride_rows(16, 1, seed=5)))},
        task_probes={"task": LMProbe.from_rows(list(stride_rows(8, TASK_STRIDE, seed=6)))},
        every_n_steps=1,
        max_drop=40.0,
    )
    pareto = ParetoCheckpoint(max_drop=25.0)
    recorder = WeightRecorder()
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        callbacks = [pareto, LoRA(r=4, alpha=8), monitor, recorder]
        trainer(tmp_path, callbacks, max_steps=7, enable_checkpointing=True).fit(CounterLM(lr=0.03))
    points = [
        {"step": r["step"], "task": r["task"], "drop": r["worst_drop"], "within_limits": r["within_limits"]}
        for r in monitor.history
    ]
    assert pareto.points == points  # one point per measurement, baseline included
    later = points[1:]
    expected = later[pareto_choice(later, "max", max_drop=25.0)]
    assert any(p["task"] > expected["task"] for p in later if p["drop"] > 25.0), "the limit must change the choice"
    assert pareto.best_step == expected["step"] and pareto.chosen == expected
    files = list((tmp_path / "pareto").iterdir())
    assert [f.name for f in files] == [f"pareto-step={expected['step']}.ckpt"]  # earlier bests were deleted
    assert pareto.best_model_path == str(files[0])
    saved = torch.load(files[0], weights_only=False)
    assert saved["global_step"] == expected["step"]
    for name, value in recorder.params[expected["step"]].items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert f"kept step {expected['step']}" in caplog.text and "front" in caplog.text


def test_needs_one_monitor_with_a_task_metric(tmp_path):
    with pytest.raises(RuntimeError, match="exactly one ForgettingMonitor"):
        trainer(tmp_path, [ParetoCheckpoint()], max_steps=1, enable_checkpointing=True).fit(CounterLM())
    monitor = ForgettingMonitor(probes={"general": LMProbe.from_rows(list(stride_rows(4, 1, seed=5)))})
    with pytest.raises(RuntimeError, match="has none"):
        trainer(tmp_path, [ParetoCheckpoint(), monitor], max_steps=1, enable_checkpointing=True).fit(CounterLM())
    with pytest.raises(ValueError, match="must contain"):
        ParetoCheckpoint(filename="best.ckpt")
    with pytest.raises(ValueError, match="max_drop=-1"):
        ParetoCheckpoint(max_drop=-1.0)


def _pareto_run(root, ckpt_path=None):
    monitor = ForgettingMonitor(
        probes={"general": LMProbe.from_rows(list(stride_rows(16, 1, seed=5)))},
        task_probes={"task": LMProbe.from_rows(list(stride_rows(8, TASK_STRIDE, seed=6)))},
        every_n_steps=1,
        max_drop=40.0,
    )
    pareto = ParetoCheckpoint(dirpath=root / "kept", filename="best-{step}.ckpt", max_drop=25.0)
    every = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    module = CounterLM(lr=0.02, n_train=16)  # the best point within 25 points moves on after step 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callbacks = [LoRA(r=4, alpha=8), monitor, pareto, every]
        trainer(root, callbacks, max_steps=6, enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)
    return pareto


def test_resume_gives_the_uninterrupted_choice(tmp_path):
    straight = _pareto_run(tmp_path / "a")
    assert straight.best_step is not None and straight.best_step > 2, straight.points
    resumed = _pareto_run(tmp_path / "b", ckpt_path=tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt")
    assert resumed.points == straight.points and resumed.best_step == straight.best_step
    kept_a, kept_b = Path(straight.best_model_path), Path(resumed.best_model_path)
    assert kept_b == tmp_path / "b" / "kept" / f"best-{straight.best_step}.ckpt" and kept_a.is_file()  # a's untouched
    a, b = (torch.load(p, weights_only=False)["state_dict"] for p in (kept_a, kept_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
