"""Target selection and the swap of base layers for adapter layers: the one place a config becomes modules.

Target syntax (``target_modules`` / ``exclude_modules``):

* a preset: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output head), ``"attention"`` (the linear
  layers inside attention blocks: q/k/v/o, GPT-2's ``c_attn``/``attn.c_proj``, Phi's ``dense``...), ``"mlp"`` (the
  linear layers of the feed-forward blocks). Presets look at the module path (a parent named ``*attn*``,
  ``*attention*`` vs ``mlp``/``ffn``/``feed_forward``/BERT's ``intermediate``/``output``), so they work across Llama,
  Mistral, Qwen2, Gemma, Phi, GPT-2, BERT and plain ``nn.Module``s that follow these names;
* a list of exact names or name suffixes, aligned on dots: ``["q_proj", "v_proj"]`` or ``["layers.0.mlp.up_proj"]``;
* any other string is a regex that must match a full module name (``re.fullmatch``); a plain name such as
  ``"q_proj"`` that matches no full name is taken as a suffix.

``rank_pattern``/``alpha_pattern`` keys match a layer when its full name ends with the key on a dot boundary (the key
is a regex), e.g. ``{"o_proj": 8, r"layers\\.0\\..*": 4}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from lightning_zenft.adapters import AdapterModule, DoRALinear, LoRALinear, find_adapters
from lightning_zenft.adapters._base import is_adaptable_linear
from lightning_zenft.config import PRESETS, LoRAConfig

_ATTENTION_HINTS = ("attn", "attention")
_MLP_SEGMENTS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "output", "block_sparse_moe", "experts")
_NORM_HINTS = ("norm",)


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into adapter layers (their base and factors are not targets)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, AdapterModule):
            yield from _walk(child, full)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear``/``Conv1D`` in ``model`` that is not already part of an adapter."""
    return [name for name, m in _walk(model) if is_adaptable_linear(m) and not isinstance(m, AdapterModule)]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of output heads: what any ``get_output_embeddings()`` inside ``model`` returns, and ``lm_head``s."""
    heads: set[str] = set()
    by_id = {id(m): name for name, m in _walk(model)}
    for module in [model, *(m for _, m in _walk(model))]:
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (AttributeError, NotImplementedError):
                head = None
            if head is not None and id(head) in by_id:
                heads.add(by_id[id(head)])
    heads.update(name for name in by_id.values() if name.rsplit(".", 1)[-1] == "lm_head")
    return heads


def block_kind(name: str) -> str | None:
    """``"attention"``, ``"mlp"`` or ``None`` for a module name, from its parent path."""
    parents = [segment.lower() for segment in name.split(".")[:-1]]
    if any(hint in segment for segment in parents for hint in _ATTENTION_HINTS):
        return "attention"
    if any(segment in _MLP_SEGMENTS or "mlp" in segment for segment in parents):
        return "mlp"
    return None


def _name_matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        if re.fullmatch(spec, name):
            return True
        return bool(re.fullmatch(r"[\w.]+", spec)) and (name == spec or name.endswith("." + spec))
    return any(name == target or name.endswith("." + target) for target in spec)


def _describe(names: Sequence[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    examples = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"leaf names {leaves}; e.g. {examples}"


def match_targets(
    model: nn.Module, target_modules: str | Sequence[str], exclude_modules: str | Sequence[str] | None = None
) -> list[str]:
    """Resolve a target spec to the full names of the linear layers it selects, in module order.

    Raises:
        ValueError: when nothing matches; the message lists the linear layers that do exist.
    """
    names = linear_layer_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no torch.nn.Linear or transformers Conv1D layers to adapt. If the model is "
            "built in `configure_model`, the LoRA callback injects after it; otherwise check what the module holds."
        )
    if isinstance(target_modules, str) and target_modules in PRESETS:
        heads = output_head_names(model)
        if target_modules == "all-linear":
            selected = [n for n in names if n not in heads]
        else:
            selected = [n for n in names if n not in heads and block_kind(n) == target_modules]
    else:
        selected = [n for n in names if _name_matches(n, target_modules)]
    if exclude_modules:
        selected = [n for n in selected if not _name_matches(n, exclude_modules)]
    if not selected:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no linear layer of "
            f"{type(model).__name__}. Its linear layers: {_describe(names)}. Use one of the presets {list(PRESETS)}, "
            "a list of these names or suffixes, or a regex over the full names."
        )
    return selected


def pattern_value(name: str, patterns: dict[str, int] | dict[str, float], default: float) -> float:
    """The value of the first key in ``patterns`` whose regex matches the end of ``name`` on a dot boundary."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def inject_adapters(model: nn.Module, config: LoRAConfig, *, initialize: bool = True) -> list[str]:
    """Swap every target layer of ``model`` for a LoRA (or DoRA) layer wrapping it; returns the adapted names.

    Only the adapter parameters are left trainable (see :func:`set_trainable`). ``initialize=False`` skips PiSSA's SVD
    (used when weights are loaded right after).

    Example::

        names = inject_adapters(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    """
    targets = match_targets(model, config.target_modules, config.exclude_modules)
    layer_cls = DoRALinear if config.use_dora else LoRALinear
    init = config.init if initialize or config.init != "pissa" else "kaiming"
    for name in targets:
        base = model.get_submodule(name)
        r = int(pattern_value(name, config.rank_pattern, config.r))
        alpha = float(pattern_value(name, config.alpha_pattern, config.alpha))
        _replace(model, name, layer_cls(base, r, alpha, config.dropout, config.use_rslora, init))
    set_trainable(model, config)
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_trainable(model: nn.Module, config: LoRAConfig) -> None:
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
            bias = getattr(layer.base_layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)
    if config.trainable_norms:
        for _, module in _walk(model):
            if any(h in type(module).__name__.lower() for h in _NORM_HINTS):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    for target in config.modules_to_save:
        found = [m for name, m in _walk(model) if name == target or name.endswith("." + target)]
        if not found:
            names = [n for n, _ in _walk(model)]
            raise ValueError(f"modules_to_save entry {target!r} matches no module; modules include e.g. {names[:12]}.")
        for module in found:
            for p in module.parameters():
                p.requires_grad_(True)


def unload_adapters(model: nn.Module, merge: bool = True) -> list[str]:
    """Put the base layers back in place of the adapters, merged into their weights when ``merge`` (else dropped).

    Returns the names of the layers restored.
    """
    restored = []
    for name, layer in list(find_adapters(model)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base_layer)  # type: ignore[attr-defined]
        restored.append(name)
    return restored


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once (as PEFT counts them)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
