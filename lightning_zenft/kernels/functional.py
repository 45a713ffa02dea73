"""One-line functional wrappers over the fused kernels (the names users call).

Example::

    from lightning_zenft.kernels import functional as ZF
    y = ZF.fused_lora(x, w, a, b, 2.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_zenft.kernels.dora import fused_dora
from lightning_zenft.kernels.glu import GLUActivation, glu
from lightning_zenft.kernels.lora import LoRAProjection, WeightLike, fused_lora, fused_lora_group
from lightning_zenft.kernels.mlp import fused_lora_mlp
from lightning_zenft.kernels.nf4 import NF4Weight, dequantize_nf4


def lora(
    x: torch.Tensor,
    weight: WeightLike,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """:func:`~lightning_zenft.kernels.lora.fused_lora`."""
    return fused_lora(x, weight, lora_a, lora_b, scaling, bias, dropout=dropout, training=training)


def lora_nf4(
    x: torch.Tensor,
    weight: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """:func:`~lightning_zenft.kernels.lora.fused_lora` on a 4-bit NF4 base (dequantized on the fly)."""
    return fused_lora(x, weight, lora_a, lora_b, scaling, bias, dropout=dropout, training=training)


def lora_group(
    x: torch.Tensor, projections: Sequence[LoRAProjection], training: bool = True
) -> tuple[torch.Tensor, ...]:
    """:func:`~lightning_zenft.kernels.lora.fused_lora_group`."""
    return fused_lora_group(x, projections, training)


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAProjection,
    up: LoRAProjection,
    down: LoRAProjection,
    act: GLUActivation = "silu",
    training: bool = True,
    recompute_hidden: bool = False,
) -> torch.Tensor:
    """:func:`~lightning_zenft.kernels.mlp.fused_lora_mlp`."""
    return fused_lora_mlp(x, gate, up, down, act, training, recompute_hidden)


def dora(
    x: torch.Tensor,
    weight: WeightLike,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """:func:`~lightning_zenft.kernels.dora.fused_dora`."""
    return fused_dora(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout=dropout, training=training)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (:func:`~lightning_zenft.kernels.glu.glu`)."""
    return glu(g, u, "silu")


def geglu(g: torch.Tensor, u: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(g) * u``, tanh-approximated by default (:func:`~lightning_zenft.kernels.glu.glu`)."""
    return glu(g, u, "gelu_tanh" if approximate == "tanh" else "gelu")


def nf4_dequantize(weight: NF4Weight) -> torch.Tensor:
    """:func:`~lightning_zenft.kernels.nf4.dequantize_nf4`, shaped ``(out, in)``."""
    return dequantize_nf4(weight).view(weight.shape)
