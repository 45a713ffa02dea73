"""The forgetting monitor's history records, and the probes x steps table made from them.

One record per measurement (the baseline first)::

    {"step": 200,                                   # trainer.global_step when measured
     "metrics": {"general": {"loss": 3.91, "perplexity": 49.9, "accuracy": 29.1, "kl_to_base": 0.012}, ...},
     "task": 61.5,                                  # the task metric at that step, or None
     "drops": {"general": 0.62, ...},               # baseline accuracy minus accuracy, points (limited probes)
     "loss_increases": {"general": 0.03, ...},      # loss minus baseline loss, nats per token
     "worst_drop": 0.62,                            # the largest drop
     "within_limits": True,
     "action": None}                                # "warn", "stop", "raise_ewc" or "rollback" when it acted

Example:
    >>> rec = {"step": 0, "metrics": {"g": {"accuracy": 50.0}}, "task": None, "drops": {"g": 0.0},
    ...        "loss_increases": {}, "worst_drop": 0.0, "within_limits": True, "action": None}
    >>> table_columns([rec]), table_rows([rec])
    (['step', 'task', 'g/accuracy', 'worst_drop', 'within_limits', 'action'], [[0, None, 50.0, 0.0, True, '']])
"""

from __future__ import annotations

from typing import Any, TypedDict


class ForgettingRecord(TypedDict):
    """One measurement of every probe (see the module docstring)."""

    step: int
    metrics: dict[str, dict[str, float]]
    task: float | None
    drops: dict[str, float]
    loss_increases: dict[str, float]
    worst_drop: float
    within_limits: bool
    action: str | None


def metric_keys(history: list[ForgettingRecord]) -> list[str]:
    """``"<probe>/<metric>"`` for every metric any record holds, in first-seen order."""
    keys: dict[str, None] = {}
    for record in history:
        for probe, metrics in record["metrics"].items():
            for metric in metrics:
                keys[f"{probe}/{metric}"] = None
    return list(keys)


def table_columns(history: list[ForgettingRecord]) -> list[str]:
    """The wide table's columns: step, task, one per probe metric, worst drop, limit verdict, action."""
    return ["step", "task", *metric_keys(history), "worst_drop", "within_limits", "action"]


def table_rows(history: list[ForgettingRecord]) -> list[list[Any]]:
    """One row per measurement, ``None`` where a record lacks a metric."""
    keys = metric_keys(history)
    rows = []
    for record in history:
        values = [record["metrics"].get(k.split("/", 1)[0], {}).get(k.split("/", 1)[1]) for k in keys]
        rows.append(
            [
                record["step"],
                record["task"],
                *values,
                record["worst_drop"],
                record["within_limits"],
                record["action"] or "",
            ]
        )
    return rows


__all__ = ["ForgettingRecord", "metric_keys", "table_columns", "table_rows"]
