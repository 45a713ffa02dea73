"""The small protocols adapter modules satisfy, and the generic helpers built on them.

Generic code (freezing, checkpoint filtering, PEFT export, kernels, merging, regularizers) finds adapters through
these protocols, never by class or by parameter names such as ``"lora_" in name``:

* :class:`AdapterModule`, what every adapter has: ``adapter_params()`` (its own trainable parameters) and ``disabled``
  (the module then computes what the model computed without it);
* :class:`Mergeable`, adapters that can be folded into the base weight (LoRA, DoRA, IA3): ``merge()``, ``unmerge()``,
  ``merged`` and ``merged_weight(weight)``, the adapted weight for a given base weight (used to merge from files);
* :class:`Wrapping`, adapters that wrap one base layer and compute ``base_layer(x)`` plus their change: ``base_layer``;
* :class:`LowRankUpdate`, adapters whose output is exactly ``base_layer(x) + s B A dropout(x)`` (LoRA; not DoRA,
  whose magnitude rescales the rows): ``low_rank_factors()`` gives ``(A, B, s)``.

Prefix tuning, ReFT and bottleneck adapters are adapter modules that are neither mergeable nor low-rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class AdapterModule(Protocol):
    """An ``nn.Module`` that adds trainable parameters to a frozen model.

    ``adapter_params()`` names the module's own trainable parameters (relative to the module); with ``disabled`` set
    the module computes what the model computed before the adapter was added.
    """

    disabled: bool

    def adapter_params(self) -> list[str]: ...


@runtime_checkable
class Mergeable(Protocol):
    """An adapter whose effect can be folded into the base weight, so the merged model runs at the base's speed.

    ``merged_weight(weight)`` returns the adapted dense ``(out, in)`` weight for a dense base weight ``weight``
    (in ``weight``'s dtype and device), without touching the module: merging from files and streaming merges use it.
    """

    merged: bool

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Wrapping(Protocol):
    """An adapter that wraps one base layer (kept as ``base_layer``) and computes its output plus a change."""

    base_layer: nn.Module


@runtime_checkable
class LowRankUpdate(Protocol):
    """An adapter whose output is ``base_layer(x) + s B A lora_dropout(x)`` exactly.

    ``(A, B, s) = low_rank_factors()``: ``A`` is ``(r, in)`` and ``B`` is ``(out, r)``, the live parameters (gradients
    flow through them); ``lora_dropout`` is the module applied to the adapter's input.
    """

    lora_dropout: nn.Module

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]: ...


def find_adapters(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Yield ``(qualified_name, layer)`` for every adapter module inside ``model``, in module order."""
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
    """Merge every unmerged mergeable adapter of ``model`` into its base weight; returns how many were merged.

    Raises:
        TypeError: when ``model`` also holds adapters that cannot be merged (they would be silently left out).
    """
    layers = list(find_adapters(model))
    unmergeable = sorted({type(layer).__name__ for _, layer in layers if not isinstance(layer, Mergeable)})
    if unmergeable:
        raise TypeError(
            f"{', '.join(unmergeable)} adapters cannot be merged into the base weights (they add computation that "
            "no weight change expresses); keep them as modules, or remove them with unload_adapters(merge=False)."
        )
    count = 0
    for _, layer in layers:
        if not layer.merged:  # type: ignore[attr-defined]
            layer.merge()  # type: ignore[attr-defined]
            count += 1
    return count


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters`; returns how many layers were unmerged."""
    count = 0
    for _, layer in find_adapters(model):
        if isinstance(layer, Mergeable) and layer.merged:
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
    was_merged = [isinstance(layer, Mergeable) and layer.merged for layer in layers]
    was_disabled = [layer.disabled for layer in layers]
    for layer, merged in zip(layers, was_merged, strict=True):
        if merged:
            layer.unmerge()  # type: ignore[attr-defined]
        layer.disabled = True
    try:
        yield
    finally:
        for layer, merged, disabled in zip(layers, was_merged, was_disabled, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge()  # type: ignore[attr-defined]
