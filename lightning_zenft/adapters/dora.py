r"""DoRA: weight-decomposed low-rank adaptation.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353). The adapted weight is split into
a magnitude and a direction; LoRA updates the direction and a trainable vector ``m`` sets each output row's norm:

.. math::  W' = m \odot \frac{W + s B A}{\lVert W + s B A \rVert_{row}}

``\lVert\cdot\rVert_{row}`` is the L2 norm of each output row (the paper's column norm of ``W^T``), and ``m`` starts at
``\lVert W \rVert_{row}`` so ``W' = W`` at initialization. Following section 4.3 of the paper, the norm is treated as
a constant in backward (detached), which saves memory and changes the gradient only slightly.

With ``g = m / \lVert W + s B A \rVert_{row}`` and the dropped-out input ``x_d``, the forward computed here is

.. math::  y = W x + b + (g - 1) \odot W x_d + g \odot s B A x_d,

which equals ``W' x + b`` when dropout is off, and matches HF PEFT's DoRA numerics so adapters move between the two.

Example::

    layer = DoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    layer.lora_magnitude_vector.shape      # torch.Size([32])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_zenft.adapters._base import add_to_weight, dense_weight, scale_weight_rows
from lightning_zenft.adapters.lora import LoRAInit, LoRALinear


class DoRALinear(LoRALinear):
    """A LoRA layer with a learned per-output magnitude (see the module docstring). Same arguments as LoRALinear."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
    ) -> None:
        super().__init__(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(self.lora_A.weight.dtype))  # (out,)
        self.register_buffer("_merged_norm", None, persistent=False)

    low_rank_factors = None  # type: ignore[assignment]  # the magnitude rescales rows: not a LowRankUpdate

    def adapter_params(self) -> list[str]:
        return ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "use_dora": True}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, settings = super().export_state()
        return {**tensors, "lora_magnitude_vector": self.lora_magnitude_vector.detach()}, settings

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``m (W + s B A) / ||W + s B A||_row`` for a dense ``(out, in)`` base weight ``W``, in ``W``'s dtype."""
        with torch.no_grad():
            adapted = weight.float() + self.delta_weight().float().to(weight.device)  # (out, in)
            norm = torch.linalg.norm(adapted, dim=1)  # (out,)
            gain = self.lora_magnitude_vector.detach().float().to(weight.device) / norm  # (out,)
            return (adapted * gain[:, None]).to(weight.dtype)

    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per output row, detached, in float32 for an accurate merge."""
        with torch.no_grad():
            weight = dense_weight(self.base_layer).float() + self.delta_weight().float()  # (out, in)
            return torch.linalg.norm(weight, dim=1)  # (out,)

    def merge(self) -> None:
        """``W <- (m / ||W + s B A||) (W + s B A)``; the norm is kept so :meth:`unmerge` can invert it."""
        if self.merged:
            raise RuntimeError("this adapter is already merged; call unmerge() first.")
        norm = self.weight_norm()
        add_to_weight(self.base_layer, self.delta_weight())
        scale_weight_rows(self.base_layer, self.lora_magnitude_vector.detach().float() / norm)
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this adapter is not merged; nothing to unmerge.")
        scale_weight_rows(self.base_layer, self._merged_norm / self.lora_magnitude_vector.detach().float())
        add_to_weight(self.base_layer, -self.delta_weight())
        self._merged_norm = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("a merged adapter cannot be disabled; use lightning_zenft.disable_adapters(model).")
            if self.disabled and self.pissa_A0 is not None:  # PiSSA's base is the residual: add the original back
                return out + self._pissa_initial(x).to(out.dtype)
            return out
        dtype = self.lora_A.weight.dtype
        xd = self.lora_dropout(x.to(dtype))
        weight = dense_weight(self.base_layer).to(dtype)  # (out, in)
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach()  # (out, in)
        norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).detach()  # (out,)
        gain = self.lora_magnitude_vector / norm  # (out,)
        if isinstance(self.lora_dropout, nn.Identity):
            bias = getattr(self.base_layer, "bias", None)
            base_out = out.to(dtype) if bias is None else out.to(dtype) - bias.to(dtype)
        else:
            base_out = F.linear(xd, weight)  # (..., out)
        extra = (gain - 1) * base_out + gain * self.scaling * self.lora_B(self.lora_A(xd))
        return out + extra.to(out.dtype)
