"""The forgetting curves as a matplotlib figure (drawn without pyplot, so no global state and no display needed).

Left panel: each limited probe's headline metric (accuracy, points) over the steps, its limit
(``baseline - max_drop``) as a dashed line of the same colour, measurements beyond the limit marked with a cross, and
the task metric on a second axis. Right panel: the task metric against the worst drop, one point per measurement
joined in step order, the ``max_drop`` limit drawn across (forgetting over the steps when there is no task metric).

Example:
    >>> rec = lambda s, a, t: {"step": s, "metrics": {"general": {"accuracy": a}}, "task": t,
    ...     "drops": {"general": 50.0 - a}, "loss_increases": {}, "worst_drop": 50.0 - a,
    ...     "within_limits": 50.0 - a <= 5, "action": None}
    >>> fig = forgetting_figure([rec(0, 50.0, 10.0), rec(10, 47.0, 40.0)], max_drop=5.0, task_name="task/accuracy")
    >>> figure_rgb(fig).shape[2]
    3
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_zenft.reporting.records import ForgettingRecord

HEADLINE = "accuracy"


def require_matplotlib() -> Any:
    """Import matplotlib, or say how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "Drawing the forgetting curves needs matplotlib: `pip install matplotlib` (or "
            "`pip install lightning_zenft[plot]`)."
        ) from err
    return matplotlib


def forgetting_figure(
    history: list[ForgettingRecord],
    max_drop: float | None = None,
    task_name: str | None = None,
    title: str | None = None,
) -> Any:
    """A ``matplotlib.figure.Figure`` of the curves of ``history`` (the monitor's records, baseline first)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("the history is empty: there is nothing to draw before the baseline is measured.")
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    ax_probe, ax_trade = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    colors = [f"C{i}" for i in range(10)]
    for i, probe in enumerate(history[0]["drops"]):
        color = colors[i % len(colors)]
        values = [r["metrics"][probe][HEADLINE] for r in history]
        ax_probe.plot(steps, values, marker="o", color=color, label=f"{probe} {HEADLINE}")
        out = [
            (s, v) for s, v, r in zip(steps, values, history, strict=True) if r["drops"][probe] > (max_drop or np.inf)
        ]
        if out:
            ax_probe.scatter(*zip(*out, strict=True), marker="x", s=80, color="red", zorder=3)
        if max_drop is not None:
            limit = history[0]["metrics"][probe][HEADLINE] - max_drop
            ax_probe.axhline(limit, color=color, linestyle="--", linewidth=1, label=f"{probe} limit ({limit:.1f})")
    ax_probe.set_xlabel("step")
    ax_probe.set_ylabel(f"probe {HEADLINE} (points)")
    ax_probe.set_title("General probes over training")
    handles, labels = ax_probe.get_legend_handles_labels()
    tasks = [r["task"] for r in history]
    has_task = task_name is not None and any(t is not None for t in tasks)
    if has_task:
        ax_task = ax_probe.twinx()
        known = [(s, t) for s, t in zip(steps, tasks, strict=True) if t is not None]
        ax_task.plot(*zip(*known, strict=True), marker="s", color="black", label=f"task: {task_name}")
        ax_task.set_ylabel(f"task: {task_name}")
        h2, l2 = ax_task.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax_probe.legend(handles, labels, fontsize=8, loc="best")

    drops = [r["worst_drop"] for r in history]
    if has_task:
        pts = [(t, d, s) for t, d, s in zip(tasks, drops, steps, strict=True) if t is not None]
        xs, ys, ss = zip(*pts, strict=True)
        ax_trade.set_xlabel(f"task: {task_name}")
        ax_trade.set_title("Task metric against forgetting")
    else:
        xs, ys, ss = steps, drops, steps
        ax_trade.set_xlabel("step")
        ax_trade.set_title("Forgetting over training")
    ax_trade.plot(xs, ys, marker="o", color="C0", label="worst probe drop")
    for x, y, s in zip(xs, ys, ss, strict=True):
        ax_trade.annotate(str(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if max_drop is not None:
        ax_trade.axhline(max_drop, color="red", linestyle="--", linewidth=1, label=f"limit max_drop={max_drop:g}")
    ax_trade.set_ylabel(f"{HEADLINE} drop from baseline (points)")
    ax_trade.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_rgb(fig: Any) -> np.ndarray:
    """The figure rendered by Agg as a ``(H, W, 3)`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write the figure as a PNG atomically (a temporary file in the same directory, then a rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        FigureCanvasAgg(fig).print_png(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["figure_rgb", "forgetting_figure", "require_matplotlib", "save_figure"]
