r"""EWC and L2-SP penalties and their gradients, for dense tensors and for low-rank (LoRA) updates.

EWC (Kirkpatrick et al. 2017) and L2-SP (Li et al. 2018, "Explicit Inductive Bias for Transfer Learning with
Convolutional Networks") both pull the weights toward their values at the start of fine-tuning:

.. math::  \Omega_{EWC} = \frac{\lambda}{2} \sum_i F_i (\theta_i - \theta^*_i)^2, \qquad
           \Omega_{L2SP} = \frac{\lambda}{2} \sum_i (\theta_i - \theta^*_i)^2,
           \qquad \nabla \Omega = \lambda F \odot (\theta - \theta^*)

(L2-SP is EWC with ``F = 1``). The gradient is written into ``.grad`` directly instead of building an autograd graph
for the penalty: one elementwise pass, no extra memory beyond the Fisher and the anchor.

**Low-rank updates.** A LoRA layer's effective weight is ``W + s B A`` with ``W`` frozen, so its change since the
anchor is :math:`D = s (B A - B_0 A_0)`. With a factored Fisher :math:`F_{ij} = u_i v_j` (``u = 1, v = 1`` for L2-SP)

.. math::  \frac{\lambda}{2} \sum_{ij} u_i v_j D_{ij}^2 = \frac{\lambda s^2}{2} \langle P, Q \rangle_F, \quad
           P = \bar B^\top \mathrm{diag}(u) \bar B, \; Q = \bar A\, \mathrm{diag}(v) \bar A^\top,
           \quad \bar B = [B, B_0], \; \bar A = [A; -A_0],

.. math::  \nabla_{\bar B} = \lambda s^2\, \mathrm{diag}(u) \bar B Q, \qquad
           \nabla_{\bar A} = \lambda s^2\, P \bar A\, \mathrm{diag}(v),

all from ``(out x 2r)`` and ``(2r x in)`` products: no dense ``(out, in)`` tensor is formed. When ``B_0 = 0`` (LoRA's
usual start) the anchor terms drop out and the products are ``r x r``.

Example:
    >>> import torch
    >>> theta, anchor, fisher = torch.ones(3), torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    >>> float(ewc_penalty(theta, anchor, fisher, strength=2.0)), ewc_gradient(theta, anchor, fisher).tolist()
    (6.0, [1.0, 2.0, 3.0])
"""

from __future__ import annotations

import torch


def ewc_penalty(param: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``strength / 2 * sum(F * (theta - theta*)^2)`` in fp32 (differentiable in ``param``)."""
    diff = param.float() - anchor.float()
    return 0.5 * strength * (fisher.float() * diff * diff).sum()


def ewc_gradient(
    param: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor, strength: float = 1.0
) -> torch.Tensor:
    """``strength * F * (theta - theta*)``, the gradient of :func:`ewc_penalty`, in fp32."""
    return strength * fisher.float() * (param.detach().float() - anchor.float())


def l2sp_penalty(param: torch.Tensor, anchor: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``strength / 2 * ||theta - theta*||^2`` in fp32 (differentiable in ``param``)."""
    diff = param.float() - anchor.float()
    return 0.5 * strength * (diff * diff).sum()


def l2sp_gradient(param: torch.Tensor, anchor: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``strength * (theta - theta*)``, the gradient of :func:`l2sp_penalty`, in fp32."""
    return strength * (param.detach().float() - anchor.float())


def lowrank_penalty(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    row: torch.Tensor | None = None,
    col: torch.Tensor | None = None,
    anchor_a: torch.Tensor | None = None,
    anchor_b: torch.Tensor | None = None,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The penalty on a low-rank change ``s (B A - B0 A0)`` and its gradients in ``A`` and ``B`` (module docstring).

    Args:
        lora_a: ``A``, ``(r, in)``.
        lora_b: ``B``, ``(out, r)``.
        scale: ``s``.
        row: ``u`` (``out``), the factored Fisher's row factor; ``None``: ones (L2-SP).
        col: ``v`` (``in``), its column factor; ``None``: ones.
        anchor_a: ``A0`` (``(r0, in)``) at the anchor; ``None`` (with ``anchor_b=None``): ``B0 A0 = 0``.
        anchor_b: ``B0`` (``(out, r0)``).
        strength: ``lambda``.

    Returns:
        ``(value, grad_A, grad_B)`` in fp32: ``value = strength/2 * sum_ij u_i v_j D_ij^2``.

    Example:
        >>> import torch
        >>> a, b = torch.randn(2, 5), torch.randn(4, 2)
        >>> value, ga, gb = lowrank_penalty(a, b, scale=0.5)
        >>> torch.allclose(value, 0.5 * (0.5 * b @ a).square().sum())
        True
    """
    if (anchor_a is None) != (anchor_b is None):
        raise ValueError("give both anchor_a and anchor_b (the factors at the anchor), or neither.")
    a = lora_a.detach().float()  # (r, in)
    b = lora_b.detach().float()  # (out, r)
    r = a.shape[0]
    if anchor_a is not None and anchor_b is not None:
        a = torch.cat([a, -anchor_a.float()], dim=0)  # (r + r0, in)
        b = torch.cat([b, anchor_b.float()], dim=1)  # (out, r + r0)
    bu = b if row is None else b * row.float()[:, None]  # (out, R)
    av = a if col is None else a * col.float()[None, :]  # (R, in)
    p = b.T @ bu  # (R, R)
    q = av @ a.T  # (R, R)
    coeff = strength * scale * scale
    value = 0.5 * coeff * (p * q).sum()
    grad_b = coeff * (bu @ q)  # (out, R)
    grad_a = coeff * (p @ av)  # (R, in)
    return value, grad_a[:r], grad_b[:, :r]


def weighted_delta_penalty(
    delta: torch.Tensor, row: torch.Tensor | None = None, col: torch.Tensor | None = None, strength: float = 1.0
) -> torch.Tensor:
    """``strength / 2 * sum_ij u_i v_j D_ij^2`` for a dense ``(out, in)`` (or ``(out, cols)``) change ``D``.

    Differentiable in ``delta``; used for adapters that are mergeable but not low-rank (DoRA), whose effective
    weight change is formed a few columns at a time.
    """
    d2 = delta.float().square()  # (out, cols)
    if row is not None:
        d2 = d2 * row.float()[:, None]
    if col is not None:
        d2 = d2 * col.float()[None, :]
    return 0.5 * strength * d2.sum()


__all__ = [
    "ewc_gradient",
    "ewc_penalty",
    "l2sp_gradient",
    "l2sp_penalty",
    "lowrank_penalty",
    "weighted_delta_penalty",
]
