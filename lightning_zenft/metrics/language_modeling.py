"""Language-modelling metrics over next-token predictions: perplexity, next-token accuracy, KL to a reference model.

All three score the same positions a causal LM's loss does: the logits at position ``t`` predict ``labels[t + 1]``
(``shift=True``, as ``transformers`` models shift their ``labels``), and targets equal to ``ignore_index`` (-100:
prompt tokens, padding) are left out. Log-probabilities are computed in float64, a bounded chunk of positions at a time
(:data:`CHUNK_ELEMENTS`), and their sums are kept in float64 and reduced across processes as sums, so a probe split
over ranks gives the numbers one process would.

* perplexity ``= exp(sum_t NLL_t / n)``, with ``NLL_t = -log softmax(z_t)[y_t]`` over the ``n`` target tokens;
* next-token accuracy ``= 100 * #{t : argmax z_t = y_t} / n`` (points; ties go to the lowest token id);
* token KL ``= (1/n) sum_t KL(p_ref,t || p_t) = (1/n) sum_t sum_v p_ref,t,v (log p_ref,t,v - log p_t,v)``: how much of
  the reference (base) model's next-token distribution the model has lost. This is the forward direction, the one
  distillation to a teacher minimises; it is zero when the two models agree.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 4)  # uniform predictions over 4 tokens
    >>> ppl = Perplexity()
    >>> ppl.update(logits, torch.tensor([[0, 1, 2]]))
    >>> round(ppl.compute().item(), 6)
    4.0
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

IGNORE_INDEX = -100

CHUNK_ELEMENTS = 1 << 24
"""Float64 work is done on at most this many logits at a time (128 MiB), whatever the vocabulary and batch."""


def _chunk_size(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` in float64, ``(n,)``, for ``logits`` ``(n, V)``, a bounded chunk at a time.

    Example:
        >>> token_log_probs(torch.zeros(3, 4), torch.tensor([0, 1, 2])).exp().tolist()
        [0.25, 0.25, 0.25]
    """
    out = torch.empty(targets.shape[0], dtype=torch.float64, device=logits.device)
    step = _chunk_size(logits.shape[-1])
    for start in range(0, targets.shape[0], step):
        z = logits[start : start + step].double()  # (c, V)
        out[start : start + step] = torch.log_softmax(z, dim=-1).gather(1, targets[start : start + step, None])[:, 0]
    return out


def shift_targets(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and target ids of the scored positions: ``(n, V)`` float and ``(n,)`` long.

    Example:
        >>> z, y = shift_targets(torch.zeros(2, 5, 7), torch.full((2, 5), 3))
        >>> tuple(z.shape), tuple(y.shape)
        ((8, 7), (8,))
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"Expected logits (B, T, V) and labels (B, T) with the same B and T, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    keep = labels != ignore_index  # (B, T')
    return logits[keep], labels[keep]  # (n, V), (n,)


class _TokenMetric(Metric):
    is_differentiable = False
    full_state_update = False

    def __init__(self, shift: bool = True, ignore_index: int = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.shift = shift
        self.ignore_index = ignore_index
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _targets(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return shift_targets(logits, labels, self.shift, self.ignore_index)

    def _count(self) -> torch.Tensor:
        if int(self.tokens) == 0:
            raise ValueError(
                f"{type(self).__name__} saw no target tokens (every label was ignore_index={self.ignore_index}, or "
                "update was never called): there is nothing to average. Check the probe's labels."
            )
        return self.tokens.double()


class Perplexity(_TokenMetric):
    """``exp`` of the mean next-token negative log-likelihood over the target tokens.

    Args:
        shift: logits at position ``t`` predict ``labels[t + 1]`` (a causal LM's ``labels``); ``False`` when the
            labels are already aligned with the logits.
        ignore_index: label value of positions that are not scored.

    Example:
        >>> m = Perplexity()
        >>> m.update(torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.long))
        >>> round(m.compute().item(), 4)  # uniform over 8 tokens
        8.0
    """

    higher_is_better = False

    def __init__(self, shift: bool = True, ignore_index: int = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(shift, ignore_index, **kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)``."""
        z, y = self._targets(logits, labels)
        self.nll_sum -= token_log_probs(z, y).sum()
        self.tokens += y.numel()

    def compute(self) -> torch.Tensor:
        """``exp(mean NLL)``; ``log`` of it is the mean per-token loss."""
        return torch.exp(self.nll_sum / self._count())


class NextTokenAccuracy(_TokenMetric):
    """Share of target tokens whose arg-max prediction is right, in points (0-100).

    Example:
        >>> logits = torch.tensor([[[0.0, 5.0], [5.0, 0.0], [0.0, 0.0]]])  # predicts 1, then 0
        >>> m = NextTokenAccuracy()
        >>> m.update(logits, torch.tensor([[0, 1, 1]]))  # targets 1, 1: one right
        >>> m.compute().item()
        50.0
    """

    higher_is_better = True

    def __init__(self, shift: bool = True, ignore_index: int = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(shift, ignore_index, **kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)``."""
        z, y = self._targets(logits, labels)
        self.correct += (z.argmax(dim=-1) == y).sum()
        self.tokens += y.numel()

    def compute(self) -> torch.Tensor:
        return 100.0 * self.correct.double() / self._count()


class TokenKL(_TokenMetric):
    """Mean over target tokens of ``KL(p_ref || p)``, the reference model's next-token distribution against the model's.

    Example:
        >>> m = TokenKL()
        >>> z = torch.randn(1, 5, 6)
        >>> m.update(z, z, torch.zeros(1, 5, dtype=torch.long))
        >>> m.compute().item()
        0.0
    """

    higher_is_better = False

    def __init__(self, shift: bool = True, ignore_index: int = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(shift, ignore_index, **kwargs)
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: the model's and the reference's ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)``."""
        if reference_logits.shape != logits.shape:
            raise ValueError(
                f"reference_logits {tuple(reference_logits.shape)} and logits {tuple(logits.shape)} must have the "
                "same shape."
            )
        z, y = self._targets(logits, labels)
        z_ref, _ = self._targets(reference_logits, labels)
        step = _chunk_size(z.shape[-1])
        for start in range(0, y.numel(), step):
            log_p = torch.log_softmax(z[start : start + step].double(), dim=-1)  # (c, V)
            log_p_ref = torch.log_softmax(z_ref[start : start + step].double(), dim=-1)  # (c, V)
            self.kl_sum += (log_p_ref.exp() * (log_p_ref - log_p)).sum()
        self.tokens += y.numel()

    def compute(self) -> torch.Tensor:
        return self.kl_sum / self._count()


__all__ = [
    "CHUNK_ELEMENTS",
    "IGNORE_INDEX",
    "NextTokenAccuracy",
    "Perplexity",
    "TokenKL",
    "shift_targets",
    "token_log_probs",
]
