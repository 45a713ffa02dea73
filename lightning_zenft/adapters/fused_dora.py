"""DoRA layers on the fused kernel: a :class:`~lightning_zenft.adapters.DoRALinear` whose forward is
:func:`~lightning_zenft.kernels.fused_dora`, made by swapping the class (same object, parameters and state_dict).

With dropout, DoRA needs a second base product (of the input's dropped-out part), as in HF PEFT; the fused function
regenerates the mask in backward from a seed instead of keeping it.

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
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        return fused_dora(x.to(dtype), weight, a, b, m, self.scaling, bias, dropout=p, training=self.training)
