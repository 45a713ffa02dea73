r"""Switching LoRA layers of a model to the fused kernels, without touching a parameter or a state_dict key.

Three levels, each detected generically (no per-architecture code) and each falling back, with a warning that names
the layer and the reason, to the level below:

1. **Per layer**: a :class:`~lightning_zenft.adapters.LoRALinear` becomes a :class:`FusedLoRALinear` by swapping its
   ``__class__`` to that subclass: same object, same parameters, same ``state_dict`` keys; its forward calls
   :func:`~lightning_zenft.kernels.fused_lora` (dense, bitsandbytes NF4, or any base with ``dequantize_weight()``).
2. **Shared input**: sibling fused layers of one parent that are called on the same tensor (q/k/v; gate/up when
   the MLP is not fused) run as one :func:`~lightning_zenft.kernels.fused_lora_group` call that saves the input once.
   Siblings are *observed* during one forward (:func:`finalize_shared_inputs` then forms the groups), never guessed
   from names; at run time a group still checks the input is the same tensor and splits if not.
3. **Gated MLP**: a module with an activation attribute (``act_fn``...) and three fused children computing
   ``down(act(gate(x)) * up(x))`` gets an instance-level ``forward`` running :func:`~lightning_zenft.kernels.
   fused_lora_mlp`. Which child is which and which activation it is are found by trying the candidates on a small
   probe input against the module's own forward; nothing is fused unless the outputs agree.

:func:`unfuse_lora_layers` undoes all of it. Merged or disabled adapters run their ordinary forward.

Example::

    report = fuse_lora_layers(model)          # after the LoRA layers are injected (and the base quantized)
    model(**batch)                            # one forward observes which siblings share their input
    finalize_shared_inputs(model)
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters._fused_weights import base_weight, compute_dtype, kernel_weight
from lightning_zenft.adapters.dora import DoRALinear
from lightning_zenft.adapters.fused_dora import FusedDoRALinear
from lightning_zenft.adapters.lora import LoRALinear
from lightning_zenft.kernels.glu import GLU_ACTIVATIONS, activation_reference, glu
from lightning_zenft.kernels.lora import LoRAProjection, fused_lora_group
from lightning_zenft.kernels.mlp import fused_lora_mlp

_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


# ---------------------------------------------------------------------------------------------------- per layer
def unfusable_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run the fused LoRA kernel, or None when it can."""
    if not isinstance(layer, LoRALinear):
        return f"{type(layer).__name__} is not a LoRALinear"
    if type(layer) not in (LoRALinear, FusedLoRALinear, DoRALinear, FusedDoRALinear):
        return f"{type(layer).__name__} has its own forward (the fused kernels compute LoRA and DoRA only)"
    if not isinstance(layer.lora_dropout, (nn.Identity, nn.Dropout)):
        return f"its lora_dropout is a {type(layer.lora_dropout).__name__}, not nn.Dropout"
    if any(type(p).__name__ == "DTensor" for p in layer.parameters()):
        return "its parameters are sharded DTensors (FSDP2); the fused kernel takes local tensors only"
    weight = base_weight(layer.base_layer)
    if weight is None:
        return (
            f"its base layer {type(layer.base_layer).__name__} stores the weight in a form the kernel cannot read "
            "(supported: floating-point weights, bitsandbytes NF4, or a base with dequantize_weight())"
        )
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        return "its base weight requires grad (the fused kernel computes no base-weight gradient)"
    return None


class FusedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose forward runs the fused kernel. Made by :func:`fuse_lora_layers`, never built.

    The class is swapped on the existing object (``layer.__class__ = FusedLoRALinear``), so parameters, buffers and
    ``state_dict`` keys are those of the LoRALinear; :func:`unfuse_lora_layers` swaps it back.

    Example::

        fuse_lora_layers(model)
        isinstance(model.q_proj, FusedLoRALinear)    # True; still a LoRALinear
    """

    def projection(self, dtype: torch.dtype) -> LoRAProjection:
        """This layer as a :class:`~lightning_zenft.kernels.LoRAProjection` in ``dtype``."""
        weight = kernel_weight(self.base_layer, dtype)
        bias = getattr(self.base_layer, "bias", None)
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return LoRAProjection(weight, bias, self.lora_A.weight, self.lora_B.weight, self.scaling, p)

    def fused_active(self) -> bool:
        """Whether the next forward uses the kernel (not merged, not disabled)."""
        return not (self.merged or self.disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused_active():
            return super().forward(x)
        group: SharedInputGroup | None = self.__dict__.get("_zenft_group")
        if group is not None:
            return group(self, x)
        dtype = compute_dtype(x)
        return fused_lora_group(x.to(dtype), [self.projection(dtype)], self.training)[0]


# ---------------------------------------------------------------------------------------------------- shared input
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
                    return fused_lora_group(x.to(dtype), [layer.projection(dtype)], layer.training)[0]
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
            dtype = compute_dtype(x)
            return fused_lora_group(x.to(dtype), [layer.projection(dtype)], layer.training)[0]
        dtype = compute_dtype(x)
        outs = fused_lora_group(x.to(dtype), [m.projection(dtype) for m in self.members], layer.training)
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
        dtype = compute_dtype(x)
        return fused_lora_group(x.to(dtype), [layer.projection(dtype)], layer.training)[0]

    def groups(self) -> list[list[int]]:
        by_root: dict[int, list[int]] = {}
        for idx in self.first_input:
            by_root.setdefault(self.shares_with.get(idx, idx), []).append(idx)
        return [sorted(g) for g in by_root.values() if len(g) > 1]


# ---------------------------------------------------------------------------------------------------- gated MLP
class FusedGatedMLPForward:
    """The instance-level ``forward`` of a gated MLP whose three projections are fused LoRA layers."""

    def __init__(
        self, module: nn.Module, gate: str, up: str, down: str, act: str, recompute_hidden: bool = False
    ) -> None:
        self.module = module  # a strong reference: deepcopy maps it to the copy, pickle stores it
        self.gate, self.up, self.down, self.act = gate, up, down, act
        self.recompute_hidden = recompute_hidden

    def layers(self) -> tuple[FusedLoRALinear, FusedLoRALinear, FusedLoRALinear]:
        module = self.module
        return getattr(module, self.gate), getattr(module, self.up), getattr(module, self.down)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        gate, up, down = self.layers()
        active = all(isinstance(m, FusedLoRALinear) and m.fused_active() for m in (gate, up, down))
        if args or kwargs or not active or len({gate.training, up.training, down.training}) > 1:
            return type(module).forward(module, x, *args, **kwargs)
        dtype = compute_dtype(x)
        projections = (gate.projection(dtype), up.projection(dtype), down.projection(dtype))
        return fused_lora_mlp(x.to(dtype), *projections, self.act, gate.training, self.recompute_hidden)


def _activation_of(module: nn.Module) -> tuple[str, str] | None:
    """``(attribute, kind)`` of the module's activation if it is one the GLU kernel computes."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(64, generator=gen) * 3
    for attr in _ACT_ATTRS:
        fn = getattr(module, attr, None)
        if not callable(fn) or isinstance(fn, LoRALinear):
            continue
        with torch.no_grad():
            got = fn(probe)
        for kind in GLU_ACTIVATIONS:
            if torch.allclose(got, activation_reference(probe, kind), atol=1e-5, rtol=1e-4):
                return attr, kind
    return None


def _other_parts(module: nn.Module, projections: list[nn.Module], act_fn: object) -> str:
    """Children and own parameters of a gated MLP beyond its three projections and activation (e.g. a dropout)."""
    others = [n for n, c in module.named_children() if c is not act_fn and not any(c is p for p in projections)]
    others += [n for n, _ in module.named_parameters(recurse=False)]
    return ", ".join(others)


def _mlp_candidate(module: nn.Module) -> tuple[str, list[tuple[str, str, str]]] | str | None:
    """For a module that looks like a gated MLP: its activation kind and the (gate, up, down) orders to try."""
    act = _activation_of(module)
    if act is None:
        return None
    children = [(n, c) for n, c in module.named_children() if isinstance(c, LoRALinear)]
    linears = [(n, c) for n, c in module.named_children() if hasattr(c, "in_features") or isinstance(c, LoRALinear)]
    if len(linears) != 3:
        return None
    if len(children) != 3:
        names = ", ".join(n for n, _ in linears)
        return f"not all of its projections ({names}) are LoRA layers"
    if any(isinstance(c, DoRALinear) for _, c in children):
        return None  # DoRA layers each run the fused DoRA function: nothing falls back, nothing to warn about
    skipped = _other_parts(module, [c for _, c in linears], getattr(module, act[0]))
    if skipped:
        return f"it has other parts ({skipped}) that the fused MLP would skip"
    shapes = {n: (c.in_features, c.out_features) for n, c in children}
    orders = []
    for down, (d_in, d_out) in shapes.items():
        rest = [n for n in shapes if n != down]
        if all(shapes[n] == (d_out, d_in) for n in rest):
            orders += [(rest[0], rest[1], down), (rest[1], rest[0], down)]
    if not orders:
        return None
    return act[1], orders


def _probe_matches(module: nn.Module, fused: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> bool:
    """Whether ``fused`` computes the module's own forward on a small probe (dropout off); ``like``: dtype/device."""
    gate = getattr(module, fused.gate)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, gate.in_features, generator=gen).to(device=like.device, dtype=dtype)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            want = type(module).forward(module, x)
            got = fused(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


class GLUMLPForward:
    """The instance-level ``forward`` of a gated MLP of plain (non-LoRA) layers: ``down(glu(gate(x), up(x)))``."""

    def __init__(self, module: nn.Module, gate: str, up: str, down: str, act: str) -> None:
        self.module = module  # a strong reference: deepcopy maps it to the copy, pickle stores it
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        if args or kwargs:
            return type(module).forward(module, x, *args, **kwargs)
        g, u = getattr(module, self.gate)(x), getattr(module, self.up)(x)
        return getattr(module, self.down)(glu(g, u, self.act))


def fuse_glu_mlps(model: nn.Module, warn: bool = True) -> list[str]:
    """Give every gated MLP of plain linear layers the fused GLU kernel (one pass for ``act(g) * u``).

    MLPs whose projections are LoRA layers are left to :func:`fuse_lora_layers`. Returns the patched module names.

    Example::

        fuse_glu_mlps(model)     # e.g. a frozen model, or one with adapters on attention only
    """
    done = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or "forward" in module.__dict__:
            continue
        act = _activation_of(module)
        kids = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]
        if act is None or len(kids) != 3 or _other_parts(module, [c for _, c in kids], getattr(module, act[0])):
            continue
        shapes = {n: (c.in_features, c.out_features) for n, c in kids}
        for down, (d_in, d_out) in shapes.items():
            rest = [n for n in shapes if n != down]
            if not all(shapes[n] == (d_out, d_in) for n in rest):
                continue
            for gate, up in ((rest[0], rest[1]), (rest[1], rest[0])):
                fused = GLUMLPForward(module, gate, up, down, act[1])
                if _probe_matches(module, fused, getattr(module, gate).weight):
                    module.forward = fused
                    done.append(name)
                    break
            break
        else:
            continue
        if name not in done and warn:
            _warn(name, "its forward is not down(act(gate(x)) * up(x))", "looks like a gated MLP but is not fused")
    return done


# ---------------------------------------------------------------------------------------------------- model level
@dataclass
class FusionReport:
    """What :func:`fuse_lora_layers` did: fused layers, fused MLPs, layers observed for sharing, fallbacks.

    Example::

        report = fuse_lora_layers(model)
        report.skipped      # {'layers.3.self_attn.q_proj': 'DoRALinear has its own forward ...'}
    """

    layers: list[str] = field(default_factory=list)
    mlps: list[str] = field(default_factory=list)
    observed_parents: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{len(self.layers)} LoRA layers fused, {len(self.mlps)} gated MLPs fused, "
            f"{len(self.observed_parents)} modules watched for shared inputs, {len(self.skipped)} fell back"
        )


def _warn(name: str, why: str, fallback: str) -> None:
    warnings.warn(f"fused LoRA: {name or '<root>'} {fallback}: {why}.", stacklevel=3)


def fuse_lora_layers(
    model: nn.Module,
    *,
    mlp: bool = True,
    shared_input: bool = True,
    warn: bool = True,
    mlp_recompute: bool = False,
) -> FusionReport:
    """Switch every LoRA layer of ``model`` to the fused kernels (see the module docstring); returns a report.

    Args:
        model: a model with :class:`LoRALinear` layers already injected.
        mlp: fuse gated MLPs whose three projections are LoRA layers.
        mlp_recompute: fused MLPs recompute ``act(gate) * up`` in backward instead of keeping it (less memory, one
            more elementwise pass).
        shared_input: watch sibling layers for a shared input (groups form at :func:`finalize_shared_inputs`).
        warn: warn for every layer or MLP that falls back, naming it and the reason.

    Example::

        report = fuse_lora_layers(model)
        print(report.summary())
    """
    report = FusionReport()
    for name, module in model.named_modules():
        if isinstance(module, (FusedLoRALinear, FusedDoRALinear)):
            report.layers.append(name)
        elif isinstance(module, LoRALinear):
            why = unfusable_reason(module)
            if why is None:
                module.__class__ = FusedDoRALinear if type(module) is DoRALinear else FusedLoRALinear
                report.layers.append(name)
            else:
                report.skipped[name] = why
                if warn:
                    _warn(name, why, "keeps the unfused LoRA forward")
    in_mlp: set[int] = set()
    if mlp:
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear) or isinstance(module.__dict__.get("forward"), FusedGatedMLPForward):
                continue
            cand = _mlp_candidate(module)
            if cand is not None and "forward" in module.__dict__:
                cand = "its forward is overridden on the instance (a wrapper or hook the fused MLP would bypass)"
            if cand is None:
                continue
            if isinstance(cand, str):
                report.skipped[name] = cand
                if warn:
                    _warn(name, cand, "is a gated MLP but is not fused (its layers run one by one)")
                continue
            act, orders = cand
            reasons = [unfusable_reason(getattr(module, n)) for n in orders[0]]
            if any(r is not None for r in reasons):
                continue  # the layer itself was reported above
            for gate, up, down in orders:
                fused = FusedGatedMLPForward(module, gate, up, down, act, mlp_recompute)
                if _probe_matches(module, fused, getattr(module, gate).lora_A.weight):
                    module.forward = fused
                    report.mlps.append(name)
                    in_mlp.update(id(getattr(module, n)) for n in (gate, up, down))
                    break
            else:
                why = "its forward is not down(act(gate(x)) * up(x)) for any assignment of its projections"
                report.skipped[name] = why
                if warn:
                    _warn(name, why, "looks like a gated MLP but is not fused")
    if shared_input:
        for name, module in model.named_modules():
            kids = [
                (n, c)
                for n, c in module.named_children()
                if isinstance(c, FusedLoRALinear) and id(c) not in in_mlp and "_zenft_group" not in c.__dict__
            ]
            by_in: dict[int, list[tuple[str, FusedLoRALinear]]] = {}
            for n, c in kids:
                by_in.setdefault(c.in_features, []).append((n, c))
            for same in by_in.values():
                if len(same) < 2:
                    continue
                prefix = f"{name}." if name else ""
                observer = _SiblingObserver([c for _, c in same], [prefix + n for n, _ in same])
                for _, c in same:
                    c.__dict__["_zenft_group"] = observer
                report.observed_parents.append(name)
    return report


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


def unfuse_lora_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_lora_layers`: plain LoRALinear/DoRALinear classes, original MLP forwards; returns the count."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), (FusedGatedMLPForward, GLUMLPForward)):
            del module.forward
        if isinstance(module, FusedLoRALinear):
            module.__dict__.pop("_zenft_group", None)
            module.__class__ = LoRALinear
            count += 1
        elif isinstance(module, FusedDoRALinear):
            module.__class__ = DoRALinear
            count += 1
    return count


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """The names of the layers in each active shared-input group of ``model``."""
    groups = {
        id(g): g for _, m in model.named_modules() if isinstance(g := m.__dict__.get("_zenft_group"), SharedInputGroup)
    }
    return [list(g.names) for g in groups.values()]
