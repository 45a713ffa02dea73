"""DoRA layers on the fused kernel: a :class:`~lightning_zenft.adapters.DoRALinear` whose forward is
:func:`~lightning_zenft.kernels.fused_dora`, made by swapping the class (same object, parameters and state_dict).

Only DoRA without dropout is fused: with dropout, DoRA needs the base product of both the input and the dropped-out
input, and the layer keeps its own forward (:func:`~lightning_zenft.adapters.fused.fuse_lora_layers` says so).

Example::

    fuse_lora_layers(model)                  # DoRALinear layers become FusedDoRALinear
    isinstance(model.q_proj, DoRALinear)     # still True
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_zenft.adapters._fused_weights import compute_dtype, kernel_weight
from lightning_zenft.adapters.dora import DoRALinear
from lightning_zenft.kernels.dora import fused_dora


class FusedDoRALinear(DoRALinear):
    """A :class:`DoRALinear` whose forward runs the fused DoRA kernel. Made by ``fuse_lora_layers``, never built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return super().forward(x)
        dtype = compute_dtype(x)
        weight = kernel_weight(self.base_layer, dtype)
        bias = getattr(self.base_layer, "bias", None)
        return fused_dora(
            x.to(dtype), weight, self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector, self.scaling, bias
        )


def dora_unfusable_reason(layer: DoRALinear) -> str | None:
    """Why a DoRA layer keeps its own forward, or None when it can be fused."""
    dropout = layer.lora_dropout
    if isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0):
        return None
    return (
        "it is a DoRA layer with dropout, which needs the base product of both the input and the dropped-out input "
        "(the fused DoRA kernel takes dropout 0)"
    )
