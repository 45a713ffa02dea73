"""A model with adapters exported as a plain merged ``transformers`` checkpoint, without changing the model.

:func:`export_merged` writes what ``save_pretrained`` would write for the merged model (tensor names without the
adapter layers, tied weights once, ``config.json``, ``generation_config.json``, the tokenizer files of the source
directory), but computes each merged weight only when its shard is written: the model in memory is not modified and
no merged copy of it is held. A 4-bit base is dequantized and written dense (``quantized="dequantize"``, in the dtype
it had before quantization unless ``dtype`` says otherwise) or requantized with its own settings
(``quantized="requantize"``, a 4-bit checkpoint ``transformers`` loads with bitsandbytes, each layer's error in the
report).

Models whose weights ``transformers`` renames or fuses when saving (a conversion mapping, e.g. fused MoE experts) are
refused with a pointer to :func:`~lightning_zenft.merging.merge_and_unload` + ``save_pretrained``, which handles them.

Example::

    report = export_merged(module.model, "merged", dtype=torch.bfloat16, source_dir="path/to/base")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters._base import is_conv1d
from lightning_zenft.adapters._bnb import dense_dtype, dequantize_4bit_weight, is_4bit
from lightning_zenft.merging.adapters import (
    Quantized,
    _check_mergeable,
    _check_quantized,
    adapted_weight,
    base_dense_weight,
)
from lightning_zenft.merging.quantized import (
    QuantizationError,
    quantization_error,
    quantize_like,
    scales_bias,
    state_shape,
)
from lightning_zenft.merging.streaming import (
    atomic_directory,
    check_destination,
    copy_non_weight_files,
    plan_shards,
    progress_bar,
    write_sharded,
)
from lightning_zenft.safetensors_io import TensorEntry


@dataclass
class ExportReport:
    """What :func:`export_merged` wrote."""

    out: Path
    tensors: int = 0
    bytes: int = 0
    errors: dict[str, QuantizationError] = field(default_factory=dict)
    """Layer -> requantization error (``quantized="requantize"`` only)."""
    copied: list[str] = field(default_factory=list)
    """Files copied from the source directory."""


@dataclass
class _Item:
    kind: (
        str  # "tensor" (as is, floating ones cast), "raw" (never cast), "adapted", "adapted_bias", "dequant", "requant"
    )
    source: Any
    part: str = ""


def _owner(key: str, owners: dict[str, Any]) -> str | None:
    """The longest module name in ``owners`` that ``key`` lies under."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in owners:
            return name
    return None


def _check_no_conversion(model: nn.Module) -> None:
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # an older transformers renames nothing on save
        return
    if not isinstance(model, PreTrainedModel):
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # as transformers' own revert_weight_conversion decides for a model built from a config
        mapping = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in mapping if not isinstance(c, PrefixChange)]
    if conversions:
        raise ValueError(
            f"{type(model).__name__}'s weights are renamed or fused by transformers when saved ({len(conversions)} "
            "conversion rules); a streamed export would write them as they are in memory. Use "
            "lightning_zenft.merging.merge_and_unload(model) and then model.save_pretrained(dir) instead."
        )


def _kept_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """The keys ``save_pretrained`` keeps: a tied tensor once (the name ``transformers`` expects on load)."""
    try:
        from transformers.modeling_utils import PreTrainedModel, remove_tied_weights_from_state_dict
    except ImportError:
        PreTrainedModel = None  # noqa: N806
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        return set(remove_tied_weights_from_state_dict(dict(state), model))
    seen: set[tuple[int, int]] = set()
    kept = set()
    for key, tensor in state.items():  # a plain module: the first name of each shared tensor
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident not in seen:
            seen.add(ident)
            kept.add(key)
    return kept


def _plan(model: nn.Module, quantized: Quantized) -> tuple[dict[str, _Item], dict[str, torch.Tensor]]:
    """Output name -> how to produce it, in state-dict order; and the model's state dict."""
    layers = dict(_check_mergeable(model))
    four_bit = {name: m for name, m in model.named_modules() if is_4bit(m) and _owner(name + ".x", layers) is None}
    state = model.state_dict()
    for name, layer in layers.items():
        pointer = layer.base_layer.weight.data_ptr()  # type: ignore[attr-defined]
        tied = [k for k, t in state.items() if not k.startswith(name + ".") and t.data_ptr() == pointer]
        if tied:
            raise ValueError(
                f"the adapted layer {name} shares its weight with {tied}; merging would change both. Leave it out of "
                "target_modules, or untie the weights (config.tie_word_embeddings=False) before training."
            )
    kept = _kept_keys(model, state)
    items: dict[str, _Item] = {}
    for key in state:
        layer_name = _owner(key, layers)
        if layer_name is not None:
            rest = key[len(layer_name) + 1 :]
            if not rest.startswith("base_layer."):
                continue  # the adapter's own tensors: folded into the weight
            rest = rest[len("base_layer.") :]
            layer, out_key = layers[layer_name], f"{layer_name}.{rest}"
            base = layer.base_layer  # type: ignore[attr-defined]
            if is_4bit(base) and quantized == "requantize" and (rest == "weight" or rest.startswith("weight.")):
                items[out_key] = _Item("requant", (layer_name, layer), rest)
            elif rest == "weight":
                items[out_key] = _Item("adapted", layer)
            elif rest == "bias" and scales_bias(layer):
                items[out_key] = _Item("adapted_bias", layer)
            elif not rest.startswith("weight."):
                items[out_key] = _Item("tensor", state[key])
            continue
        if key not in kept:
            continue
        module_name = _owner(key, four_bit)
        if module_name is not None and (key.endswith(".weight") or ".weight." in key):
            if quantized == "requantize":
                items[key] = _Item("raw", state[key])
            elif key == f"{module_name}.weight":
                items[key] = _Item("dequant", four_bit[module_name])
            continue
        items[key] = _Item("tensor", state[key])
    return items, state


def _entry(key: str, item: _Item, dtype: torch.dtype | None) -> TensorEntry:
    if item.kind in ("tensor", "raw"):
        tensor = item.source
        cast = item.kind == "tensor" and dtype is not None and tensor.is_floating_point()
        return TensorEntry(key, dtype if cast else tensor.dtype, tuple(tensor.shape))
    if item.kind == "adapted_bias":
        bias = item.source.base_layer.bias
        return TensorEntry(key, dtype or bias.dtype, tuple(bias.shape))
    if item.kind == "requant":  # planned with the current tensors' sizes; the real ones replace them per shard
        current = item.source[1].base_layer.state_dict()[item.part]
        return TensorEntry(key, current.dtype, tuple(current.shape))
    module = item.source.base_layer if item.kind == "adapted" else item.source
    if is_4bit(module):  # a Linear4bit: (out, in), never a Conv1D
        return TensorEntry(key, dtype or dense_dtype(module), state_shape(module))
    return TensorEntry(key, dtype or module.weight.dtype, tuple(module.weight.shape))  # storage layout


def export_merged(
    model: nn.Module,
    out: str | Path,
    *,
    quantized: Quantized = "dequantize",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write ``model`` with its adapters merged as a plain checkpoint at ``out`` (atomically); ``model`` is unchanged.

    Args:
        model: a ``transformers`` model (or any module) holding mergeable adapter layers.
        out: the output directory.
        quantized: 4-bit bases ``"dequantize"``\\ d (dense output) or ``"requantize"``\\ d (4-bit output).
        dtype: the floating dtype of the output (default: each tensor's own; a dequantized weight's pre-quantization
            dtype). Quantization statistics are never cast.
        max_shard_size: the largest shard, e.g. ``"5GB"``.
        source_dir: a directory whose tokenizer and other non-weight files are copied (default: the model's
            ``config._name_or_path`` when it is a directory).
        overwrite: replace an existing ``out``.
        progress: show a progress bar.
        on_tensor: called with each tensor's name after it is written (an exception aborts; nothing is left).
    """
    _check_quantized(quantized)
    out = Path(out)
    check_destination(out, overwrite)
    _check_no_conversion(model)
    items, _ = _plan(model, quantized)
    report = ExportReport(out=out)
    entries = [_entry(key, item, dtype) for key, item in items.items()]
    plan = plan_shards(entries, max_shard_size)

    def produce(key: str) -> torch.Tensor:
        item = items[key]
        if item.kind == "raw":
            return item.source
        if item.kind == "tensor":
            tensor = item.source
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        if item.kind == "adapted":
            return adapted_weight(item.source, dtype) if not item.source.merged else _merged_base(item.source, dtype)
        if item.kind == "adapted_bias":
            bias = item.source.merged_bias(item.source.base_layer.bias.detach())
            return bias.to(dtype) if dtype is not None else bias
        return dequantize_4bit_weight(item.source).to(dtype or dense_dtype(item.source))

    def prepare(planned: list[TensorEntry]) -> tuple[list[TensorEntry], Callable[[str], torch.Tensor]]:
        layers = {items[e.name].source for e in planned if items[e.name].kind == "requant"}
        if not layers:
            return planned, produce
        parts = {name: _requantized(name, layer, report) for name, layer in layers}

        def shard_produce(key: str) -> torch.Tensor:
            item = items[key]
            return parts[item.source[0]][item.part] if item.kind == "requant" else produce(key)

        final = [
            TensorEntry(e.name, shard_produce(e.name).dtype, tuple(shard_produce(e.name).shape))
            if items[e.name].kind == "requant" else e
            for e in planned
        ]  # fmt: skip
        return final, shard_produce

    with progress_bar(sum(e.nbytes for e in entries), progress, "exporting") as bar:

        def written(entry: TensorEntry) -> None:
            bar.update(entry.nbytes)
            if on_tensor is not None:
                on_tensor(entry.name)

        with atomic_directory(out, overwrite) as tmp:
            report.bytes = write_sharded(tmp, plan, produce, on_tensor=written, prepare_shard=prepare)
            report.tensors = len(entries)
            report.copied = _write_configs(model, tmp, quantized, dtype, source_dir)
    return report


def _merged_base(layer: nn.Module, dtype: torch.dtype | None) -> torch.Tensor:
    """The weight of a layer merged already (its base holds the adapted weight), in storage layout."""
    base = layer.base_layer  # type: ignore[attr-defined]
    weight = base_dense_weight(base)  # (out, in)
    weight = weight.t() if is_conv1d(base) else weight
    return weight.to(dtype or weight.dtype)


def _requantized(layer_name: str, layer: nn.Module, report: ExportReport) -> dict[str, torch.Tensor]:
    """The 4-bit state-dict tensors of an adapter layer's merged, requantized base."""
    base = layer.base_layer
    if layer.merged:
        return dict(base.state_dict())
    merged = adapted_weight(layer, torch.float32)  # (out, in): a Linear4bit is never a Conv1D
    codes, state = quantize_like(base, merged)
    report.errors[layer_name] = quantization_error(codes, state, merged)
    parts = {"weight": codes, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    if getattr(base, "bias", None) is not None:
        parts["bias"] = layer.merged_bias(base.bias.detach()) if scales_bias(layer) else base.bias.detach()
    return parts


def _write_configs(
    model: nn.Module, tmp: Path, quantized: Quantized, dtype: torch.dtype | None, source_dir: str | Path | None
) -> list[str]:
    """``config.json`` (dtype, quantization) and ``generation_config.json`` of the merged model, and the source's
    other non-weight files (tokenizer...)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        if dtype is not None:
            config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [type(model).__name__]
        has_4bit = any(is_4bit(m) for m in model.modules())
        if quantized == "dequantize" or not has_4bit:
            if getattr(config, "quantization_config", None) is not None:
                del config.quantization_config
        elif getattr(config, "quantization_config", None) is None:
            config.quantization_config = _bnb_config(model)
        config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(tmp)
    if source_dir is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        source_dir = name if name and Path(name).is_dir() else None
    if source_dir is None:
        return []
    written = {p.name for p in tmp.iterdir()}
    return copy_non_weight_files(Path(source_dir), tmp, skip=sorted(written))


def _bnb_config(model: nn.Module) -> Any:
    """A ``BitsAndBytesConfig`` describing the model's 4-bit layers (one setting for all), dense linears skipped."""
    from transformers import BitsAndBytesConfig

    settings, compute = set(), set()
    for module in model.modules():
        if is_4bit(module):
            w = module.weight
            settings.add((w.quant_type, w.compress_statistics, w.quant_storage, w.blocksize))
            compute.add(getattr(module, "compute_dtype", None))
    if len(settings) > 1:
        raise ValueError(
            f"the model's 4-bit layers use different settings {sorted(map(str, settings))}; one checkpoint config "
            "describes one. Export with quantized='dequantize' instead."
        )
    quant_type, double, storage, blocksize = settings.pop()
    compute_dtype = next((c for c in compute if c is not None), torch.float32)  # a load-time choice, not stored
    if blocksize != 64:
        raise ValueError(f"transformers loads 4-bit checkpoints with blocksize 64; these layers use {blocksize}.")
    dense = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not is_4bit(m) and name)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_quant_storage=storage,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=dense or None,
    )
