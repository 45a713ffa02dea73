r"""Task-vector merging of one tensor: task arithmetic, TIES, DARE and magnitude pruning.

A task vector is what fine-tuning changed, :math:`\tau_i = \theta_i - \theta_{base}` (for an adapter, the change of
each adapted weight: ``merged_weight(W) - W``). Each function here merges the task tensors of ONE tensor (same shape,
stacked on a new leading axis); the merged model is :math:`\theta_{base} + \text{merge}(\tau_1..\tau_N)`.

* ``task_arithmetic`` (Ilharco et al. 2023, arXiv:2212.04089): :math:`\sum_i w_i \tau_i`.
* ``magnitude_prune``: :math:`\sum_i w_i \,\text{trim}(\tau_i)`, where trim keeps the ``density`` fraction of entries
  largest in magnitude (``int(density * numel)`` of them) and zeroes the rest.
* ``ties`` (Yadav et al. 2023, arXiv:2306.01708): trim each :math:`\tau_i`; elect a sign per entry, the sign of
  :math:`\sum_i \text{trim}(\tau_i)` (``"total"``) or of :math:`\sum_i \text{sign}(\text{trim}(\tau_i))`
  (``"frequency"``), zero counting as positive; the disjoint mean
  :math:`\sum_{i \in A} w_i \text{trim}(\tau_i) / \max(1, |A|)` over the tasks :math:`A` whose entry has the elected
  sign (a trimmed zero agrees with no sign).
* ``dare_linear`` (Yu et al. 2023, arXiv:2311.03099): drop each entry with probability ``1 - density`` and divide the
  kept ones by ``density`` (unbiased in expectation), then :math:`\sum_i w_i \tau_i`.
* ``dare_ties``: DARE's drop-and-rescale in place of TIES' trim, then TIES' election and disjoint mean.

Argument names and order are those of ``peft.utils.merge_utils`` (``ties(task_tensors, weights, density,
majority_sign_method="total")``...) and, in float32, the results are PEFT's: the sign is elected from the unweighted
trimmed tensors and the weights enter before the disjoint mean, as PEFT does. Differences, all keyword-only extras or
stricter checks: ``generator=`` seeds DARE (without it, torch's global generator is used, as PEFT does);
``thresholds=`` trims by a magnitude threshold per task tensor, for trimming over the whole task vector as the TIES
paper does (:class:`GlobalMagnitudeThreshold` computes it exactly, streaming); tensors of lower precision are merged
in float32 and returned in their own dtype (PEFT computes in their dtype); a density outside [0, 1] (and 0 for DARE,
whose rescale divides by it) is an error where PEFT warns or returns NaN.

Example::

    merged = ties([tau_a, tau_b], torch.tensor([1.0, 0.5]), density=0.2)
    merged = dare_linear([tau_a, tau_b], [1.0, 1.0], 0.3, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

MergeMethod = Literal["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
MajoritySign = Literal["total", "frequency"]
METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS: tuple[str, ...] = ("ties", "dare_linear", "dare_ties", "magnitude_prune")

__all__ = [
    "METHODS",
    "GlobalMagnitudeThreshold",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "magnitude_threshold",
    "merge_task_tensors",
    "seeded_generator",
    "task_arithmetic",
    "ties",
]


# ------------------------------------------------------------------------------------------------------ checks
def _stack(task_tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.dtype]:
    """``(N, *shape)`` in the compute dtype (float32 at least), and the dtype to return."""
    if len(task_tensors) == 0:
        raise ValueError("task_tensors is empty; give one task tensor per fine-tuned model or adapter.")
    shapes = {tuple(t.shape) for t in task_tensors}
    if len(shapes) > 1:
        raise ValueError(f"task tensors must share one shape; got {[tuple(t.shape) for t in task_tensors]}.")
    dtype = task_tensors[0].dtype
    if not dtype.is_floating_point:
        raise TypeError(f"task tensors must be floating point; got {dtype}.")
    compute = torch.promote_types(dtype, torch.float32)
    return torch.stack([t.to(compute) for t in task_tensors], dim=0), dtype  # (N, *shape)


def _weights(weights: torch.Tensor | Sequence[float], stacked: torch.Tensor) -> torch.Tensor:
    """The weights as ``(N, 1, ..., 1)`` so they broadcast over the stacked tensors."""
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device).reshape(-1)
    if w.numel() != stacked.shape[0]:
        raise ValueError(f"got {w.numel()} weights for {stacked.shape[0]} task tensors; give one weight per tensor.")
    return w.reshape((-1,) + (1,) * (stacked.dim() - 1))  # (N, 1, ..., 1)


def _check_density(density: float, *, dare: bool = False) -> None:
    low_ok = density > 0 if dare else density >= 0
    if not (low_ok and density <= 1):
        rule = "(0, 1] for DARE, whose rescale divides by it" if dare else "[0, 1]"
        raise ValueError(f"density={density!r} must be in {rule}: the fraction of each task tensor's entries kept.")


def _check_sign_method(method: str) -> None:
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={method!r} must be 'total' or 'frequency'.")


# ----------------------------------------------------------------------------------------------- trimming
def _trim(tensor: torch.Tensor, density: float, threshold: float | None) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries largest in magnitude (or those with ``|x| >= threshold``)."""
    if threshold is not None:
        return tensor * (tensor.abs() >= threshold)
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)  # (numel,)
    keep[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _trim_all(stacked: torch.Tensor, density: float, thresholds: Sequence[float] | None) -> torch.Tensor:
    _check_density(density)
    if thresholds is not None and len(thresholds) != stacked.shape[0]:
        raise ValueError(f"got {len(thresholds)} thresholds for {stacked.shape[0]} task tensors; give one per tensor.")
    limits = list(thresholds) if thresholds is not None else [None] * stacked.shape[0]
    return torch.stack([_trim(t, density, limit) for t, limit in zip(stacked, limits, strict=True)])  # (N, *shape)


def _drop_and_rescale(
    stacked: torch.Tensor, originals: Sequence[torch.Tensor], density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by ``density``."""
    _check_density(density, dare=True)
    if density >= 1:
        return stacked
    out = []
    for t, original in zip(stacked, originals, strict=True):
        # The mask is drawn as PEFT draws it (in the task tensor's own dtype), so equal seeds give equal masks.
        probs = torch.full_like(original, density, device=generator.device if generator is not None else None)
        keep = torch.bernoulli(probs, generator=generator).to(t.device, t.dtype)  # (*shape,)
        out.append(t * keep / density)
    return torch.stack(out)  # (N, *shape)


def _disjoint_mean(trimmed: torch.Tensor, w: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' elected sign and the mean of the weighted entries that agree with it."""
    _check_sign_method(method)
    signs = trimmed.sign()  # (N, *shape)
    votes = trimmed.sum(dim=0) if method == "total" else signs.sum(dim=0)  # (*shape,)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)  # (*shape,)
    agree = signs == elected  # (N, *shape)
    total = (trimmed * w * agree).sum(dim=0)  # (*shape,)
    return total / agree.sum(dim=0).clamp(min=1)


# ------------------------------------------------------------------------------------------------- methods
def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``sum_i weights[i] * task_tensors[i]``."""
    stacked, dtype = _stack(task_tensors)
    return (stacked * _weights(weights, stacked)).sum(dim=0).to(dtype)


def magnitude_prune(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    *,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """``sum_i weights[i] * trim(task_tensors[i])``; ``thresholds`` trims by magnitude threshold instead."""
    stacked, dtype = _stack(task_tensors)
    trimmed = _trim_all(stacked, density, thresholds)
    return (trimmed * _weights(weights, stacked)).sum(dim=0).to(dtype)


def ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    majority_sign_method: MajoritySign = "total",
    *,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES: trim, elect the sign, disjoint mean (see the module docstring).

    ``thresholds`` (one per task tensor) trims to the entries with ``|x| >= threshold`` instead of each tensor's own
    top ``density`` fraction: with thresholds from :class:`GlobalMagnitudeThreshold`, trimming is over the whole
    task vector, as in the TIES paper, rather than per tensor as in PEFT and mergekit.
    """
    stacked, dtype = _stack(task_tensors)
    trimmed = _trim_all(stacked, density, thresholds)
    return _disjoint_mean(trimmed, _weights(weights, stacked), majority_sign_method).to(dtype)


def dare_linear(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE then task arithmetic; ``generator`` seeds the drop masks (default: torch's global generator)."""
    stacked, dtype = _stack(task_tensors)
    dropped = _drop_and_rescale(stacked, task_tensors, density, generator)
    return (dropped * _weights(weights, stacked)).sum(dim=0).to(dtype)


def dare_ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    majority_sign_method: MajoritySign = "total",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE's drop-and-rescale, then TIES' sign election and disjoint mean."""
    stacked, dtype = _stack(task_tensors)
    dropped = _drop_and_rescale(stacked, task_tensors, density, generator)
    return _disjoint_mean(dropped, _weights(weights, stacked), majority_sign_method).to(dtype)


def merge_task_tensors(
    method: MergeMethod,
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    *,
    density: float | None = None,
    majority_sign_method: MajoritySign = "total",
    thresholds: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the merge method named ``method`` with the options it takes (the one dispatch the model-level merges use).

    Raises:
        ValueError: for an unknown method, a missing ``density`` where the method needs one, or options the method
            does not take (``thresholds`` with DARE, ``generator`` without it).
    """
    check_method_options(method, density, thresholds is not None)
    if method == "task_arithmetic":
        return task_arithmetic(task_tensors, weights)
    assert density is not None
    if method == "magnitude_prune":
        return magnitude_prune(task_tensors, weights, density, thresholds=thresholds)
    if method == "ties":
        return ties(task_tensors, weights, density, majority_sign_method, thresholds=thresholds)
    if method == "dare_linear":
        return dare_linear(task_tensors, weights, density, generator=generator)
    return dare_ties(task_tensors, weights, density, majority_sign_method, generator=generator)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a tensor's name: DARE masks that do not depend on merge order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def check_method_options(method: str, density: float | None, global_trim: bool = False) -> None:
    """Raise a clear error for a method name or option combination that does not exist."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}.")
    if method in DENSITY_METHODS and density is None:
        raise ValueError(f"method={method!r} needs a density (the fraction of entries kept, e.g. 0.2).")
    if method == "task_arithmetic" and density is not None:
        raise ValueError("method='task_arithmetic' keeps every entry and takes no density; use 'magnitude_prune'.")
    if global_trim and method not in ("ties", "magnitude_prune"):
        raise ValueError(f"trimming over a whole task vector applies to 'ties' and 'magnitude_prune', not {method!r}.")
    if density is not None:
        _check_density(density, dare=method.startswith("dare"))


# ------------------------------------------------------------------------------ trimming over a whole vector
class GlobalMagnitudeThreshold:
    """The magnitude of the ``k``-th largest entry over many tensors, ``k = int(density * total entries)``, exactly.

    Two streaming passes, each a histogram of 16 bits of the float32 bit pattern of ``|x|`` (monotonic in ``|x|``):
    the first over the high 16 bits finds the bucket holding the ``k``-th largest entry, the second over the low 16
    bits inside that bucket finds the value. Memory: two histograms, whatever the number of entries. Keeping
    ``|x| >= threshold`` then keeps exactly ``k`` entries, or more when several entries equal the threshold (all of
    them are kept; :attr:`kept` counts them).

    Example::

        thr = GlobalMagnitudeThreshold(density=0.2)
        for t in tensors: thr.add(t)
        if thr.needs_refine():
            for t in tensors: thr.refine(t)
        threshold = thr.value()
    """

    def __init__(self, density: float) -> None:
        _check_density(density)
        self.density = density
        self.total = 0
        self._high = torch.zeros(1 << 15, dtype=torch.int64)
        self._low = torch.zeros(1 << 16, dtype=torch.int64)
        self._bucket: int | None = None
        self._need = 0
        self._above = 0
        self._value: float | None = None
        self.kept = 0

    @staticmethod
    def _bits(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().float().abs().reshape(-1).view(torch.int32)  # (numel,)

    def add(self, tensor: torch.Tensor) -> None:
        """First pass: count the entries of ``tensor``."""
        if self._bucket is not None:
            raise RuntimeError("add() after needs_refine(): the first pass is over.")
        bits = self._bits(tensor)
        self.total += bits.numel()
        self._high += torch.bincount((bits >> 16).long().cpu(), minlength=1 << 15)[: 1 << 15]

    def needs_refine(self) -> bool:
        """Close the first pass; True when a second pass (:meth:`refine` over the same tensors) is needed."""
        k = int(self.density * self.total)
        if k == 0:
            self._value, self.kept = float("inf"), 0
        elif k >= self.total:
            self._value, self.kept = 0.0, self.total
        if self._value is not None:
            self._bucket = -1
            return False
        from_top = self._high.flip(0).cumsum(0).flip(0)  # (2^15,) entries in this bucket or above
        self._bucket = int((from_top >= k).nonzero().max())
        self._above = int(from_top[self._bucket] - self._high[self._bucket])  # entries in buckets above it
        self._need = k - self._above
        return True

    def refine(self, tensor: torch.Tensor) -> None:
        """Second pass: the low bits of the entries that fall in the selected bucket (nothing to do when
        :meth:`needs_refine` returned False)."""
        if self._bucket is None:
            raise RuntimeError("refine() before needs_refine(): finish the first pass first.")
        if self._value is not None:
            return
        bits = self._bits(tensor)
        inside = bits[(bits >> 16) == self._bucket]
        self._low += torch.bincount((inside & 0xFFFF).long().cpu(), minlength=1 << 16)

    def value(self) -> float:
        """The threshold: ``inf`` when nothing is kept, ``0.0`` when everything is."""
        if self._value is None:
            if self._bucket is None:
                raise RuntimeError("value() before the passes: call add() on every tensor, then needs_refine().")
            from_top = self._low.flip(0).cumsum(0).flip(0)  # (2^16,)
            low = int((from_top >= self._need).nonzero().max())
            bits = torch.tensor([(self._bucket << 16) | low], dtype=torch.int32)
            self._value = float(bits.view(torch.float32))
            self.kept = self._above + int(from_top[low])
        return self._value


def magnitude_threshold(tensors: Callable[[], Iterable[torch.Tensor]], density: float) -> float:
    """The threshold that keeps the top ``density`` fraction by magnitude over every tensor ``tensors()`` yields.

    ``tensors`` is called once or twice (a second pass when needed) and must yield the same tensors each time.
    """
    threshold = GlobalMagnitudeThreshold(density)
    for tensor in tensors():
        threshold.add(tensor)
    if threshold.needs_refine():
        for tensor in tensors():
            threshold.refine(tensor)
    return threshold.value()
