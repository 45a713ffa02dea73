"""The methods the library knows: one :class:`Method` a method, registered in one line at the bottom of this file.

A method is a config dataclass (:mod:`lightning_zenft.config`: its fields, checks, per-layer values and PEFT's
config keys), a module file under :mod:`lightning_zenft.adapters` (the ``nn.Module``), a thin callback, and this
line, which says how a module is built, what kind of module it attaches to, and the ``peft_type`` of its PEFT files
(``None`` where PEFT lacks the method: such adapters save as safetensors plus our own JSON config).

Example::

    method = method_for_config(LoRAConfig())          # Method(name='lora', ...)
    layer = method.build(nn.Linear(8, 8), **LoRAConfig().layer_kwargs("q_proj"))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lightning_zenft.adapters import DoRALinear, LoRALinear
from lightning_zenft.adapters.bottleneck import BottleneckAdapterLayer, ParallelAdapterLayer
from lightning_zenft.adapters.ia3 import IA3Linear
from lightning_zenft.adapters.lora_param import LoRAParameter
from lightning_zenft.adapters.prefix import PrefixKV
from lightning_zenft.adapters.prompt import PromptEncoder, SoftPrompt
from lightning_zenft.adapters.reft import LoReFTLayer
from lightning_zenft.config import (
    AdapterConfig,
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoRAConfig,
    LoReFTConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)

Kind = Literal["linear", "embedding", "attention", "mlp", "block", "model"]
AttachesTo = Kind | tuple[Kind, ...]
"""What a method's module wraps (:mod:`lightning_zenft.targets` finds the candidates): a linear layer, the input
embedding, an attention module, a feed-forward module, a transformer block; or ``"model"``: one module beside the
whole model, built from it and added as ``config.attach_name`` (prompt tuning), or none at all when
``attach_name`` is None (methods that only change what trains, e.g. BitFit). A tuple of module kinds (e.g.
``("attention", "mlp")``, bottleneck adapters) attaches to any of them: ``target_modules`` then picks among their
candidates together (``"all"``, a kind's name, names or a regex)."""


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Args:
        name: the registry name (``config_cls.method``).
        config_cls: its config dataclass.
        build: ``build(target_module, **config.layer_kwargs(name)) -> module`` made for that target (for
            ``"model"``: ``build(model, ...)``; the module must not register ``model`` as a submodule).
        attaches_to: see :data:`AttachesTo`.
        module_types: the classes ``build`` makes (their subclasses count too), to tell which method a module is.
        peft_type: PEFT's ``peft_type`` for this method's files, or None where PEFT has no such method.
    """

    name: str
    config_cls: type[AdapterConfig]
    build: Callable[..., nn.Module]
    attaches_to: AttachesTo
    module_types: tuple[type[nn.Module], ...]
    peft_type: str | None = None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name and PEFT type must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered.")
    if method.config_cls.method != method.name:
        raise ValueError(f"{method.config_cls.__name__}.method={method.config_cls.method!r} != {method.name!r}.")
    if method.peft_type is not None and any(m.peft_type == method.peft_type for m in _METHODS.values()):
        raise ValueError(f"peft_type {method.peft_type!r} is already registered.")
    _METHODS[method.name] = method
    return method


def methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def method_for_config(config: AdapterConfig) -> Method:
    """The method a config belongs to."""
    name = type(config).method
    if name not in _METHODS:
        raise KeyError(f"{type(config).__name__} names method {name!r}, which is not registered.")
    return _METHODS[name]


def method_for_module(module: nn.Module) -> Method | None:
    """The method whose ``build`` made ``module`` (None for a module no method makes)."""
    for method in _METHODS.values():
        if isinstance(module, method.module_types):
            return method
    return None


def method_for_name(name: object, path: object = "adapter_config.json") -> Method:
    """The method registered as ``name``; an error naming the file and the known methods otherwise."""
    if isinstance(name, str) and name in _METHODS:
        return _METHODS[name]
    raise ValueError(f"{path}: method={name!r} is not one this library knows; it knows {sorted(_METHODS)}.")


def method_for_peft_type(peft_type: object, path: object = "adapter_config.json") -> Method:
    """The method that reads PEFT files of ``peft_type``; an error naming the file and the known types otherwise."""
    for method in _METHODS.values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise ValueError(f"{path}: peft_type={peft_type!r} is not one this library reads; it reads {known}.")


# ---------------------------------------------------------------------------------------------------- factories
def _lora_layer(
    base: nn.Module, *, use_dora: bool = False, parameter_name: str | None = None, **kwargs: Any
) -> nn.Module:
    if parameter_name is not None:  # the stacked expert weights of a mixture-of-experts layer
        if use_dora:
            raise ValueError(f"DoRA cannot adapt the expert parameter {parameter_name!r}; use LoRA for experts.")
        return LoRAParameter(base, parameter_name, **kwargs)
    return (DoRALinear if use_dora else LoRALinear)(base, **kwargs)


def _no_module(model: nn.Module, **kwargs: Any) -> nn.Module:
    raise TypeError(
        "this method builds no module of its own: BitFit only chooses which of the model's own parameters train, and "
        "a composite method (MAM) is built by its parts' methods."
    )


# ---------------------------------------------------------------------------------------------------- the methods
_SUBLAYERS: AttachesTo = ("attention", "mlp")
register(Method("lora", LoRAConfig, _lora_layer, "linear", (LoRALinear, LoRAParameter), peft_type="LORA"))
register(Method("ia3", IA3Config, IA3Linear, "linear", (IA3Linear,), peft_type="IA3"))
register(Method("bitfit", BitFitConfig, _no_module, "model", ()))
register(Method("prompt_tuning", PromptTuningConfig, SoftPrompt, "model", (SoftPrompt,), peft_type="PROMPT_TUNING"))
register(Method("prefix_tuning", PrefixTuningConfig, PrefixKV, "model", (PrefixKV,), peft_type="PREFIX_TUNING"))
register(Method("p_tuning", PTuningConfig, PromptEncoder, "model", (PromptEncoder,), peft_type="P_TUNING"))
register(Method("bottleneck", BottleneckConfig, BottleneckAdapterLayer, _SUBLAYERS, (BottleneckAdapterLayer,)))
register(Method("parallel_adapter", ParallelAdapterConfig, ParallelAdapterLayer, _SUBLAYERS, (ParallelAdapterLayer,)))
register(Method("loreft", LoReFTConfig, LoReFTLayer, "block", (LoReFTLayer,)))
register(Method("mam", MAMConfig, _no_module, "model", ()))  # composite: its parts' methods build its modules
