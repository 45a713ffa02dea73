r"""Switching LoRA layers of a model to the fused kernels, without touching a parameter or a state_dict key.

Three levels, each detected generically (no per-architecture code) and each falling back, with a warning that names
the layer and the reason, to the level below:

1. **Per layer** (:mod:`~lightning_zenft.fusion.layers`): a LoRA layer becomes a ``FusedLoRALinear`` (a DoRA
   layer a ``FusedDoRALinear``) by swapping its ``__class__``: same object, same parameters, same ``state_dict``
   keys; its forward calls :func:`~lightning_zenft.kernels.fused_lora` (dense, bitsandbytes NF4, or any base with
   ``dequantize_weight()``) or :func:`~lightning_zenft.kernels.fused_dora`.
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

from dataclasses import dataclass, field

from torch import nn

from lightning_zenft.adapters import AdapterModule, Wrapping
from lightning_zenft.fusion.groups import _SiblingObserver
from lightning_zenft.fusion.layers import FusedLoRALinear, fuse_layer, is_fused, unfusable_reason, unfuse_layer
from lightning_zenft.fusion.mlp import (
    FusedGatedMLPForward,
    GLUMLPForward,
    _mlp_candidate,
    _probe_matches,
    warn_fallback,
)
from lightning_zenft.fusion.sharding import fsdp_units, unsharded
from lightning_zenft.kernels.runtime import KernelRuntime, resolve


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


def fuse_lora_layers(
    model: nn.Module,
    *,
    mlp: bool = True,
    shared_input: bool = True,
    warn: bool = True,
    mlp_recompute: bool = False,
    runtime: KernelRuntime | None = None,
) -> FusionReport:
    """Switch every LoRA layer of ``model`` to the fused kernels (see the module docstring); returns a report.

    Args:
        model: a model with :class:`LoRALinear` layers already injected.
        mlp: fuse gated MLPs whose three projections are LoRA layers.
        mlp_recompute: fused MLPs recompute ``act(gate) * up`` in backward instead of keeping it (less memory, one
            more elementwise pass).
        shared_input: watch sibling layers for a shared input (groups form at :func:`finalize_shared_inputs`).
        warn: warn for every layer or MLP that falls back, naming it and the reason.
        runtime: the kernels' back-end choice and caches (the default runtime if None).

    Example::

        report = fuse_lora_layers(model)
        print(report.summary())
    """
    runtime = resolve(runtime)
    report = FusionReport()
    units = fsdp_units(model)  # FSDP2: layers inside a unit are whole during their forward
    for name, module in model.named_modules():
        if is_fused(module):
            report.layers.append(name)
        elif isinstance(module, Wrapping) and isinstance(module, AdapterModule):
            why = unfusable_reason(module, in_fsdp_unit=id(module) in units)
            if why is None:
                fuse_layer(module, runtime)
                report.layers.append(name)
            else:
                report.skipped[name] = why
                if warn:
                    warn_fallback(name, why, "keeps the unfused LoRA forward")
    in_mlp: set[int] = set()
    if mlp:
        for name, module in model.named_modules():
            if isinstance(module, AdapterModule) or isinstance(module.__dict__.get("forward"), FusedGatedMLPForward):
                continue
            cand = _mlp_candidate(module)
            if cand is not None and "forward" in module.__dict__:
                cand = "its forward is overridden on the instance (a wrapper or hook the fused MLP would bypass)"
            if cand is None:
                continue
            if isinstance(cand, str):
                report.skipped[name] = cand
                if warn:
                    warn_fallback(name, cand, "is a gated MLP but is not fused (its layers run one by one)")
                continue
            act, orders = cand
            reasons = [unfusable_reason(getattr(module, n), in_fsdp_unit=id(module) in units) for n in orders[0]]
            if any(r is not None for r in reasons):
                continue  # the layer itself was reported above
            for gate, up, down in orders:
                fused = FusedGatedMLPForward(module, gate, up, down, act, mlp_recompute, runtime)
                with unsharded(units.get(id(module))):  # the probe calls the MLP outside its unit's forward
                    matches = _probe_matches(module, fused, getattr(module, gate).lora_A.weight)
                if matches:
                    module.forward = fused
                    report.mlps.append(name)
                    in_mlp.update(id(getattr(module, n)) for n in (gate, up, down))
                    break
            else:
                why = "its forward is not down(act(gate(x)) * up(x)) for any assignment of its projections"
                report.skipped[name] = why
                if warn:
                    warn_fallback(name, why, "looks like a gated MLP but is not fused")
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


def unfuse_lora_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_lora_layers`: plain adapter classes, original MLP forwards; returns the count of layers."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), (FusedGatedMLPForward, GLUMLPForward)):
            del module.forward
        count += unfuse_layer(module)
    return count
