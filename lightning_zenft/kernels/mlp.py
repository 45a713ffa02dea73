r"""A LoRA gated MLP in one autograd function: gate/up from one saved input, GLU, down (SwiGLU / GeGLU).

.. math::

    g = \mathrm{LoRA}_{gate}(x), \quad u = \mathrm{LoRA}_{up}(x), \quad h = \mathrm{act}(g)\, u, \quad
    y = \mathrm{LoRA}_{down}(h)

with each ``LoRA`` as in :mod:`lightning_zenft.kernels.lora` (frozen weight, optional bias and dropout). Backward:

.. math::

    dh = dy\, W_d + D_d \odot s_d (dy B_d) A_d, \quad (dg, du) = \mathrm{GLU}'(dh; g, u), \quad
    dx = dg\, W_g + du\, W_u + \text{low-rank terms}

Saved: ``x`` (once, for ``dA_gate`` and ``dA_up``), ``g`` and ``u`` (which the GLU backward needs anyway), the
``M x r`` low-rank activations, and ``h`` (the down projection's input, ``M x intermediate``, for ``dA_down``):
one copy of each distinct adapted input, no more. With ``recompute_hidden=True`` ``h`` is not kept but recomputed
from ``g`` and ``u`` in backward (one more elementwise pass, ``M x intermediate`` less memory per MLP): the adapted
MLP then keeps less than eager PyTorch keeps for the frozen MLP alone (``g``, ``act(g)``, ``u``) plus ``x``. When
``lora_A`` of down does not train, ``h`` is neither kept nor recomputed.

Example::

    y = fused_lora_mlp(x, gate, up, down, act="silu")   # gate/up/down: LoRAProjection
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_zenft.kernels.glu import GLU_ACTIVATIONS, GLUActivation, glu_backward, glu_forward
from lightning_zenft.kernels.lora import (
    LoRAProjection,
    ProjectionPlan,
    check_projections,
    project_backward,
    project_forward,
)
from lightning_zenft.kernels.runtime import KernelRuntime


class LoRAMLPFunction(torch.autograd.Function):
    """Autograd function of :func:`fused_lora_mlp`; inputs ``(x, plan_gu, plan_down, act, recompute, *12 tensors)``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        plan_gu: ProjectionPlan,
        plan_down: ProjectionPlan,
        act: GLUActivation,
        recompute_hidden: bool,
        *flat: torch.Tensor | None,
    ) -> torch.Tensor:
        w_g, b_g, a_g, bb_g, w_u, b_u, a_u, bb_u, w_d, b_d, a_d, bb_d = flat
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x  # (M, K): fused_lora_mlp flattens the leading dims outside, so the output is not a view
            (g, u), xa_gu = project_forward(x2, plan_gu, [w_g, w_u], [b_g, b_u], [a_g, a_u], [bb_g, bb_u])
            h = glu_forward(g, u, act, plan_gu.runtime)  # (M, I)
            (y,), xa_d = project_forward(h, plan_down, [w_d], [b_d], [a_d], [bb_d])  # (M, N)
        needs = ctx.needs_input_grad
        keep_x = needs[7] or needs[11]  # lora_A of gate or up trains
        ctx.need_h = needs[15]  # lora_A of down trains: dA_down reads h
        ctx.recompute_hidden = recompute_hidden
        ctx.plan_gu, ctx.plan_down, ctx.act = plan_gu, plan_down, act
        ctx.x_shape = tuple(x2.shape)
        keep_h = h if ctx.need_h and not recompute_hidden else None
        ctx.save_for_backward(
            x2 if keep_x else None, g, u, keep_h, w_g, w_u, w_d, a_g, a_u, a_d, bb_g, bb_u, bb_d, *xa_gu, *xa_d
        )
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, g, u, h, w_g, w_u, w_d, a_g, a_u, a_d, bb_g, bb_u, bb_d, xa_g, xa_u, xa_d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        act = ctx.act
        need_gu = needs[0] or any(needs[6:9]) or any(needs[10:13])  # anything upstream of h needs a gradient
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (M, N)
            if ctx.need_h and ctx.recompute_hidden:
                h = glu_forward(g, u, act, ctx.plan_gu.runtime)  # (M, I), recomputed
            dh, (ga_d,), (gb_d,), (gbias_d,) = project_backward(
                h,
                ctx.plan_down,
                [w_d],
                [a_d],
                [bb_d],
                [xa_d],
                [dy2],
                need_x=need_gu,
                need_a=[needs[15]],
                need_b=[needs[16]],
                need_bias=[needs[14]],
                x_shape=tuple(g.shape),
            )
            del h
            dx, ga_g, ga_u, gb_g, gb_u, gbias_g, gbias_u = (None,) * 7
            if need_gu:  # else only down's adapter (or bias) trains and x needs no gradient: stop here
                dg, du = glu_backward(dh, g, u, act, ctx.plan_gu.runtime)  # (M, I) each
                del dh
                dx, (ga_g, ga_u), (gb_g, gb_u), (gbias_g, gbias_u) = project_backward(
                    x2,
                    ctx.plan_gu,
                    [w_g, w_u],
                    [a_g, a_u],
                    [bb_g, bb_u],
                    [xa_g, xa_u],
                    [dg, du],
                    need_x=needs[0],
                    need_a=[needs[7], needs[11]],
                    need_b=[needs[8], needs[12]],
                    need_bias=[needs[6], needs[10]],
                    x_shape=ctx.x_shape,
                )
        return (
            dx,
            None,
            None,
            None,
            None,
            *(None, gbias_g, ga_g, gb_g),
            *(None, gbias_u, ga_u, gb_u),
            *(None, gbias_d, ga_d, gb_d),
        )


def fused_lora_mlp(
    x: torch.Tensor,
    gate: LoRAProjection,
    up: LoRAProjection,
    down: LoRAProjection,
    act: GLUActivation = "silu",
    training: bool = True,
    recompute_hidden: bool = False,
    runtime: KernelRuntime | None = None,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on all three projections, in one autograd function.

    Args:
        x: input ``(..., hidden)``.
        gate, up: projections ``hidden -> intermediate``; down: ``intermediate -> hidden``.
        act: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` or ``"gelu"`` (GeGLU).
        training: when False, dropout is off.
        recompute_hidden: do not keep ``act(gate) * up`` for backward; recompute it there (less memory, one more
            elementwise pass).
        runtime: back-end choice and caches (the default runtime if None).

    Example::

        y = fused_lora_mlp(x, LoRAProjection(wg, None, ag, bg, 2.0), LoRAProjection(wu, None, au, bu, 2.0),
                           LoRAProjection(wd, None, ad, bd, 2.0), act="silu")
    """
    if act not in GLU_ACTIVATIONS:
        raise ValueError(f"act={act!r} is not one of {GLU_ACTIVATIONS}.")
    check_projections(x, [gate, up])
    inter = gate.weight.shape[0]
    if up.weight.shape[0] != inter or down.weight.shape[1] != inter:
        raise ValueError(
            f"gate {tuple(gate.weight.shape)}, up {tuple(up.weight.shape)} and down {tuple(down.weight.shape)} do "
            "not form an MLP: gate and up must have the same out_features, equal to down's in_features."
        )
    h_probe = x.new_empty((1, inter))
    check_projections(h_probe, [down])
    plan_gu = ProjectionPlan([gate, up], training, runtime)
    plan_down = ProjectionPlan([down], training, runtime)
    flat: list[torch.Tensor | None] = []
    for p in (gate, up, down):
        flat += [p.weight if isinstance(p.weight, torch.Tensor) else None, p.bias, p.lora_a, p.lora_b]
    y = LoRAMLPFunction.apply(x.reshape(-1, x.shape[-1]), plan_gu, plan_down, act, recompute_hidden, *flat)
    return y.view(*x.shape[:-1], y.shape[-1])
