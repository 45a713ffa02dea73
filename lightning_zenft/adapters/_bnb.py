"""bitsandbytes 4-bit layers as adapters and merging see them: detection, and the dense weight they compute with.

bitsandbytes is imported only when a 4-bit layer is met; a missing one says what to install.

Example::

    if is_4bit(layer):
        w = dequantize_4bit_weight(layer)     # (out, in), in the dtype it had before quantization
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as functional
    except ImportError as err:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError(
            "this 4-bit layer needs bitsandbytes to be read: pip install bitsandbytes (or lightning_zenft[bnb])."
        ) from err
    return functional


def is_4bit(module: nn.Module) -> bool:
    """True for a layer whose weight is a quantized bitsandbytes ``Params4bit`` (checked without importing bnb)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def _packed_state(module: nn.Module) -> tuple[torch.Tensor, Any]:
    """The layer's codes and quant state in bitsandbytes' standard layout, the module left untouched.

    bitsandbytes may repack a CPU layer's weight for its AVX512-BF16 kernel at an eval forward; its inverse runs here on
    copies.
    """
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        functional = _bnb_functional()
        return functional._convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
    return weight.data, state


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer's weight dequantizes to (the one it had before quantization)."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # the CPU repacking records the original apart
        return state.original_dtype
    return state.dtype


def dequantize_4bit_weight(module: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a 4-bit layer, in the dtype it had before quantization."""
    if not is_4bit(module):
        raise TypeError(f"{type(module).__name__} has no quantized Params4bit weight to dequantize.")
    data, state = _packed_state(module)
    return _bnb_functional().dequantize_4bit(data, state)  # (out, in)
