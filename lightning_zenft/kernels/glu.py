r"""Gated linear units ``h = act(g) * u`` (SwiGLU, GeGLU): Triton on CUDA, torch elsewhere; one autograd function.

.. math::  h = \mathrm{act}(g)\, u, \qquad dg = dh\, u\, \mathrm{act}'(g), \qquad du = dh\, \mathrm{act}(g)

The backward recomputes ``act(g)`` from ``g`` (saved with ``u``), so ``act(g)`` is never stored: eager PyTorch keeps
``g``, ``act(g)`` and ``u``; this keeps two of the three. ``act`` is ``"silu"`` (Llama, Mistral, Qwen2),
``"gelu_tanh"`` (Gemma) or ``"gelu"`` (erf). The formulas are in ``_glu_triton``.

Example::

    h = glu(gate_out, up_out, "silu")          # == F.silu(gate_out) * up_out
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lightning_zenft.kernels._triton import triton_module
from lightning_zenft.kernels.runtime import KernelRuntime, resolve

GLUActivation = Literal["silu", "gelu_tanh", "gelu"]
GLU_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_tanh", "gelu")


def activation_reference(g: torch.Tensor, act: GLUActivation) -> torch.Tensor:
    """``act(g)`` with torch's own functions (the reference for the kernels)."""
    if act == "silu":
        return F.silu(g)
    if act == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if act == "gelu":
        return F.gelu(g)
    raise ValueError(f"GLU activation {act!r} is not one of {GLU_ACTIVATIONS}.")


def glu_reference(g: torch.Tensor, u: torch.Tensor, act: GLUActivation) -> torch.Tensor:
    """``act(g) * u`` in plain PyTorch (autograd gives the gradients)."""
    return activation_reference(g, act) * u


def _act_and_grad_torch(g: torch.Tensor, act: GLUActivation) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(g)`` and ``act'(g)`` in fp32."""
    g = g.float()
    if act == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1 + g * (1 - sig))
    if act == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (g + 0.044715 * g**3))
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    raise ValueError(f"GLU activation {act!r} is not one of {GLU_ACTIVATIONS}.")


def glu_forward(
    g: torch.Tensor, u: torch.Tensor, act: GLUActivation, runtime: KernelRuntime | None = None
) -> torch.Tensor:
    """``act(g) * u`` without autograd, one Triton kernel where it runs."""
    if act not in GLU_ACTIVATIONS:
        raise ValueError(f"GLU activation {act!r} is not one of {GLU_ACTIVATIONS}.")
    if g.shape != u.shape:
        raise ValueError(f"GLU needs gate and up of one shape; got {tuple(g.shape)} and {tuple(u.shape)}.")
    if resolve(runtime).use_triton(g, u):
        return triton_module("_glu_triton").glu_forward_triton(g.contiguous(), u.contiguous(), act)
    a, _ = _act_and_grad_torch(g, act)
    return (a * u.float()).to(g.dtype)


def glu_backward(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: GLUActivation, runtime: KernelRuntime | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of :func:`glu_forward` given ``dh``, recomputing ``act(g)``."""
    if resolve(runtime).use_triton(dh, g, u):
        return triton_module("_glu_triton").glu_backward_triton(dh.contiguous(), g.contiguous(), u.contiguous(), act)
    a, da = _act_and_grad_torch(g, act)
    dh32 = dh.float()
    return (dh32 * u.float() * da).to(g.dtype), (dh32 * a).to(u.dtype)


class GLUFunction(torch.autograd.Function):
    """Autograd function of :func:`glu`: saves ``g`` and ``u`` only."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor, act: GLUActivation, runtime: KernelRuntime) -> torch.Tensor:
        ctx.act, ctx.runtime = act, runtime
        ctx.save_for_backward(g, u)
        return glu_forward(g, u, act, runtime)

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, u = ctx.saved_tensors
        dg, du = glu_backward(dh, g, u, ctx.act, ctx.runtime)
        return dg, du, None, None


def glu(
    g: torch.Tensor, u: torch.Tensor, act: GLUActivation = "silu", runtime: KernelRuntime | None = None
) -> torch.Tensor:
    """``act(g) * u`` with a fused forward and backward.

    Example::

        h = glu(gate_proj(x), up_proj(x), "silu")     # SwiGLU
    """
    return GLUFunction.apply(g, u, act, resolve(runtime))
