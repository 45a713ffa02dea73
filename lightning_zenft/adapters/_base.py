"""What adapter layers need to know about the layer they wrap: ``nn.Linear`` or GPT-2's ``Conv1D``.

``nn.Linear`` stores its weight as ``(out_features, in_features)``; ``transformers``' ``Conv1D`` stores the transpose,
``(in_features, out_features)`` (PEFT calls that layout ``fan_in_fan_out``). Everything here returns weights in the
``(out, in)`` layout so adapter math is written once.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_zenft.adapters._bnb import dequantize_4bit_weight, is_4bit


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked by class name: transformers need not be imported)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_adaptable_linear(module: nn.Module) -> bool:
    """True for the layer types adapters can wrap: ``nn.Linear`` (and subclasses) and GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(
        f"{type(module).__name__} is not a linear layer; adapters wrap torch.nn.Linear or transformers' Conv1D."
    )


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a dense ``(out, in)`` tensor (a view where possible; dequantized for 4-bit layers)."""
    weight = module.weight
    dequantize = getattr(module, "dequantize_weight", None)
    if callable(dequantize):
        weight = dequantize()
    elif is_4bit(module):  # a bitsandbytes Linear4bit
        weight = dequantize_4bit_weight(module)  # (out, in)
    return weight.t() if is_conv1d(module) else weight


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` in place, with ``delta`` in ``(out, in)`` layout, in the weight's own dtype."""
    weight = module.weight
    if not weight.is_floating_point():
        raise TypeError(
            f"cannot merge into a {weight.dtype} weight of {type(module).__name__}; dequantize the base first "
            "(lightning_zenft.merging handles 4-bit bases)."
        )
    with torch.no_grad():
        weight.add_((delta.t() if is_conv1d(module) else delta).to(weight.dtype))


def scale_weight_rows(module: nn.Module, factor: torch.Tensor) -> None:
    """Multiply output row ``i`` of the weight by ``factor[i]`` in place (any layout)."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight.mul_(factor.to(module.weight.dtype).view(1, -1))
        else:
            module.weight.mul_(factor.to(module.weight.dtype).view(-1, 1))
