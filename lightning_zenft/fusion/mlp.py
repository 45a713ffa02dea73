"""Gated MLPs (``down(act(gate(x)) * up(x))``, SwiGLU / GeGLU) on one fused function.

* With LoRA on all three projections: an instance-level ``forward`` running
  :func:`~lightning_zenft.kernels.fused_lora_mlp` (:class:`FusedGatedMLPForward`).
* With plain linear layers: the fused GLU kernel between them (:class:`GLUMLPForward`, :func:`fuse_glu_mlps`).

Which child is which and which activation it is are found by trying the candidates on a small probe input against
the module's own forward; nothing is fused unless the outputs agree.

Example::

    fuse_glu_mlps(model)       # a frozen model, or one with adapters on attention only
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters import AdapterModule, LowRankUpdate, Wrapping
from lightning_zenft.fusion.layers import FusedLoRALinear
from lightning_zenft.fusion.weights import compute_dtype
from lightning_zenft.kernels.glu import GLU_ACTIVATIONS, activation_reference, glu
from lightning_zenft.kernels.mlp import fused_lora_mlp
from lightning_zenft.kernels.runtime import KernelRuntime

_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


def warn_fallback(name: str, why: str, fallback: str) -> None:
    """Warn that module ``name`` keeps an unfused path (``fallback``) and why."""
    warnings.warn(f"fused LoRA: {name or '<root>'} {fallback}: {why}.", stacklevel=3)


class FusedGatedMLPForward:
    """The instance-level ``forward`` of a gated MLP whose three projections are fused LoRA layers."""

    def __init__(
        self,
        module: nn.Module,
        gate: str,
        up: str,
        down: str,
        act: str,
        recompute_hidden: bool = False,
        runtime: KernelRuntime | None = None,
    ) -> None:
        self.module = module  # a strong reference: deepcopy maps it to the copy, pickle stores it
        self.gate, self.up, self.down, self.act = gate, up, down, act
        self.recompute_hidden = recompute_hidden
        self.runtime = runtime

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
        return fused_lora_mlp(
            x.to(dtype), *projections, self.act, gate.training, self.recompute_hidden, runtime=self.runtime
        )


def _activation_of(module: nn.Module) -> tuple[str, str] | None:
    """``(attribute, kind)`` of the module's activation if it is one the GLU kernel computes."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(64, generator=gen) * 3
    for attr in _ACT_ATTRS:
        fn = getattr(module, attr, None)
        if not callable(fn) or isinstance(fn, AdapterModule):
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
    children = [(n, c) for n, c in module.named_children() if isinstance(c, Wrapping)]
    linears = [(n, c) for n, c in module.named_children() if hasattr(c, "in_features") or isinstance(c, Wrapping)]
    if len(linears) != 3:
        return None
    if len(children) != 3:
        names = ", ".join(n for n, _ in linears)
        return f"not all of its projections ({names}) are LoRA layers"
    if any(not isinstance(c, LowRankUpdate) for _, c in children):
        return None  # e.g. DoRA layers, which each run the fused DoRA function: nothing falls back, nothing to warn
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

    def __init__(
        self, module: nn.Module, gate: str, up: str, down: str, act: str, runtime: KernelRuntime | None = None
    ) -> None:
        self.module = module  # a strong reference: deepcopy maps it to the copy, pickle stores it
        self.gate, self.up, self.down, self.act = gate, up, down, act
        self.runtime = runtime

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        if args or kwargs:
            return type(module).forward(module, x, *args, **kwargs)
        g, u = getattr(module, self.gate)(x), getattr(module, self.up)(x)
        return getattr(module, self.down)(glu(g, u, self.act, self.runtime))


def fuse_glu_mlps(model: nn.Module, warn: bool = True, runtime: KernelRuntime | None = None) -> list[str]:
    """Give every gated MLP of plain linear layers the fused GLU kernel (one pass for ``act(g) * u``).

    MLPs whose projections are LoRA layers are left to :func:`fuse_lora_layers`. Returns the patched module names.

    Example::

        fuse_glu_mlps(model)     # e.g. a frozen model, or one with adapters on attention only
    """
    from lightning_zenft.fusion.sharding import fsdp_units, unsharded

    done = []
    units = fsdp_units(model)
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule) or "forward" in module.__dict__:
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
                fused = GLUMLPForward(module, gate, up, down, act[1], runtime)
                with unsharded(units.get(id(module))):  # the probe calls the MLP outside its unit's forward
                    matches = _probe_matches(module, fused, getattr(module, gate).weight)
                if matches:
                    module.forward = fused
                    done.append(name)
                    break
            break
        else:
            continue
        if name not in done and warn:
            why = "its forward is not down(act(gate(x)) * up(x))"
            warn_fallback(name, why, "looks like a gated MLP but is not fused")
    return done
