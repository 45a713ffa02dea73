"""Adapters merged into the weights of a model in memory, 4-bit bases included.

:func:`merge_and_unload` folds every mergeable adapter into its base layer and puts the base layer back in the
adapter's place, so the model is a plain model again (``save_pretrained`` writes it as one). Dense bases merge
exactly as ``layer.merge()`` does. A 4-bit base (bitsandbytes ``Linear4bit``) is dequantized and either replaced by a
dense ``nn.Linear`` holding ``merged_weight(W)`` (``quantized="dequantize"``; the other 4-bit layers are dequantized
too, so nothing quantized is left) or requantized with its own settings (``quantized="requantize"``; the error of
each layer is returned).

:func:`adapted_weight` is the per-layer step both this and the streaming export use: the merged dense weight of an
adapter layer, in its base layer's storage layout.

Example::

    errors = merge_and_unload(model, quantized="requantize")     # {layer name: QuantizationError}
    model.save_pretrained("merged-4bit")
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_zenft.adapters import Mergeable, find_adapters
from lightning_zenft.adapters._base import dense_weight, is_conv1d
from lightning_zenft.adapters._bnb import dense_dtype, is_4bit
from lightning_zenft.merging.quantized import QuantizationError, dense_copy, merge_into_4bit, scales_bias

Quantized = Literal["dequantize", "requantize"]


def _check_mergeable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = list(find_adapters(model))
    unmergeable = sorted({type(layer).__name__ for _, layer in layers if not isinstance(layer, Mergeable)})
    if unmergeable:
        raise TypeError(
            f"{', '.join(unmergeable)} adapters cannot be merged into the base weights (they add computation that no "
            "weight change expresses); save them with save_adapter and serve them as modules."
        )
    return layers  # type: ignore[return-value]


def _check_quantized(quantized: str) -> None:
    if quantized not in ("dequantize", "requantize"):
        raise ValueError(f"quantized={quantized!r} must be 'dequantize' (dense output) or 'requantize' (4-bit output).")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def base_dense_weight(base: nn.Module) -> torch.Tensor:
    """A base layer's dense ``(out, in)`` weight: dequantized for 4-bit layers, transposed for ``Conv1D``."""
    return dense_weight(base)


def adapted_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The merged weight of an (unmerged) adapter layer in its base's storage layout (``(in, out)`` for ``Conv1D``).

    Computed in float32 from the (dequantized) base weight, returned in ``dtype`` (default: the base weight's dtype,
    or the dtype a 4-bit base dequantizes to).
    """
    if not isinstance(layer, Mergeable):
        raise TypeError(f"{type(layer).__name__} is not a mergeable adapter.")
    if layer.merged:
        raise RuntimeError("this adapter is merged into its base already; its base weight is the adapted weight.")
    base = layer.base_layer  # type: ignore[attr-defined]
    weight = base_dense_weight(base)  # (out, in)
    merged = layer.merged_weight(weight.float()).to(dtype or weight.dtype)  # (out, in)
    return merged.t() if is_conv1d(base) else merged


def merge_and_unload(
    model: nn.Module, quantized: Quantized = "dequantize", dtype: torch.dtype | None = None
) -> dict[str, QuantizationError]:
    """Merge every adapter of ``model`` into its base layer and put the base layers back; returns 4-bit errors.

    Args:
        model: any module holding mergeable adapter layers (in place).
        quantized: for 4-bit bases, ``"dequantize"`` (dense ``nn.Linear`` layers in ``dtype``, every other 4-bit layer
            of the model dequantized too) or ``"requantize"`` (merged into the 4-bit weights; lossy).
        dtype: the dtype of dequantized layers (default: the dtype each 4-bit weight had before quantization).

    Returns:
        Layer name -> :class:`QuantizationError` of each requantized layer (empty for dense bases).

    Raises:
        TypeError: when the model holds adapters that cannot be merged (nothing is changed then).
    """
    _check_quantized(quantized)
    errors: dict[str, QuantizationError] = {}
    for name, layer in _check_mergeable(model):
        base = layer.base_layer  # type: ignore[attr-defined]
        if is_4bit(base) and quantized == "dequantize":
            weight = base_dense_weight(base) if layer.merged else layer.merged_weight(base_dense_weight(base).float())
            bias = layer.merged_bias(base.bias.detach()) if scales_bias(layer) else None
            base = dense_copy(base, weight, dtype or dense_dtype(base), bias=bias)
        elif is_4bit(base):
            if not layer.merged:
                errors[name] = merge_into_4bit(layer)
        elif not layer.merged:
            layer.merge()  # type: ignore[attr-defined]
        _set_submodule(model, name, base)
    if quantized == "dequantize":
        for name, module in list(model.named_modules()):
            if is_4bit(module):
                _set_submodule(model, name, dense_copy(module, dtype=dtype))
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # a transformers model loaded in 4-bit is a dense model now
            for attr in ("is_quantized", "is_loaded_in_4bit"):
                if getattr(model, attr, False):
                    setattr(model, attr, False)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
    return errors
