"""ForgettingMonitor inside a Trainer: baseline, measurements, logging, KL to the base, options and errors."""

from __future__ import annotations

import copy
import csv
import logging
import warnings

import lightning as L
import pytest
import torch
from forgetting_testing import TASK_STRIDE, CounterLM, stride_rows, trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_zenft import ForgettingMonitor, LoRA
from lightning_zenft.data.probes import LMProbe

GENERAL = stride_rows(16, 1, seed=5)
TASK = stride_rows(8, TASK_STRIDE, seed=6)


def _monitor(**kwargs) -> ForgettingMonitor:
    kwargs.setdefault("probes", {"general": LMProbe.from_rows(list(GENERAL), batch_size=5)})
    kwargs.setdefault("task_probes", {"task": LMProbe.from_rows(list(TASK))})
    kwargs.setdefault("every_n_steps", 2)
    return ForgettingMonitor(**kwargs)


def _lm_reference(model, rows, base=None):
    """Accuracy, loss and KL(base || model) over all next-token positions of ``rows``, computed directly."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=rows).logits[:, :-1].double()  # (N, T-1, V)
        target = rows[:, 1:]
        out = {
            "accuracy": 100.0 * (logits.argmax(-1) == target).double().mean().item(),
            "loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).item(),
        }
        if base is not None:
            base.eval()
            log_q = torch.log_softmax(base(input_ids=rows).logits[:, :-1].double(), -1)
            log_p = torch.log_softmax(logits, -1)
            out["kl"] = (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()
    model.train()
    return out


def test_baseline_once_then_every_n_steps_and_at_the_end_logged_everywhere(tmp_path):
    monitor = _monitor(max_drop=90.0)
    module = CounterLM(lr=0.02)
    trained = trainer(tmp_path, [LoRA(r=4, alpha=8), monitor], max_steps=5, logger=CSVLogger(tmp_path))
    trained.fit(module)
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 5]  # baseline, every 2 steps, the end
    base = monitor.baseline
    assert base is monitor.history[0]["metrics"] and base["general"]["accuracy"] == 100.0
    final = _lm_reference(module.model, GENERAL)
    last = monitor.history[-1]
    assert last["metrics"]["general"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    assert last["metrics"]["general"]["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert (
        last["task"]
        == last["metrics"]["task"]["accuracy"]
        == pytest.approx(_lm_reference(module.model, TASK)["accuracy"])
    )
    assert last["drops"] == {"general": base["general"]["accuracy"] - last["metrics"]["general"]["accuracy"]}
    assert "task" not in last["drops"]  # task probes are never limited
    # every logger gets the scalars at the measured steps
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("forgetting/general/accuracy")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]
    for row, record in zip(rows, monitor.history, strict=True):
        general = record["metrics"]["general"]
        assert float(row["forgetting/general/accuracy"]) == pytest.approx(general["accuracy"])
        assert float(row["forgetting/general/loss_change"]) == pytest.approx(general["loss"] - base["general"]["loss"])
        assert float(row["forgetting/general/drop"]) == pytest.approx(record["drops"]["general"])
        assert float(row["forgetting/task/accuracy"]) == pytest.approx(record["metrics"]["task"]["accuracy"])
        assert float(row["forgetting/within_limits"]) == 1.0
    assert trained.callback_metrics["forgetting/worst_drop"].item() == pytest.approx(last["worst_drop"])
    # the progress bar shows the latest figure when the last batch ended (step 4's; step 5 is measured after it)
    assert trained.progress_bar_metrics["forgetting"] == pytest.approx(monitor.history[2]["worst_drop"])
    assert monitor.within_limits() is True


def test_kl_to_base_with_adapters_equals_a_separate_copy_of_the_base(tmp_path):
    module = CounterLM(lr=0.02)
    base = copy.deepcopy(module.model)
    monitor = _monitor()
    trainer(tmp_path, [LoRA(r=4, alpha=8), monitor], max_steps=3).fit(module)
    assert monitor.kl_mode == "adapters"
    assert monitor.history[0]["metrics"]["general"]["kl_to_base"] == 0.0  # LoRA starts at B = 0
    reference = _lm_reference(module.model, GENERAL, base)
    got = monitor.history[-1]["metrics"]["general"]
    assert reference["kl"] > 1e-4 and got["kl_to_base"] == pytest.approx(reference["kl"], rel=1e-6)
    assert got["accuracy"] == pytest.approx(reference["accuracy"])  # adapters are back on after the base pass
    assert "kl_to_base" not in monitor.history[-1]["metrics"]["task"]


def test_full_fine_tuning_skips_kl_or_keeps_a_frozen_copy(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        auto = _monitor()
        trainer(tmp_path / "auto", [auto], max_steps=2).fit(CounterLM(lr=0.01))
    assert auto.kl_mode == "off" and "kl_to_base" not in auto.history[-1]["metrics"]["general"]
    assert "no adapters" in caplog.text and "kl='copy'" in caplog.text
    module = CounterLM(lr=0.01)
    base = copy.deepcopy(module.model)
    copied = _monitor(kl="copy")
    trainer(tmp_path / "copy", [copied], max_steps=2).fit(module)
    reference = _lm_reference(module.model, GENERAL, base)
    assert copied.history[-1]["metrics"]["general"]["kl_to_base"] == pytest.approx(reference["kl"], rel=1e-6)
    with pytest.raises(RuntimeError, match="has no adapters"):
        trainer(tmp_path / "x", [_monitor(kl="adapters")], max_steps=1).fit(CounterLM())


def test_loss_limit(tmp_path):
    monitor = _monitor(max_drop=None, max_loss_increase=0.5, every_n_steps=1)
    with pytest.warns(UserWarning, match=r"general: loss .* above its baseline .*max_loss_increase=0.5"):
        trainer(tmp_path, [monitor], max_steps=4).fit(CounterLM(lr=0.01))
    rises = {r["step"]: r["loss_increases"]["general"] for r in monitor.history}
    beyond = [s for s, rise in rises.items() if rise > 0.5]
    assert beyond and [r["step"] for r in monitor.history if r["action"] == "warn"] == beyond
    for record in monitor.history:
        assert rises[record["step"]] == record["metrics"]["general"]["loss"] - monitor.baseline["general"]["loss"]


class LoggingCounter(CounterLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("task_score", 10.0 * self.trainer.global_step)  # before the step: the value at global_step
        return loss


def test_task_metric_from_the_logged_metrics(tmp_path):
    monitor = _monitor(task_probes=None, task_metric="task_score", task_mode="max", every_n_steps=2)
    trainer(tmp_path, [monitor], max_steps=4).fit(LoggingCounter(lr=0.001))
    # baseline: nothing logged yet; later: the latest logged value (logged during step 2 at global_step 1)
    assert [(r["step"], r["task"]) for r in monitor.history] == [(0, None), (2, 10.0), (4, 30.0)]
    missing = _monitor(task_probes=None, task_metric="nope")
    with pytest.warns(UserWarning, match=r"task_metric='nope' is not among the logged metrics"):
        trainer(tmp_path, [missing], max_steps=2).fit(CounterLM(lr=0.001))
    assert missing.task_mode == "max" and _monitor(task_metric="val_loss").task_mode == "min"
    assert (
        _monitor(task_metric="val/perplexity").task_mode == "min"
        and _monitor(task_metric="skill_acc").task_mode == "max"
    )


def test_forward_fn_and_non_logit_outputs(tmp_path):
    seen = []

    def forward(model, batch):
        seen.append(tuple(batch))
        return model(input_ids=batch["input_ids"]).logits

    custom = _monitor(forward_fn=forward)
    trainer(tmp_path, [custom], max_steps=2).fit(CounterLM(lr=0.001))
    plain = _monitor()
    trainer(tmp_path, [plain], max_steps=2).fit(CounterLM(lr=0.001))
    assert seen and set(seen) == {("input_ids", "attention_mask")}
    assert custom.history == plain.history  # all rows have one length here, so the mask changes nothing
    bad = _monitor(forward_fn=lambda model, batch: {"scores": 1})
    with pytest.raises(TypeError, match="not logits"):
        trainer(tmp_path, [bad], max_steps=1).fit(CounterLM())


def test_default_probes_use_the_module_tokenizer(tmp_path):
    from lightning_zenft import CausalLMModule

    module = CausalLMModule()
    monitor = ForgettingMonitor()
    monitor.setup(L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path), module, "fit")
    assert set(monitor.probes) == {"general", "python_choice"}
    assert monitor.probes["python_choice"].items[0].context[0] == 0  # the base model tokenizer's BOS id
    with pytest.raises(ValueError, match=r"needs a tokenizer"):
        ForgettingMonitor().setup(L.Trainer(accelerator="cpu", logger=False), CounterLM(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_exceed": "panic"}, "on_exceed='panic'"),
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"max_drop": -1.0}, "max_drop=-1.0"),
        ({"max_drop": None, "on_exceed": "stop"}, "needs a limit"),
        ({"kl": "maybe"}, "kl='maybe'"),
        ({"rollback_lr_factor": 2.0}, "rollback_lr_factor=2.0"),
        ({"strength_factor": 0.0}, "strength_factor=0.0 must be > 0"),
        ({"max_rollbacks": -1}, "max_rollbacks=-1 >= 0"),
        ({"max_loss_increase": float("inf")}, "max_loss_increase=inf"),
        ({"task_mode": "up"}, "task_mode='up'"),
        ({"probes": {}}, "holds no probe"),
        ({"probes": {"a/b": [torch.zeros(1, 2, dtype=torch.long)]}}, "without '/'"),
        ({"probes": {"x": "x.jsonl"}, "task_probes": {"x": "y.jsonl"}}, "distinct"),
        ({"probes": None, "task_probes": {"general": "t.jsonl"}}, "distinct"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForgettingMonitor(**kwargs)


def test_errors_at_setup_and_before_measuring(tmp_path):
    monitor = _monitor()
    with pytest.raises(RuntimeError, match="measured nothing yet"):
        monitor.within_limits()
    with pytest.raises(RuntimeError, match="no WandbLogger"):
        trainer(tmp_path, [_monitor(log_artifact=True)], max_steps=1).fit(CounterLM())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lightning.pytorch.strategies import ModelParallelStrategy

        sharded = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(RuntimeError, match="sharded"):
        _monitor(kl="copy").setup(sharded, CounterLM(), "fit")


def test_configured_from_yaml_with_the_zenft_command(tmp_path):
    from lightning_zenft.cli import cli_main

    probe = tmp_path / "python.jsonl"
    probe.write_text(
        '{"question": "x = [1, 2", "choices": ["]", ")"], "answer": 0}\n'
        '{"question": "def f(a)", "choices": [":", ";"], "answer": 0}\n'
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_zenft.LoRA
      init_args: {{r: 2}}
    - class_path: lightning_zenft.ForgettingMonitor
      init_args:
        probes: {{python: {probe}}}
        every_n_steps: 1
        max_drop: 50.0
data:
  max_length: 64
  batch_size: 2
"""
    )
    cli = cli_main(["fit", "--config", str(config)])
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ForgettingMonitor)]
    assert list(monitor.probes) == ["python"] and len(monitor.probes["python"]) == 2
    assert [r["step"] for r in monitor.history] == [0, 1, 2] and monitor.kl_mode == "adapters"
    tokenizer = cli.datamodule.tokenizer  # the monitor encoded the file with the datamodule's tokenizer
    assert monitor.probes["python"].items[1].context == tokenizer("def f(a)")["input_ids"]


class LogitsModule(CounterLM):
    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_options_model_attr_kl_off_no_end_measurement_no_progress_bar_and_stop_directory(tmp_path):
    monitor = _monitor(
        model_attr="",  # the LightningModule itself, whose forward returns the logits tensor
        kl="off",
        eval_at_end=False,
        prog_bar=False,
        on_exceed="stop",
        max_drop=100.0,
        checkpoint_dir=tmp_path / "stops",
        every_n_steps=2,
    )
    fit = trainer(tmp_path, [LoRA(r=4, alpha=8), monitor], max_steps=3)
    fit.fit(LogitsModule(lr=0.001))
    assert [r["step"] for r in monitor.history] == [0, 2]  # no measurement at the end (step 3)
    assert (
        "kl_to_base" not in monitor.history[-1]["metrics"]["general"] and "forgetting" not in fit.progress_bar_metrics
    )
    first = monitor.history[0]["metrics"]["general"]
    assert first["accuracy"] == pytest.approx(_lm_reference(fit.lightning_module.model, GENERAL)["accuracy"], abs=1e-9)
    stopper = _monitor(on_exceed="stop", max_drop=0.0, checkpoint_dir=tmp_path / "stops", every_n_steps=1)
    with pytest.warns(UserWarning, match="Training stops"):
        trainer(tmp_path, [stopper], max_steps=4).fit(CounterLM(lr=0.05))
    assert stopper.stop_checkpoint.parent == tmp_path / "stops" and stopper.stop_checkpoint.is_file()


def test_tokenizer_given_as_a_directory(tmp_path):
    from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR

    monitor = ForgettingMonitor(tokenizer=str(DEFAULT_BASE_MODEL_DIR))
    monitor.setup(L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path), CounterLM(), "fit")
    assert len(monitor.probes["python_choice"]) > 0


@pytest.mark.slow
def test_more_setup_errors(tmp_path):
    class LateModel(CounterLM):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()  # the real layers come in configure_model

    with pytest.raises(RuntimeError, match=r"no parameters yet \(built in configure_model\?\)"):
        _monitor(kl="copy").setup(L.Trainer(accelerator="cpu", logger=False), LateModel(), "fit")
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    with pytest.raises(RuntimeError, match="the model has no adapters"):
        trainer(tmp_path, [_monitor(log_artifact=True)], max_steps=1, logger=wandb_logger).fit(CounterLM())
    import wandb

    wandb.finish()
    with pytest.raises(KeyError, match=r"task_metric='task/nope'"):
        trainer(tmp_path, [_monitor(task_metric="task/nope")], max_steps=1).fit(CounterLM())
