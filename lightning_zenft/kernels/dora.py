r"""A fused DoRA projection: the LoRA kernel plus the per-output gain, in one autograd function.

With ``z = x W^T + s (x A^T) B^T`` (the LoRA product without bias), the row norm ``n = ||W + s B A||_row`` treated
as a constant (DoRA's section 4.3, as :class:`~lightning_zenft.adapters.DoRALinear` and HF PEFT do) and the gain
``g = m / n``:

.. math::

    y &= g \odot z + b \\
    dm &= \textstyle\sum_{rows} (dy \odot z) / n \qquad db = \textstyle\sum_{rows} dy \qquad dz = dy \odot g

and ``dz`` goes through the LoRA backward (:func:`~lightning_zenft.kernels.lora.project_backward`): ``dX``, ``dA``,
``dB`` as for LoRA. The norm never materializes ``W + s B A`` (``out x in``, what eager DoRA builds every step):

.. math::  n^2 = \lVert W \rVert_{row}^2 + 2 s\, \mathrm{rowsum}\big(B \odot (W A^T)\big)
                 + s^2\, \mathrm{rowsum}\big((B A A^T) \odot B\big)

in fp32 (fp64 for fp64 weights): one skinny product over ``W`` (``W A^T``, ``out x r``) and ``||W||_row^2``, each
step (a cache of ``||W||`` cannot see every way a weight changes, e.g. through ``.data``). Saved for
backward: ``x`` (for ``dA``), ``x A^T``, ``z`` (for ``dm``: one ``M x out`` tensor, what eager DoRA keeps too) and
``g``.

With dropout (mask ``D``), DoRA as HF PEFT defines it is ``y = W x + b + (g - 1) W D x + g s B A D x``
``= W (x - D x) + g z_D + b`` with ``z_D`` the LoRA product of ``D x``: a second base product, of ``x - D x``, which
any DoRA with dropout pays. Its backward is ``dx = (1 - D)(dy W) + D\, d(Dx)``; the mask is regenerated from a seed,
never saved.

Example::

    y = fused_dora(x, base.weight, lora_a, lora_b, magnitude, scaling=2.0, bias=base.bias)
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_zenft.kernels.lora import (
    LoRAProjection,
    ProjectionPlan,
    WeightLike,
    check_projections,
    dense_of,
    dropout_mask,
    project_backward,
    project_forward,
)
from lightning_zenft.kernels.matmul import lowrank_matmul
from lightning_zenft.kernels.runtime import KernelRuntime


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs, fp64 for fp64 ones: the precision of the norm and the gain."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dora_row_norm(weight: WeightLike, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + s B A||`` per output row, fp32, without building ``W + s B A`` (see the module docstring)."""
    with torch.no_grad():
        w = dense_of(weight)  # (out, in)
        wide = _wide(w.dtype)
        a = lora_a.to(w.dtype)
        b = lora_b.to(wide)
        wa = (w @ a.t()).to(wide)  # (out, r)
        aat = lora_a.to(wide) @ lora_a.to(wide).t()  # (r, r)
        cross = (b * wa).sum(1)  # (out,)
        own = ((b @ aat) * b).sum(1)  # (out,)
        w_sq = torch.linalg.vector_norm(w, dim=1, dtype=wide).square()  # (out,), read with W A^T's pass over W
        return (w_sq + 2.0 * scaling * cross + scaling * scaling * own).clamp_min(0.0).sqrt()


class DoRAFunction(torch.autograd.Function):
    """Autograd function of :func:`fused_dora`; inputs ``(x, plan, weight, bias, lora_a, lora_b, magnitude)``.

    ``plan`` carries the dropout probability and seed (see the module docstring for the dropout case).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        plan: ProjectionPlan,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        magnitude: torch.Tensor,
    ) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = _dense_weight(plan, weight)  # (N, K), dequantized once for the norm and both products
            norm = dora_row_norm(w, lora_a, lora_b, plan.scalings[0])  # (N,), a constant
            mask = _mask(plan, x)  # (M, K) dropout multiplier, or None
            xd = x if mask is None else x * mask
            plain = plan.without_dropout()  # the mask is applied here, to the base product too
            (z,), (xa,) = project_forward(xd, plain, [w], [None], [lora_a], [lora_b])  # (M, N), (M, r)
            gain = magnitude.to(norm.dtype) / norm  # (N,)
            y = z * gain.to(z.dtype)
            if bias is not None:
                y.add_(bias.to(y.dtype))  # in place: y is a fresh tensor, z stays as saved
            if mask is not None:  # the base product of the kept-out part: W (x - D x)
                y = lowrank_matmul(x - xd, w.t(), c0=y, runtime=plan.runtime)
        ctx.plan = plan
        ctx.x_shape = tuple(x.shape)
        ctx.magnitude_dtype = magnitude.dtype
        keep_x = ctx.needs_input_grad[4] or mask is not None
        ctx.save_for_backward(x if keep_x else None, weight, lora_a, lora_b, xa, z, gain, norm)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, xa, z, gain, norm = ctx.saved_tensors
        needs = ctx.needs_input_grad
        plan: ProjectionPlan = ctx.plan
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dy = dy.contiguous()  # (M, N)
            mask = None if x is None else _mask(plan, x)
            grad_m = (dy * z).sum(0, dtype=norm.dtype).div_(norm) if needs[6] else None  # (N,)
            grad_bias = dy.sum(0) if needs[3] else None
            dz = dy * gain.to(dy.dtype)  # (M, N)
            w = _dense_weight(plan, weight) if needs[0] else weight  # dequantized once for both products
            grad_x, (grad_a,), (grad_b,), _ = project_backward(
                x if mask is None else x * mask,
                plan.without_dropout(),
                [w],
                [lora_a],
                [lora_b],
                [xa],
                [dz],
                need_x=needs[0],
                need_a=[needs[4]],
                need_b=[needs[5]],
                need_bias=[False],
                x_shape=ctx.x_shape,
            )
            if mask is not None and grad_x is not None:  # dx = (1 - D) (dy W) + D d(Dx)
                grad_base = lowrank_matmul(dy, w, runtime=plan.runtime)  # (M, K)
                grad_x = grad_base.add_(grad_x.sub_(grad_base).mul_(mask))
        if grad_m is not None:
            grad_m = grad_m.to(ctx.magnitude_dtype)
        return grad_x, None, None, grad_bias, grad_a, grad_b, grad_m


def _dense_weight(plan: ProjectionPlan, weight: torch.Tensor | None) -> torch.Tensor:
    return weight if weight is not None else plan.frozen[0].dense()


def _mask(plan: ProjectionPlan, x: torch.Tensor) -> torch.Tensor | None:
    if not plan.dropped:
        return None
    return dropout_mask(x.shape, plan.dropouts[0], plan.seeds[0], x.device, x.dtype)


def fused_dora(
    x: torch.Tensor,
    weight: WeightLike,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
    runtime: KernelRuntime | None = None,
) -> torch.Tensor:
    """DoRA: ``W x + b + (g - 1) W D x + g s B A D x`` with ``g = m / ||W + s B A||_row`` constant in backward.

    ``D`` is the dropout mask (identity when ``dropout`` is 0 or not ``training``); without dropout this is
    ``g (W x + s B A x) + b``. The same numerics as :class:`~lightning_zenft.adapters.DoRALinear` and HF PEFT.

    Args:
        x: input ``(..., in)``.
        weight: the frozen base weight ``(out, in)`` or a :class:`~lightning_zenft.kernels.lora.FrozenWeight`.
        lora_a: ``(r, in)``. lora_b: ``(out, r)``. magnitude: ``m``, ``(out,)``. scaling: ``s``.
        bias: ``(out,)`` or None.
        dropout: dropout probability on the adapter's input (only when ``training``); it costs a second base product.
        runtime: back-end choice and caches (the default runtime if None).

    Example::

        y = fused_dora(x, w, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling)
    """
    projection = LoRAProjection(weight, bias, lora_a, lora_b, scaling, dropout)
    check_projections(x, [projection])
    if tuple(magnitude.shape) != (weight.shape[0],):
        shape, out = tuple(magnitude.shape), weight.shape[0]
        raise ValueError(f"magnitude has shape {shape}; expected ({out},), one value per output.")
    plan = ProjectionPlan([projection], training, runtime)
    w = weight if isinstance(weight, torch.Tensor) else None
    y = DoRAFunction.apply(x.reshape(-1, x.shape[-1]), plan, w, bias, lora_a, lora_b, magnitude)
    return y.view(*x.shape[:-1], y.shape[-1])
