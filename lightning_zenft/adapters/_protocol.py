"""The small protocol every adapter layer satisfies, and the generic helpers built on it.

Generic code (freezing, checkpoint filtering, PEFT export, kernels) finds adapters through this protocol, never by
parameter names such as ``"lora_" in name``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class AdapterModule(Protocol):
    """An ``nn.Module`` that adds trainable parameters on top of a frozen base layer.

    ``adapter_params()`` names the module's own trainable parameters (relative to the module), ``merge()`` folds the
    adapter into the base weight, ``unmerge()`` takes it out again, ``merged`` tells which state it is in and
    ``disabled`` turns the adapter off (the layer then computes the base layer alone).
    """

    merged: bool
    disabled: bool

    def adapter_params(self) -> list[str]: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def find_adapters(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Yield ``(qualified_name, layer)`` for every adapter layer inside ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every adapter parameter in ``model`` (as in ``model.named_parameters()``)."""
    names = []
    for layer_name, layer in find_adapters(model):
        prefix = f"{layer_name}." if layer_name else ""
        names.extend(prefix + p for p in layer.adapter_params())
    return names


def merge_adapters(model: nn.Module) -> int:
    """Merge every unmerged adapter of ``model`` into its base weight; returns how many were merged."""
    count = 0
    for _, layer in find_adapters(model):
        if not layer.merged:
            layer.merge()
            count += 1
    return count


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters`; returns how many layers were unmerged."""
    count = 0
    for _, layer in find_adapters(model):
        if layer.merged:
            layer.unmerge()
            count += 1
    return count


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block: adapters off, merged ones taken out and put back after.

    Example::

        with disable_adapters(module.model):
            base_logits = module.model(input_ids).logits
    """
    layers = [layer for _, layer in find_adapters(model)]
    was_merged = [layer.merged for layer in layers]
    was_disabled = [layer.disabled for layer in layers]
    for layer, merged in zip(layers, was_merged, strict=True):
        if merged:
            layer.unmerge()
        layer.disabled = True
    try:
        yield
    finally:
        for layer, merged, disabled in zip(layers, was_merged, was_disabled, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge()
