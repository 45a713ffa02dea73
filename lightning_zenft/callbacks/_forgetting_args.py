"""ForgettingMonitor's argument checks: every problem collected, then raised once."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

_LOWER_IS_BETTER = frozenset({"loss", "nll", "perplexity", "ppl", "kl", "error", "err"})


def infer_mode(metric: str) -> Literal["min", "max"]:
    """``"min"`` when a word of the name (split at ``/``, ``_``, ``.``...) reads as a loss, else ``"max"``.

    Example:
        >>> infer_mode("val_loss"), infer_mode("task/accuracy"), infer_mode("skill_acc")
        ('min', 'max', 'max')
    """
    words = re.split(r"[^a-z0-9]+", metric.lower())
    return "min" if _LOWER_IS_BETTER.intersection(words) else "max"


def check_arguments(args: dict[str, Any]) -> list[str]:
    """The problems with ``ForgettingMonitor.__init__``'s arguments (its ``locals()``), one sentence each."""
    problems = []
    if args["on_exceed"] not in ("warn", "stop", "raise_ewc", "rollback"):
        problems.append(f"on_exceed={args['on_exceed']!r} must be 'warn', 'stop', 'raise_ewc' or 'rollback'")
    if args["kl"] not in ("auto", "adapters", "copy", "off"):
        problems.append(f"kl={args['kl']!r} must be 'auto', 'adapters', 'copy' or 'off'")
    if not isinstance(args["every_n_steps"], int) or args["every_n_steps"] < 1:
        problems.append(f"every_n_steps={args['every_n_steps']!r} must be a positive integer")
    for name in ("max_drop", "max_loss_increase"):
        value = args[name]
        if value is not None and (not math.isfinite(value) or value < 0):
            problems.append(f"{name}={value} must be a non-negative number or None")
    if args["max_drop"] is None and args["max_loss_increase"] is None and args["on_exceed"] != "warn":
        problems.append(f"on_exceed={args['on_exceed']!r} needs a limit: set max_drop and/or max_loss_increase")
    if args["strength_factor"] <= 0 or not 0 < args["rollback_lr_factor"] <= 1 or args["max_rollbacks"] < 0:
        problems.append(
            f"strength_factor={args['strength_factor']} must be > 0, rollback_lr_factor={args['rollback_lr_factor']} "
            f"in (0, 1] and max_rollbacks={args['max_rollbacks']} >= 0"
        )
    if args["task_mode"] not in (None, "min", "max"):
        problems.append(f"task_mode={args['task_mode']!r} must be 'min', 'max' or None")
    names = list(args["probes"] or {}) + list(args["task_probes"] or {})
    if args["probes"] is not None and not args["probes"]:
        problems.append("probes={} holds no probe (None selects the built-in ones)")
    bad = [n for n in names if not isinstance(n, str) or not n or "/" in n]
    if bad:
        problems.append(f"probe names must be non-empty strings without '/', got {bad}")
    if len(set(names)) != len(names) or (args["probes"] is None and {"general", "python_choice"} & set(names)):
        problems.append(f"probe names must be distinct across probes and task_probes, got {names}")
    return problems


__all__ = ["check_arguments", "infer_mode"]
