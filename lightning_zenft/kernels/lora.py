r"""Fused LoRA projections: one autograd function for one layer, or for several layers that read the same input.

For projection ``i`` with frozen weight ``W_i`` (``N_i x K``), bias ``b_i``, adapter ``A_i`` (``r_i x K``),
``B_i`` (``N_i x r_i``), scale ``s_i`` and dropout mask ``D_i`` (identity when the dropout is 0):

.. math::

    Y_i &= X W_i^T + b_i + s_i (D_i X) A_i^T B_i^T \\
    dB_i &= s_i \, dY_i^T (D_i X A_i^T) \qquad dA_i = s_i \, (dY_i B_i)^T (D_i X) \qquad db_i = \textstyle\sum_m dY_i \\
    dX &= \textstyle\sum_i dY_i W_i + \sum_i D_i \odot s_i (dY_i B_i) A_i

* The base weight gets no gradient: it must be frozen, and only ``dY W`` is computed for it.
* Saved for backward: ``X`` once for the whole group (for ``dA``; not saved when no ``A`` trains), ``X A^T``
  (``M x sum r``, tiny) and the parameters. No output, no dropped-out copy of ``X``: dropout keeps only a seed and
  regenerates its mask in backward. A quantized base keeps its 4-bit form and is dequantized again in backward.
* Members without dropout share their low-rank GEMMs: ``X [A_1; A_2; ...]^T`` in forward and
  ``[s_1 dY_1 B_1, ...]^T X`` in backward read ``X`` once for all of them, and the input gradient accumulates every
  ``dY_i W_i`` and the whole low-rank term into one buffer (:func:`~lightning_zenft.kernels.matmul.lowrank_matmul`,
  whose Triton back end adds the low-rank term in the GEMM's epilogue).
* In backward, ``dY B`` and ``dY^T (X A^T)`` come from one pass over ``dY``
  (:func:`~lightning_zenft.kernels.matmul.dual_lowrank`, where its Triton kernel beats two cuBLAS calls).
* Every product accumulates in fp32 inside the GEMM; the adapter path runs in the input's dtype.

Example::

    y = fused_lora(x, layer.weight, lora_a, lora_b, scaling=2.0, bias=layer.bias)
    q, k, v = fused_lora_group(x, [LoRAProjection(wq, None, aq, bq, 2.0), ...])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from lightning_zenft.kernels.matmul import dual_lowrank, lowrank_matmul
from lightning_zenft.kernels.runtime import KernelRuntime, resolve


@runtime_checkable
class FrozenWeight(Protocol):
    """A frozen base weight kept in another form (e.g. 4-bit) and materialized as a dense ``(out, in)`` tensor.

    ``dense()`` may return a buffer that is reused by the next call; kernels use it at once and never save it.
    """

    shape: tuple[int, int]

    def dense(self) -> torch.Tensor: ...


class CallableWeight:
    """A :class:`FrozenWeight` from any function returning the dense ``(out, in)`` weight (e.g. a dequantizer).

    Example::

        weight = CallableWeight(layer.dequantize_weight, (layer.out_features, layer.in_features))
    """

    def __init__(self, fn: Callable[[], torch.Tensor], shape: tuple[int, int]) -> None:
        self.fn = fn
        self.shape = shape

    def dense(self) -> torch.Tensor:
        return self.fn()


WeightLike = torch.Tensor | FrozenWeight


@dataclass
class LoRAProjection:
    """One projection of a fused group: ``x @ weight.T + bias + scaling * dropout(x) @ lora_a.T @ lora_b.T``.

    ``weight`` is a frozen ``(out, in)`` tensor or a :class:`FrozenWeight`; ``lora_a`` is ``(r, in)``, ``lora_b``
    ``(out, r)``; ``bias`` (``(out,)`` or None) may be trainable.

    Example::

        q = LoRAProjection(q_proj.weight, None, lora_a=aq, lora_b=bq, scaling=2.0, dropout=0.05)
    """

    weight: WeightLike
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dropout: float = 0.0


def dense_of(weight: WeightLike) -> torch.Tensor:
    """The ``(out, in)`` dense weight (a quantized one dequantized, possibly into a reused buffer)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dense()


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier ``Bernoulli(1 - p) / (1 - p)`` drawn from ``seed``; the same seed gives the same mask."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


class ProjectionPlan:
    """The non-tensor facts of one call: scales, dropout probabilities and seeds, quantized weights, the runtime."""

    def __init__(
        self, projections: Sequence[LoRAProjection], training: bool, runtime: KernelRuntime | None = None
    ) -> None:
        self.runtime = resolve(runtime)
        self.scalings = [float(p.scaling) for p in projections]
        self.dropouts = [float(p.dropout) if training else 0.0 for p in projections]
        self.seeds = [_new_seed() if d > 0 else None for d in self.dropouts]
        self.frozen = [None if isinstance(p.weight, torch.Tensor) else p.weight for p in projections]
        self.ranks = [int(p.lora_a.shape[0]) for p in projections]
        self._split_by_dropout()

    def _split_by_dropout(self) -> None:
        self.shared = [i for i, d in enumerate(self.dropouts) if d == 0.0]  # share the low-rank GEMMs
        self.dropped = [i for i, d in enumerate(self.dropouts) if d > 0.0]

    def without_dropout(self) -> ProjectionPlan:
        """The same plan with dropout off (e.g. for a caller that applies its mask itself)."""
        if not self.dropped:
            return self
        plain = copy.copy(self)
        plain.dropouts = [0.0] * len(self.dropouts)
        plain.seeds = [None] * len(self.seeds)
        plain._split_by_dropout()
        return plain


def check_projections(x: torch.Tensor, projections: Sequence[LoRAProjection]) -> None:
    k = x.shape[-1]
    for i, p in enumerate(projections):
        n, k_w = tuple(p.weight.shape)
        r = p.lora_a.shape[0]
        if k_w != k or tuple(p.lora_a.shape) != (r, k) or tuple(p.lora_b.shape) != (n, r):
            raise ValueError(
                f"projection {i}: x has {k} features but weight is {tuple(p.weight.shape)}, lora_a "
                f"{tuple(p.lora_a.shape)}, lora_b {tuple(p.lora_b.shape)}; expected weight (out, {k}), "
                f"lora_a (r, {k}), lora_b (out, r)."
            )
        if p.bias is not None and tuple(p.bias.shape) != (n,):
            raise ValueError(f"projection {i}: bias has shape {tuple(p.bias.shape)}; expected ({n},), one per output.")
        if not isinstance(p.weight, torch.Tensor) and getattr(p.weight, "dtype", x.dtype) != x.dtype:
            raise TypeError(
                f"projection {i}: the quantized base weight dequantizes to {p.weight.dtype} but x is {x.dtype}; "
                "quantize it for x's dtype (e.g. quantize_nf4(w, dtype=x.dtype)) or cast x."
            )
        if isinstance(p.weight, torch.Tensor):
            if p.weight.requires_grad:
                raise ValueError(
                    f"projection {i}: the base weight requires grad, but fused LoRA kernels compute no base-weight "
                    "gradient; freeze it (weight.requires_grad_(False)) or train it with a plain nn.Linear."
                )
            if p.weight.dtype != x.dtype:
                raise TypeError(
                    f"projection {i}: base weight is {p.weight.dtype} but x is {x.dtype}; cast one of them "
                    "(or run under torch.autocast, which FusedLoRALinear handles)."
                )
        if not 0.0 <= p.dropout < 1.0:
            raise ValueError(f"projection {i}: dropout={p.dropout} must be in [0, 1).")


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def project_forward(
    x2: torch.Tensor,
    plan: ProjectionPlan,
    weights: Sequence[torch.Tensor | None],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward of a group on a 2-D input ``x2 (M, K)``: the outputs ``Y_i`` and the low-rank activations ``x A_i^T``."""
    dtype = x2.dtype
    xas: list[torch.Tensor | None] = [None] * len(lora_as)
    if plan.shared:
        a_cat = torch.cat([lora_as[i].to(dtype) for i in plan.shared]) if len(plan.shared) > 1 else None
        a_cat = lora_as[plan.shared[0]].to(dtype) if a_cat is None else a_cat  # (sum r, K)
        xa_cat = x2 @ a_cat.t()  # (M, sum r)
        for i, xa in zip(plan.shared, xa_cat.split([plan.ranks[i] for i in plan.shared], dim=1), strict=True):
            xas[i] = xa  # (M, r_i)
    for i in plan.dropped:
        xd = x2 * dropout_mask(x2.shape, plan.dropouts[i], plan.seeds[i], x2.device, dtype)  # (M, K)
        xas[i] = xd @ lora_as[i].to(dtype).t()  # (M, r_i)
        del xd
    outs = []
    for i in range(len(lora_as)):
        w = weights[i] if weights[i] is not None else plan.frozen[i].dense()  # (N_i, K)
        q = (lora_bs[i].to(dtype) * plan.scalings[i]).t()  # (r_i, N_i)
        outs.append(lowrank_matmul(x2, w.t(), xas[i], q, _cast(biases[i], dtype), runtime=plan.runtime))  # (M, N_i)
    return outs, xas


def project_backward(
    x2: torch.Tensor | None,
    plan: ProjectionPlan,
    weights: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    xas: Sequence[torch.Tensor],
    dys: Sequence[torch.Tensor],
    need_x: bool,
    need_a: Sequence[bool],
    need_b: Sequence[bool],
    need_bias: Sequence[bool],
    x_shape: tuple[int, int],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Backward of :func:`project_forward`: ``dX`` and the per-projection ``dA``, ``dB``, ``db``."""
    n = len(lora_as)
    dtype = dys[0].dtype
    a_ = [a.to(dtype) for a in lora_as]
    b_ = [b.to(dtype) for b in lora_bs]
    grad_a: list[torch.Tensor | None] = [None] * n
    grad_b: list[torch.Tensor | None] = [None] * n
    grad_bias = [dys[i].sum(0) if need_bias[i] else None for i in range(n)]
    dybs = []
    for i in range(n):
        if need_b[i]:  # dY B and dY^T (X A^T) from one pass over dY where that is faster
            dyb, gb = dual_lowrank(dys[i], b_[i], xas[i], plan.runtime)
            grad_b[i] = gb.mul_(plan.scalings[i])  # (N_i, r_i)
        else:
            dyb = dys[i] @ b_[i]
        dybs.append(dyb)  # (M, r_i), unscaled

    shared = plan.shared
    if shared:
        scaled = [dybs[i] * plan.scalings[i] for i in shared]
        dyb_cat = torch.cat(scaled, dim=1) if len(scaled) > 1 else scaled[0]  # (M, sum r)
        a_cat = torch.cat([a_[i] for i in shared]) if len(shared) > 1 else a_[shared[0]]  # (sum r, K)
        if any(need_a[i] for i in shared):
            ga_cat = dyb_cat.t() @ x2  # (sum r, K)
            for i, ga in zip(shared, ga_cat.split([plan.ranks[i] for i in shared], dim=0), strict=True):
                grad_a[i] = ga if need_a[i] else None
    masks = {}
    for i in plan.dropped:
        if need_a[i] or need_x:
            masks[i] = dropout_mask(torch.Size(x_shape), plan.dropouts[i], plan.seeds[i], dys[i].device, dtype)
        if need_a[i]:
            grad_a[i] = (dybs[i].t() @ (x2 * masks[i])).mul_(plan.scalings[i])  # (r_i, K)

    grad_x = None
    if need_x:
        for i in range(n):
            w = weights[i] if weights[i] is not None else plan.frozen[i].dense()  # (N_i, K)
            p, q = (dyb_cat, a_cat) if shared and i == 0 else (None, None)  # every shared member's term, once
            grad_x = lowrank_matmul(dys[i], w, p, q, None, grad_x, plan.runtime)  # (M, K)
        for i in plan.dropped:
            grad_x.add_((dybs[i] @ a_[i]).mul_(masks[i]), alpha=plan.scalings[i])  # (M, K)
    return grad_x, grad_a, grad_b, grad_bias


class LoRAGroupFunction(torch.autograd.Function):
    """Autograd function of :func:`fused_lora_group`; inputs are ``(x, plan, *[weight, bias, lora_a, lora_b]*n)``."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, plan: ProjectionPlan, *flat: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        n = len(flat) // 4
        weights, biases, lora_as, lora_bs = (list(flat[j::4]) for j in range(4))
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x  # (M, K): fused_lora_group flattens the leading dims outside, so outputs are not views
            outs, xas = project_forward(x2, plan, weights, biases, lora_as, lora_bs)
        keep_x = any(ctx.needs_input_grad[4 + 4 * i] for i in range(n))
        ctx.plan = plan
        ctx.x_shape = tuple(x2.shape)
        ctx.save_for_backward(x2 if keep_x else None, *weights, *lora_as, *lora_bs, *xas)
        ctx.set_materialize_grads(False)  # an unused output (a sibling called under no_grad) gives its adapter no grad
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: ProjectionPlan = ctx.plan
        n = len(plan.scalings)
        saved = ctx.saved_tensors
        x2, weights, lora_as, lora_bs, xas = (
            saved[0],
            saved[1 : 1 + n],
            saved[1 + n : 1 + 2 * n],
            saved[1 + 2 * n : 1 + 3 * n],
            saved[1 + 3 * n :],
        )
        needs = ctx.needs_input_grad
        used = [g is not None for g in grads]
        if not any(used):
            return (None,) * (2 + 4 * n)
        like = next(g for g in grads if g is not None)
        with torch.autocast(device_type=like.device.type, enabled=False):
            dys = [  # (M, N_i); an unused output's gradient is zero and its parameters get None
                g.reshape(-1, g.shape[-1]) if g is not None else like.new_zeros(ctx.x_shape[0], lora_bs[i].shape[0])
                for i, g in enumerate(grads)
            ]
            dys = [dy if dy.is_contiguous() else dy.contiguous() for dy in dys]
            grad_x, grad_a, grad_b, grad_bias = project_backward(
                x2,
                plan,
                weights,
                lora_as,
                lora_bs,
                xas,
                dys,
                need_x=needs[0],
                need_a=[needs[4 + 4 * i] and used[i] for i in range(n)],
                need_b=[needs[5 + 4 * i] and used[i] for i in range(n)],
                need_bias=[needs[3 + 4 * i] and used[i] for i in range(n)],
                x_shape=ctx.x_shape,
            )
        out: list[torch.Tensor | None] = [grad_x, None]
        for i in range(n):
            out += [None, grad_bias[i], grad_a[i], grad_b[i]]
        return tuple(out)


def fused_lora_group(
    x: torch.Tensor,
    projections: Sequence[LoRAProjection],
    training: bool = True,
    runtime: KernelRuntime | None = None,
) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of one input in one autograd function (q/k/v, gate/up): ``X`` saved once.

    Args:
        x: the shared input ``(..., in)``.
        projections: one :class:`LoRAProjection` per output.
        training: when False, dropout is off.
        runtime: back-end choice and caches (:class:`~lightning_zenft.kernels.runtime.KernelRuntime`; the default
            runtime if None).

    Example::

        q, k, v = fused_lora_group(x, [LoRAProjection(wq, None, aq, bq, 2.0), LoRAProjection(wk, None, ak, bk, 2.0),
                                       LoRAProjection(wv, None, av, bv, 2.0)])
    """
    if not projections:
        raise ValueError("fused_lora_group needs at least one projection.")
    check_projections(x, projections)
    plan = ProjectionPlan(projections, training, runtime)
    flat: list[torch.Tensor | None] = []
    for p in projections:
        weight = p.weight if isinstance(p.weight, torch.Tensor) else None
        flat += [weight, p.bias, p.lora_a, p.lora_b]
    outs = LoRAGroupFunction.apply(x.reshape(-1, x.shape[-1]), plan, *flat)  # (M, N_i) each
    return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in outs)


def fused_lora(
    x: torch.Tensor,
    weight: WeightLike,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
    runtime: KernelRuntime | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias + scaling * dropout(x) @ lora_a.T @ lora_b.T`` with a hand-written backward.

    Args:
        x: input ``(..., in)``.
        weight: the frozen base weight ``(out, in)``, or a :class:`FrozenWeight` such as an
            :class:`~lightning_zenft.kernels.nf4.NF4Weight` (dequantized on the fly, never stored dense).
        lora_a: ``(r, in)``. lora_b: ``(out, r)``. scaling: the LoRA scale ``s``.
        bias: ``(out,)`` or None; it gets a gradient if it requires one.
        dropout: dropout probability on the adapter's input (only when ``training``).
        runtime: back-end choice and caches (the default runtime if None).

    Example::

        y = fused_lora(x, base.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, base.bias)
    """
    projection = LoRAProjection(weight, bias, lora_a, lora_b, scaling, dropout)
    return fused_lora_group(x, [projection], training, runtime)[0]


def lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain-PyTorch LoRA forward that :func:`fused_lora` must match (autograd gives the gradients).

    ``dropout_multiplier`` is the mask already divided by ``1 - p`` (see :func:`dropout_mask`), or None.

    Example::

        ref = lora_reference(x, w, a, b, 2.0)
    """
    xd = x if dropout_multiplier is None else x * dropout_multiplier.view_as(x)
    base = torch.nn.functional.linear(x, weight, bias)
    return base + torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_a), lora_b) * scaling
