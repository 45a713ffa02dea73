r"""Bottleneck adapters: serial (Houlsby et al.) and parallel (He et al.), on whole attention and feed-forward modules.

Serial, Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751): after a sublayer
``f`` (attention, or the feed-forward network), before the residual add,

.. math::  y = h + W_{up}\, \mathrm{act}(W_{down} h + b_{down}) + b_{up}, \qquad h = f(x),
           W_{down} \in \mathbb{R}^{m \times d}, \; W_{up} \in \mathbb{R}^{d \times m}

Parallel, He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (arXiv:2110.04366): beside
the sublayer, reading its input ``x``, with a scale ``s``,

.. math::  y = f(x) + s \, \big(W_{up}\, \mathrm{act}(W_{down} x + b_{down}) + b_{up}\big)

* ``m = d / reduction_factor`` (the factor must divide ``d``; nothing is rounded) or an explicit ``bottleneck_size``;
  ``d`` is the module's output width (its last linear layer's). The default factor 16 keeps an adapter near
  ``2 d^2 / 16`` parameters; He et al.'s MAM used ``m = 512`` for ``d = 1024`` (``reduction_factor=2``).
* Initialization: ``W_down`` Kaiming-uniform (``nn.Linear``'s default), ``W_up``, ``b_down`` and ``b_up`` zero, so the
  adapted model starts exactly at the base (Houlsby et al.'s "near-identity" start, made exact).
* Non-linearity: GELU for the serial adapter (the activation of the released adapter-BERT code), ReLU for the
  parallel one (He et al.); ``s = 4`` (their scaled parallel adapter). Dropout, when set, acts on the activations.
* Where: on the output of the module the target names. In pre-norm decoders (Llama, Mistral, Qwen2, Gemma, Phi,
  GPT-2) the attention and MLP modules return their output before the block adds the residual, which is Houlsby et
  al.'s position. Houlsby et al. also train the layer norms: ``trainable_norms=True`` does.
* Not mergeable: ``act`` makes the change non-linear in the input, so no change of the base weights expresses it.
  These modules have no ``merge``; ``merge_adapters`` and ``unload_adapters(merge=True)`` refuse them.

Example::

    layer = BottleneckAdapterLayer(model.model.layers[0].mlp, reduction_factor=8)
    y = layer(x)                               # equals the base output until W_up has trained
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters._sublayer import (
    first_argument_name,
    float_dtype_device,
    join_output,
    module_widths,
    split_output,
)

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_REDUCTION_FACTOR = 16.0


def bottleneck_width(width: int, reduction_factor: float | None, bottleneck_size: int | None, owner: str) -> int:
    """``bottleneck_size``, or ``width / reduction_factor`` when that is a whole number (16 when neither is given)."""
    if bottleneck_size is not None:
        if reduction_factor is not None:
            raise ValueError(
                f"{owner}: reduction_factor={reduction_factor} and bottleneck_size={bottleneck_size} both set the "
                "bottleneck size; give one."
            )
        if bottleneck_size < 1:
            raise ValueError(f"{owner}: bottleneck_size={bottleneck_size} must be a positive integer.")
        return int(bottleneck_size)
    factor = DEFAULT_REDUCTION_FACTOR if reduction_factor is None else float(reduction_factor)
    size = width / factor if factor > 0 else 0.0
    if size < 1 or size != math.floor(size):
        raise ValueError(
            f"{owner}: reduction_factor={factor:g} does not divide the module's width {width} into a whole bottleneck "
            f"size ({width} / {factor:g} = {size:g}); give a factor that does, or bottleneck_size="
            f"{max(1, math.floor(size))}."
        )
    return int(size)


class _Bottleneck(nn.Module):
    """What both adapters share: the wrapped module, ``down -> act -> dropout -> up``, settings and export."""

    def __init__(
        self,
        base: nn.Module,
        *,
        reads_input: bool,
        reduction_factor: float | None,
        bottleneck_size: int | None,
        non_linearity: str,
        dropout: float,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"{owner}: non_linearity={non_linearity!r} must be one of {sorted(ACTIVATIONS)}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout={dropout} must be in [0, 1).")
        in_width, self.out_features = module_widths(base, owner)
        self.in_features = in_width if reads_input else self.out_features
        self.bottleneck_size = bottleneck_width(self.out_features, reduction_factor, bottleneck_size, owner)
        self.reduction_factor = reduction_factor
        self.given_bottleneck_size = bottleneck_size
        self.non_linearity = non_linearity
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        dtype, device = float_dtype_device(base)
        self.adapter_down = nn.Linear(self.in_features, self.bottleneck_size, device=device, dtype=dtype)
        self.adapter_act = ACTIVATIONS[non_linearity]()
        self.adapter_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_up = nn.Linear(self.bottleneck_size, self.out_features, device=device, dtype=dtype)
        self.disabled = False
        self._input_name = first_argument_name(base)
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """``W_down`` Kaiming-uniform, the rest zero: the adapter's output is exactly zero until it trains."""
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    # ------------------------------------------------------------------ protocol
    def adapter_params(self) -> list[str]:
        return ["adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"]

    def settings(self) -> dict[str, Any]:
        """The primitives this module was built with (``build(base, **settings())`` rebuilds it)."""
        dropout = self.adapter_dropout.p if isinstance(self.adapter_dropout, nn.Dropout) else 0.0
        return {
            "reduction_factor": self.reduction_factor,
            "bottleneck_size": self.given_bottleneck_size,
            "non_linearity": self.non_linearity,
            "dropout": float(dropout),
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors of the adapter file (relative to this module) and the settings recorded for it."""
        return {name: self.get_parameter(name).detach() for name in self.adapter_params()}, self.settings()

    # ------------------------------------------------------------------ forward
    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``up(dropout(act(down(x))))`` in the adapter's dtype."""
        z = self.adapter_act(self.adapter_down(x.to(self.adapter_down.weight.dtype)))  # (..., m)
        return self.adapter_up(self.adapter_dropout(z))  # (..., d)

    def _hidden(self, output: object) -> tuple[torch.Tensor, Any]:
        hidden, rest = split_output(output, type(self).__name__)
        if hidden.shape[-1] != self.out_features:
            raise RuntimeError(
                f"{type(self).__name__} was built for outputs of width {self.out_features} (the last linear layer of "
                f"{type(self.base_layer).__name__}), but the module returned width {hidden.shape[-1]}."
            )
        return hidden, rest

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bottleneck_size={self.bottleneck_size}, non_linearity={self.non_linearity!r}"
        )


class BottleneckAdapterLayer(_Bottleneck):
    """A frozen attention or feed-forward module followed by a serial bottleneck adapter: ``h + up(act(down(h)))``.

    Args:
        base: the module to wrap (its parameters are frozen); it returns a tensor or a tuple ``(output, ...)``.
        reduction_factor: bottleneck size = output width / this (must divide it); None: 16 unless
            ``bottleneck_size`` is given.
        bottleneck_size: the bottleneck size itself.
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the bottleneck's activations.

    Example::

        mlp = BottleneckAdapterLayer(model.model.layers[0].mlp, bottleneck_size=8)
    """

    def __init__(
        self,
        base: nn.Module,
        reduction_factor: float | None = None,
        bottleneck_size: int | None = None,
        non_linearity: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            base,
            reads_input=False,
            reduction_factor=reduction_factor,
            bottleneck_size=bottleneck_size,
            non_linearity=non_linearity,
            dropout=dropout,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.disabled:
            return output
        hidden, rest = self._hidden(output)  # (..., d)
        return join_output(hidden + self.bottleneck(hidden).to(hidden.dtype), rest)


class ParallelAdapterLayer(_Bottleneck):
    """A frozen attention or feed-forward module ``f`` with a parallel adapter: ``f(x) + s * up(act(down(x)))``.

    Args:
        base: the module to wrap (its parameters are frozen); its input ``x`` is its first argument (positional, or
            by its name, e.g. ``hidden_states``).
        reduction_factor: bottleneck size = output width / this (must divide it); None: 16 unless
            ``bottleneck_size`` is given.
        bottleneck_size: the bottleneck size itself.
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the bottleneck's activations.
        scaling: the scale ``s`` of the adapter's output.

    Example::

        mlp = ParallelAdapterLayer(model.model.layers[0].mlp, bottleneck_size=16, scaling=4.0)
    """

    def __init__(
        self,
        base: nn.Module,
        reduction_factor: float | None = None,
        bottleneck_size: int | None = None,
        non_linearity: str = "relu",
        dropout: float = 0.0,
        scaling: float = 4.0,
    ) -> None:
        super().__init__(
            base,
            reads_input=True,
            reduction_factor=reduction_factor,
            bottleneck_size=bottleneck_size,
            non_linearity=non_linearity,
            dropout=dropout,
        )
        self.scaling = float(scaling)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "scaling": self.scaling}

    def _input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x = args[0] if args else kwargs.get(self._input_name) if self._input_name else None
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"ParallelAdapterLayer reads the input of {type(self.base_layer).__name__} from its first argument "
                f"({self._input_name!r}), but the call passed none (arguments: {sorted(kwargs)})."
            )
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        x = self._input(args, kwargs)  # (..., d_in)
        hidden, rest = self._hidden(self.base_layer(*args, **kwargs))  # (..., d)
        return join_output(hidden + (self.scaling * self.bottleneck(x)).to(hidden.dtype), rest)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling:g}"


__all__ = ["ACTIVATIONS", "BottleneckAdapterLayer", "ParallelAdapterLayer", "bottleneck_width"]
