r"""Several LoRA adapters of one base combined into one adapter.

Two ways, per adapted layer, with adapter ``i`` contributing ``(A_i, B_i, s_i)`` and merge weight ``w_i``:

* on the products (exact): the task tensors are the updates :math:`\Delta_i = s_i B_i A_i`; any task-vector method
  merges them into :math:`\Delta`, which is exact as a dense update. Saved as an adapter, :math:`\Delta` is cut back
  to rank ``r`` by SVD, :math:`\Delta \approx U_r S_r V_r^T`, stored as ``B = U_r S_r^{1/2}``,
  ``A = S_r^{1/2} V_r^T`` with scaling 1; the truncation error
  :math:`\lVert \Delta - B A \rVert_F / \lVert \Delta \rVert_F = \sqrt{\sum_{j>r} \sigma_j^2 / \sum_j \sigma_j^2}`
  is reported per layer. Merged into the base instead, nothing is truncated
  (:func:`~lightning_zenft.merging.merge_pretrained` with the adapters does exactly that).
* on A and B separately (HF PEFT's ``add_weighted_adapter`` for ``linear``/``ties``/``dare_*``/``magnitude_prune``):
  the A's are merged with weights :math:`\text{sign}(w_i s_i)\sqrt{|w_i s_i|}` and the B's with
  :math:`\sqrt{|w_i s_i|}`, the result has scaling 1 and the inputs' rank. For one adapter or for disjoint supports
  this reproduces :math:`\sum_i w_i s_i B_i A_i`; in general :math:`B A` also holds the cross terms
  :math:`\sqrt{w_i s_i w_j s_j} B_j A_i`, so it is an approximation that stays at rank ``r``.

Only adapters whose update is exactly ``s B A`` (:class:`~lightning_zenft.adapters.LowRankUpdate`: LoRA, rsLoRA; not
DoRA, whose magnitude rescales rows) combine into a LoRA adapter; DoRA adapters merge into the base.

Example::

    report = combine_adapters(["ad-math", "ad-code"], "ad-both", method="ties", density=0.5, rank=16)
    print(report.max_error)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from lightning_zenft.adapters import LowRankUpdate
from lightning_zenft.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lightning_zenft.merging.adapter_files import AdapterFile, load_adapter_layers
from lightning_zenft.merging.streaming import atomic_directory, check_destination
from lightning_zenft.merging.task_vectors import (
    MajoritySign,
    MergeMethod,
    check_method_options,
    merge_task_tensors,
    seeded_generator,
)

Combine = Literal["products", "factors"]
Factors = tuple[torch.Tensor, torch.Tensor, float]


def combine_lora_products(
    factors: Sequence[Factors | None],
    weights: Sequence[float],
    method: MergeMethod = "task_arithmetic",
    *,
    density: float | None = None,
    majority_sign_method: MajoritySign = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The merged dense update ``(out, in)`` of one layer from each adapter's ``(A, B, s)`` (None: not adapted)."""
    present = [f for f in factors if f is not None]
    if not present:
        raise ValueError("no adapter adapts this layer; nothing to combine.")
    shape = (present[0][1].shape[0], present[0][0].shape[1])
    deltas = [None if f is None else f[2] * (f[1].float() @ f[0].float()) for f in factors]  # (out, in) each
    for delta in deltas:
        if delta is not None and tuple(delta.shape) != shape:
            raise ValueError(f"the adapters disagree on this layer's shape: {shape} vs {tuple(delta.shape)}.")
    task_tensors = [d if d is not None else torch.zeros(shape) for d in deltas]
    return merge_task_tensors(method, task_tensors, weights, density=density,
                              majority_sign_method=majority_sign_method, generator=generator)  # fmt: skip


def combine_lora_factors(
    factors: Sequence[Factors | None],
    weights: Sequence[float],
    method: MergeMethod = "task_arithmetic",
    *,
    density: float | None = None,
    majority_sign_method: MajoritySign = "total",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's way: ``(A, B)`` merged separately, each input weighted by ``sqrt(|w s|)`` (the sign on A); scaling 1.

    Adapters that do not adapt the layer (None) take no part, as in PEFT. All A's (and B's) must share one shape.
    """
    present = [(f, w) for f, w in zip(factors, weights, strict=True) if f is not None]
    if not present:
        raise ValueError("no adapter adapts this layer; nothing to combine.")
    shapes = {(tuple(f[0].shape), tuple(f[1].shape)) for f, _ in present}
    if len(shapes) > 1:
        raise ValueError(
            f"combining A and B separately needs one rank per layer; the adapters have (A, B) shapes {sorted(shapes)}. "
            "Combine on the products instead (combine='products')."
        )
    scaled = [w * s for (_, _, s), w in present]
    weights_a = [math.copysign(math.sqrt(abs(v)), v) for v in scaled]
    weights_b = [math.sqrt(abs(v)) for v in scaled]
    options = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)
    a = merge_task_tensors(method, [f[0] for f, _ in present], weights_a, **options)  # type: ignore[arg-type]
    b = merge_task_tensors(method, [f[1] for f, _ in present], weights_b, **options)  # type: ignore[arg-type]
    return a, b  # (r, in), (out, r)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, in), B (out, r), relative error)`` with ``B A`` the best rank-``r`` approximation of ``delta``."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be a positive integer.")
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    r = min(rank, s.numel())
    root = s[:r].sqrt()  # (r,)
    b = u[:, :r] * root  # (out, r)
    a = root[:, None] * vh[:r]  # (r, in)
    total = torch.linalg.norm(delta.float())
    error = float(torch.linalg.norm(delta.float() - b @ a) / total) if total > 0 else 0.0
    return a, b, error


@dataclass
class CombineReport:
    """What :func:`combine_adapters` wrote."""

    out: Path
    ranks: dict[str, int] = field(default_factory=dict)
    """Layer -> rank of the combined adapter."""
    errors: dict[str, float] = field(default_factory=dict)
    """Layer -> relative Frobenius truncation error of the SVD (products only; 0.0 where nothing was cut)."""

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _factors(adapter: AdapterFile, path: str) -> Factors | None:
    layer = adapter.layers.get(path)
    if layer is None:
        return None
    if not isinstance(layer, LowRankUpdate):
        raise TypeError(
            f"adapter {adapter.path}, layer {path}: a {type(layer).__name__}'s update is not s B A (DoRA rescales "
            "rows), so it cannot be combined into a LoRA adapter; merge it into the base instead (merge_pretrained)."
        )
    a, b, s = layer.low_rank_factors()
    return a.detach(), b.detach(), float(s)


def combine_adapters(
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: MergeMethod = "task_arithmetic",
    density: float | None = None,
    majority_sign_method: MajoritySign = "total",
    combine: Combine = "products",
    rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> CombineReport:
    """Combine LoRA adapter directories into one PEFT-format adapter at ``out`` (written atomically).

    ``combine="products"`` merges the updates exactly and cuts each layer back to ``rank`` by SVD (default: the
    largest input rank of that layer), reporting the truncation error; ``combine="factors"`` merges A and B as PEFT
    does (the inputs' rank; ``rank`` must be None). The new adapter has scaling 1 (``lora_alpha = r``).

    Raises:
        TypeError: for a DoRA adapter.
        ValueError: for adapters of different bases or layer shapes, trained biases or modules_to_save (they are not
            low-rank: merge into the base), or inconsistent options.
    """
    out = Path(out)
    check_method_options(method, density)
    if combine not in ("products", "factors"):
        raise ValueError(f"combine={combine!r} must be 'products' or 'factors'.")
    if combine == "factors" and rank is not None:
        raise ValueError("combine='factors' keeps the adapters' rank; rank= applies to combine='products'.")
    check_destination(out, overwrite, [Path(p) for p in adapters])
    files = [load_adapter_layers(p) for p in adapters]
    weights = [1.0] * len(files) if weights is None else [float(w) for w in weights]
    if len(weights) != len(files):
        raise ValueError(f"got {len(weights)} weights for {len(files)} adapters; give one weight per adapter.")
    for adapter in files:
        if adapter.replacements:
            raise ValueError(
                f"adapter {adapter.path} also trains {sorted(adapter.replacements)[:3]} in full; such tensors are not "
                "low-rank and cannot go into a combined LoRA adapter. Merge into the base instead (merge_pretrained)."
            )
    bases = {a.base_model_name_or_path for a in files}
    if len(bases - {None}) > 1:
        raise ValueError(f"the adapters were made for different bases: {sorted(b for b in bases if b)}.")
    fan_in_fan_out = {a.fan_in_fan_out for a in files}
    if len(fan_in_fan_out) > 1:
        raise ValueError("the adapters disagree on fan_in_fan_out; they cannot adapt the same layers of one base.")

    report = CombineReport(out=out)
    tensors: dict[str, torch.Tensor] = {}
    paths = sorted(set().union(*(a.layers for a in files)))
    for path in paths:
        factors = [_factors(a, path) for a in files]
        generator = seeded_generator(seed, path) if method.startswith("dare") else None
        options = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)
        if combine == "factors":
            a, b = combine_lora_factors(factors, weights, method, **options)  # type: ignore[arg-type]
            error = 0.0
        else:
            delta = combine_lora_products(factors, weights, method, **options)  # type: ignore[arg-type]
            layer_rank = rank if rank is not None else max(f[0].shape[0] for f in factors if f is not None)
            a, b, error = low_rank(delta, layer_rank)
        dtype = next(f[0].dtype for f in factors if f is not None)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.to(dtype).contiguous()
        report.ranks[path], report.errors[path] = int(a.shape[0]), error

    with atomic_directory(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(_config(files[0], report.ranks), indent=2, sort_keys=True) + "\n")
    return report


def _config(first: AdapterFile, ranks: dict[str, int]) -> dict[str, object]:
    """A PEFT LoRA config for the combined adapter: scaling 1 everywhere (``lora_alpha = r`` per layer)."""
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(path): r for path, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": first.config.get("task_type"),
        "base_model_name_or_path": first.base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": first.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
