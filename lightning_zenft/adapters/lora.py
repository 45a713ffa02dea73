r"""LoRA: low-rank adaptation of a frozen linear layer.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685):

.. math::  y = W x + b + s \, B A \, \mathrm{dropout}(x), \qquad A \in \mathbb{R}^{r \times d_{in}},
           B \in \mathbb{R}^{d_{out} \times r}

* ``W, b`` are the frozen base weight and bias; only ``A`` and ``B`` train.
* ``s = alpha / r`` (Hu et al.), or ``s = alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732),
  which keeps the update's scale stable as ``r`` grows.
* Initialization, chosen so the model starts exactly at the base (``B A = 0``):
  ``"kaiming"`` draws ``A`` from Kaiming-uniform with ``a = sqrt(5)`` (the ``nn.Linear`` default) and sets ``B = 0``;
  ``"gaussian"`` draws ``A ~ N(0, 1/r^2)`` and sets ``B = 0``.
* ``"pissa"`` (Meng et al. 2024, arXiv:2404.02948) starts from the principal singular directions instead:
  with ``W = U S V^T``, ``B = U_r \sqrt{S_r / s}``, ``A = \sqrt{S_r / s} V_r^T`` and the base becomes the residual
  ``W - s B A``. The output is unchanged at initialization but training moves the top directions first. A PiSSA
  adapter describes a change relative to the *residual* base; :func:`lightning_zenft.save_adapter` converts it to a
  plain LoRA of rank ``2r`` relative to the original base, so the file works on the unmodified model.

Example::

    layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    y = layer(torch.randn(4, 64))          # equals the base output until B has trained
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from lightning_zenft.adapters._base import add_to_weight, dense_weight, linear_features

LoRAInit = Literal["kaiming", "gaussian", "pissa", "loftq"]


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` plus a trainable low-rank update ``s * B A``.

    Args:
        base: the layer to wrap; its parameters are frozen.
        r: the rank of the update.
        alpha: the scale numerator (``s = alpha / r``).
        dropout: dropout probability on the adapter's input (the base path sees the undropped input).
        use_rslora: scale by ``alpha / sqrt(r)`` instead.
        init: ``"kaiming"``, ``"gaussian"`` or ``"pissa"`` (see the module docstring).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be a positive integer.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout={dropout} must be in [0, 1).")
        self.in_features, self.out_features = linear_features(base)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        device = weight.device
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.init = init
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.disabled = False
        # PiSSA's initial factors, kept (not saved) to express the adapter relative to the original base.
        self.register_buffer("pissa_A0", None, persistent=False)
        self.register_buffer("pissa_B0", None, persistent=False)
        self.reset_adapter_parameters()

    # ------------------------------------------------------------------ the wrapped layer's attributes
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads ``proj.weight`` (T5 reads its dtype), as in HF PEFT.

        Not a parameter of this module: ``state_dict`` keeps it under ``base_layer.weight``.
        """
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (or None), as :attr:`weight`."""
        return getattr(self.base_layer, "bias", None)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self.base_layer, name, value)  # e.g. transformers' tie_weights re-tying a LoRA output head
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ protocol
    def adapter_params(self) -> list[str]:
        return ["lora_A.weight", "lora_B.weight"]

    def settings(self) -> dict[str, Any]:
        """The primitives this layer was built with, as :meth:`LoRAConfig.layer_kwargs` gives them."""
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": float(dropout),
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "init": self.init,
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors of the adapter file (PEFT's names, relative to this layer) and the settings recorded for it.

        Relative to the ORIGINAL base weight: a PiSSA layer's base holds ``W - s B0 A0``, so relative to ``W`` its
        update is ``s (B A - B0 A0)``, a rank-``2r`` LoRA ``[B, -B0] [A; A0]`` with the same scaling (``alpha`` is
        rescaled for the doubled rank, with rsLoRA's square root where it applies).
        """
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        r, alpha = self.r, self.alpha
        if self.pissa_A0 is not None:
            a = torch.cat([a, self.pissa_A0], dim=0)  # (2r, in)
            b = torch.cat([b, -self.pissa_B0], dim=1)  # (out, 2r)
            r = 2 * self.r
            alpha = self.scaling * (math.sqrt(r) if self.use_rslora else r)
        # the arguments that rebuild this update on the original base: PiSSA's base rewrite is already in the factors
        init = "kaiming" if self.init == "pissa" else self.init
        settings = {**self.settings(), "r": r, "alpha": alpha, "init": init}
        return {"lora_A.weight": a, "lora_B.weight": b}, settings

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)``: the layer computes ``base(x) + s B A dropout(x)`` (:class:`LowRankUpdate`)."""
        return self.lora_A.weight, self.lora_B.weight, self.scaling

    @property
    def modifies_base(self) -> bool:
        """True once PiSSA rewrote the base weight to its residual (other adapters cannot share that base)."""
        return self.pissa_A0 is not None

    def delta_weight(self) -> torch.Tensor:
        """The update ``s * B A`` as an ``(out, in)`` matrix."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s B A`` for a dense ``(out, in)`` base weight ``W``, in ``W``'s dtype (:class:`Mergeable`)."""
        with torch.no_grad():
            return (weight.float() + self.delta_weight().float().to(weight.device)).to(weight.dtype)

    def merge(self) -> None:
        """``W <- W + s B A``. The layer then runs the base alone, at the base layer's speed."""
        if self.merged:
            raise RuntimeError("this adapter is already merged; call unmerge() first.")
        add_to_weight(self.base_layer, self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """``W <- W - s B A``: undoes :meth:`merge` (up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("this adapter is not merged; nothing to unmerge.")
        add_to_weight(self.base_layer, -self.delta_weight())
        self.merged = False

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """(Re)initialize ``A`` and ``B`` as ``self.init`` says; PiSSA also rewrites the base weight once."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif self.init == "pissa":
            self._pissa_init()
        elif self.init == "loftq":
            # QLoRA's start until LoftQ runs: LoftQ needs the 4-bit quantizer, so precision.apply_loftq sets A, B and
            # the 4-bit base (the LoRA callback calls it at setup; NF4Precision refuses a layer it missed).
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        else:
            raise ValueError(f"init={self.init!r} is not one of 'kaiming', 'gaussian', 'pissa', 'loftq'.")

    def _pissa_init(self) -> None:
        if self.pissa_A0 is not None:
            raise RuntimeError("PiSSA init already rewrote this layer's base weight; it cannot run twice.")
        weight = dense_weight(self.base_layer).float()  # (out, in)
        if self.r > min(weight.shape):
            raise ValueError(f"PiSSA rank r={self.r} exceeds min(out, in)={min(weight.shape)} of this layer.")
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scaling)  # (r,)
        b0 = u[:, : self.r] * root  # (out, r)
        a0 = root[:, None] * vh[: self.r]  # (r, in)
        self.lora_A.weight.copy_(a0)
        self.lora_B.weight.copy_(b0)
        add_to_weight(self.base_layer, -self.scaling * (b0 @ a0))
        self.pissa_A0 = self.lora_A.weight.detach().clone()
        self.pissa_B0 = self.lora_B.weight.detach().clone()

    # ------------------------------------------------------------------ forward
    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A dropout(x)`` in the adapter's dtype."""
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x)) * self.scaling  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("a merged adapter cannot be disabled; use lightning_zenft.disable_adapters(model).")
            if self.disabled and self.pissa_A0 is not None:  # PiSSA's base is the residual: add the original back
                return out + self._pissa_initial(x).to(out.dtype)
            return out
        return out + self.lora_forward(x).to(out.dtype)

    def _pissa_initial(self, x: torch.Tensor) -> torch.Tensor:
        """``s B0 A0 x``: what PiSSA took out of the base weight (the base alone is ``W - s B0 A0``)."""
        xa = torch.nn.functional.linear(x.to(self.pissa_A0.dtype), self.pissa_A0)  # (..., r)
        return torch.nn.functional.linear(xa, self.pissa_B0) * self.scaling  # (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, init={self.init!r}, merged={self.merged}"
        )
