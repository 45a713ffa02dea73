"""Merging saved models: adapters into their base, or N fine-tunes of one base, streamed tensor by tensor.

``merge_pretrained(base, out, adapters=[...])`` or ``models=[...]`` reads the base's safetensors one tensor at a
time, computes each input's value of that tensor (an adapter layer's ``merged_weight(W)``, a trained bias it
replaces, or the fine-tuned model's tensor), merges the task vectors ``value_i - W`` with the chosen method, and
writes ``W + merge(...)`` straight into the output shard. Memory holds a few copies of the largest tensor (the base's,
one per input, the result), never a shard or a model: the header of each output shard is written before its data.

* One adapter, ``task_arithmetic`` with weight 1 (the default) is the plain merge: the output tensor IS
  ``merged_weight(W)``, the weight the adapted model computes with.
* A 4-bit base saved by ``transformers`` with bitsandbytes is read dequantized
  (:class:`~lightning_zenft.merging.quantized_files.DequantizedWeights`) and the merge is written dense, in the dtype
  recorded for each weight (or ``dtype``), without the ``quantization_config``.
* ``trim="global"`` (TIES, magnitude pruning) trims each input over its whole task vector, as the TIES paper does,
  instead of per tensor: two extra streaming passes find the exact magnitude threshold per input
  (:class:`~lightning_zenft.merging.task_vectors.GlobalMagnitudeThreshold`). An adapter's task vector is the tensors it
  changes; a fine-tuned model's is every floating tensor.
* DARE's masks come from a generator seeded with ``seed`` and the tensor's name, so a merge is reproducible and does
  not depend on the shard layout.
* Every input is checked against the base before anything is written: a missing tensor or a shape that differs is an
  error naming the tensor and both shapes; an adapter recorded for another ``base_model_name_or_path`` is refused
  (``base_mismatch="warn"`` merges anyway, with a warning).
* The output is written into a temporary directory beside ``out`` and renamed into place when complete
  (:func:`~lightning_zenft.merging.streaming.atomic_directory`); ``on_tensor(name)`` runs after each tensor is written
  (progress, or an exception to abort: the partial output is removed).

Example::

    merge_pretrained("llama-dir", "merged", adapters=["ad-math", "ad-code"], method="ties", density=0.2)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lightning_zenft.merging.adapter_files import AdapterFile, load_adapter_layers
from lightning_zenft.merging.quantized_files import DequantizedWeights, open_weights
from lightning_zenft.merging.streaming import (
    PretrainedWeights,
    atomic_directory,
    check_destination,
    copy_non_weight_files,
    plan_shards,
    progress_bar,
    write_sharded,
)
from lightning_zenft.merging.task_vectors import (
    GlobalMagnitudeThreshold,
    MajoritySign,
    MergeMethod,
    check_method_options,
    merge_task_tensors,
    seeded_generator,
)
from lightning_zenft.safetensors_io import TensorEntry

Trim = Literal["tensor", "global"]
Weights = PretrainedWeights | DequantizedWeights
BaseMismatch = Literal["error", "warn"]


@dataclass
class MergeReport:
    """What a merge wrote."""

    out: Path
    tensors: int = 0
    """Tensors written."""
    changed: int = 0
    """Tensors at least one input changed."""
    bytes: int = 0
    thresholds: list[float] | None = None
    """With ``trim="global"``: the magnitude threshold of each input's task vector."""
    warnings: list[str] = field(default_factory=list)


class _AdapterInput:
    def __init__(self, adapter: AdapterFile) -> None:
        self.adapter, self.name = adapter, str(adapter.path)
        self.keys = adapter.touches()

    def value(self, key: str, base: torch.Tensor) -> torch.Tensor:
        return self.adapter.merged_tensor(key, base).to(base.dtype)


class _ModelInput:
    def __init__(self, weights: Weights, floating: set[str]) -> None:
        self.weights, self.name = weights, str(weights.directory)
        self.keys = floating

    def value(self, key: str, base: torch.Tensor) -> torch.Tensor:
        return self.weights.read(key).to(base.dtype)


def _check_base_name(adapters: Sequence[AdapterFile], base_dir: Path, policy: BaseMismatch) -> list[str]:
    """Refuse (or warn about) adapters recorded for another base; returns the warnings issued."""
    notes: list[str] = []
    problems: list[str] = []
    recorded = {str(a.path): a.base_model_name_or_path for a in adapters}
    distinct = {name for name in recorded.values() if name}
    if len(distinct) > 1:
        problems.append(f"the adapters were made for different bases: {recorded}")
    for path, name in recorded.items():
        if not name:
            notes.append(f"adapter {path} records no base_model_name_or_path; only its tensor shapes were checked.")
        elif Path(name).is_dir():
            if Path(name).resolve() != base_dir.resolve():
                problems.append(f"adapter {path} was made for base {name!r}, not {str(base_dir)!r}")
        elif Path(name).name != base_dir.name:
            notes.append(f"adapter {path} was made for {name!r}, which is not a directory here; merging it into "
                         f"{str(base_dir)!r} with only its tensor shapes checked.")  # fmt: skip
    if problems:
        message = "; ".join(problems)
        if policy == "error":
            raise ValueError(
                f"{message}. Merge each adapter into the base it was trained on, or pass base_mismatch='warn' "
                "(zenft merge --allow-base-mismatch) if the bases hold the same weights."
            )
        notes.append(message)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return notes


def _check_adapter_shapes(adapter: AdapterFile, base: Weights) -> None:
    for key, path in adapter.weight_keys().items():
        if key not in base.shard_of:
            raise ValueError(
                f"adapter {adapter.path} adapts layer {path}, but the base {base.directory} has no tensor {key}: the "
                "adapter was made for another base model (or the layer's weight is tied to another tensor)."
            )
        want, have = adapter.expected_shape(path), base.entry(key).shape
        if tuple(want) != tuple(have):
            raise ValueError(
                f"tensor {key}: the base {base.directory} has shape {tuple(have)} but adapter {adapter.path} needs "
                f"{tuple(want)} (fan_in_fan_out={adapter.fan_in_fan_out}): the adapter was made for another base."
            )
    for key, value in adapter.replacements.items():
        if key not in base.shard_of:
            raise ValueError(f"adapter {adapter.path} replaces {key}, which the base {base.directory} does not hold.")
        if tuple(value.shape) != base.entry(key).shape:
            raise ValueError(
                f"tensor {key}: the base {base.directory} has shape {base.entry(key).shape} but adapter "
                f"{adapter.path} holds {tuple(value.shape)}: the adapter was made for another base."
            )


def _check_model_shapes(model: Weights, base: Weights) -> set[str]:
    """The floating tensors of a fine-tuned model, after checking it holds exactly the base's tensors and shapes."""
    missing = sorted(set(base.shard_of) - set(model.shard_of))
    extra = sorted(set(model.shard_of) - set(base.shard_of))
    if missing or extra:
        raise ValueError(
            f"{model.directory} does not hold the base's tensors: missing {missing[:5]}, unexpected {extra[:5]} "
            f"(base {base.directory}); merge only fine-tunes of this base."
        )
    for key in base.shard_of:
        if model.entry(key).shape != base.entry(key).shape:
            raise ValueError(
                f"tensor {key}: the base {base.directory} has shape {base.entry(key).shape} but {model.directory} "
                f"has {model.entry(key).shape}; merge only fine-tunes of this base."
            )
    return {key for key in base.shard_of if base.entry(key).dtype.is_floating_point}


def merge_pretrained(
    base: str | Path,
    out: str | Path,
    *,
    adapters: Sequence[str | Path] = (),
    models: Sequence[str | Path] = (),
    method: MergeMethod = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign_method: MajoritySign = "total",
    trim: Trim = "tensor",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    base_mismatch: BaseMismatch = "error",
    progress: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeReport:
    """Merge ``adapters`` (PEFT-format directories) or ``models`` (``save_pretrained`` fine-tunes) into ``base``.

    Args:
        base: the base model's ``save_pretrained`` directory (``model.safetensors`` or an index with shards; a
            bitsandbytes 4-bit checkpoint is dequantized).
        out: the merged model's directory, a plain ``transformers`` checkpoint (weights, config, tokenizer files).
        adapters / models: the inputs (give one kind).
        method: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``.
        weights: one per input (default 1.0 each).
        density: the fraction kept, for every method but task arithmetic.
        majority_sign_method: TIES' sign election, ``"total"`` or ``"frequency"``.
        trim: ``"tensor"`` (per tensor, as PEFT) or ``"global"`` (over each input's whole task vector).
        seed: DARE's seed.
        dtype: the floating dtype written (default: the base's, tensor by tensor).
        max_shard_size: e.g. ``"5GB"``; default: the base's own shard layout.
        overwrite: replace an existing ``out``.
        base_mismatch: ``"error"`` or ``"warn"`` for an adapter recorded for another base.
        progress: show a progress bar (bytes written).
        on_tensor: called with each tensor's name after it is written.
    """
    base_dir, out = Path(base), Path(out)
    if bool(adapters) == bool(models):
        raise ValueError("give adapters=[...] or models=[...] (one kind of input, at least one).")
    if trim not in ("tensor", "global"):
        raise ValueError(f"trim={trim!r} must be 'tensor' or 'global'.")
    check_method_options(method, density, trim == "global")
    inputs_paths = [Path(p) for p in (*adapters, *models)]
    check_destination(out, overwrite, [base_dir, *inputs_paths])
    weights = [1.0] * len(inputs_paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs_paths):
        raise ValueError(f"got {len(weights)} weights for {len(inputs_paths)} inputs; give one weight per input.")

    base_weights = open_weights(base_dir)
    report = MergeReport(out=out)
    sources: list[_AdapterInput | _ModelInput] = []
    if adapters:
        files = [load_adapter_layers(p) for p in adapters]
        report.warnings += _check_base_name(files, base_dir, base_mismatch)
        for adapter in files:
            _check_adapter_shapes(adapter, base_weights)
        sources = [_AdapterInput(a) for a in files]
    else:
        for path in models:
            model = open_weights(path)
            sources.append(_ModelInput(model, _check_model_shapes(model, base_weights)))
    touched = set().union(*(s.keys for s in sources))

    def out_dtype(key: str) -> torch.dtype:
        have = base_weights.entry(key).dtype
        return dtype if dtype is not None and have.is_floating_point else have

    def compute_dtype(key: str) -> torch.dtype:
        return torch.promote_types(base_weights.entry(key).dtype, torch.float32)

    def task_tensors(key: str, base32: torch.Tensor) -> list[torch.Tensor]:
        return [s.value(key, base32) - base32 if key in s.keys else torch.zeros_like(base32) for s in sources]

    thresholds: list[float] | None = None
    if trim == "global":
        assert density is not None
        thresholds = _global_thresholds(base_weights, sources, touched, density, compute_dtype, progress)
        report.thresholds = thresholds
    exact = len(sources) == 1 and method == "task_arithmetic" and weights[0] == 1.0

    def produce(key: str) -> torch.Tensor:
        base_tensor = base_weights.read(key)
        if key not in touched:
            return base_tensor.to(out_dtype(key))
        base32 = base_tensor.to(compute_dtype(key))
        if exact:
            return sources[0].value(key, base32).to(out_dtype(key))
        generator = seeded_generator(seed, key) if method.startswith("dare") else None
        merged = merge_task_tensors(method, task_tensors(key, base32), weights, density=density,
                                    majority_sign_method=majority_sign_method, thresholds=thresholds,
                                    generator=generator)  # fmt: skip
        return (base32 + merged).to(out_dtype(key))

    entries = [TensorEntry(key, out_dtype(key), base_weights.entry(key).shape) for key in base_weights.keys()]
    plan = plan_shards(entries, max_shard_size, base_layout=base_weights.layout())
    report.tensors, report.changed = len(entries), len(touched)
    with progress_bar(sum(e.nbytes for e in entries), progress, "merging") as bar:

        def written(entry: TensorEntry) -> None:
            bar.update(entry.nbytes)
            if on_tensor is not None:
                on_tensor(entry.name)

        with atomic_directory(out, overwrite) as tmp:
            report.bytes = write_sharded(tmp, plan, produce, on_tensor=written)
            _write_config(base_weights, tmp, dtype)
    return report


def _global_thresholds(
    base: Weights,
    sources: Sequence[_AdapterInput | _ModelInput],
    touched: set[str],
    density: float,
    compute_dtype: Callable[[str], torch.dtype],
    progress: bool,
) -> list[float]:
    """Each input's exact magnitude threshold over its whole task vector (two streaming passes)."""
    counters = [GlobalMagnitudeThreshold(density) for _ in sources]
    keys = [key for key in base.keys() if key in touched]

    def one_pass(update: Callable[[GlobalMagnitudeThreshold, torch.Tensor], None], label: str) -> None:
        with progress_bar(len(keys), progress, label, unit="tensor") as bar:
            for key in keys:
                base32 = base.read(key).to(compute_dtype(key))
                for source, counter in zip(sources, counters, strict=True):
                    if key in source.keys:
                        update(counter, source.value(key, base32) - base32)
                bar.update(1)

    one_pass(GlobalMagnitudeThreshold.add, "trim threshold, pass 1/2")
    if any([counter.needs_refine() for counter in counters]):
        one_pass(GlobalMagnitudeThreshold.refine, "trim threshold, pass 2/2")
    return [counter.value() for counter in counters]


def _write_config(base: Weights, tmp: Path, dtype: torch.dtype | None) -> None:
    """Copy the base's non-weight files; ``config.json`` records a changed dtype, and loses the quantization config
    of a 4-bit base (the merge is dense)."""
    rewrite = dtype is not None or isinstance(base, DequantizedWeights)
    copy_non_weight_files(base.directory, tmp, skip=("config.json",) if rewrite else ())
    config = base.config()
    if rewrite and config:
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
