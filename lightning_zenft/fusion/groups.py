"""Shared-input groups: sibling fused LoRA layers called on the same tensor (q/k/v) computed in one kernel call.

Siblings are *observed* during one forward (:class:`_SiblingObserver`, installed by ``fuse_lora_layers``);
:func:`finalize_shared_inputs` then forms the groups. Nothing is guessed from names, and at run time a group still
checks that its members are called on the same tensor, splitting (with a warning) when they are not.

Example::

    fuse_lora_layers(model)
    model(**batch)                          # one forward observes which siblings share their input
    finalize_shared_inputs(model)           # [['layers.0.self_attn.q_proj', '...k_proj', '...v_proj'], ...]
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from lightning_zenft.fusion.layers import FusedLoRALinear, layer_runtime
from lightning_zenft.fusion.weights import compute_dtype
from lightning_zenft.kernels.lora import fused_lora_group


class SharedInputGroup:
    """Sibling fused layers of one parent module, observed to read the same input; computed in one call.

    The first member called computes every member's output and hands the others theirs when they are called on the
    same tensor. A member called on another tensor leaves the group (with a warning) and runs alone from then on.

    Example::

        finalize_shared_inputs(model)      # after one forward: q/k/v of each attention become one group
        shared_input_groups(model)         # [['layers.0.self_attn.q_proj', '...k_proj', '...v_proj'], ...]
    """

    def __init__(self, members: list[FusedLoRALinear], names: list[str]) -> None:
        self.members = members
        self.names = names
        self._pending: dict[int, torch.Tensor] = {}
        self._input: weakref.ReferenceType[torch.Tensor] | None = None
        self._mode: tuple[bool, torch.dtype] | None = None  # grad mode and compute dtype of the pending outputs

    def _leave(self, idx: int, why: str) -> None:
        layer = self.members[idx]
        warnings.warn(
            f"fused LoRA: {self.names[idx]} leaves its shared-input group ({', '.join(self.names)}): {why}; it runs "
            "its own fused kernel from now on.",
            stacklevel=3,
        )
        layer.__dict__.pop("_zenft_group", None)
        del self.members[idx], self.names[idx]
        self._pending.clear()
        self._input = None
        if len(self.members) == 1:
            self.members[0].__dict__.pop("_zenft_group", None)

    def __call__(self, layer: FusedLoRALinear, x: torch.Tensor) -> torch.Tensor:
        idx = next(i for i, m in enumerate(self.members) if m is layer)
        if idx in self._pending:
            if self._input is not None and self._input() is x:
                out = self._pending.pop(idx)
                if not self._pending:
                    self._input = None
                dtype = compute_dtype(x)
                if self._mode != (torch.is_grad_enabled(), dtype):  # e.g. a sibling called under no_grad
                    return layer.forward_alone(x)
                return out
            self._leave(idx, "it was called on a different tensor than its siblings")
            return layer(x)
        if self._pending:
            stale = sorted(self._pending)
            for i in reversed(stale):
                self._leave(i, "it was not called on the input its siblings were called on")
            if layer.__dict__.get("_zenft_group") is not self:
                return layer(x)
            idx = next(i for i, m in enumerate(self.members) if m is layer)
        if not all(m.fused_active() for m in self.members) or len({m.training for m in self.members}) > 1:
            return layer.forward_alone(x)
        dtype = compute_dtype(x)
        projections = [m.projection(dtype) for m in self.members]
        outs = fused_lora_group(x.to(dtype), projections, layer.training, layer_runtime(layer))
        self._pending = {i: o for i, o in enumerate(outs) if i != idx}
        self._input = weakref.ref(x)
        self._mode = (torch.is_grad_enabled(), dtype)
        return outs[idx]


class _SiblingObserver:
    """Records, during forward passes, which sibling fused layers of one parent receive the same input tensor."""

    def __init__(self, members: list[FusedLoRALinear], names: list[str]) -> None:
        self.members = members
        self.names = names
        self.first_input: dict[int, weakref.ReferenceType[torch.Tensor]] = {}
        self.shares_with: dict[int, int] = {}  # member -> representative member seen with the same tensor

    def __call__(self, layer: FusedLoRALinear, x: torch.Tensor) -> torch.Tensor:
        idx = next(i for i, m in enumerate(self.members) if m is layer)
        if idx not in self.first_input:
            for j, ref in self.first_input.items():
                if ref() is x:
                    self.shares_with[idx] = self.shares_with.get(j, j)
                    break
            self.first_input[idx] = weakref.ref(x)
        return layer.forward_alone(x)

    def groups(self) -> list[list[int]]:
        by_root: dict[int, list[int]] = {}
        for idx in self.first_input:
            by_root.setdefault(self.shares_with.get(idx, idx), []).append(idx)
        return [sorted(g) for g in by_root.values() if len(g) > 1]


def finalize_shared_inputs(model: nn.Module) -> list[list[str]]:
    """Turn what the sibling observers saw into :class:`SharedInputGroup` s; returns the groups' layer names.

    Call after at least one forward through the model (the :class:`~lightning_zenft.FusedKernels` callback calls it
    after the first training batch). Siblings never called stay alone.
    """
    observers = {
        id(obs): obs
        for _, m in model.named_modules()
        if isinstance(obs := m.__dict__.get("_zenft_group"), _SiblingObserver)
    }
    formed = []
    for obs in observers.values():
        if not obs.first_input:
            continue  # not called yet: keep observing
        for m in obs.members:
            m.__dict__.pop("_zenft_group", None)
        for idxs in obs.groups():
            group = SharedInputGroup([obs.members[i] for i in idxs], [obs.names[i] for i in idxs])
            for m in group.members:
                m.__dict__["_zenft_group"] = group
            formed.append(list(group.names))
    return formed


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """The names of the layers in each active shared-input group of ``model``."""
    groups = {
        id(g): g for _, m in model.named_modules() if isinstance(g := m.__dict__.get("_zenft_group"), SharedInputGroup)
    }
    return [list(g.names) for g in groups.values()]
