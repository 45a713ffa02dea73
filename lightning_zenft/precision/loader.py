"""Loading a model that does not fit in memory at full precision: meta skeleton, then one tensor at a time.

``load_pretrained_4bit(directory, spec)`` builds the ``transformers`` model from its config on the meta device (no
storage), then reads the safetensors shards of a ``save_pretrained`` directory one tensor at a time, with plain file
reads rather than a memory map (mapped pages of a shard would stay resident and count in the process's memory), and
hands the memory of each tensor back to the operating system once it is quantized and placed: each
linear weight to quantize is read, quantized on the target device and dropped; every other tensor is read, cast to
the compute dtype and placed. A weight to quantize is streamed from the file in chunks of ``CHUNK`` values through one
buffer, so peak host memory is the 4-bit model plus the largest tensor that stays unquantized (an embedding) and a
few chunk-sized temporaries; the full-precision model never exists. Non-persistent buffers (rotary frequencies) are
recomputed by the model's own initializer.

Inside ``NF4Precision().module_init_context()`` (``fabric.init_module()`` in Fabric), ``CausalLMModule(model=dir)``
takes this path by itself.

Example::

    plugin = NF4Precision(mode="nf4-dq")
    with plugin.module_init_context():
        module = CausalLMModule(model="path/to/llama")          # 4-bit linear layers, loaded tensor by tensor
    trainer = L.Trainer(plugins=[plugin], callbacks=[LoRA(r=16)])
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_zenft.precision.quantize import CHUNK, QuantSpec, quantize_chunks, to_linear4bit
from lightning_zenft.precision.select import ModuleSpec, plan_quantization
from lightning_zenft.safetensors_io import SafetensorsReader


@functools.cache
def _malloc_trim() -> Any:
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps the space of freed tensors for reuse otherwise, and a load
    that frees one full-precision tensor per layer leaves the process holding several times the model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def quantized_loading(loader: Any) -> Iterator[None]:
    """Within the block, loaders that know this path (``CausalLMModule``) load through ``loader.load_pretrained``."""
    token = _ACTIVE.set(loader)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


_ACTIVE: ContextVar[Any] = ContextVar("zenft_quantized_loading", default=None)


def active_quantized_loading() -> Any:
    """The object whose ``load_pretrained(directory, dtype)`` loads 4-bit models here, or None outside the block."""
    return _ACTIVE.get()


def safetensors_files(directory: str | Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory: the shards of its index, or ``model.safetensors``."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{str(directory)!r} holds no model.safetensors nor model.safetensors.index.json; the low-memory loader reads "
        "safetensors written by save_pretrained (save the model with safe_serialization, the default)."
    )


@dataclass(frozen=True)
class SourceWeight:
    """Where a 4-bit layer's full-precision weight lives on disk, so LoftQ can read it back (one tensor)."""

    path: Path
    key: str

    def read(self) -> torch.Tensor:
        return SafetensorsReader(self.path).read(self.key)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(key)


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Give meta buffers (not stored in checkpoints: rotary frequencies) storage and the model's own init values."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        meta = [name for name, buf in module._buffers.items() if buf is not None and buf.is_meta]
        if not meta:
            continue
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        if callable(init):
            init(module)


def load_pretrained_4bit(
    directory: str | Path,
    spec: QuantSpec,
    modules: ModuleSpec | None = None,
    skip_modules: ModuleSpec | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a causal LM saved with ``save_pretrained`` with its frozen linear weights in 4 bits, tensor by tensor.

    Args:
        directory: the ``save_pretrained`` directory (``config.json`` + safetensors, sharded or not).
        spec: the 4-bit quantization.
        modules, skip_modules: which linear layers to quantize, as in ``NF4Precision`` (default: all but the head).
        device: where the weights go (default: the current default device, e.g. inside ``fabric.init_module()``).
        dtype: the dtype of the weights that stay unquantized (default: the compute dtype).

    The returned model is in eval mode, like ``from_pretrained``'s; its 4-bit weights are frozen, the rest trainable.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    device = torch.device(device) if device is not None else torch.get_default_device()
    dtype = dtype or spec.compute_dtype
    files = safetensors_files(directory)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linear_grad = {n: m.weight.requires_grad for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in linear_grad:
        model.get_submodule(name).weight.requires_grad_(False)  # a base to adapt: plan as the frozen base it will be
    targets = set(plan_quantization(model, modules, skip_modules).targets)
    for name, grad in linear_grad.items():
        if name not in targets:
            model.get_submodule(name).weight.requires_grad_(grad)
    chunk = CHUNK if device.type == "cpu" else 64 * CHUNK  # on an accelerator, fewer and larger transfers
    expected = set(model.state_dict())
    tied = {k for k in expected if _is_tied(model, k)}
    ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in files:
        reader = SafetensorsReader(path)
        for key in reader.keys():
            entry = reader.entries[key]
            layer_name, _, attr = key.rpartition(".")
            if key not in expected:
                if not any(re.search(pattern, key) for pattern in ignore):
                    unexpected.append(key)
                continue
            if layer_name in targets and attr == "weight":
                if not entry.dtype.is_floating_point:
                    raise ValueError(f"{path}: {key} is a {entry.dtype} tensor, which cannot be quantized.")
                chunks = (part.to(device) for part in reader.read_chunks(key, chunk))
                weight = quantize_chunks(chunks, entry.shape, spec)
                layer = to_linear4bit(model.get_submodule(layer_name), spec, weight=weight)
                layer.source_weight = SourceWeight(path, key)
                _replace(model, layer_name, layer)
            else:
                tensor = reader.read(key)
                target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                _set_tensor(model, key, tensor.to(device=device, dtype=target_dtype))
                del tensor
            seen.add(key)
            release_freed_memory()
    if unexpected:
        raise ValueError(
            f"{directory}: {len(unexpected)} tensors match no parameter of {type(model).__name__} (e.g. "
            f"{unexpected[:4]}); the low-memory loader needs checkpoints in the model's own naming (as save_pretrained "
            "writes them). Load this one with from_pretrained, then let NF4Precision quantize it at setup."
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _materialize_buffers(model, device)
    missing = [k for k in expected - seen - tied if _tensor(model, k).is_meta]
    if missing:
        raise ValueError(f"{directory} lacks {len(missing)} tensors of {type(model).__name__}: {sorted(missing)[:6]}.")
    model.config.name_or_path = str(directory)
    return model.eval()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    value = getattr(owner, attr)
    return value if isinstance(value, torch.Tensor) else torch.empty(0)


def _is_tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return key in tied
