"""What the monitor shows: the figure's content, the PNG, and what real W&B (offline) and TensorBoard runs hold."""

from __future__ import annotations

import io
import json
import re
import sys
import warnings

import numpy as np
import pytest
from forgetting_testing import TASK_STRIDE, CounterLM, stride_rows, trainer, wandb_records

from lightning_zenft import ForgettingMonitor, LoRA, save_adapter
from lightning_zenft.data.probes import LMProbe
from lightning_zenft.reporting import figure_rgb, forgetting_figure, require_wandb
from lightning_zenft.reporting.records import table_columns, table_rows


def _png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _monitor(**kwargs) -> ForgettingMonitor:
    return ForgettingMonitor(
        probes={"general": LMProbe.from_rows(list(stride_rows(16, 1, seed=5)))},
        task_probes={"task": LMProbe.from_rows(list(stride_rows(8, TASK_STRIDE, seed=6)))},
        every_n_steps=2,
        max_drop=20.0,
        **kwargs,
    )


def _fit(tmp_path, monitor, logger, max_steps=4):
    module = CounterLM(lr=0.03)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [LoRA(r=4, alpha=8), monitor], max_steps=max_steps, logger=logger).fit(module)
    return module


def _history(steps_and_accuracies, task=True, max_drop=5.0):
    base = steps_and_accuracies[0][1]
    return [
        {
            "step": s,
            "metrics": {"general": {"accuracy": a, "loss": 1.0}},
            "task": 10.0 + s if task else None,
            "drops": {"general": base - a},
            "loss_increases": {"general": 0.0},
            "worst_drop": base - a,
            "within_limits": base - a <= max_drop,
            "action": None if base - a <= max_drop else "warn",
        }
        for s, a in steps_and_accuracies
    ]


def test_figure_draws_the_history_and_the_limits():
    history = _history([(0, 60.0), (5, 58.0), (10, 52.0)])
    fig = forgetting_figure(history, max_drop=5.0, task_name="task/accuracy")
    left, trade = fig.axes[0], fig.axes[1]
    lines = {line.get_label(): line for line in left.get_lines()}
    assert list(lines["general accuracy"].get_xdata()) == [0, 5, 10]
    assert list(lines["general accuracy"].get_ydata()) == [60.0, 58.0, 52.0]
    assert list(lines["general limit (55.0)"].get_ydata()) == [55.0, 55.0]  # baseline - max_drop
    crosses = left.collections[0].get_offsets().tolist()
    assert crosses == [[10.0, 52.0]]  # the measurement beyond the limit
    task_axis = fig.axes[2]
    assert list(task_axis.get_lines()[0].get_ydata()) == [10.0, 15.0, 20.0]
    trade_lines = {line.get_label(): line for line in trade.get_lines()}
    assert list(trade_lines["worst probe drop"].get_xdata()) == [10.0, 15.0, 20.0]  # task metric on x
    assert list(trade_lines["worst probe drop"].get_ydata()) == [0.0, 2.0, 8.0]
    assert list(trade_lines["limit max_drop=5"].get_ydata()) == [5.0, 5.0]
    no_task = forgetting_figure(_history([(0, 60.0), (5, 58.0)], task=False), max_drop=None)
    assert no_task.axes[1].get_xlabel() == "step" and len(no_task.axes) == 2
    with pytest.raises(ValueError, match="history is empty"):
        forgetting_figure([])


def test_png_written_at_the_end_is_the_figure_of_the_history(tmp_path):
    monitor = _monitor(plot_path="curves/forgetting.png")
    _fit(tmp_path, monitor, logger=False)
    assert monitor.plot_written == tmp_path / "curves" / "forgetting.png"
    pixels = _png_pixels(monitor.plot_written.read_bytes())
    expected = figure_rgb(forgetting_figure(monitor.history, 20.0, "task/accuracy"))
    assert np.array_equal(pixels, expected)
    assert list((tmp_path / "curves").iterdir()) == [monitor.plot_written]  # no temporary file left


@pytest.mark.slow
def test_wandb_offline_run_holds_the_table_image_scalars_and_adapter(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = _monitor(log_artifact=True)
    logger = WandbLogger(project="zenft-test", save_dir=str(tmp_path), offline=True)
    module = _fit(tmp_path, monitor, logger)
    wandb.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    # the table: one row per measurement, as the history says
    tables = sorted(media.glob("table/forgetting/table_*.table.json"), key=lambda p: int(p.name.split("_")[1]))
    assert len(tables) == len(monitor.history) == 3  # logged at every measurement (steps 0, 2, 4)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == table_columns(monitor.history)
    assert last["data"] == json.loads(json.dumps(table_rows(monitor.history)))
    # the image: the curves of the whole history, pixel for pixel
    images = sorted(media.glob("images/forgetting/curves_*.png"), key=lambda p: int(p.name.split("_")[1]))
    assert len(images) == 3
    expected = figure_rgb(forgetting_figure(monitor.history, 20.0, "task/accuracy"))
    assert np.array_equal(_png_pixels(images[-1].read_bytes()), expected)
    # the scalars, from the run's transaction log
    records = wandb_records(run_dir)
    logged = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                item.nested_key[0] if item.nested_key else item.key: item.value_json for item in record.history.item
            }
            if "forgetting/general/accuracy" in items:
                logged.append(
                    (int(json.loads(items["trainer/global_step"])), json.loads(items["forgetting/general/accuracy"]))
                )
    assert logged == [(r["step"], r["metrics"]["general"]["accuracy"]) for r in monitor.history]
    # the adapter artifact with the files save_adapter writes (W&B also stores each table as an artifact)
    artifacts = [
        r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    ]
    assert [a.name for a in artifacts] == ["adapter"]
    save_adapter(module.model, tmp_path / "expected")
    assert {e.path for e in artifacts[0].manifest.contents} == {f.name for f in (tmp_path / "expected").iterdir()}
    assert json.loads(artifacts[0].metadata)["step"] == monitor.history[-1]["step"]


@pytest.mark.slow
def test_tensorboard_gets_scalars_and_the_image(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = _monitor()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _fit(tmp_path, monitor, logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("forgetting/general/accuracy")]
    assert scalars == [(r["step"], pytest.approx(r["metrics"]["general"]["accuracy"])) for r in monitor.history]
    images = events.Images("forgetting/curves")
    assert [i.step for i in images] == [r["step"] for r in monitor.history]
    expected = figure_rgb(forgetting_figure(monitor.history, 20.0, "task/accuracy"))
    assert np.array_equal(_png_pixels(images[-1].encoded_image_string), expected)


def test_missing_wandb_or_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of wandb now fails, as if it were not installed
    with pytest.raises(ImportError, match=re.escape("pip install wandb")):
        require_wandb()
    with pytest.raises(ImportError, match=re.escape("lightning_zenft[wandb]")):
        trainer(tmp_path, [_monitor(log_artifact=True)], max_steps=1).fit(CounterLM())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=re.escape("pip install matplotlib")):
        forgetting_figure(_history([(0, 50.0)]))


def test_reporting_helpers_refuse_bad_input(tmp_path):
    from lightning_zenft.reporting import log_artifact, log_image

    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        log_image([], "k", np.zeros((4, 4), dtype=np.uint8), step=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        log_artifact([], tmp_path / "missing", "adapter")


def test_no_table_and_no_image_when_switched_off(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _fit(tmp_path, _monitor(log_image=False, log_table=False), logger, max_steps=2)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == [] and "forgetting/general/accuracy" in events.Tags()["scalars"]
