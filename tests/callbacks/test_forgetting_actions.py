"""ForgettingMonitor's actions on a run that destroys general ability (high learning rate), and resuming.

The "general ability" is counting (each token the previous plus one); the task is counting by 5. A recorder callback
placed after the monitor measures the counting accuracy itself at every step (straight from the logits), and keeps
the trainable parameters and optimizer state, so the step where the drop first passes the limit, and what a
rollback must restore, are known independently of the monitor.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from forgetting_testing import TASK_STRIDE, CounterLM, counting_accuracy, stride_rows, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_zenft import ForgettingMonitor, LoRA
from lightning_zenft.data.probes import LMProbe

MAX_DROP = 30.0
GENERAL = stride_rows(16, 1, seed=5)


class Recorder(Callback):
    """Reference accuracy, trainable parameters, optimizer state and learning rate at every step."""

    def __init__(self) -> None:
        self.accuracy: dict[int, float] = {}
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict] = {}
        self.lr: dict[int, float] = {}

    def _record(self, trainer, pl_module) -> None:
        step = trainer.global_step
        self.accuracy[step] = counting_accuracy(pl_module.model, GENERAL)
        self.params[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.optimizer[step] = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.lr[step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)

    def beyond(self) -> list[int]:
        """Steps whose reference accuracy is more than MAX_DROP below the step-0 accuracy."""
        return [s for s, acc in sorted(self.accuracy.items()) if self.accuracy[0] - acc > MAX_DROP]


class StrengthDouble(Callback):
    """Stands in for an EWC/L2-SP callback: has scale_strength and records each call with the step."""

    def __init__(self) -> None:
        self.strength = 1.0
        self.calls: list[tuple[int, float]] = []

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def scale_strength(self, factor: float) -> float:
        self.calls.append((self.trainer.global_step, factor))
        self.strength *= factor
        return self.strength


def _monitor(**kwargs) -> ForgettingMonitor:
    return ForgettingMonitor(
        probes={"general": LMProbe.from_rows(list(GENERAL))},
        task_probes={"task": LMProbe.from_rows(list(stride_rows(8, TASK_STRIDE, seed=6)))},
        every_n_steps=1,
        max_drop=MAX_DROP,
        **kwargs,
    )


def _fit(tmp_path, monitor, extra=(), lr=0.01, max_steps=6, **kwargs):
    recorder = Recorder()
    module = CounterLM(lr=lr)
    trainer(tmp_path, [*extra, monitor, recorder], max_steps=max_steps, **kwargs).fit(module)
    return module, recorder


@pytest.fixture(scope="module")
def warned(tmp_path_factory):
    """The reference run: on_exceed='warn', every warning captured."""
    monitor = _monitor(on_exceed="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, recorder = _fit(tmp_path_factory.mktemp("warn"), monitor)
    messages = [str(w.message) for w in caught if "beyond the limit" in str(w.message)]
    return monitor, recorder, messages


def test_warn_at_each_step_beyond_the_limit(warned):
    monitor, recorder, messages = warned
    beyond = recorder.beyond()
    assert beyond and beyond[0] > 1, "the run must pass the limit after some measurements within it"
    assert [r["step"] for r in monitor.history] == sorted(recorder.accuracy)
    for record in monitor.history:
        assert record["metrics"]["general"]["accuracy"] == pytest.approx(recorder.accuracy[record["step"]], abs=1e-9)
    assert [r["step"] for r in monitor.history if r["action"] == "warn"] == beyond
    assert [r["step"] for r in monitor.history if not r["within_limits"]] == beyond
    assert (
        len(messages) == len(beyond) and f"at step {beyond[0]} " in messages[0] and "general: accuracy" in messages[0]
    )
    assert monitor.within_limits() is False  # the last step is beyond the limit


def test_stop_at_the_first_step_beyond_with_a_checkpoint(tmp_path, warned):
    _, reference, _ = warned
    first = reference.beyond()[0]
    monitor = _monitor(on_exceed="stop")
    with pytest.warns(UserWarning, match="Training stops"):
        module, _ = _fit(tmp_path, monitor)
    assert monitor.history[-1]["step"] == first and monitor.history[-1]["action"] == "stop"
    assert module.trainer.global_step == first
    path = tmp_path / "forgetting" / f"forgetting-stop-step={first}.ckpt"
    assert monitor.stop_checkpoint == path and path.is_file()
    assert not list(path.parent.glob(".*tmp"))  # written under a temporary name, then renamed
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == first
    for name, value in reference.params[first].items():
        assert torch.equal(saved["state_dict"][name], value), name
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ForgettingMonitor")]
    assert state["history"][-1]["action"] == "stop" and state["history"] == monitor.history


def test_raise_ewc_calls_scale_strength_at_each_step_beyond(tmp_path, warned):
    _, reference, _ = warned
    double = StrengthDouble()
    monitor = _monitor(on_exceed="raise_ewc", strength_factor=3.0)
    with pytest.warns(UserWarning, match=r"Strengths multiplied by 3: \{'StrengthDouble'"):
        _fit(tmp_path, monitor, extra=[double])
    assert double.calls == [(step, 3.0) for step in reference.beyond()]
    assert double.strength == 3.0 ** len(reference.beyond())
    assert [r["step"] for r in monitor.history if r["action"] == "raise_ewc"] == reference.beyond()


def test_raise_ewc_without_a_strength_callback_fails_at_setup(tmp_path):
    with pytest.raises(RuntimeError, match=r"no callback with a scale_strength\(factor\) method"):
        _fit(tmp_path, _monitor(on_exceed="raise_ewc"))


def test_rollback_restores_weights_and_optimizer_then_stops_when_out_of_rollbacks(tmp_path):
    monitor = _monitor(on_exceed="rollback", max_rollbacks=1, rollback_lr_factor=0.5)
    with pytest.warns(UserWarning, match="Rolled back to step"):
        module, rec = _fit(tmp_path, monitor, max_steps=12)
    actions = [(r["step"], r["action"]) for r in monitor.history if r["action"]]
    assert [a for _, a in actions] == ["rollback", "stop"], actions
    (back, _), (stop, _) = actions
    last_good = max(r["step"] for r in monitor.history if r["within_limits"] and r["step"] < back)
    for name, value in rec.params[last_good].items():  # the recorder runs after the monitor: it sees the restore
        assert torch.equal(rec.params[back][name], value), name
    state_now, state_then = rec.optimizer[back]["state"], rec.optimizer[last_good]["state"]
    assert state_now.keys() == state_then.keys()
    for key in state_then:
        for field, value in state_then[key].items():
            assert torch.equal(state_now[key][field], value), (key, field)
    assert rec.lr[back] == pytest.approx(0.5 * rec.lr[0])
    assert monitor.rollbacks == 1 and module.trainer.global_step == stop
    assert (tmp_path / "forgetting" / f"forgetting-stop-step={stop}.ckpt").is_file()


def _resume_run(root, ckpt_path=None):
    monitor = _monitor(on_exceed="rollback", max_rollbacks=3)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    module = CounterLM(lr=0.05, n_train=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(root, [LoRA(r=4, alpha=8), monitor, checkpoints], max_steps=8, enable_checkpointing=True).fit(
            module, ckpt_path=ckpt_path
        )
    return module, monitor


def test_resume_keeps_baseline_history_and_rollback_point(tmp_path):
    straight, monitor = _resume_run(tmp_path / "a")
    assert any(r["action"] == "rollback" and r["step"] > 2 for r in monitor.history), monitor.history
    resumed, again = _resume_run(tmp_path / "b", ckpt_path=tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt")
    assert again.history == monitor.history  # same baseline (not re-measured at step 2), same records, same actions
    assert again.rollbacks == monitor.rollbacks and again.lr_scale == monitor.lr_scale
    assert resumed.losses == straight.losses[2:]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_snapshot_refuses_a_changed_model():
    from lightning_zenft.callbacks._forgetting_actions import Snapshot

    model = torch.nn.Linear(2, 2)
    snapshot = Snapshot.take(model, [torch.optim.SGD(model.parameters(), lr=0.1)], step=3, lr_scale=1.0)
    with pytest.raises(RuntimeError, match="cannot roll back to step 3"):
        snapshot.restore(torch.nn.Linear(2, 2, bias=False), [torch.optim.SGD(model.parameters(), lr=0.1)], 1.0)
    with pytest.raises(RuntimeError, match="0 optimizers now against 1"):
        snapshot.restore(model, [], 1.0)


def test_rollback_at_the_end_restores_the_last_good_weights_while_rollbacks_remain(tmp_path):
    start = {n: p.detach().clone() for n, p in CounterLM().named_parameters()}
    monitor = _monitor(on_exceed="rollback", max_rollbacks=1)
    monitor.every_n_steps = 100  # measured at the start and at the end only
    with pytest.warns(UserWarning, match="Rolled back to step 0"):
        module, _ = _fit(tmp_path / "a", monitor, max_steps=4)
    assert [(r["step"], r["action"]) for r in monitor.history] == [(0, None), (4, "rollback")]
    assert monitor.within_limits() is True
    for name, param in module.named_parameters():
        assert torch.equal(param, start[name]), name
    spent = _monitor(on_exceed="rollback", max_rollbacks=0)
    spent.every_n_steps = 100
    with pytest.warns(UserWarning, match=r"0 rollback\(s\) made \(max_rollbacks=0\)"):
        module, rec = _fit(tmp_path / "b", spent, max_steps=4)
    assert spent.history[-1]["action"] == "warn" and spent.within_limits() is False
    assert any(not torch.equal(p, start[n]) for n, p in module.named_parameters())
