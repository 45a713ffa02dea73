"""What adapters that wrap a whole sublayer or block (bottleneck, parallel, LoReFT) need to know about it: its widths,
its parameters' dtype and device, and the shape of what it returns.

In ``transformers`` an attention module returns a tuple ``(output, attention_weights)``, a feed-forward module and
(since 5.0) a decoder block a tensor; older blocks return ``(hidden_states, ...)``. Adapters change the hidden states
only: the first element of a tuple, or the tensor.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lightning_zenft.adapters._base import is_adaptable_linear, linear_features

Rest = tuple[object, ...] | None
"""What a module returned besides its hidden states (None: it returned a tensor)."""


def split_output(output: object, owner: str) -> tuple[torch.Tensor, Rest]:
    """``(hidden_states, rest)`` of a module's output: a tensor, or a tuple whose first element is the hidden states.

    Raises:
        TypeError: for any other output, naming ``owner`` (the adapter class) and what it got.
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], output[1:]
    raise TypeError(
        f"{owner} adapts modules that return a tensor or a tuple starting with one (hidden states), but the wrapped "
        f"module returned a {type(output).__name__}; target modules of another kind."
    )


def join_output(hidden: torch.Tensor, rest: Rest) -> torch.Tensor | tuple[object, ...]:
    """The inverse of :func:`split_output`."""
    return hidden if rest is None else (hidden, *rest)


def module_widths(module: nn.Module, owner: str) -> tuple[int, int]:
    """``(input width, output width)`` of an attention/feed-forward module or block: the input width of its first
    linear layer and the output width of its last (in registration order: q..o, gate/up..down, c_fc..c_proj).

    Raises:
        ValueError: when ``module`` holds no linear layer to read them from.
    """
    linears = [m for m in module.modules() if is_adaptable_linear(m)]
    if not linears:
        raise ValueError(
            f"{owner} reads the widths of the module it wraps from its linear layers, but this "
            f"{type(module).__name__} holds none; target attention or feed-forward modules (or blocks) of a "
            "transformer."
        )
    return linear_features(linears[0])[0], linear_features(linears[-1])[1]


def float_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the module's first floating-point parameter (float32 on CPU if it has none, e.g. a
    fully quantized module): what the adapter's own parameters are made in."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return torch.float32, device


def first_argument_name(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module.forward`` (where its input is when passed by keyword)."""
    params = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[0].name if params else None
