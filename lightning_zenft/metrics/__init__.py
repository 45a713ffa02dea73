"""``torchmetrics`` metrics for measuring forgetting; all reduce correctly across processes (sums, then divide).

* :class:`Perplexity`, :class:`NextTokenAccuracy` and :class:`TokenKL` for language-modelling probes;
* :class:`ChoiceAccuracy` for multiple-choice probes scored by log-likelihood;
* :class:`Forgetting` (a baseline minus the current value) and :class:`BackwardTransfer` (over a sequence of tasks).

Accuracies are in points (0-100), the unit forgetting limits are written in.
"""

from lightning_zenft.metrics.choice import ChoiceAccuracy
from lightning_zenft.metrics.forgetting import BackwardTransfer, Forgetting
from lightning_zenft.metrics.language_modeling import NextTokenAccuracy, Perplexity, TokenKL, shift_targets

__all__ = [
    "BackwardTransfer",
    "ChoiceAccuracy",
    "Forgetting",
    "NextTokenAccuracy",
    "Perplexity",
    "TokenKL",
    "shift_targets",
]
