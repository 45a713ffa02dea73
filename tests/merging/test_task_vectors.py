"""Tensor-level merging: equal to peft.utils.merge_utils, hand-computed small cases, exact global thresholds."""

from __future__ import annotations

import pytest
import torch

from lightning_zenft.merging import (
    GlobalMagnitudeThreshold,
    dare_linear,
    dare_ties,
    magnitude_prune,
    magnitude_threshold,
    merge_task_tensors,
    task_arithmetic,
    ties,
)
from lightning_zenft.merging.task_vectors import seeded_generator

peft_merge = pytest.importorskip("peft.utils.merge_utils")

TAU1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
TAU2 = torch.tensor([-1.0, 1.5, 1.0, -4.0])


def _tasks(n: int = 3, shape: tuple[int, ...] = (17, 9), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------ against PEFT
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, -0.3, 1.6]])
def test_task_arithmetic_equals_peft(weights):
    tasks = _tasks()
    w = torch.tensor(weights)
    torch.testing.assert_close(task_arithmetic(tasks, w), peft_merge.task_arithmetic(tasks, w), rtol=0, atol=0)
    torch.testing.assert_close(task_arithmetic(tasks, weights), peft_merge.task_arithmetic(tasks, w), rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_and_magnitude_prune_equal_peft(density, sign):
    tasks, w = _tasks(seed=1), torch.tensor([0.5, 1.0, -2.0])
    torch.testing.assert_close(ties(tasks, w, density, sign), peft_merge.ties(tasks, w, density, sign), rtol=0, atol=0)
    torch.testing.assert_close(
        magnitude_prune(tasks, w, density), peft_merge.magnitude_prune(tasks, w, density), rtol=0, atol=0
    )


@pytest.mark.parametrize("density", [0.3, 0.9, 1.0])
def test_dare_equals_peft_with_the_same_seed(density):
    tasks, w = _tasks(seed=2), torch.tensor([1.0, 0.4, 0.8])
    torch.manual_seed(7)
    want_linear = peft_merge.dare_linear(tasks, w, density)
    want_ties = peft_merge.dare_ties(tasks, w, density, "frequency")
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(dare_linear(tasks, w, density, generator=g), want_linear, rtol=0, atol=0)
    torch.testing.assert_close(dare_ties(tasks, w, density, "frequency", generator=g), want_ties, rtol=0, atol=0)
    # without a generator, torch's global generator is used, as in PEFT
    torch.manual_seed(7)
    torch.testing.assert_close(dare_linear(tasks, w, density), want_linear, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- hand-computed cases
def test_hand_computed_cases():
    ones = [1.0, 1.0]
    # task arithmetic: 0.5 tau1 + 2 tau2
    torch.testing.assert_close(task_arithmetic([TAU1, TAU2], [0.5, 2.0]), torch.tensor([-1.5, 2.0, 3.5, -7.75]))
    # density 0.5 keeps two entries of each: tau1 -> [0, -2, 3, 0], tau2 -> [0, 1.5, 0, -4]
    torch.testing.assert_close(magnitude_prune([TAU1, TAU2], ones, 0.5), torch.tensor([0.0, -0.5, 3.0, -4.0]))
    # TIES "total": sums [0, -0.5, 3, -4] elect [+, -, +, -]; entry 1 keeps only tau1's -2
    torch.testing.assert_close(ties([TAU1, TAU2], ones, 0.5), torch.tensor([0.0, -2.0, 3.0, -4.0]))
    torch.testing.assert_close(ties([TAU1, TAU2], [2.0, 0.5], 0.5), torch.tensor([0.0, -4.0, 6.0, -2.0]))
    # "frequency": entry 1 has one vote each way, a tie elects +, so tau2's 1.5 is kept
    torch.testing.assert_close(ties([TAU1, TAU2], ones, 0.5, "frequency"), torch.tensor([0.0, 1.5, 3.0, -4.0]))
    # two agreeing entries are averaged: (2 + 4) / 2
    torch.testing.assert_close(ties([torch.tensor([2.0]), torch.tensor([4.0])], ones, 1.0), torch.tensor([3.0]))


def test_dare_drops_and_rescales():
    tau = torch.randn(20_000, generator=torch.Generator().manual_seed(3))
    out = dare_linear([tau], [1.0], 0.25, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept] / 0.25)  # every kept entry is rescaled by 1/density
    # kept ~ Binomial(20000, 0.25): sd 61, so a 5-sd band
    assert abs(int(kept.sum()) - 5000) < 310
    again = dare_linear([tau], [1.0], 0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, dare_linear([tau], [1.0], 0.25, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(seeded_generator(3, "a.weight").get_state(), seeded_generator(3, "a.weight").get_state())
    assert not torch.equal(seeded_generator(3, "a.weight").get_state(), seeded_generator(3, "b.weight").get_state())


def test_low_precision_is_merged_in_float32_and_returned_in_its_dtype():
    tasks = [t.bfloat16() for t in _tasks(seed=4)]
    got = ties(tasks, [1.0, 0.5, 0.25], 0.4)
    want = ties([t.float() for t in tasks], [1.0, 0.5, 0.25], 0.4).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -------------------------------------------------------------------------------- whole-vector trimming
@pytest.mark.parametrize("density", [0.0, 0.013, 0.2, 0.5, 0.999, 1.0])
def test_global_threshold_is_the_kth_largest_magnitude(density):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(s, generator=g) * 10 ** float(e) for s, e in [((40, 7), -3), ((3,), 1), ((100,), 0)]]
    tensors.append(torch.tensor([0.0, 0.0, 1.5, -1.5, 1.5]))  # zeros and equal magnitudes
    threshold = GlobalMagnitudeThreshold(density)
    for t in tensors:
        threshold.add(t)
    if threshold.needs_refine():
        for t in tensors:
            threshold.refine(t)
    value = threshold.value()
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    k = int(density * flat.numel())
    if k == 0:
        assert value == float("inf") and threshold.kept == 0
    else:
        assert value == float(flat.sort(descending=True).values[k - 1])
        assert threshold.kept == int((flat >= value).sum()) >= k
    assert magnitude_threshold(lambda: iter(tensors), density) == value


def test_global_trimming_equals_trimming_the_concatenated_vector():
    first, second = _tasks(n=2, shape=(30, 4), seed=6), _tasks(n=2, shape=(50,), seed=7)
    weights = [1.0, 0.6]
    thresholds = [magnitude_threshold(lambda i=i: iter([first[i], second[i]]), 0.3) for i in range(2)]
    got = torch.cat([ties(first, weights, 0.3, thresholds=thresholds).reshape(-1),
                     ties(second, weights, 0.3, thresholds=thresholds)])  # fmt: skip
    flat = [torch.cat([first[i].reshape(-1), second[i]]) for i in range(2)]
    torch.testing.assert_close(got, peft_merge.ties(flat, torch.tensor(weights), 0.3))
    pruned = torch.cat([magnitude_prune(first, weights, 0.3, thresholds=thresholds).reshape(-1),
                        magnitude_prune(second, weights, 0.3, thresholds=thresholds)])  # fmt: skip
    torch.testing.assert_close(pruned, peft_merge.magnitude_prune(flat, torch.tensor(weights), 0.3))


def test_merge_task_tensors_dispatches_to_each_method():
    tasks, w = _tasks(seed=8), [1.0, 0.5, 0.2]
    assert torch.equal(merge_task_tensors("task_arithmetic", tasks, w), task_arithmetic(tasks, w))
    assert torch.equal(merge_task_tensors("ties", tasks, w, density=0.3), ties(tasks, w, 0.3))
    assert torch.equal(merge_task_tensors("magnitude_prune", tasks, w, density=0.3), magnitude_prune(tasks, w, 0.3))
    for name, fn in [("dare_linear", dare_linear), ("dare_ties", dare_ties)]:
        got = merge_task_tensors(name, tasks, w, density=0.3, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got, fn(tasks, w, 0.3, generator=torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: task_arithmetic([], []), "task_tensors is empty"),
        (lambda: task_arithmetic([TAU1, torch.zeros(3)], [1, 1]), "share one shape"),
        (lambda: task_arithmetic([TAU1.long()], [1]), "floating point"),
        (lambda: task_arithmetic([TAU1, TAU2], [1.0]), "got 1 weights for 2"),
        (lambda: ties([TAU1, TAU2], [1, 1], 1.5), "density=1.5"),
        (lambda: magnitude_prune([TAU1, TAU2], [1, 1], -0.1), "density=-0.1"),
        (lambda: dare_linear([TAU1], [1], 0.0), r"\(0, 1\] for DARE"),
        (lambda: ties([TAU1, TAU2], [1, 1], 0.5, "mean"), "majority_sign_method='mean'"),
        (lambda: ties([TAU1, TAU2], [1, 1], 0.5, thresholds=[0.1]), "got 1 thresholds for 2"),
        (lambda: merge_task_tensors("slerp", [TAU1], [1]), "method='slerp' is not one of"),
        (lambda: merge_task_tensors("ties", [TAU1], [1]), "needs a density"),
        (lambda: merge_task_tensors("task_arithmetic", [TAU1], [1], density=0.5), "takes no density"),
        (lambda: merge_task_tensors("dare_ties", [TAU1], [1], density=0.5, thresholds=[0.1]), "whole task vector"),
    ],
)
def test_errors_name_the_bad_value(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_threshold_misuse_is_an_error():
    threshold = GlobalMagnitudeThreshold(0.5)
    with pytest.raises(RuntimeError, match="before the passes"):
        threshold.value()
    with pytest.raises(RuntimeError, match="first pass"):
        threshold.refine(TAU1)
    threshold.add(TAU1)
    threshold.needs_refine()
    with pytest.raises(RuntimeError, match="first pass is over"):
        threshold.add(TAU2)
