"""Forgetting against a baseline, and backward transfer over a sequence of tasks.

**Forgetting** of one measure is its baseline (before fine-tuning) minus its current value, for measures where higher
is better (accuracy: a drop of 3 points is forgetting 3.0), and the current value minus the baseline where lower is
better (a loss that rose by 0.2 nats is forgetting 0.2). The current value is the mean of per-example (or per-token)
values, optionally weighted, summed across processes before dividing.

**Backward transfer** (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"): with ``R[i, j]`` the accuracy on task
``j`` after training through task ``i`` of ``T``, ``BWT = 1/(T-1) * sum_{j<T-1} (R[T-1, j] - R[j, j])``; negative
values are forgetting. ``R`` is accumulated from per-example correctness, so it reduces across processes as counts.

Example:
    >>> import torch
    >>> f = Forgetting(baseline=80.0)
    >>> f.update(torch.tensor([100.0, 0.0, 100.0, 100.0]))  # per-question correctness in points: 75 now
    >>> f.compute().item()
    5.0
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class Forgetting(Metric):
    """``baseline - mean(values)`` (``higher_is_better=True``) or ``mean(values) - baseline`` (lower is better).

    Args:
        baseline: the measure before fine-tuning, in the unit of the values (points, nats...).
        higher_is_better: whether larger values of the measure are better (accuracy) or worse (loss, perplexity).

    ``update(values, weights=None)`` adds per-example values ``(N,)`` with optional non-negative weights ``(N,)``.
    """

    is_differentiable = False
    higher_is_better = False  # of the forgetting itself
    full_state_update = False

    def __init__(self, baseline: float, higher_is_better: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)
        baseline = float(baseline)
        if not torch.isfinite(torch.tensor(baseline)):
            raise ValueError(f"baseline must be a finite number, got {baseline}.")
        self.baseline = baseline
        self.measure_higher_is_better = higher_is_better
        self.add_state("value_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        values = values.reshape(-1).double()
        if weights is None:
            weights = torch.ones_like(values)
        weights = weights.reshape(-1).double()
        if weights.shape != values.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must match values {tuple(values.shape)}.")
        if (weights < 0).any():
            raise ValueError("weights must be non-negative.")
        self.value_sum += (values * weights).sum()
        self.weight_sum += weights.sum()

    def compute(self) -> torch.Tensor:
        if float(self.weight_sum) == 0.0:
            raise ValueError("Forgetting has no current value yet: update was never called with a non-zero weight.")
        current = self.value_sum / self.weight_sum
        return self.baseline - current if self.measure_higher_is_better else current - self.baseline


class BackwardTransfer(Metric):
    """Backward transfer over ``num_tasks`` tasks learnt in sequence, in points.

    ``update(trained_through, task, correct)`` records per-example correctness (bool or 0/1, ``(N,)``) on ``task``
    after training through task ``trained_through``. ``compute()`` needs ``R[j, j]`` and ``R[T-1, j]`` for every
    ``j < T-1``.

    Example:
        >>> bwt = BackwardTransfer(num_tasks=2)
        >>> bwt.update(0, 0, torch.tensor([1, 1, 1, 0]))  # task 0 after task 0: 75
        >>> bwt.update(1, 0, torch.tensor([1, 0, 0, 0]))  # task 0 after task 1: 25
        >>> bwt.update(1, 1, torch.tensor([1, 1, 0, 0]))
        >>> bwt.compute().item()
        -50.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_tasks: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_tasks < 2:
            raise ValueError(f"backward transfer needs at least 2 tasks, got num_tasks={num_tasks}.")
        self.num_tasks = num_tasks
        shape = (num_tasks, num_tasks)
        self.add_state("correct", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, trained_through: int, task: int, correct: torch.Tensor) -> None:
        for name, value in (("trained_through", trained_through), ("task", task)):
            if not 0 <= value < self.num_tasks:
                raise ValueError(f"{name}={value} is outside [0, {self.num_tasks}).")
        correct = correct.reshape(-1)
        if correct.numel() and not ((correct == 0) | (correct == 1)).all():
            raise ValueError("correct must hold 0/1 (or bool) values, one per example.")
        self.correct[trained_through, task] += correct.long().sum()
        self.total[trained_through, task] += correct.numel()

    def accuracy_matrix(self) -> torch.Tensor:
        """``R`` ``(T, T)`` in points, ``nan`` where nothing was recorded (this process's counts, before any sync)."""
        r = 100.0 * self.correct.double() / self.total.double()
        return torch.where(self.total > 0, r, torch.full_like(r, float("nan")))

    def compute(self) -> torch.Tensor:
        last = self.num_tasks - 1
        missing = [f"R[{i},{j}]" for j in range(last) for i in (j, last) if int(self.total[i, j]) == 0]
        if missing:
            raise ValueError(
                f"backward transfer needs {', '.join(missing)}: call update for those (task, stage) pairs."
            )
        r = self.accuracy_matrix()  # (T, T), synced counts inside compute
        idx = torch.arange(last, device=r.device)
        return (r[last, idx] - r[idx, idx]).mean()


__all__ = ["BackwardTransfer", "Forgetting"]
