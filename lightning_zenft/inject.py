"""The plan of an adapter config on a model, and the swap of modules for adapter modules: the one place a config
becomes modules.

:func:`plan_adapters` turns a config and a model into an :class:`AdapterPlan`: which modules, with which per-layer
values. The swap (:func:`inject_adapters`), the resume path of the adapter callbacks and the PEFT file loader all use
it, so per-layer values are worked out once.

Which modules a config selects, and the target syntax (``target_modules``, ``exclude_modules``, the per-layer
pattern keys), is :mod:`lightning_zenft.targets`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_zenft.adapters import Mergeable, Wrapping, find_adapters, merge_adapters
from lightning_zenft.config import PRESETS, AdapterConfig, pattern_value
from lightning_zenft.registry import Method, method_for_config, method_for_module
from lightning_zenft.targets import match_targets, model_root, module_candidates, walk

_NORM_HINTS = ("norm",)


@dataclass
class LayerPlan:
    """One module of a plan: its full name, the keyword arguments its adapter module is built with, and the method
    that builds it (a composite method's parts differ; None: the plan's method)."""

    name: str
    kwargs: dict[str, Any]
    method: Method | None = None
    at: str | None = None
    """Where the module is built, if not at ``name`` (nested parameter adapters are all built at their module)."""


@dataclass
class AdapterPlan:
    """Which modules of a model a config adapts, with which per-layer values.

    Example::

        plan = plan_adapters(model, LoRAConfig(r=8, rank_pattern={"o_proj": 4}))
        [(layer.name, layer.kwargs["r"]) for layer in plan.layers]
    """

    method: Method
    config: AdapterConfig | None
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def mismatches(self, model: nn.Module) -> list[str]:
        """How the adapters already in ``model`` differ from this plan (empty when they are exactly what it makes).

        Compares the set of adapted modules, the method, and the per-layer settings that change what the trained
        tensors mean (``config.identity_keys``: rank, alpha, scaling and variant for LoRA).
        """
        existing = dict(find_adapters(model))
        problems = []
        missing = [n for n in self.names if n not in existing]
        extra = [n for n in existing if n not in set(self.names)]
        if missing:
            problems.append(f"{len(missing)} planned layers have no adapter (e.g. {missing[:3]})")
        if extra:
            problems.append(f"{len(extra)} adapted layers are not in the plan (e.g. {extra[:3]})")
        for layer in self.layers:
            module = existing.get(layer.name)
            if module is None:
                continue
            method = method_for_module(module)
            wanted = layer.method or self.method
            if method is not wanted:
                kind = method.name if method else type(module).__name__
                problems.append(f"{layer.name} holds a {kind} adapter, not {wanted.name}")
                continue
            keys = wanted.config_cls.identity_keys
            have = module.settings() if callable(getattr(module, "settings", None)) else {}
            differ = {k: (have.get(k), layer.kwargs.get(k)) for k in keys}
            differ = {k: pair for k, pair in differ.items() if not _same(*pair)}
            if differ:
                pretty = ", ".join(f"{k}={a!r} (wanted {b!r})" for k, (a, b) in differ.items())
                problems.append(f"{layer.name}: {pretty}")
        return problems


def _same(a: object, b: object) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def plan_adapters(
    model: nn.Module, config: AdapterConfig, *, initialize: bool = True, include_adapted: bool = False
) -> AdapterPlan:
    """The plan of ``config`` on ``model``: the modules its method attaches to, each with its build arguments.

    ``initialize=False`` plans modules whose weights are loaded next (no initialization that rewrites the base).
    ``include_adapted``: plan on a model that already holds adapters (they count at their positions).

    Raises:
        ValueError: when nothing matches (the message lists what exists).

    Example::

        plan = plan_adapters(model, LoRAConfig(target_modules="attention"))
        plan.names             # ['model.layers.0.self_attn.q_proj', ...]
    """
    plan = _plan(model, config, initialize, include_adapted)
    if config.target_modules in ("all-linear", "mlp") and plan.method.attaches_to == "linear":
        _warn_uncovered_mlps(model, plan)
    return plan


def _warn_uncovered_mlps(model: nn.Module, plan: AdapterPlan) -> None:
    """An ``"all-linear"``/``"mlp"`` plan that leaves a feed-forward module with weights but no adapter says so."""
    covered = [layer.at or layer.name for layer in plan.layers]
    missed = []
    for name in module_candidates(model, "mlp", include_adapted=True):
        module = model.get_submodule(name)
        if any(p.dim() >= 2 for p in module.parameters()) and not any(c.startswith(name + ".") for c in covered):
            missed.append(name)
    if missed:
        warnings.warn(
            f"{type(plan.config).__name__}(target_modules={plan.config.target_modules!r}) adapts nothing inside the "
            f"feed-forward modules {missed[:3]}{' ...' if len(missed) > 3 else ''}: their weights are in no layer or "
            "parameter form this library adapts. Name their layers or parameters (target_modules / "
            "target_parameters) to adapt them.",
            stacklevel=3,
        )


def _plan(model: nn.Module, config: AdapterConfig, initialize: bool, include_adapted: bool) -> AdapterPlan:
    method = method_for_config(config)
    parts = config.parts(model)
    if parts:  # a composite config: the layers of each part's plan, each built by its part's method
        return _plan_parts(model, config, method, parts, initialize, include_adapted)
    kind = config.attach_kind or method.attaches_to
    if kind == "model":  # one module in the adapted model (none: a method that only changes what trains)
        name = config.attach_name
        targets = [] if name is None else [_attach_path(model, name, include_adapted)]
    else:
        targets = match_targets(model, config.target_modules, config.exclude_modules, include_adapted, kind)
    if kind == "parameter":
        return AdapterPlan(method, config, _parameter_layers(config, targets, initialize))
    plan = AdapterPlan(method, config, [LayerPlan(n, config.layer_kwargs(n, initialize=initialize)) for n in targets])
    for key, unused in _unused_patterns(config, targets).items():
        warnings.warn(
            f"{type(config).__name__}: {key} key {unused!r} matches none of the {len(targets)} adapted layers "
            f"(e.g. {targets[:2]}); it has no effect. Keys match the end of a layer name on a dot boundary.",
            stacklevel=3,
        )
    return plan


def _attach_path(model: nn.Module, attach_name: str, include_adapted: bool) -> str:
    """Where a ``"model"``-kind module goes: ``attach_name`` inside the model it adapts (:func:`model_root`)."""
    root = model_root(model)
    owner = model.get_submodule(root) if root else model
    if not include_adapted and hasattr(owner, attach_name):
        raise ValueError(
            f"{type(owner).__name__} already has an attribute {attach_name!r} "
            f"({type(getattr(owner, attach_name)).__name__}); an adapter of this kind is already in place or the name "
            "is taken. Unload it first (lightning_zenft.unload_adapters(model, merge=False))."
        )
    return f"{root}.{attach_name}" if root else attach_name


def _plan_parts(
    model: nn.Module,
    config: AdapterConfig,
    method: Method,
    parts: list[AdapterConfig],
    initialize: bool,
    include_adapted: bool,
) -> AdapterPlan:
    """The layers of every part's plan. A part whose preset matches nothing is left out when another part has
    layers (e.g. ``"mlp"`` on a mixture-of-experts model: no linear layer, the expert weights); else its error."""
    layers: list[LayerPlan] = []
    errors = []
    for part in parts:
        try:
            sub = _plan(model, part, initialize, include_adapted)
        except ValueError as err:
            if not (isinstance(part.target_modules, str) and part.target_modules in PRESETS):
                raise
            errors.append(err)
            continue
        layers += [LayerPlan(x.name, x.kwargs, x.method or sub.method, x.at) for x in sub.layers]
    if not layers and errors:
        raise errors[0]
    return AdapterPlan(method, config, layers)


def _parameter_layers(config: AdapterConfig, names: list[str], initialize: bool) -> list[LayerPlan]:
    """Parameter adapters: one per parameter, nested per module, the first parameter innermost (as HF PEFT nests)."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(name.rsplit(".", 1)[0], []).append(name)
    layers = []
    for module, params in by_module.items():
        for i, name in enumerate(params):
            final = module + ".base_layer" * (len(params) - 1 - i)
            layers.append(LayerPlan(final, config.layer_kwargs(name, initialize=initialize), at=module))
    return layers


def _unused_patterns(config: AdapterConfig, names: list[str]) -> dict[str, list[str]]:
    """Per-layer pattern keys (``rank_pattern``...) of ``config`` that match none of ``names``."""
    out = {}
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None) or {}
        unused = [key for key in patterns if not any(pattern_value(n, {key: True}, False) for n in names)]
        if unused:
            out[attr] = unused
    return out


def inject_adapters(model: nn.Module, config: AdapterConfig, *, initialize: bool = True) -> list[str]:
    """Swap every target module of ``model`` for the config's adapter module wrapping it; returns the adapted names.

    Only the adapter parameters are left trainable (see :func:`set_trainable`). ``initialize=False`` skips
    initialization that rewrites the base, such as PiSSA's SVD (used when weights are loaded right after).

    Example::

        names = inject_adapters(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    """
    plan = plan_adapters(model, config, initialize=initialize)
    apply_plan(model, plan)
    return plan.names


def apply_plan(model: nn.Module, plan: AdapterPlan) -> None:
    """Build and swap in every module of ``plan`` (:func:`build_plan`), then set what trains (:func:`set_trainable`)."""
    if plan.config is None:
        raise ValueError("this plan has no config to say what trains; use build_plan and set_trainable_names.")
    build_plan(model, plan)
    set_trainable(model, plan.config)


def build_plan(model: nn.Module, plan: AdapterPlan) -> None:
    """Build and swap in every module of ``plan``; a ``"model"``-kind module is built from the model it is added to
    (the parent of its plan name: the model it adapts, see :func:`lightning_zenft.targets.model_root`).

    A module that needs something outside itself (LoReFT reads the attention mask the model was called with) has
    ``install(model)``, called once it is in place, and ``remove()``, called before it is taken out
    (:func:`unload_adapters`).
    """
    for layer in plan.layers:
        method = layer.method or plan.method
        where = layer.at or layer.name
        if method.attaches_to == "model":
            target = model.get_submodule(where.rpartition(".")[0])
        else:
            target = model.get_submodule(where)
        module = method.build(target, **layer.kwargs)
        _replace(model, where, module)
        install = getattr(module, "install", None)
        if callable(install):
            install(model)


def set_trainable_names(model: nn.Module, names: list[str]) -> None:
    """Freeze ``model`` except its adapters' parameters and the parameters named in ``names``.

    Raises:
        ValueError: naming a parameter ``model`` does not have.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"{type(model).__name__} has no parameters {unknown[:5]}; it is not the model they were for.")
    for p in params.values():
        p.requires_grad_(False)
    for _, layer in find_adapters(model):
        for pname in layer.adapter_params():
            layer.get_parameter(pname).requires_grad_(True)
    for name in names:
        params[name].requires_grad_(True)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_trainable(model: nn.Module, config: AdapterConfig) -> None:
    """Freeze ``model`` except the adapters, plus the biases/norms/modules the config asks to train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in find_adapters(model):
        for pname in layer.adapter_params():
            layer.get_parameter(pname).requires_grad_(True)
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in find_adapters(model):
            bias = getattr(layer.base_layer, "bias", None) if isinstance(layer, Wrapping) else None
            if bias is not None:
                bias.requires_grad_(True)
    if config.trainable_norms:
        for _, module in walk(model):
            if any(h in type(module).__name__.lower() for h in _NORM_HINTS):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    for pname in config.trainable_names(model):
        model.get_parameter(pname).requires_grad_(True)
    for target in config.modules_to_save:
        found = [m for name, m in walk(model) if name == target or name.endswith("." + target)]
        if not found:
            names = [n for n, _ in walk(model)]
            raise ValueError(f"modules_to_save entry {target!r} matches no module; modules include e.g. {names[:12]}.")
        for module in found:
            for p in module.parameters():
                p.requires_grad_(True)


def unload_adapters(model: nn.Module, merge: bool = True) -> list[str]:
    """Put the base layers back in place of the adapters, merged into their weights when ``merge`` (else dropped).

    Returns the names of the layers restored.
    """
    layers = list(find_adapters(model))
    if merge:
        merge_adapters(model)  # refuses adapters that cannot be merged, before anything is changed
    restored = []
    for name, layer in sorted(layers, key=lambda item: -item[0].count(".")):  # nested adapters: innermost first
        if not merge and isinstance(layer, Mergeable) and layer.merged:
            layer.unmerge()
        remove = getattr(layer, "remove", None)
        if callable(remove):  # undo what the module installed (hooks on the model)
            remove()
        if isinstance(layer, Wrapping):
            _replace(model, name, layer.base_layer)
        else:  # a module beside the model (e.g. prompt tuning's): drop it
            parent_name, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent_name) if parent_name else model, child)
        restored.append(name)
    return restored


def unwrap_model(model: nn.Module) -> nn.Module:
    """Accept a LightningModule holding the model in ``.model`` where the adapters live under that attribute."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "trainer") and hasattr(inner, "config"):
        return inner
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once (as PEFT counts them)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
