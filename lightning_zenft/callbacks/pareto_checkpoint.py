"""``ParetoCheckpoint``: keep the checkpoint with the best task metric among those within the forgetting limit.

Fine-tuning trades task skill against general skill (Biderman et al. 2024: LoRA and full fine-tuning lie on one
learning-forgetting curve). A plain ``ModelCheckpoint`` on the task metric keeps the step that learnt most, however
much it forgot. This checkpoint callback reads the :class:`~lightning_zenft.ForgettingMonitor` of the same Trainer:
at each of its measurements it has a point ``(task metric, worst probe drop)``; among the points within the limit
(the monitor's verdict, or ``max_drop`` here if given) it keeps the one with the best task metric, and saves a
checkpoint whenever a new best appears (deleting the previous one). Ties on the task metric go to the smaller drop,
then to the earlier step; such a choice is always on the Pareto front of the points (no other point is at least as
good on both axes and better on one).

At the end it reports every point, whether it is on the front, and which one was kept (console, and a W&B table
``forgetting/pareto`` when there is a ``WandbLogger``). The baseline (before training) is a point of the report but
never a checkpoint: it is the base model, which needs none. ``best_model_path`` works with ``ckpt_path="best"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_zenft.callbacks._forgetting_actions import save_checkpoint_atomically
from lightning_zenft.callbacks.forgetting_monitor import ForgettingMonitor
from lightning_zenft.reporting import loggers as report

Point = dict[str, Any]
"""``{"step", "task", "drop", "within_limits"}``."""


def _better(a: Point, b: Point, mode: str) -> bool:
    """Whether ``a`` beats ``b``: better task metric, then smaller drop, then earlier step."""
    ta, tb = (a["task"], b["task"]) if mode == "max" else (-a["task"], -b["task"])
    return (ta, -a["drop"], -a["step"]) > (tb, -b["drop"], -b["step"])


def pareto_front(points: list[Point], mode: Literal["min", "max"]) -> list[int]:
    """Indices of the points no other point dominates (task at least as good and drop at most as large, one strictly).

    Example:
        >>> pts = [{"step": 1, "task": 10, "drop": 1}, {"step": 2, "task": 20, "drop": 3},
        ...        {"step": 3, "task": 15, "drop": 4}]
        >>> pareto_front(pts, "max")
        [0, 1]
    """
    sign = 1 if mode == "max" else -1
    front = []
    for i, p in enumerate(points):
        dominated = any(
            sign * q["task"] >= sign * p["task"]
            and q["drop"] <= p["drop"]
            and (sign * q["task"] > sign * p["task"] or q["drop"] < p["drop"])
            for q in points
        )
        if not dominated:
            front.append(i)
    return front


def pareto_choice(points: list[Point], mode: Literal["min", "max"], max_drop: float | None = None) -> int | None:
    """The index of the best task metric among points within the limit (``within_limits``, or ``drop <= max_drop``).

    Example:
        >>> pts = [{"step": 1, "task": 10, "drop": 1, "within_limits": True},
        ...        {"step": 2, "task": 20, "drop": 6, "within_limits": False}]
        >>> pareto_choice(pts, "max"), pareto_choice(pts, "max", max_drop=10.0)
        (0, 1)
    """
    best = None
    for i, p in enumerate(points):
        within = p["within_limits"] if max_drop is None else p["drop"] <= max_drop
        if within and (best is None or _better(p, points[best], mode)):
            best = i
    return best


class ParetoCheckpoint(Checkpoint):
    """Keep the checkpoint with the best task metric among those within the forgetting limit.

    Needs a :class:`~lightning_zenft.ForgettingMonitor` in the same Trainer with a task metric (``task_probes`` or
    ``task_metric``); it is measured at the monitor's steps. It is a Lightning ``Checkpoint`` callback: the Trainer
    keeps ``enable_checkpointing=True`` (the default) and adds no default ``ModelCheckpoint`` beside it.

    Args:
        dirpath: where the checkpoint goes; default ``<default_root_dir>/pareto``.
        filename: the file name, formatted with ``step``.
        max_drop: a limit of its own on the worst accuracy drop, in points (e.g. pick within 2 points while the
            monitor only warns above 5); ``None``: the monitor's verdict.

    Example:
        >>> pareto = ParetoCheckpoint(max_drop=2.0)  # keep the best task step within 2 points of forgetting
        >>> pareto.best_model_path, pareto.points
        ('', [])

        In a run::

            monitor = ForgettingMonitor(probes={"general": general}, task_probes={"task": task_val}, max_drop=5.0)
            L.Trainer(callbacks=[LoRA(r=8), monitor, pareto]).fit(module)
            pareto.best_model_path, pareto.chosen, pareto.points
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str = "pareto-step={step}.ckpt",
        max_drop: float | None = None,
    ) -> None:
        if max_drop is not None and max_drop < 0:
            raise ValueError(f"max_drop={max_drop} must be a non-negative number of points or None.")
        if "{step}" not in filename:
            raise ValueError(f"filename={filename!r} must contain '{{step}}' so checkpoints of different steps differ.")
        self.dirpath, self.filename, self.max_drop = dirpath, filename, max_drop
        self.points: list[Point] = []
        self.best_model_path = ""
        self.best_step: int | None = None
        self.monitor: ForgettingMonitor | None = None

    @property
    def chosen(self) -> Point | None:
        """The kept point, or ``None`` when no measurement after the baseline was within the limit."""
        return next((p for p in self.points if p["step"] == self.best_step), None)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, ForgettingMonitor)]
        if len(monitors) != 1:
            raise RuntimeError(
                f"ParetoCheckpoint needs exactly one ForgettingMonitor in the Trainer's callbacks, found "
                f"{len(monitors)}. Add one ForgettingMonitor(probes=..., task_probes=...), in any position."
            )
        if monitors[0].task_metric is None:
            raise RuntimeError(
                "ParetoCheckpoint ranks checkpoints by the task metric, but the ForgettingMonitor has none: give it "
                "task_probes={...} or task_metric='val_loss'."
            )
        self.monitor = monitors[0]

    def _directory(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "pareto"

    def _consider(self, trainer: pl.Trainer) -> None:
        assert self.monitor is not None
        history = self.monitor.history
        if not history or any(p["step"] == history[-1]["step"] for p in self.points):
            return
        record = history[-1]
        if record["task"] is None:
            return  # no task value at this step (a callback metric not logged yet): not a point
        point = {
            "step": record["step"],
            "task": record["task"],
            "drop": record["worst_drop"],
            "within_limits": record["within_limits"],
        }
        self.points.append(point)
        if point["step"] == history[0]["step"]:
            return  # the baseline is the base model: reported, never saved
        candidates = [p for p in self.points if p["step"] != history[0]["step"]]
        best = pareto_choice(candidates, self.monitor.task_mode or "max", self.max_drop)
        if best is None or candidates[best]["step"] != point["step"]:
            return
        directory = self._directory(trainer)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        previous = self.best_model_path
        path = directory / self.filename.format(step=point["step"])
        self.best_model_path, self.best_step = str(path), point["step"]  # before saving: the file holds this state
        save_checkpoint_atomically(trainer, path)
        # the previous best goes, unless it lies elsewhere (a resumed run's state names the first run's file)
        if trainer.is_global_zero and previous and Path(previous).resolve().parent == directory.resolve():
            if Path(previous) != path:
                Path(previous).unlink(missing_ok=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._consider(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._consider(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._consider(trainer)
        if not self.points:
            return
        assert self.monitor is not None
        mode = self.monitor.task_mode or "max"
        front = set(pareto_front(self.points, mode))
        rows = [
            [p["step"], p["task"], p["drop"], p["within_limits"], i in front, p["step"] == self.best_step]
            for i, p in enumerate(self.points)
        ]
        lines = [
            f"  step {r[0]:>6}  task {r[1]:.4g}  drop {r[2]:+.2f}{'  front' if r[4] else ''}{'  KEPT' if r[5] else ''}"
            for r in rows
        ]
        kept = (
            f"kept step {self.best_step}: {self.best_model_path}"
            if self.best_step is not None
            else ("no measurement after the baseline was within the limit; nothing kept")
        )
        rank_zero_info(f"ParetoCheckpoint ({self.monitor.task_metric}, {mode}): {kept}\n" + "\n".join(lines))
        if trainer.is_global_zero:
            columns = ["step", "task", "worst_drop", "within_limits", "pareto_front", "kept"]
            report.log_table(trainer.loggers, "forgetting/pareto", columns, rows, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "points": [dict(p) for p in self.points],
            "best_model_path": self.best_model_path,
            "best_step": self.best_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(p) for p in state_dict["points"]]
        self.best_model_path = state_dict["best_model_path"]
        self.best_step = state_dict["best_step"]
        if self.best_model_path and not os.path.exists(self.best_model_path):
            rank_zero_warn(
                f"ParetoCheckpoint: the kept checkpoint {self.best_model_path!r} recorded in the resumed state no "
                "longer exists (a later, better one replaced it, or it was moved); best_model_path names a missing "
                "file until a better point is saved."
            )


__all__ = ["ParetoCheckpoint", "pareto_choice", "pareto_front"]
