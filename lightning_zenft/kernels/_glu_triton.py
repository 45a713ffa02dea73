r"""Triton gated-linear-unit kernels: ``h = act(g) * u`` and its backward in one pass each.

.. math::

    h &= \mathrm{act}(g)\, u \qquad dg = dh\, u\, \mathrm{act}'(g) \qquad du = dh\, \mathrm{act}(g) \\
    \mathrm{silu}(g) &= g \sigma(g), \quad \mathrm{silu}'(g) = \sigma(g) (1 + g (1 - \sigma(g))) \\
    \mathrm{gelu_{tanh}}(g) &= \tfrac12 g (1 + \tanh z),\; z = c (g + 0.044715 g^3),\; c = \sqrt{2/\pi} \\
    \mathrm{gelu_{tanh}}'(g) &= \tfrac12 (1 + \tanh z) + \tfrac12 g (1 - \tanh^2 z)\, c (1 + 3 \cdot 0.044715 g^2) \\
    \mathrm{gelu}(g) &= g \Phi(g), \quad \mathrm{gelu}'(g) = \Phi(g) + g \varphi(g)

``ACT`` is 0 (SiLU, SwiGLU), 1 (tanh-GELU, GeGLU as in Gemma) or 2 (erf-GELU). Everything is computed in fp32 and
stored in the input dtype; ``tanh`` is written through ``sigmoid`` (``tanh z = 2 sigma(2z) - 1``).

This module holds ``@triton.jit`` code and is imported only when a Triton path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        c = 0.7978845608028654
        inner = c * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        a = g * cdf
        da = cdf + g * pdf
    return a, da


@triton.jit
def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(dg_ptr + offs, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + offs, (dh * a).to(du_ptr.dtype.element_ty), mask=ok)


_BLOCK = 1024


def glu_forward_triton(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """``act(g) * u`` for contiguous tensors of one shape."""
    h = torch.empty_like(g)
    numel = g.numel()
    _glu_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](g, u, h, numel, ACT=ACT_CODES[act], BLOCK=_BLOCK)
    return h


def glu_backward_triton(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str) -> tuple[torch.Tensor, ...]:
    """``(dg, du)`` for contiguous tensors of one shape."""
    dg, du = torch.empty_like(g), torch.empty_like(u)
    numel = g.numel()
    _glu_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](dh, g, u, dg, du, numel, ACT=ACT_CODES[act], BLOCK=_BLOCK)
    return dg, du
