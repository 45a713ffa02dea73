"""What ForgettingMonitor sends to the Trainer's loggers after each measurement, and the adapter artifact.

Every logger gets the scalars (also put in ``trainer.callback_metrics``); on global rank 0, W&B gets the probes x steps
table, W&B and TensorBoard the image of the curves. Figures are drawn only when a logger takes them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_zenft.reporting import loggers as report
from lightning_zenft.reporting.records import ForgettingRecord, table_columns, table_rows


def scalars_of(record: ForgettingRecord, baseline: dict[str, dict[str, float]]) -> dict[str, float]:
    """``forgetting/<probe>/<metric>``, ``..._change`` (from the baseline), ``.../drop``, worst drop, verdict."""
    scalars: dict[str, float] = {}
    for probe, values in record["metrics"].items():
        for metric, value in values.items():
            scalars[f"forgetting/{probe}/{metric}"] = value
            if metric != "kl_to_base":
                scalars[f"forgetting/{probe}/{metric}_change"] = value - baseline[probe][metric]
        if probe in record["drops"]:
            scalars[f"forgetting/{probe}/drop"] = record["drops"][probe]
    scalars["forgetting/worst_drop"] = record["worst_drop"]
    scalars["forgetting/within_limits"] = float(record["within_limits"])
    if record["task"] is not None:
        scalars["forgetting/task"] = record["task"]
    return scalars


def figure_of(history: list[ForgettingRecord], max_drop: float | None, task_metric: str | None) -> Any:
    from lightning_zenft.reporting.plots import forgetting_figure

    return forgetting_figure(history, max_drop, task_metric)


def report_record(
    trainer: pl.Trainer,
    history: list[ForgettingRecord],
    record: ForgettingRecord,
    max_drop: float | None,
    task_metric: str | None,
    log_table: bool,
    log_image: bool,
) -> None:
    """Log one measurement (``record``, the last of ``history``) everywhere it belongs."""
    scalars = scalars_of(record, history[0]["metrics"])
    for key, value in scalars.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    step = record["step"]
    report.log_scalars(trainer.loggers, scalars, step)
    if not trainer.is_global_zero:
        return
    if log_table and report.takes_tables(trainer.loggers):
        report.log_table(trainer.loggers, "forgetting/table", table_columns(history), table_rows(history), step)
    if log_image and report.takes_images(trainer.loggers):
        from lightning_zenft.reporting.plots import figure_rgb

        report.log_image(
            trainer.loggers, "forgetting/curves", figure_rgb(figure_of(history, max_drop, task_metric)), step
        )


def log_adapter(trainer: pl.Trainer, model: nn.Module, last: ForgettingRecord, within: bool) -> None:
    """The model's adapter (PEFT format) as a W&B ``model`` artifact named ``adapter``, with the last verdict."""
    from lightning_zenft.io import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        meta = {"step": last["step"], "within_limits": within, "worst_drop": last["worst_drop"]}
        report.log_artifact(trainer.loggers, Path(tmp) / "adapter", "adapter", "model", meta)


__all__ = ["figure_of", "log_adapter", "report_record", "scalars_of"]
