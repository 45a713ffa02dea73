"""Which modules of a model an adapter config selects: the candidates of each attachment kind, and target matching.

Kinds of module a method attaches to (:data:`lightning_zenft.registry.AttachesTo`), each found generically:

* ``"linear"``: every ``nn.Linear``/``Conv1D`` not part of an adapter;
* ``"attention"``: attention modules (a module whose own name contains ``attn``/``attention`` and that holds linear
  layers, the outermost one where they nest: ``self_attn``, GPT-2's ``attn``, BERT's ``attention``; not Llama's
  ``post_attention_layernorm``);
* ``"mlp"``: feed-forward modules (named ``mlp``, ``ffn``, ``feed_forward``...);
* ``"block"``: the transformer blocks (the modules holding an attention module);
* ``"embedding"``: the input embedding (``get_input_embeddings()``);
* ``"parameter"``: parameters adapted in place of a layer, named ``<module path>.<parameter>``: the stacked 3-D
  expert weights of mixture-of-experts layers (``experts.gate_up_proj``...), which no ``nn.Linear`` holds.

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

For the module kinds, the preset ``"all"`` selects every candidate of the kind, and a kind's name (``"attention"``,
``"mlp"``...) selects the candidates of that kind. A method may attach to several module kinds (e.g.
``("attention", "mlp")`` for bottleneck adapters): its candidates are theirs together, in module order, and the kind
names pick one of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TypeAlias

from torch import nn

from lightning_zenft.adapters import AdapterModule, Wrapping
from lightning_zenft.adapters._base import is_adaptable_linear
from lightning_zenft.config.base import PRESETS

_ATTENTION_HINTS = ("attn", "attention")
_MLP_SEGMENTS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "output", "block_sparse_moe", "experts")
_MLP_MODULES = ("mlp", "ffn", "feed_forward", "feedforward")
KINDS = ("linear", "attention", "mlp", "block", "embedding", "parameter")
MODULE_KINDS = ("attention", "mlp", "block", "embedding")

Kind: TypeAlias = str | Sequence[str]
"""One of :data:`KINDS`, or several module kinds (:data:`MODULE_KINDS`) at once."""


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into adapter layers (their base and factors are not targets)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, AdapterModule):
            yield from walk(child, full)


def linear_layer_names(model: nn.Module, include_adapted: bool = False) -> list[str]:
    """Names of every ``nn.Linear``/``Conv1D`` in ``model`` that is not part of an adapter.

    ``include_adapted``: also name the adapter layers that wrap one (at the position of the layer they wrap).
    """
    names = []
    for name, m in walk(model):
        if isinstance(m, AdapterModule):
            if include_adapted and isinstance(m, Wrapping) and is_adaptable_linear(m.base_layer):
                names.append(name)
        elif is_adaptable_linear(m):
            names.append(name)
    return names


def output_head_names(model: nn.Module) -> set[str]:
    """Names of output heads: what any ``get_output_embeddings()`` inside ``model`` returns, and ``lm_head``s."""
    heads: set[str] = set()
    by_id = {id(m): name for name, m in walk(model)}
    for module in [model, *(m for _, m in walk(model))]:
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


def name_matches(name: str, spec: str | Sequence[str]) -> bool:
    """Whether ``name`` is selected by a target spec (a regex over the whole name, or names/suffixes on dots)."""
    if isinstance(spec, str):
        if re.fullmatch(spec, name):
            return True
        return bool(re.fullmatch(r"[\w.]+", spec)) and (name == spec or name.endswith("." + spec))
    return any(name == target or name.endswith("." + target) for target in spec)


def _describe(names: Sequence[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    examples = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"leaf names {leaves}; e.g. {examples}"


def logical_name(model: nn.Module, name: str) -> str:
    """``name`` without the ``base_layer`` segments of the adapters it passes through (the name before adapting)."""
    parts = name.split(".")
    out: list[str] = []
    module = model
    for part in parts:
        child = getattr(module, part, None) if isinstance(module, nn.Module) else None
        if not (part == "base_layer" and isinstance(module, Wrapping) and isinstance(module, AdapterModule)):
            out.append(part)
        module = child
    return ".".join(out)


def expert_parameter_names(model: nn.Module, include_adapted: bool = False) -> list[str]:
    """``<module>.<parameter>`` of every 3-D parameter (stacked expert weights), in module order.

    A parameter already adapted counts only with ``include_adapted``; names are those before adapting.
    """
    names = []
    for full, param in model.named_parameters(remove_duplicate=False):
        if param.dim() != 3:
            continue
        module_name = full.rsplit(".", 1)[0] if "." in full else ""
        inside_adapter = any(isinstance(m, AdapterModule) for m in _chain(model, module_name))
        if inside_adapter and not include_adapted:
            continue
        names.append(logical_name(model, full))
    return list(dict.fromkeys(names))


def _chain(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """The modules on the path from ``model`` to the module ``name`` (itself included)."""
    module = model
    for part in [p for p in name.split(".") if p]:
        module = getattr(module, part)
        yield module


def _outermost(names: list[str]) -> list[str]:
    """``names`` without those nested inside another of them."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def _has_attention_name(name: str) -> bool:
    return any(hint in name.rsplit(".", 1)[-1].lower() for hint in _ATTENTION_HINTS)


def _kinds(kind: Kind) -> tuple[str, ...]:
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or (len(kinds) > 1 and any(k not in MODULE_KINDS for k in kinds)):
        raise ValueError(f"unknown module kind {kind!r}; one of {KINDS}, or several of {MODULE_KINDS}.")
    return kinds


def _positions(model: nn.Module, include_adapted: bool) -> dict[str, nn.Module]:
    """Module name -> the module whose kind decides, in module order: adapters and linear layers left out, or (with
    ``include_adapted``) a wrapping adapter counted as the module it wraps, whose submodules count as if unwrapped."""
    position: dict[str, nn.Module] = {}
    for name, module in walk(model):
        if isinstance(module, AdapterModule):
            if include_adapted and isinstance(module, Wrapping):
                position[name] = module.base_layer
                inner = _positions(module.base_layer, include_adapted=True)
                position.update({f"{name}.{sub}": m for sub, m in inner.items()})
        elif not is_adaptable_linear(module):
            position[name] = module
    return position


def module_candidates(model: nn.Module, kind: Kind, include_adapted: bool = False) -> list[str]:
    """Names of the modules of ``kind`` (see the module docstring) in ``model``, in module order.

    ``include_adapted``: a module already wrapped by an adapter counts at its position.
    """
    kinds = _kinds(kind)
    if len(kinds) > 1:
        found = {name for k in kinds for name in module_candidates(model, k, include_adapted)}
        return [name for name in _positions(model, include_adapted) if name in found]
    (kind,) = kinds
    if kind == "linear":
        return linear_layer_names(model, include_adapted)
    if kind == "parameter":
        return expert_parameter_names(model, include_adapted)
    position = _positions(model, include_adapted)
    if kind == "embedding":
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        return [n for n, m in position.items() if m is embedding or (embedding is None and isinstance(m, nn.Embedding))]
    attention = _outermost(  # holding linear layers: a norm named after attention (post_attention_layernorm) is not one
        [n for n, m in position.items() if _has_attention_name(n) and any(map(is_adaptable_linear, m.modules()))]
    )
    if kind == "attention":
        return attention
    if kind == "mlp":
        return _outermost([n for n in position if n.rsplit(".", 1)[-1].lower() in _MLP_MODULES])
    return _outermost(sorted({n.rsplit(".", 1)[0] for n in attention if "." in n}, key=list(position).index))


def match_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    include_adapted: bool = False,
    kind: Kind = "linear",
) -> list[str]:
    """Resolve a target spec to the full names of the modules of ``kind`` (one kind, or several module kinds) it
    selects, in module order.

    ``include_adapted``: modules already wrapped by an adapter count at their position (to plan on an adapted model).

    Raises:
        ValueError: when nothing matches; the message lists the candidates that do exist.
    """
    if kind != "linear":
        return _match_modules(model, target_modules, exclude_modules, include_adapted, kind)
    names = linear_layer_names(model, include_adapted)
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
        selected = [n for n in names if name_matches(n, target_modules)]
    if exclude_modules:
        selected = [n for n in selected if not name_matches(n, exclude_modules)]
    if not selected:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no linear layer of "
            f"{type(model).__name__}. Its linear layers: {_describe(names)}. Use one of the presets {list(PRESETS)}, "
            f"a list of these names or suffixes, or a regex over the full names.{_regex_hint(target_modules, names)}"
        )
    return selected


def _regex_hint(spec: str | Sequence[str], names: Sequence[str]) -> str:
    """A hint when ``spec`` is a regex that matches inside names but not whole names (``q_proj|v_proj``)."""
    if not isinstance(spec, str) or spec in PRESETS:
        return ""
    try:
        found = [n for n in names if re.search(spec, n)]
    except re.error as err:
        return f" ({spec!r} is not a valid regex: {err}.)"
    if not found:
        return ""
    return (
        f" A regex must match a whole name: {spec!r} matches inside {len(found)} names (e.g. {found[0]!r}); "
        f"write {'.*(' + spec + ')'!r} to match names that end with it."
    )


def _match_modules(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None,
    include_adapted: bool,
    kind: Kind,
) -> list[str]:
    kinds = _kinds(kind)
    what = " or ".join(kinds)
    names = module_candidates(model, kinds, include_adapted)
    if not names:
        looked = "; ".join(_KIND_HELP[k] for k in kinds)
        raise ValueError(
            f"{type(model).__name__} has no {what} modules to adapt (looked for {looked}). Name the modules "
            "in target_modules only if they are of that kind."
        )
    if target_modules == "all":
        selected = list(names)
    elif isinstance(target_modules, str) and target_modules in kinds:  # a kind's name: its candidates
        of_kind = set(module_candidates(model, target_modules, include_adapted))
        selected = [n for n in names if n in of_kind]
    else:
        selected = [n for n in names if name_matches(n, target_modules)]
    if exclude_modules:
        selected = [n for n in selected if not name_matches(n, exclude_modules)]
    if not selected:
        presets = ", ".join(repr(p) for p in ("all", *kinds))
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no {what} module of "
            f"{type(model).__name__}. Its {what} modules: {_describe(names)}. Use {presets}, a list of these names or "
            f"suffixes, or a regex over the full names.{_regex_hint(target_modules, names)}"
        )
    return selected


def model_root(model: nn.Module) -> str:
    """The name, inside ``model``, of the model a ``"model"``-kind method adapts: the outermost module with input
    embeddings (a ``get_input_embeddings`` method, as every ``transformers`` model has); ``""`` for ``model`` itself,
    also when no module has them (the method's module then says what it needs).

    A LightningModule holding a causal LM in ``.model`` gives ``"model"``; the causal LM itself gives ``""``.

    Raises:
        ValueError: when several modules qualify (e.g. a student and a teacher model).
    """
    if callable(getattr(model, "get_input_embeddings", None)):
        return ""
    found = _outermost([n for n, m in walk(model) if callable(getattr(m, "get_input_embeddings", None))])
    if len(found) > 1:
        raise ValueError(
            f"{type(model).__name__} holds {len(found)} models with input embeddings ({found}); a method attached to "
            "the whole model cannot tell which one to adapt. Inject into that model directly "
            "(lightning_zenft.inject_adapters(module.<name>, config))."
        )
    return found[0] if found else ""


_KIND_HELP = {
    "attention": "modules named *attn* or *attention*",
    "mlp": "modules named mlp, ffn or feed_forward",
    "block": "the modules holding an attention module",
    "embedding": "get_input_embeddings() or an nn.Embedding",
    "parameter": "3-D parameters: stacked expert weights",
}
