"""Several adapters on one base: add or load adapters under names, switch the active one, delete, export one.

A layer holds one adapter at a time (no per-adapter dicts in any ``forward``): the active adapter's modules are in
the model, the others are kept aside, whole, with the base modules they wrap. Switching swaps modules in and out, so
the base is never reloaded or copied. What an adapter trains besides its modules (biases under BitFit,
``modules_to_save``) is kept per adapter as values, and the base's own values come back when it is switched out.

The adapters of a model that were injected without a name (by a callback or :func:`~lightning_zenft.inject_adapters`)
are the adapter named ``"default"``.

Example::

    add_adapter(model, "math", LoRAConfig(r=8))           # inactive while "default" is active
    load_adapter(model, "code_adapter", adapter_name="code")
    set_adapter(model, "math")                           # "math"'s modules in, the others aside
    save_adapter(model, "out/code", adapter_name="code") # any adapter, active or not
    delete_adapter(model, "code")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_zenft.adapters import Mergeable, Wrapping, adapter_parameter_names, find_adapters
from lightning_zenft.config import AdapterConfig
from lightning_zenft.inject import _replace, inject_adapters, unwrap_model
from lightning_zenft.registry import method_for_module

DEFAULT = "default"
_STATE = "_zenft_named_adapters"


@dataclass
class _Stored:
    """An adapter kept aside: its modules by position, and the values of what else it trains."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    trained: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Adapters:
    active: str | None = None
    stored: dict[str, _Stored] = field(default_factory=dict)
    base_values: dict[str, torch.Tensor] = field(default_factory=dict)  # what extras were before any adapter


def _state(model: nn.Module) -> _Adapters:
    state = model.__dict__.get(_STATE)
    if state is None:
        state = _Adapters(active=DEFAULT if _present(model) else None)
        model.__dict__[_STATE] = state
    return state


def _present(model: nn.Module) -> bool:
    return any(True for _ in find_adapters(model))


def _extras(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trained parameters of ``model`` that belong to no adapter module."""
    own = set(adapter_parameter_names(model))
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n not in own}


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters of ``model``, the active one first."""
    model = unwrap_model(model)
    state = _state(model)
    return ([state.active] if state.active else []) + sorted(state.stored)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter whose modules are in ``model`` (None: none is)."""
    model = unwrap_model(model)
    return _state(model).active


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without dots.")
    return name


# ---------------------------------------------------------------------------------------------------- swap out / in
def _stash(model: nn.Module, state: _Adapters) -> _Stored:
    """Take the active adapter out of ``model``: its modules aside, its extras' values saved, the base's put back."""
    stored = _Stored()
    layers = list(find_adapters(model))
    extras = _extras(model)
    for name, layer in layers:
        if isinstance(layer, Mergeable) and layer.merged:
            raise RuntimeError(
                f"the active adapter is merged into the base at {name}; unmerge it (unmerge_adapters) before switching."
            )
        if getattr(layer, "modifies_base", False):
            raise RuntimeError(
                f"the active adapter rewrote the base weights at {name} (PiSSA); other adapters cannot share this "
                "base. Save it (save_adapter writes it against the original base) and load it into a fresh base as a "
                "named adapter instead."
            )
    unknown = [n for n in extras if n not in state.base_values]
    if unknown:
        raise RuntimeError(
            f"the active adapter trains base parameters {unknown[:3]} whose values before training are unknown (it "
            "was injected before named adapters were used on this model); save it and load it by name into a fresh "
            "base instead."
        )
    for name, layer in sorted(layers, key=lambda item: -item[0].count(".")):  # nested adapters: innermost first
        stored.modules[name] = layer
        remove = getattr(layer, "remove", None)
        if callable(remove):  # what the module installed on the model (hooks)
            remove()
        if isinstance(layer, Wrapping):
            _replace(model, name, layer.base_layer)
        else:
            parent, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
    for pname, p in extras.items():
        stored.trained[pname] = p.detach().clone()
        with torch.no_grad():
            p.copy_(state.base_values[pname])
        p.requires_grad_(False)
    state.active = None
    return stored


def _restore(model: nn.Module, state: _Adapters, name: str) -> None:
    """Put the stored adapter ``name`` into ``model`` (no adapter may be active)."""
    stored = state.stored.pop(name)
    for layer_name, layer in reversed(stored.modules.items()):  # outermost first: the reverse of _stash
        if isinstance(layer, Wrapping):
            here = model.get_submodule(layer_name)
            if here is not layer.base_layer:
                state.stored[name] = stored
                raise RuntimeError(
                    f"adapter {name!r} wraps a module at {layer_name} that is no longer in the model "
                    f"({type(here).__name__} is there now); the base was changed after the adapter was added."
                )
            device = _device(layer.base_layer)
            _replace(model, layer_name, layer.to(device) if device is not None else layer)
            install = getattr(layer, "install", None)
            if callable(install):  # e.g. LoReFT's hook that reads the attention mask
                install(model)
        else:  # a module the model holds beside its layers: built anew from that model, given the stored values
            method = method_for_module(layer)
            assert method is not None
            owner = layer_name.rpartition(".")[0]
            fresh = method.build(model.get_submodule(owner), **layer.settings())  # type: ignore[operator]
            fresh.load_state_dict(layer.state_dict())
            _replace(model, layer_name, fresh)
    params = dict(model.named_parameters())
    for pname, value in stored.trained.items():
        p = params[pname]
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
        p.requires_grad_(True)
    for pname in adapter_parameter_names(model):
        params[pname].requires_grad_(True)
    state.active = name


def _device(module: nn.Module) -> torch.device | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return None


def _remember_base_values(model: nn.Module, state: _Adapters, names: list[str]) -> None:
    params = dict(model.named_parameters())
    for pname in names:
        if pname not in state.base_values:
            state.base_values[pname] = params[pname].detach().clone()


# ---------------------------------------------------------------------------------------------------- public API
def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter of ``model`` (the active one is kept aside, whole).

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
    """
    model = unwrap_model(model)
    state = _state(model)
    if name == state.active:
        return
    if name not in state.stored:
        raise KeyError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")
    previous = state.active
    if previous is not None:
        state.stored[previous] = _stash(model, state)
    try:
        _restore(model, state, name)
    except BaseException:
        if previous is not None:
            _restore(model, state, previous)
        raise


@contextmanager
def _aside(model: nn.Module, state: _Adapters) -> Iterator[None]:
    """Inside the block the model holds no adapter; the active one comes back after (a new one stays aside)."""
    previous = state.active
    if previous is not None:
        state.stored[previous] = _stash(model, state)
    try:
        yield
    finally:
        if previous is not None:
            _restore(model, state, previous)


def add_adapter(model: nn.Module, name: str, config: AdapterConfig, activate: bool = False) -> list[str]:
    """Inject a new adapter named ``name`` from ``config``; returns the adapted module names.

    It stays aside while another adapter is active, unless ``activate`` (or no adapter is active yet).

    Example::

        add_adapter(model, "math", LoRAConfig(r=8, target_modules="attention"), activate=True)
    """
    model = unwrap_model(model)
    names = _add(model, name, lambda: inject_adapters(model, config))
    if activate:
        set_adapter(model, name)
    return names


def _add(model: nn.Module, name: str, inject: Callable[[], list[str]]) -> list[str]:
    """Run ``inject`` (which adds adapters to a model holding none) as adapter ``name``: active if no adapter is,
    else kept aside while the active one stays."""
    name = _check_name(name)
    state = _state(model)
    if name == state.active or name in state.stored:
        raise ValueError(f"an adapter named {name!r} exists already; delete_adapter it first or pick another name.")
    if state.active is None:
        return _add_active(model, state, name, inject)
    with _aside(model, state):
        names = _add_active(model, state, name, inject)
        state.stored[name] = _stash(model, state)
    return names


def _add_active(model: nn.Module, state: _Adapters, name: str, inject: Callable[[], list[str]]) -> list[str]:
    names = inject()
    _remember_base_values(model, state, list(_extras(model)))  # flags changed, values not yet: the base's values
    state.active = name
    return names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the adapter ``name`` (the active one too: the model then holds none)."""
    model = unwrap_model(model)
    state = _state(model)
    if name == state.active:
        _stash(model, state)
    elif state.stored.pop(name, None) is None:
        raise KeyError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")


def add_loaded_adapter(model: nn.Module, adapter_name: str, load: Callable[[], list[str]]) -> list[str]:
    """Keep what ``load`` injects (``load_adapter`` into the model, which then holds no other active adapter) as the
    adapter ``adapter_name``, aside while another adapter is active; ``load_adapter(..., adapter_name=)`` uses it."""
    return _add(unwrap_model(model), adapter_name, load)


@contextmanager
def using_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``name`` active inside the block, and the previously active adapter (or none) after it."""
    model = unwrap_model(model)
    state = _state(model)
    previous = state.active
    set_adapter(model, name)
    try:
        yield
    finally:
        if previous is None:
            state.stored[name] = _stash(model, state)
        else:
            set_adapter(model, previous)


__all__ = [
    "DEFAULT",
    "active_adapter",
    "add_adapter",
    "add_loaded_adapter",
    "delete_adapter",
    "list_adapters",
    "set_adapter",
    "using_adapter",
]
