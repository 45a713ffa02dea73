"""Where a model is cut into sharding units, and how its frozen and trained parameters are laid out for sharding.

A sharding unit is all-gathered as a whole before its forward and freed after, so units should be the repeated
transformer blocks: each holds a few percent of the model, and one or two of them are gathered at a time. Hugging Face
models name their block classes in ``_no_split_modules`` (``["LlamaDecoderLayer"]``); :func:`resolve_block_classes`
reads it (or takes the class names given) and finds those classes among the model's modules.

Frozen and trained parameters: FSDP2 shards each parameter on its own, so frozen weights simply get no gradient and
(once dropped from the optimizer) no optimizer state. FSDP1 flattens every parameter of a unit into one
``FlatParameter``, which must be uniformly trainable or frozen ("FlatParameter requires uniform requires_grad");
:func:`trained_leaf` picks the small modules whose own parameters all train (an adapter's ``lora_A``/``lora_B``) so
they become units of their own and the blocks around them hold frozen weights only.

Example::

    classes = resolve_block_classes(model, "auto")        # {LlamaDecoderLayer}
    blocks = [m for m in model.modules() if isinstance(m, tuple(classes))]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BlockClasses = str | Sequence[str]
"""``"auto"`` (from the model's ``_no_split_modules``) or class names, e.g. ``["LlamaDecoderLayer"]``."""


def resolve_block_classes(model: nn.Module, block_classes: BlockClasses = "auto") -> set[type[nn.Module]]:
    """The classes of ``model``'s modules that become sharding units.

    Args:
        model: the model (a LightningModule holding a Hugging Face model is fine).
        block_classes: ``"auto"`` reads ``_no_split_modules`` of every submodule; or names of classes (the class
            ``__name__``) present in the model.

    Raises:
        ValueError: no block class can be found, or a named class is not in the model (the error lists what is there).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=32))
        >>> [c.__name__ for c in resolve_block_classes(model)]
        ['LlamaDecoderLayer']
    """
    by_name: dict[str, type[nn.Module]] = {}
    for module in model.modules():
        by_name.setdefault(type(module).__name__, type(module))
    if block_classes == "auto":
        names: list[str] = []
        for module in model.modules():
            names.extend(getattr(module, "_no_split_modules", None) or [])
        wanted = [n for n in dict.fromkeys(names) if n in by_name]
        if not wanted:
            raise ValueError(
                f"block_classes='auto' found no transformer block class in {type(model).__name__}: no submodule names "
                "its blocks in `_no_split_modules` (Hugging Face models do). Give the class names of the repeated "
                f"blocks, e.g. block_classes=['DecoderLayer']; module classes in this model: {_repeated(model)}."
            )
    elif isinstance(block_classes, str) or not isinstance(block_classes, Sequence):
        raise ValueError(
            f"block_classes={block_classes!r}: use 'auto' or a list of class names, e.g. ['LlamaDecoderLayer']."
        )
    else:
        wanted = list(block_classes)
        bad = [n for n in wanted if not isinstance(n, str)]
        if bad:
            raise ValueError(f"block_classes={block_classes!r}: entries must be class names (strings), got {bad}.")
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(
                f"block_classes={wanted!r}: {missing} not found in {type(model).__name__}. Module classes that "
                f"repeat in this model: {_repeated(model)}."
            )
    return {by_name[n] for n in wanted}


def _repeated(model: nn.Module) -> list[str]:
    """Class names that occur more than once among ``model``'s modules with parameters (block candidates)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if any(True for _ in module.parameters()) and list(module.children()):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return sorted(n for n, c in counts.items() if c > 1)


def trained_leaf(module: nn.Module) -> bool:
    """True for a module whose own parameters exist and all train while its children hold none (``lora_A``)."""
    own = list(module.parameters(recurse=False))
    if not own or not all(p.requires_grad for p in own):
        return False
    return not any(True for child in module.children() for _ in child.parameters())


def mixed_modules(model: nn.Module) -> list[str]:
    """Names of modules whose own parameters are partly trained and partly frozen (a frozen weight with a trained
    bias): FSDP1 cannot put such a module's parameters into uniform units."""
    found = []
    for name, module in model.named_modules():
        flags = {p.requires_grad for p in module.parameters(recurse=False)}
        if len(flags) > 1:
            found.append(name)
    return found


def _cast_params(model: nn.Module, dtype: torch.dtype, trained: bool) -> list[str]:
    """Store the trained (or the frozen) floating-point parameters of ``model`` in ``dtype``; returns those cast.
    Tensor subclasses (4-bit weights) keep their own storage."""
    cast = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if type(param.data) is not torch.Tensor or param.requires_grad != trained:
                continue
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast.append(name)
    return cast


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter of ``model`` in ``dtype``; returns how many were cast.

    Under mixed precision with ``param_dtype=dtype`` a frozen weight is only ever used after the cast to ``dtype``
    that the all-gather does, so casting it once before sharding gives the same numbers with less memory. Tensor
    subclasses (4-bit weights) are left as they are.
    """
    return len(_cast_params(model, dtype, trained=False))


def cast_trained(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Store every trained floating-point parameter of ``model`` in ``dtype``; returns the names of those cast.

    FSDP2 needs one dtype for the trained parameters of a unit. Adapters take their base layer's dtype, so a model
    whose unquantized layers are bf16 beside 4-bit ones (the low-memory 4-bit loader keeps them in the compute dtype)
    holds bf16 adapters beside fp32 ones. Under bf16 mixed precision trained parameters are the optimizer's fp32
    master copy anyway: they are stored in fp32 and gathered in bf16.
    """
    return _cast_params(model, dtype, trained=True)


def trained_dtypes(model: nn.Module) -> dict[torch.dtype, list[str]]:
    """The trained floating-point parameters of ``model``, by dtype."""
    found: dict[torch.dtype, list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point():
            found.setdefault(param.dtype, []).append(name)
    return found


def shardable_4bit(model: nn.Module, owner: str) -> int:
    """Make bitsandbytes 4-bit layers shardable by FSDP2 (``fully_shard`` would drop their ``quant_state``): each
    becomes a :class:`~lightning_zenft.precision.sharded_linear.ShardedLinear4bit` over the same 4-bit storage;
    returns how many were converted. ``owner`` names the strategy in errors."""
    if not any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        return 0
    from lightning_zenft.precision.sharded_linear import make_shardable

    try:
        return len(make_shardable(model))
    except RuntimeError as error:
        raise RuntimeError(f"{owner}: {error}") from None


def refuse_4bit(model: nn.Module, owner: str) -> None:
    """FSDP1 flattens a unit's parameters into one ``FlatParameter``, which keeps neither bitsandbytes' quant state nor
    the packed 4-bit form: a 4-bit base is an error that says to use FSDP2Strategy."""
    kinds = ("Params4bit", "Packed4bitTensor")
    found = [n for n, p in model.named_parameters() if {type(p).__name__, type(p.data).__name__} & set(kinds)]
    if found:
        raise RuntimeError(
            f"{owner}: {len(found)} parameters are 4-bit weights (e.g. {found[:2]}); FSDP1's flat parameters cannot "
            "hold them. Use FSDP2Strategy, which shards the 4-bit base, or train the base unquantized."
        )


def checkpoint_blocks(pl_module: nn.Module, blocks: list[nn.Module], torch_fallback: bool = True) -> dict[str, int]:
    """Recompute each block's activations in backward instead of keeping them; returns how many blocks each way.

    Hugging Face models (``transformers`` 5) checkpoint their own layers' ``forward`` through
    ``gradient_checkpointing_enable``, which also turns the KV cache off while a checkpointed layer trains (a cache
    written again during the recomputation would double its keys), and keeps FSDP's hooks outside the recomputation:
    it is used for the blocks it covers (non-reentrant). Other blocks get torch's composable ``checkpoint``, which
    keeps parameter names and state-dict keys unchanged (unless ``torch_fallback=False``: then they are only counted,
    as ``"other"``, for the caller to checkpoint).
    """
    from torch.distributed._composable import checkpoint

    for module in pl_module.modules():
        if not getattr(module, "supports_gradient_checkpointing", False):
            continue
        if callable(getattr(module, "activation_checkpointing_enable", None)):  # transformers >= 5
            if not module.is_activation_checkpointing:
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif callable(getattr(module, "gradient_checkpointing_enable", None)) and not module.is_gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ways = {"transformers": 0, "torch": 0, "other": 0}
    for block in blocks:
        if getattr(block, "gradient_checkpointing", False) is True:
            ways["transformers"] += 1
        elif torch_fallback:
            checkpoint(block)
            ways["torch"] += 1
        else:
            ways["other"] += 1
    return ways


__all__ = [
    "BlockClasses",
    "cast_frozen",
    "checkpoint_blocks",
    "mixed_modules",
    "resolve_block_classes",
    "trained_leaf",
]
