r"""Adapters merged into 4-bit (bitsandbytes ``Linear4bit``) base layers: dequantize, merge, requantize.

A 4-bit weight cannot absorb an update in place: its codes index a 16-value table scaled per block of ``blocksize``
entries by the block's absolute maximum. Merging therefore dequantizes the base to ``W`` (what the adapted layer
computed with), forms the adapted weight ``W' = layer.merged_weight(W)`` in float32, and either keeps ``W'`` dense
(bf16/fp32 export) or quantizes it again with the layer's own settings (quant type, block size, double quantization,
storage dtype). Requantization rounds every entry to the nearest code of its block, so each entry moves by at most
half the widest gap of the code table times the block's absmax (NF4's widest gap, 0.7230 -> 1.0, gives
``0.139 * absmax``); :class:`QuantizationError` reports the error actually made, against ``W'``.

Works on any ``bitsandbytes.nn.Linear4bit`` (a ``Params4bit`` weight with its ``quant_state``), on CPU too, whoever
quantized it; bitsandbytes is imported only when a 4-bit layer is met.

Example::

    error = merge_into_4bit(model.model.layers[0].self_attn.q_proj)    # a LoRA layer over a Linear4bit
    print(error.max_abs, error.relative)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters import Mergeable, Wrapping
from lightning_zenft.adapters._bnb import _bnb_functional, _packed_state, dequantize_4bit_weight, is_4bit


@dataclass(frozen=True)
class QuantizationError:
    """How far the requantized weight is from the merged weight ``W'`` it stands for (float32)."""

    max_abs: float
    """``max |deq(Q(W')) - W'|``."""
    relative: float
    """``||deq(Q(W')) - W'||_F / ||W'||_F``."""
    numel: int


def quantize_like(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``weight`` quantized with ``module``'s 4-bit settings: ``(codes, quant_state)``; the state keeps the dtype
    the module's weight dequantizes to."""
    current = module.weight
    _, state = _packed_state(module)
    codes, new_state = _bnb_functional().quantize_4bit(
        weight.float().contiguous(),
        blocksize=current.blocksize,
        compress_statistics=current.compress_statistics,
        quant_type=current.quant_type,
        quant_storage=current.quant_storage,
    )
    new_state.dtype = state.dtype
    return codes, new_state


def quantization_error(codes: torch.Tensor, state: Any, target: torch.Tensor) -> QuantizationError:
    """The error of ``(codes, state)`` against the float32 weight ``target`` it quantizes."""
    restored = _bnb_functional().dequantize_4bit(codes, state).float()  # (out, in)
    target = target.float()
    diff = restored - target
    norm = torch.linalg.norm(target)
    return QuantizationError(
        max_abs=float(diff.abs().max()) if diff.numel() else 0.0,
        relative=float(torch.linalg.norm(diff) / norm) if norm > 0 else 0.0,
        numel=target.numel(),
    )


def requantize_(module: nn.Module, weight: torch.Tensor) -> QuantizationError:
    """Replace ``module``'s 4-bit weight by ``weight`` (dense ``(out, in)``) quantized with the same settings."""
    from bitsandbytes.nn import Params4bit

    current = module.weight
    if tuple(weight.shape) != tuple(state_shape(module)):
        raise ValueError(f"cannot requantize a {tuple(weight.shape)} weight into a {state_shape(module)} layer.")
    codes, state = quantize_like(module, weight)
    error = quantization_error(codes, state, weight)
    module.weight = Params4bit(
        codes,
        requires_grad=False,
        quant_state=state,
        blocksize=current.blocksize,
        compress_statistics=current.compress_statistics,
        quant_type=current.quant_type,
        quant_storage=current.quant_storage,
        module=module,
        bnb_quantized=True,
    )
    if hasattr(module, "quant_state"):
        module.quant_state = state
    return error


def state_shape(module: nn.Module) -> tuple[int, int]:
    """The dense ``(out, in)`` shape of a 4-bit layer."""
    return tuple(int(n) for n in module.weight.quant_state.shape)  # type: ignore[return-value]


def scales_bias(layer: nn.Module) -> bool:
    """Whether merging ``layer`` changes its base's bias (``merged_bias``: IA3's output scaling), not done yet."""
    bias = getattr(layer.base_layer, "bias", None)
    return callable(getattr(layer, "merged_bias", None)) and not layer.merged and bias is not None


def merge_into_4bit(layer: nn.Module) -> QuantizationError:
    """Merge a mergeable adapter layer into its 4-bit base layer in place; returns the requantization error.

    ``W' = layer.merged_weight(dequantize(base))`` in float32, quantized back into ``layer.base_layer`` with its own
    settings; the layer is then marked merged (it computes the base alone). Requantization is lossy, so this merge
    cannot be undone: drop the adapter layer afterwards (``lightning_zenft.unload_adapters(model, merge=True)``, or
    :func:`~lightning_zenft.merging.merge_and_unload`, which does both).

    Raises:
        TypeError: when ``layer`` is not a mergeable wrapping adapter, or its base is not a 4-bit layer.
        RuntimeError: when it is already merged.
    """
    if not (isinstance(layer, Mergeable) and isinstance(layer, Wrapping)):
        raise TypeError(f"{type(layer).__name__} is not a mergeable adapter layer wrapping a base layer.")
    if not is_4bit(layer.base_layer):
        raise TypeError(
            f"the base of this {type(layer).__name__} is a {type(layer.base_layer).__name__}, not a 4-bit layer; "
            "call layer.merge() for dense bases."
        )
    if layer.merged:
        raise RuntimeError("this adapter is already merged into its 4-bit base.")
    merged = layer.merged_weight(dequantize_4bit_weight(layer.base_layer).float())  # (out, in)
    scale_bias = scales_bias(layer)  # IA3's output scaling scales the bias too
    error = requantize_(layer.base_layer, merged)
    if scale_bias:
        bias = layer.base_layer.bias
        with torch.no_grad():
            bias.copy_(layer.merged_bias(bias.detach().clone()))
    layer.merged = True
    return error


def dense_copy(
    module: nn.Module,
    weight: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> nn.Linear:
    """An ``nn.Linear`` with ``module``'s (dequantized) weight, or ``weight`` when given, and its bias (or ``bias``)."""
    weight = dequantize_4bit_weight(module) if weight is None else weight
    dtype = dtype or weight.dtype
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None) if bias is None else bias
    linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear
