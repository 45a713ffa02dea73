"""Which linear layers the 4-bit plugin quantizes, and why every other one stays as it is.

The rule: frozen base weights only. A layer is quantized when it is an ``nn.Linear`` whose weight does not train
(an adapter layer's ``base_layer``, or any linear layer the adapter callback froze), unless it is

* an adapter's own weight (found through :func:`lightning_zenft.adapters.adapter_parameter_names`, whatever its
  ``requires_grad``), never quantized, even when asked;
* the output head (``get_output_embeddings()`` or ``lm_head``), kept unless ``modules`` names it;
* matched by ``skip_modules``;
* trainable (kept; naming it in ``modules`` is an error).

Embeddings, norms and GPT-2 ``Conv1D`` layers are never quantized. ``modules`` and ``skip_modules`` take the syntax
of ``target_modules``: a list of exact names or dot-aligned suffixes (``["q_proj", "layers.0.mlp"]``), or one string
that is a regex matched against full names (a plain name such as ``"lm_head"`` also matches as a suffix).

Example::

    plan = plan_quantization(model, skip_modules=["mlp.down_proj"])
    plan.targets                      # names of the layers to quantize
    plan.kept                         # {name: reason} for the linear layers left alone
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_zenft.adapters import adapter_parameter_names
from lightning_zenft.adapters._base import is_conv1d
from lightning_zenft.targets import output_head_names

ModuleSpec = str | list[str]


def name_matches(name: str, spec: str | Sequence[str]) -> bool:
    """True when ``name`` matches a module spec: a regex (full match) or plain suffix string, or a list of names."""
    if isinstance(spec, str):
        if re.fullmatch(spec, name):
            return True
        return bool(re.fullmatch(r"[\w.]+", spec)) and (name == spec or name.endswith("." + spec))
    return any(name == target or name.endswith("." + target) for target in spec)


def _layer_matches(name: str, spec: ModuleSpec) -> bool:
    """``name_matches`` for a layer that may sit inside an adapter wrapper: ``mlp.down_proj.base_layer`` is also
    matched as ``mlp.down_proj``, the name the user knows."""
    if name_matches(name, spec):
        return True
    return name.endswith(".base_layer") and name_matches(name[: -len(".base_layer")], spec)


def is_4bit_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or a :class:`~lightning_zenft.precision.ShardedLinear4bit`."""
    names = {cls.__name__ for cls in type(module).__mro__}
    return "Linear4bit" in names or "ShardedLinear4bit" in names


@dataclass
class QuantizationPlan:
    """The outcome of :func:`plan_quantization`."""

    targets: list[str] = field(default_factory=list)
    """Linear layers to quantize now, in module order."""
    quantized: list[str] = field(default_factory=list)
    """Layers that are 4-bit already (quantized by LoftQ, the low-memory loader, or an earlier conversion)."""
    kept: dict[str, str] = field(default_factory=dict)
    """Linear layers left in full precision, with the reason."""


def _head_names(model: nn.Module) -> set[str]:
    heads = output_head_names(model)
    return heads | {f"{head}.base_layer" for head in heads}  # a head wrapped by an adapter


def plan_quantization(
    model: nn.Module, modules: ModuleSpec | None = None, skip_modules: ModuleSpec | None = None
) -> QuantizationPlan:
    """Decide which linear layers of ``model`` get 4-bit weights (see the module docstring).

    Raises:
        ValueError: when ``modules`` names a trainable layer, an adapter's own weight, or matches nothing.
    """
    adapter_ids = {id(model.get_parameter(n)) for n in adapter_parameter_names(model)}
    heads = _head_names(model)
    plan = QuantizationPlan()
    asked_trainable: list[str] = []
    asked_adapter: list[str] = []
    matched_any = skipped_any = False
    for name, module in model.named_modules():
        if is_4bit_layer(module):
            plan.quantized.append(name)
            skipped_any = skipped_any or bool(skip_modules and _layer_matches(name, skip_modules))
            continue
        if is_conv1d(module):
            plan.kept[name] = "GPT-2 Conv1D (only nn.Linear layers are quantized)"
            continue
        if not isinstance(module, nn.Linear) or type(module).__name__ == "Linear8bitLt":
            continue
        asked = modules is not None and _layer_matches(name, modules)
        matched_any = matched_any or asked
        if id(module.weight) in adapter_ids:
            if asked:
                asked_adapter.append(name)
            continue  # adapter factors are never quantized, and not worth listing
        skip = skip_modules is not None and _layer_matches(name, skip_modules)
        skipped_any = skipped_any or skip
        if skip:
            plan.kept[name] = "skip_modules"
        elif module.weight.requires_grad:
            if asked:
                asked_trainable.append(name)
            plan.kept[name] = "trainable"
        elif modules is not None and not asked:
            plan.kept[name] = "not in modules"
        elif modules is None and name in heads:
            plan.kept[name] = "output head (name it in modules= to quantize it)"
        else:
            plan.targets.append(name)
    problems = []
    if asked_adapter:
        problems.append(f"modules={modules!r} names adapter weights {asked_adapter[:4]}, which are never quantized")
    if asked_trainable:
        problems.append(
            f"modules={modules!r} names trainable layers {asked_trainable[:4]}; only frozen weights can be 4-bit "
            "(freeze them, or leave them out of modules=)"
        )
    if modules is not None and not matched_any:
        problems.append(f"modules={modules!r} matches no linear layer of {type(model).__name__}")
    if skip_modules and not skipped_any:
        problems.append(f"skip_modules={skip_modules!r} matches no linear layer of {type(model).__name__}")
    if problems:
        raise ValueError("NF4Precision: " + "; ".join(problems) + ".")
    return plan
