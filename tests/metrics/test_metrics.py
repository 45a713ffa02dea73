"""The forgetting metrics against hand computations on fixed logits (plain Python loops over positions, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_zenft.metrics import (
    BackwardTransfer,
    ChoiceAccuracy,
    Forgetting,
    NextTokenAccuracy,
    Perplexity,
    TokenKL,
)


def _fixed_batch(seed: int = 0, b: int = 2, t: int = 5, v: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 2] = -100  # a prompt token
    labels[1, 3:] = -100  # padding
    return logits, labels


def _positions(labels, shift):
    """(row, logit position, target) triples the metrics must score."""
    b, t = labels.shape
    out = []
    for i in range(b):
        for pos in range(t - 1 if shift else t):
            target = int(labels[i, pos + 1 if shift else pos])
            if target != -100:
                out.append((i, pos, target))
    return out


def _log_softmax(row):
    values = [float(x) for x in row]
    top = max(values)
    log_z = top + math.log(sum(math.exp(x - top) for x in values))
    return [x - log_z for x in values]


@pytest.mark.parametrize("shift", [True, False])
def test_perplexity_and_accuracy_by_hand(shift):
    batches = [_fixed_batch(0), _fixed_batch(1, t=4)]
    ppl, acc = Perplexity(shift=shift), NextTokenAccuracy(shift=shift)
    nll, right, n = 0.0, 0, 0
    for logits, labels in batches:
        ppl.update(logits, labels)
        acc.update(logits, labels)
        for i, pos, target in _positions(labels, shift):
            logp = _log_softmax(logits[i, pos])
            nll -= logp[target]
            best = max(range(len(logp)), key=lambda k: (logp[k], -k))  # first maximum
            right += best == target
            n += 1
    assert ppl.compute().item() == pytest.approx(math.exp(nll / n), rel=1e-12)
    assert acc.compute().item() == pytest.approx(100.0 * right / n, abs=1e-12)


def test_token_kl_by_hand():
    logits, labels = _fixed_batch(2)
    reference, _ = _fixed_batch(3)
    kl = TokenKL()
    kl.update(logits, reference, labels)
    total, n = 0.0, 0
    for i, pos, _ in _positions(labels, shift=True):
        logp, logq = _log_softmax(logits[i, pos]), _log_softmax(reference[i, pos])
        total += sum(math.exp(lq) * (lq - lp) for lp, lq in zip(logp, logq, strict=True))  # KL(reference || model)
        n += 1
    assert kl.compute().item() == pytest.approx(total / n, rel=1e-12)
    same = TokenKL()
    same.update(logits, logits, labels)
    assert same.compute().item() == 0.0


def test_token_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) and labels \(B, T\)"):
        Perplexity().update(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    empty = Perplexity()
    empty.update(torch.zeros(1, 3, 4), torch.full((1, 3), -100))
    with pytest.raises(ValueError, match="no target tokens"):
        empty.compute()
    with pytest.raises(ValueError, match="same shape"):
        TokenKL().update(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))


def test_choice_accuracy_by_hand():
    scores = torch.tensor(
        [
            [-1.0, -2.0, -3.0],  # picks 0
            [-2.0, -0.5, float("-inf")],  # two choices, picks 1
            [-1.0, -1.0, -4.0],  # tie: the first choice wins
            [-5.0, -4.0, -3.0],  # picks 2
        ]
    )
    answers = torch.tensor([0, 0, 1, 2])
    m = ChoiceAccuracy()
    m.update(scores[:2], answers[:2])
    m.update(scores[2:], answers[2:])
    assert m.compute().item() == 50.0  # questions 0 and 3


def test_choice_accuracy_errors():
    m = ChoiceAccuracy()
    with pytest.raises(ValueError, match=r"scores \(N, C\) and answers \(N,\)"):
        m.update(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"answers must index a choice in \[0, 3\)"):
        m.update(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="padded choice"):
        m.update(torch.tensor([[0.0, float("-inf")]]), torch.tensor([1]))
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="saw no question"):
        ChoiceAccuracy().compute()


def test_forgetting_both_directions_and_weights():
    up = Forgetting(baseline=80.0)
    up.update(torch.tensor([100.0, 0.0]))
    up.update(torch.tensor([100.0, 100.0]))
    assert up.compute().item() == 80.0 - 75.0
    down = Forgetting(baseline=2.0, higher_is_better=False)
    down.update(torch.tensor([2.5, 1.0]), weights=torch.tensor([3.0, 1.0]))
    assert down.compute().item() == pytest.approx((2.5 * 3 + 1.0) / 4 - 2.0)


def test_forgetting_errors():
    with pytest.raises(ValueError, match="finite"):
        Forgetting(baseline=float("nan"))
    f = Forgetting(baseline=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        f.update(torch.ones(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="must match values"):
        f.update(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="no current value"):
        f.compute()


def test_backward_transfer_by_hand():
    bwt = BackwardTransfer(num_tasks=3)
    outcomes = {  # (trained_through, task): correctness per example
        (0, 0): [1, 1, 1, 1],  # 100
        (1, 1): [1, 1, 0, 0],  # 50
        (2, 0): [1, 0, 0, 0],  # 25
        (2, 1): [1, 1, 1, 0],  # 75
        (2, 2): [1, 0, 1, 0],
        (1, 0): [0, 0, 1, 1],  # not used by BWT
    }
    for (i, j), values in outcomes.items():
        bwt.update(i, j, torch.tensor(values))
    assert bwt.compute().item() == pytest.approx(((25 - 100) + (75 - 50)) / 2)
    matrix = bwt.accuracy_matrix()
    assert matrix[1, 0].item() == 50.0 and math.isnan(matrix[0, 1].item())


def test_backward_transfer_errors():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        BackwardTransfer(num_tasks=1)
    bwt = BackwardTransfer(num_tasks=2)
    with pytest.raises(ValueError, match=r"task=2 is outside \[0, 2\)"):
        bwt.update(0, 2, torch.tensor([1]))
    with pytest.raises(ValueError, match="0/1"):
        bwt.update(0, 0, torch.tensor([2]))
    bwt.update(0, 0, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"R\[1,0\]"):
        bwt.compute()
