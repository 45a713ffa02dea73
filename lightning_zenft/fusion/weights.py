"""How fused kernels read a wrapped layer's frozen base: its weight in a form the kernels take, and the compute dtype.

Example::

    weight = kernel_weight(layer.base_layer, torch.bfloat16)   # dense (out, in), NF4, or a dequantizer
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lightning_zenft.adapters._base import is_conv1d
from lightning_zenft.kernels.lora import CallableWeight, WeightLike
from lightning_zenft.kernels.nf4 import NF4Weight
from lightning_zenft.kernels.runtime import KernelRuntime


def base_weight(base: nn.Module, runtime: KernelRuntime | None = None) -> WeightLike | None:
    """The frozen base weight as the kernels take it: an ``(out, in)`` tensor, an NF4 weight, or a dequantizer.

    Returns None when the layer's weight is in a form the kernels cannot read. An NF4 weight dequantizes into
    ``runtime``'s buffer.
    """
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    nf4 = getattr(base, "nf4_weight", None)
    if callable(nf4):
        return nf4()
    if type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        if weight.quant_state.quant_type == "nf4":
            return NF4Weight.from_bnb(weight, runtime=runtime)
    dequantize = getattr(base, "dequantize_weight", None)
    if callable(dequantize):
        out_f = getattr(base, "out_features", None)
        in_f = getattr(base, "in_features", None)
        if out_f is None or in_f is None:
            return None
        return CallableWeight(dequantize, (int(out_f), int(in_f)))
    if not weight.is_floating_point():
        return None
    return weight.t() if is_conv1d(base) else weight


def kernel_weight(base: nn.Module, dtype: torch.dtype, runtime: KernelRuntime | None = None) -> WeightLike:
    """:func:`base_weight` in ``dtype`` (as autocast would cast it for ``F.linear``); an error if it cannot be read."""
    weight = base_weight(base, runtime)
    if weight is None:
        raise RuntimeError(
            f"{type(base).__name__}'s weight can no longer be read by the fused kernel; "
            "call lightning_zenft.fusion.unfuse_lora_layers(model) before changing the base layer."
        )
    if isinstance(weight, torch.Tensor) and weight.dtype != dtype:
        return weight.to(dtype)  # (out, in)
    if isinstance(weight, NF4Weight) and weight.dtype != dtype:
        return dataclasses.replace(weight, dtype=dtype)
    return weight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input ``x``: autocast's when it is on, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
