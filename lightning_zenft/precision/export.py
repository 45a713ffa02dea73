"""The base model an adapter trained on a 4-bit base belongs to, written where PEFT can load it.

An adapter trained with QLoRA from a zero ``B`` also works on the original full-precision base (it was trained to
correct ``W``'s quantization only indirectly). A LoftQ adapter does not: its ``A``, ``B`` start at the SVD of ``W - Q``
and make sense only on top of ``Q``. So the base is part of the export: :func:`save_base` writes the model without its
adapters, each 4-bit weight dequantized (``dequant(Q)``, the values the 4-bit layers compute with), with
``save_pretrained``; then::

    save_adapter(module.model, "out/adapter")
    save_base(module.model, "out/base")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/base"), "out/adapter")

gives the trained model's outputs. With ``mode="nf4"`` (no double quantization) and ``dtype=torch.float32``,
quantizing ``out/base`` to NF4 again with the same block size gives back each ``Q``'s codes and scales; from bf16
values, or with double quantization, the scales move slightly.

Example::

    save_base(module.model, "out/base")                 # dense dequantized Q, in the compute dtype
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_zenft.adapters import find_adapters
from lightning_zenft.precision.select import is_4bit_layer


def _dequantized(layer: nn.Module, dtype: torch.dtype | None) -> torch.Tensor:
    dense = getattr(layer, "dequantize_weight", None)
    if callable(dense):
        weight = dense()
    else:
        from lightning_zenft.precision.quantize import dequantize

        weight = dequantize(layer.weight)
    return weight.to(dtype) if dtype is not None else weight


def base_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` as the model without adapters names it, 4-bit weights dequantized.

    Adapter parameters and buffers are left out, ``<layer>.base_layer.<name>`` becomes ``<layer>.<name>``, and each
    4-bit weight becomes its dense ``(out, in)`` dequantization in ``dtype`` (default: the layer's compute dtype).
    """
    adapters = dict(find_adapters(model))
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if any(name == a or name.startswith(a + ".") for a in adapters) and not _inside_base(name, adapters):
            continue
        key = _unadapted(name, adapters)
        prefix = f"{key}." if key else ""
        if is_4bit_layer(module):
            state[prefix + "weight"] = _dequantized(module, dtype).detach()
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
            continue
        if _inside_4bit(name, model):
            continue
        for pname, param in module._parameters.items():
            if param is not None:
                state[prefix + pname] = param.detach()
        for bname, buf in module._buffers.items():
            if buf is not None and bname not in module._non_persistent_buffers_set:
                state[prefix + bname] = buf
    return state


def _inside_base(name: str, adapters: dict[str, nn.Module]) -> bool:
    return any(name == f"{a}.base_layer" or name.startswith(f"{a}.base_layer.") for a in adapters)


def _unadapted(name: str, adapters: dict[str, nn.Module]) -> str:
    for a in adapters:
        if name == f"{a}.base_layer" or name.startswith(f"{a}.base_layer."):
            return a + name[len(a) + len(".base_layer") :]
    return name


def _inside_4bit(name: str, model: nn.Module) -> bool:
    parent = name.rpartition(".")[0]
    while parent:
        if is_4bit_layer(model.get_submodule(parent)):
            return True
        parent = parent.rpartition(".")[0]
    return False


def save_base(model: nn.Module, save_directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` without its adapters, 4-bit weights dequantized, with ``save_pretrained``; returns the directory.

    Args:
        model: a ``transformers`` model holding adapters and 4-bit layers (or a LightningModule whose ``.model`` is).
        save_directory: replaced atomically (written next to it, then renamed).
        dtype: the dtype of the dequantized weights (default: each layer's compute dtype).
    """
    inner = getattr(model, "model", None)
    if not hasattr(model, "save_pretrained") and hasattr(inner, "save_pretrained"):
        model = inner
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_base writes transformers models (save_pretrained); got {type(model).__name__}.")
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    config = model.config
    try:
        if getattr(config, "quantization_config", None) is not None:  # loaded in 4-bit by transformers: now dense
            model.config = copy.deepcopy(config)
            del model.config.quantization_config
        model.save_pretrained(tmp, state_dict=base_state_dict(model, dtype))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config = config
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
