"""Multiple-choice accuracy from per-choice scores (log-likelihood scoring), in points.

A question with ``C`` choices is answered by the choice with the highest score, where the score of a choice is the
log-likelihood the model gives its tokens after the question (summed, or averaged per token); questions with fewer
choices than the widest one pad their score rows with ``-inf``. Ties go to the first choice (``argmax``).
Accuracy ``= 100 * #{i : argmax_c s_ic = a_i} / N``; the counts are summed across processes.

Example:
    >>> import torch
    >>> m = ChoiceAccuracy()
    >>> m.update(torch.tensor([[-1.0, -2.0], [-3.0, -0.5]]), torch.tensor([0, 0]))
    >>> m.compute().item()
    50.0
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ChoiceAccuracy(Metric):
    """Share of questions whose best-scored choice is the answer, in points (0-100).

    ``update(scores, answers)`` takes ``scores`` ``(N, C)`` (``-inf`` where a question has no such choice) and
    ``answers`` ``(N,)``, the index of each right choice.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, answers: torch.Tensor) -> None:
        if scores.ndim != 2 or answers.ndim != 1 or scores.shape[0] != answers.shape[0]:
            raise ValueError(
                f"Expected scores (N, C) and answers (N,), got {tuple(scores.shape)} and {tuple(answers.shape)}."
            )
        if answers.numel() and (answers.min() < 0 or answers.max() >= scores.shape[1]):
            raise ValueError(
                f"answers must index a choice in [0, {scores.shape[1]}), got values from {int(answers.min())} to "
                f"{int(answers.max())}."
            )
        right = scores.gather(1, answers[:, None].long())[:, 0]  # (N,)
        if torch.isneginf(right).any():
            raise ValueError("an answer points at a padded choice (score -inf); the question has fewer choices.")
        self.correct += (scores.argmax(dim=1) == answers).sum()
        self.total += answers.numel()

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            raise ValueError("ChoiceAccuracy saw no question (update was never called with a non-empty batch).")
        return 100.0 * self.correct.double() / self.total.double()


__all__ = ["ChoiceAccuracy"]
