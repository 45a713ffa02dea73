r"""The diagonal Fisher information of a model's predictive distribution, per token, in fp32.

For a model with softmax outputs :math:`p_\theta(y \mid x)` the Fisher information is

.. math::  F = \mathbb{E}_{x}\, \mathbb{E}_{y \sim p_\theta(\cdot \mid x)} \big[ g\, g^\top \big],
           \qquad g = \nabla_\theta \log p_\theta(y \mid x),

and EWC (Kirkpatrick et al. 2017) keeps its diagonal. A causal LM under teacher forcing is a product of per-token
categorical distributions, so each target token is one draw: :func:`fisher_diagonal` returns the Fisher **per target
token** (the sum over tokens divided by their count), with tokens whose label is ``-100`` (padding, prompts) left out.
Dividing by the token count is what makes the result independent of batch size and sequence length.

Estimators (Kunstner et al. 2019 and van de Ven 2025 explain why the first beats the second):

``"sampled"`` (the true Fisher, default)
    labels drawn from the model's own softmax, gradients squared per example. Because
    :math:`\mathbb{E}_y[g] = 0` for each token and the tokens of a sequence are drawn independently given the
    teacher-forced inputs, the square of one sequence's summed gradient has expectation :math:`\sum_t F_t`: with
    ``unit="sequence"`` (default) one backward pass per example is an unbiased estimate; ``unit="token"`` squares
    each token's gradient separately (lower variance, ``T`` times the backward passes). ``samples`` draws are
    averaged.
``"empirical"``
    the data's own labels, each token's gradient squared. Not the Fisher unless the data follows the model.
``"exact"``
    :math:`\sum_y p(y) g_y^2` summed over every class of every token: one backward pass per token and class, for small
    output spaces (``max_exact_classes``).

Squaring the gradient of a minibatch **mean** loss (what several continual-learning libraries do) is none of these:
under sampled labels its expectation is :math:`F / B` (it shrinks with the batch size ``B``), under true labels it adds
:math:`(\mathbb{E}\,g)^2`. The tests show both effects against the closed form of softmax regression.

How gradients are taken: one forward per example, then all units of that example (a draw, a token, or a token and
class) as one batched vector-Jacobian product of the logits (``is_grads_batched``), a few hundred MiB at a time
(``chunk_bytes``). When parameters are sharded (FSDP2 ``DTensor``\ s) each unit runs its own ``backward`` and the
local gradient shards are squared, so the Fisher is shard-local; every rank must then read the same data.

Layers whose weight is adapted by a :class:`~lightning_zenft.adapters.LowRankUpdate` or
:class:`~lightning_zenft.adapters.Mergeable` adapter (``factored=``) get a **rank-1 factored** Fisher of their
effective weight instead of a dense ``(out, in)`` one: with :math:`\Delta` the gradient at the layer's output and
:math:`X` its input (tokens by features), one unit's weight gradient is :math:`G = \Delta^\top X`, and the row and
column sums of :math:`G \odot G` are

.. math::  r_i = \mathrm{diag}(\Delta^\top X X^\top \Delta)_i, \qquad
           c_j = \mathrm{diag}(X^\top \Delta \Delta^\top X)_j,

computed from ``T x T`` Gram matrices without forming ``G``. The factored Fisher is
:math:`F_{ij} \approx r_i c_j / \sum r`: the rank-1 matrix with the same row and column sums (the independence fit of a
non-negative matrix), stored as ``row`` (``out``) and ``col`` (``in``) vectors.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 4)
    >>> batches = [(torch.randn(8, 3), torch.randint(0, 4, (8,)))]
    >>> fisher = fisher_diagonal(model, batches, "exact", logits_fn=lambda m, b: (m(b[0]), b[1]))
    >>> fisher.diagonal["weight"].shape, fisher.tokens
    (torch.Size([4, 3]), 8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_zenft.regularizers.examples import split_examples
from lightning_zenft.regularizers.factored import Capture, add_factor_sums, add_rank1

Estimator = Literal["sampled", "empirical", "exact"]
Unit = Literal["token", "sequence"]
LogitsFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]
"""``logits_fn(model, batch) -> (logits (B, ..., C), labels (B, ...))``; labels ``-100`` take no part."""

IGNORE_INDEX = -100
ESTIMATORS: tuple[str, ...] = ("sampled", "empirical", "exact")


@dataclass
class Fisher:
    """A per-token diagonal Fisher: dense tensors per parameter and rank-1 factors per adapted layer.

    Attributes:
        diagonal: parameter name -> fp32 tensor of the parameter's shape (its local shard when sharded).
        factors: layer name -> ``(row (out,), col (in,))``, the factored Fisher ``row[:, None] * col[None, :]`` of
            the layer's effective ``(out, in)`` weight.
        tokens: target tokens the estimate averaged over.
        estimator: ``"sampled"``, ``"empirical"``, ``"exact"`` (or ``"loaded"`` / ``"combined"``).
    """

    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tokens: int = 0
    estimator: str = "sampled"

    def factor_matrix(self, name: str) -> torch.Tensor:
        """The dense ``(out, in)`` matrix the factors of layer ``name`` stand for (for checks on small layers)."""
        row, col = self.factors[name]
        return row[:, None] * col[None, :]  # (out, in)

    def combined(self, new: Fisher, decay: float) -> Fisher:
        """Online EWC (Schwarz et al. 2018): ``decay * self + new``, name by name (factors: row/col re-fitted)."""
        if set(self.diagonal) != set(new.diagonal) or set(self.factors) != set(new.factors):
            raise ValueError(
                "cannot combine Fisher estimates over different parameters: "
                f"{sorted(set(self.diagonal) ^ set(new.diagonal)) + sorted(set(self.factors) ^ set(new.factors))}"
                " appear in only one. Use the same model and targets for every task."
            )
        diagonal = {k: decay * v + new.diagonal[k] for k, v in self.diagonal.items()}
        factors = {k: add_rank1(v, new.factors[k], decay) for k, v in self.factors.items()}
        return Fisher(diagonal, factors, self.tokens + new.tokens, "combined")


def causal_lm_logits(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ``logits_fn``: a Hugging Face causal LM on a ``{"input_ids", "attention_mask", "labels"}`` batch.

    Returns the logits of positions ``0..T-2`` and the labels of ``1..T-1`` (the model's own shift). Without
    ``labels`` every attended token is a target.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"the Fisher data's batches are {type(batch).__name__}, not dicts with 'input_ids'; pass "
            "logits_fn=lambda model, batch: (logits, labels) to say how to run the model on them."
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    kwargs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    logits = model(**kwargs).logits  # (B, T, V)
    return logits[:, :-1], labels[:, 1:]


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    estimator: Estimator = "sampled",
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    factored: Mapping[str, nn.Module] | None = None,
    logits_fn: LogitsFn | None = None,
    samples: int = 1,
    unit: Unit | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    max_exact_classes: int = 1024,
    chunk_bytes: int = 256 * 2**20,
    vectorize: bool | None = None,
) -> Fisher:
    """Estimate the per-token diagonal Fisher of ``model`` on ``batches`` (see the module docstring).

    Args:
        model: run in eval mode (no dropout) for the estimate; its modes and gradients are restored after.
        batches: batches ``logits_fn`` understands (the default: causal-LM dicts); each is split into examples.
        estimator: ``"sampled"``, ``"empirical"`` or ``"exact"``.
        params: name -> parameter to estimate a dense diagonal for; ``None`` (with ``factored=None``): every
            parameter that requires grad.
        factored: name -> linear-map module (an adapter layer) whose effective weight gets a rank-1 factored Fisher.
        logits_fn: ``(model, batch) -> (logits (B, ..., C), labels (B, ...))``; default :func:`causal_lm_logits`.
        samples: label draws per token for ``"sampled"``.
        unit: ``"sequence"`` (default for ``"sampled"``) or ``"token"`` (the only one for the other estimators).
        seed: seed of the label draws (the same seed gives the same estimate, whatever the batching).
        max_batches: read at most this many batches.
        max_exact_classes: ``"exact"`` refuses outputs with more classes (one backward pass per class and token).
        chunk_bytes: memory for one batched vector-Jacobian product.
        vectorize: batched products (default when no parameter is sharded) or one ``backward`` per unit (``False``;
            forced for sharded parameters).

    Returns:
        A :class:`Fisher` with fp32 tensors on the parameters' devices.

    Raises:
        ValueError: an unknown estimator or unit, ``samples < 1``, too many classes for ``"exact"``, or data that
            yields no target token.
        FloatingPointError: a non-finite value, naming the parameter or layer.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}.")
    if samples < 1:
        raise ValueError(f"samples={samples} must be at least 1 label draw per token.")
    unit = unit or ("sequence" if estimator == "sampled" else "token")
    if unit not in ("token", "sequence"):
        raise ValueError(f"unit={unit!r} is not 'token' or 'sequence'.")
    if unit == "sequence" and estimator != "sampled":
        raise ValueError(
            f"unit='sequence' with estimator={estimator!r} would square sums of true-label gradients, whose cross "
            "terms do not vanish (a biased estimate); use unit='token' (the default for this estimator)."
        )
    if params is None and factored is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dense = dict(params or {})
    layers = dict(factored or {})
    if not dense and not layers:
        raise ValueError("fisher_diagonal: nothing to estimate (no parameter requires grad and no factored layer).")
    sharded = any(_is_dtensor(p) for p in dense.values())
    if vectorize is None:
        vectorize = not sharded
    elif vectorize and sharded:
        raise ValueError("vectorize=True cannot take gradients of sharded (DTensor) parameters; leave it None.")
    logits_fn = logits_fn or causal_lm_logits

    acc = {n: torch.zeros_like(_local(p), dtype=torch.float32) for n, p in dense.items()}
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    capture = Capture(layers, keep_grads=not vectorize)
    generator: torch.Generator | None = None
    tokens = examples = seen_batches = 0
    saved_grads = {id(p): p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for batch in batches:
            if max_batches is not None and seen_batches >= max_batches:
                break
            seen_batches += 1
            for example in split_examples(batch):
                examples += 1
                with capture:
                    logits, labels = logits_fn(model, example)
                logits2 = logits.reshape(-1, logits.shape[-1])  # (N, C)
                valid = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
                if valid.numel() == 0:
                    continue
                classes = logits2.shape[1]
                if estimator == "exact" and classes > max_exact_classes:
                    raise ValueError(
                        f"estimator='exact' needs one backward pass per class and token, and the output has {classes} "
                        f"classes (max_exact_classes={max_exact_classes}); use estimator='sampled' (raise `samples` "
                        "for less noise) or raise max_exact_classes."
                    )
                tokens += valid.numel()
                if generator is None:
                    generator = torch.Generator(device=logits.device).manual_seed(seed)
                probs = torch.softmax(logits2.detach()[valid].float(), dim=-1)  # (n, C)
                if not torch.isfinite(probs).all():
                    bad = [n for n, p in model.named_parameters() if not torch.isfinite(_local(p)).all()]
                    raise FloatingPointError(
                        f"the model's outputs are NaN or inf on example {examples} of the Fisher data, so the Fisher "
                        f"would be too; parameters holding NaN or inf: {bad[:5] or 'none (the data or an overflow)'}. "
                        "Fix the weights or compute in fp32."
                    )
                target = labels.reshape(-1)[valid]
                weight = 1.0 / samples if estimator == "sampled" else 1.0
                per_unit = 8 * (logits2.numel() + sum(_local(p).numel() for p in dense.values()) + capture.numel())
                chunk = max(1, chunk_bytes // max(per_unit, 1))
                for part in _unit_chunks(estimator, unit, probs, target, samples, generator, chunk):  # (K, n, C)
                    full = logits2.new_zeros((part.shape[0], *logits2.shape))  # (K, N, C)
                    full[:, valid] = part.to(full.dtype)
                    full = full.view(part.shape[0], *logits.shape)
                    if vectorize:
                        _accumulate_batched(logits, full, dense, acc, capture, rows, cols, weight)
                    else:
                        for k in range(full.shape[0]):
                            _accumulate_backward(logits, full[k], dense, acc, capture, rows, cols, weight)
                capture.clear()
                del logits, logits2
    finally:
        capture.remove()
        for m, mode in modes.items():
            m.train(mode)
        for p in model.parameters():
            p.grad = saved_grads.get(id(p))
    if tokens == 0:
        raise ValueError(
            f"the Fisher data gave no target tokens ({seen_batches} batches, {examples} examples, every label -100 "
            "or no batch at all); pass data with trained tokens (labels other than -100)."
        )
    fisher = Fisher(estimator=estimator, tokens=tokens)
    for name, value in acc.items():
        fisher.diagonal[name] = value / tokens
    for name in layers:
        row = rows.get(name)
        col = cols.get(name)
        if row is None or col is None:
            raise ValueError(f"layer {name!r} was never called by the model on the Fisher data; is it used?")
        total = row.sum()
        if total > 0:
            fisher.factors[name] = (row / tokens, col / total)
        else:
            fisher.factors[name] = (torch.zeros_like(row), torch.zeros_like(col))
    check_finite(fisher)
    return fisher


def check_finite(fisher: Fisher) -> None:
    """Raise ``FloatingPointError`` naming the first parameter or layer whose Fisher holds NaN or inf."""
    for name, value in fisher.diagonal.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"the Fisher of parameter {name!r} holds NaN or inf ({(~torch.isfinite(value)).sum().item()} "
                "entries): the model's outputs overflowed on the Fisher data. Compute it in fp32 (precision='32') or "
                "check the model and data."
            )
    for name, (row, col) in fisher.factors.items():
        if not (torch.isfinite(row).all() and torch.isfinite(col).all()):
            raise FloatingPointError(
                f"the factored Fisher of layer {name!r} holds NaN or inf: the model's outputs overflowed on the "
                "Fisher data. Compute it in fp32 or check the model and data."
            )


# ---------------------------------------------------------------------------------------------------------- units
def _unit_chunks(
    estimator: str,
    unit: str,
    probs: torch.Tensor,
    target: torch.Tensor,
    samples: int,
    generator: torch.Generator,
    chunk: int,
) -> Iterator[torch.Tensor]:
    """Vectors ``v`` in logit space, one per unit, ``chunk`` at a time: the Fisher sums ``(J^T v)^2`` over units.

    ``probs`` is ``(n, C)`` over the valid tokens; each yielded tensor is ``(K, n, C)`` with ``K <= chunk``. A unit is
    a draw of the whole sequence (``"sampled"``, ``unit="sequence"``), a token and draw, a token (``"empirical"``), or
    a token and class (``"exact"``, ``v = sqrt(p_y) (p - e_y)``).
    """
    n, classes = probs.shape
    eye = torch.eye(classes, device=probs.device, dtype=probs.dtype)
    if estimator == "sampled":
        draws = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (n, S)
        if unit == "sequence":
            for s0 in range(0, samples, chunk):
                s1 = min(samples, s0 + chunk)
                yield (probs[:, None, :] - eye[draws[:, s0:s1]]).permute(1, 0, 2)  # (K, n, C)
            return
        total, per_token = n * samples, samples
    elif estimator == "empirical":
        total, per_token = n, 1
    else:
        total, per_token = n * classes, classes
    for u0 in range(0, total, chunk):
        idx = torch.arange(u0, min(total, u0 + chunk), device=probs.device)  # (K,)
        token, which = idx // per_token, idx % per_token  # (K,), (K,)
        out = torch.zeros(idx.numel(), n, classes, device=probs.device, dtype=probs.dtype)  # (K, n, C)
        if estimator == "sampled":
            out[torch.arange(idx.numel()), token] = probs[token] - eye[draws[token, which]]
        elif estimator == "empirical":
            out[torch.arange(idx.numel()), token] = probs[token] - eye[target[token]]
        else:
            out[torch.arange(idx.numel()), token] = probs[token, which, None].sqrt() * (probs[token] - eye[which])
        yield out


# ----------------------------------------------------------------------------------------------- accumulation
def _accumulate_batched(
    logits: torch.Tensor,
    grad_outputs: torch.Tensor,
    dense: dict[str, torch.Tensor],
    acc: dict[str, torch.Tensor],
    capture: Capture,
    rows: dict[str, torch.Tensor],
    cols: dict[str, torch.Tensor],
    weight: float,
) -> None:
    names = list(dense)
    outputs = capture.outputs()
    inputs = [dense[n] for n in names] + [y for _, ys in outputs for y in ys]
    grads = torch.autograd.grad(
        logits, inputs, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    for name, g in zip(names, grads[: len(names)], strict=True):
        if g is not None:
            acc[name] += weight * g.float().square().sum(0)
    offset = len(names)
    for name, ys in outputs:
        deltas = []
        for y, g in zip(ys, grads[offset : offset + len(ys)], strict=True):
            deltas.append(torch.zeros_like(y).expand(grad_outputs.shape[0], *y.shape) if g is None else g)
        offset += len(ys)
        delta = torch.cat([d.reshape(d.shape[0], -1, d.shape[-1]) for d in deltas], dim=1)  # (K, T, out)
        add_factor_sums(name, delta, capture.inputs(name), rows, cols, weight)


def _accumulate_backward(
    logits: torch.Tensor,
    grad_output: torch.Tensor,
    dense: dict[str, torch.Tensor],
    acc: dict[str, torch.Tensor],
    capture: Capture,
    rows: dict[str, torch.Tensor],
    cols: dict[str, torch.Tensor],
    weight: float,
) -> None:
    for p in dense.values():
        p.grad = None
    capture.reset_grads()
    logits.backward(grad_output, retain_graph=True)
    for name, p in dense.items():
        if p.grad is not None:
            acc[name] += weight * _local(p.grad).float().square()
            p.grad = None
    for name in capture.layers:
        delta = torch.cat([d.reshape(1, -1, d.shape[-1]) for d in capture.grads(name)], dim=1)  # (1, T, out)
        add_factor_sums(name, delta, capture.inputs(name), rows, cols, weight)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor``, or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def fisher_bytes(fisher: Fisher) -> int:
    """Bytes held by a :class:`Fisher` (for memory reports)."""
    dense = sum(v.numel() * v.element_size() for v in fisher.diagonal.values())
    factors = sum(r.numel() * r.element_size() + c.numel() * c.element_size() for r, c in fisher.factors.values())
    return dense + factors


__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Fisher",
    "LogitsFn",
    "Unit",
    "causal_lm_logits",
    "check_finite",
    "fisher_bytes",
    "fisher_diagonal",
]
