r"""(IA)^3: learned vectors that rescale a frozen layer's activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(arXiv:2205.05638). The method ("Infused Adapter by Inhibiting and Amplifying Inner Activations") learns one vector
per adapted layer and multiplies an activation by it, element-wise:

.. math::  \mathrm{softmax}\Big(\frac{Q (l_k \odot K)^\top}{\sqrt{d_k}}\Big) (l_v \odot V), \qquad
           (l_{ff} \odot \gamma(W_1 x)) W_2

so on the key and value projections the layer's OUTPUT is scaled, and on the feed-forward down projection its INPUT:

.. math::  y = l \odot (W x + b) \quad \text{(output scaling, } l \in \mathbb{R}^{d_{out}}\text{)}, \qquad
           y = W (l \odot x) + b \quad \text{(input scaling, ``feedforward``, } l \in \mathbb{R}^{d_{in}}\text{)}

* Only ``l`` trains: ``d_out`` (or ``d_in``) numbers per layer, about 0.01% of a model with the default targets.
* ``l`` starts at ones, so the adapted model starts exactly at the base (the paper's initialization).
* Output scaling scales the bias too (``l ⊙ (Wx + b)``: ``K`` in the paper includes the projection's bias); input
  scaling leaves the bias alone. Both fold into the weight (:meth:`IA3Linear.merge`): output scaling multiplies the
  weight's rows (and the bias), input scaling its columns.
* The vector has HF PEFT's shape, ``(d_out, 1)`` for output scaling and ``(1, d_in)`` for input scaling, and PEFT's
  name ``ia3_l``, so adapter files move between the two unchanged (GPT-2's ``Conv1D`` included).

Example::

    layer = IA3Linear(nn.Linear(64, 32), feedforward=False)
    layer.ia3_l.shape              # torch.Size([32, 1]); the output is unchanged until it trains
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters._base import is_conv1d, linear_features


class IA3Linear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` whose output (or, for a feed-forward layer, input) is scaled by ``ia3_l``.

    Args:
        base: the layer to wrap; its parameters are frozen.
        feedforward: scale the layer's input (the paper's feed-forward down projection) instead of its output.
        init_ia3_weights: start ``ia3_l`` at ones (the base model's output); False draws it from ``N(0, 1)`` as
            PEFT does with ``init_ia3_weights=False`` (for tests: the layer then changes the output at once).

    Example::

        layer = IA3Linear(nn.Linear(64, 32), feedforward=True)
        y = layer(torch.randn(4, 64))          # = base(ia3_l * x)
    """

    def __init__(self, base: nn.Module, feedforward: bool = False, init_ia3_weights: bool = True) -> None:
        super().__init__()
        if not isinstance(feedforward, bool) or not isinstance(init_ia3_weights, bool):
            raise TypeError(
                f"IA3Linear(feedforward={feedforward!r}, init_ia3_weights={init_ia3_weights!r}): both must be True or "
                "False."
            )
        self.in_features, self.out_features = linear_features(base)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.feedforward = feedforward
        self.init_ia3_weights = init_ia3_weights
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        if not init_ia3_weights:
            with torch.no_grad():
                self.ia3_l.normal_()
        self.merged = False
        self.disabled = False

    # ------------------------------------------------------------------ the wrapped layer's attributes
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads ``proj.weight`` (not a parameter of this module)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (or None), as :attr:`weight`."""
        return getattr(self.base_layer, "bias", None)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self.base_layer, name, value)  # e.g. transformers' tie_weights re-tying an adapted head
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ protocol
    def adapter_params(self) -> list[str]:
        return ["ia3_l"]

    def settings(self) -> dict[str, Any]:
        """The primitives this layer was built with, as :meth:`IA3Config.layer_kwargs` gives them."""
        return {"feedforward": self.feedforward, "init_ia3_weights": self.init_ia3_weights}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors of the adapter file (PEFT's name ``ia3_l``, PEFT's shape) and the settings recorded for it."""
        settings = self.settings()
        return {"ia3_l": self.ia3_l.detach()}, settings

    def scale(self) -> torch.Tensor:
        """``l`` as a flat vector: ``(out,)`` for output scaling, ``(in,)`` for input scaling."""
        return self.ia3_l.reshape(-1)

    def _weight_factor(self) -> torch.Tensor:
        """``l`` shaped to multiply a dense ``(out, in)`` weight: rows for output scaling, columns for input."""
        return self.scale().view(1, -1) if self.feedforward else self.scale().view(-1, 1)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``diag(l) W`` (output scaling) or ``W diag(l)`` (input scaling) for a dense ``(out, in)`` ``W``, in ``W``'s
        dtype (:class:`Mergeable`); the bias is :meth:`merged_bias`'s."""
        with torch.no_grad():
            factor = self._weight_factor().float().to(weight.device)  # (out, 1) or (1, in)
            return (weight.float() * factor).to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias of the merged layer: ``l ⊙ b`` for output scaling, ``b`` unchanged for input scaling."""
        if bias is None or self.feedforward:
            return bias
        with torch.no_grad():
            return (bias.float() * self.scale().float().to(bias.device)).to(bias.dtype)

    def merge(self) -> None:
        """Fold ``l`` into the base weight (rows, or columns for input scaling) and, for output scaling, its bias.

        The layer then runs the base alone, at the base layer's speed.
        """
        if self.merged:
            raise RuntimeError("this IA3 adapter is already merged; call unmerge() first.")
        self._rescale(self.scale().detach())
        self.merged = True

    def unmerge(self) -> None:
        """Divide ``l`` back out of the base weight (and bias): undoes :meth:`merge` up to the dtype's rounding.

        Raises:
            RuntimeError: when ``l`` has a zero entry: the weight row/column it scaled is lost; reload the base.
        """
        if not self.merged:
            raise RuntimeError("this IA3 adapter is not merged; nothing to unmerge.")
        scale = self.scale().detach()
        zeros = (scale == 0).nonzero().flatten().tolist()
        if zeros:
            raise RuntimeError(
                f"cannot unmerge this IA3 adapter: ia3_l is 0 at {zeros[:8]}, so merging zeroed those weight "
                f"{'columns' if self.feedforward else 'rows'} for good. Reload the base weights instead."
            )
        self._rescale(1.0 / scale.double())
        self.merged = False

    def _rescale(self, factor: torch.Tensor) -> None:
        """Scale the base weight's output rows and bias (input columns for input scaling) by ``factor``, in place."""
        base = self.base_layer
        weight = base.weight
        if not weight.is_floating_point():
            raise TypeError(
                f"cannot merge IA3 into a {weight.dtype} weight of {type(base).__name__}; dequantize the base first."
            )
        # Conv1D stores (in, out): its output axis is 1.
        out_axis = 1 if is_conv1d(base) else 0
        axis = 1 - out_axis if self.feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        with torch.no_grad():
            weight.copy_((weight.double() * factor.double().view(shape)).to(weight.dtype))
            bias = getattr(base, "bias", None)
            if bias is not None and not self.feedforward:
                bias.copy_((bias.double() * factor.double()).to(bias.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("a merged adapter cannot be disabled; use lightning_zenft.disable_adapters(model).")
            return self.base_layer(x)
        scale = self.scale()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # (..., in) -> (..., out)
        out = self.base_layer(x)  # (..., out)
        return (out * scale).to(out.dtype)

    def extra_repr(self) -> str:
        kind = "input" if self.feedforward else "output"
        return f"in_features={self.in_features}, out_features={self.out_features}, scales={kind}, merged={self.merged}"
