r"""Fine-tuning recipe recommender: method, LoRA rank, learning rate, epochs and a data verdict.

The rules encode a published study of fine-tuning 0.6B-32B decoder models.

Learning rate by model size (``log(lr)`` linear in ``log(N_params)`` between the points, clamped outside
0.6B..32B)::

    size    full FT   LoRA / QLoRA
    0.6B    2e-5      3e-4
    7B      1e-5      2e-4
    32B     5e-6      1e-4

LoRA learning rate against dataset size, a power law fitted at 7B::

    eta*(N_data) = eta0 * (N_data / N0)^k,   eta0 = 2e-4,  N0 = 10,000,  k = +0.22

The study prints ``k = -0.22``, but its own table and text say larger datasets tolerate *higher* rates (best
LR 1e-4 at 500 and at 5K samples, 3e-4 at 50K, 1e-3 at 500K). ``k = +0.22`` reproduces that table
(500 -> 1.0e-4, 50K -> 2.9e-4, 500K -> 4.7e-4); a negative exponent would predict the opposite trend, so the
sign here is positive. ``N_data`` is clamped to the fitted range 500..500,000. For other model sizes the law
is scaled by ``lr_lora(N_params) / lr_lora(7B)`` from the size table. The step rule (1e-4 below 5K samples,
2e-4 up to 100K, 3e-4 above) is the study's coarse summary of the same law.

Rank and epochs: rank 64 on all linear layers (attention and MLP) above 10K samples, 32 for 5K..10K, 16 below
5K; 5 epochs below 5K samples, 3 up to 100K, 2 up to 500K, 1 above, always with early stopping on validation
loss (the epoch count is a ceiling).

Data needed (minimum / recommended / saturation samples for a 7B LoRA r64), scaled to the model by
``(N_params / 7e9)^0.3``: larger models need somewhat more data to move.

Method: full fine-tuning when the task diverges strongly from the base distribution, data exceeds 500K
samples, maximum task performance is required, or several nodes are available; LoRA otherwise; QLoRA when
the bf16 base plus LoRA training memory does not fit the GPU but a 4-bit base does (and this installation has
the 4-bit plugin), then gradient checkpointing if nothing fits without it. Memory comes from
:func:`~lightning_zenft.planning.memory.estimate_memory` with the settings the written config runs with,
accepted when at most 90% of the GPU memory (headroom for the CUDA context, allocator fragmentation and
transient buffers): :mod:`~lightning_zenft.planning.recipe_memory`. The config itself:
:mod:`~lightning_zenft.planning.fit_config`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from lightning_zenft.planning.model_info import ModelInfo, resolve_model
from lightning_zenft.planning.recipe_memory import LORA_DROPOUT, choose_by_memory, nf4_precision_available

__all__ = [
    "TASKS",
    "Recommendation",
    "data_thresholds",
    "full_learning_rate",
    "lora_learning_rate",
    "lora_learning_rate_rule",
    "lora_size_learning_rate",
    "recommend",
    "recommend_epochs",
    "resolve_lora_rank_auto",
]

TASKS: dict[str, tuple[int, int, int]] = {
    "classification": (500, 2_000, 20_000),
    "ner": (1_000, 5_000, 50_000),
    "summarization-short": (2_000, 10_000, 100_000),
    "summarization-long": (5_000, 20_000, 200_000),
    "qa-extractive": (2_000, 10_000, 100_000),
    "qa-generative": (5_000, 20_000, 200_000),
    "instruction-simple": (1_000, 5_000, 50_000),
    "instruction-complex": (10_000, 50_000, 500_000),
    "code-function": (5_000, 20_000, 200_000),
    "code-repository": (20_000, 100_000, 1_000_000),
    "domain-adaptation": (50_000, 200_000, 2_000_000),
}
"""Samples needed (minimum, recommended, saturation) for a 7B model with LoRA r64, by task id."""

_LR_TABLE: tuple[tuple[float, float, float], ...] = ((0.6e9, 2e-5, 3e-4), (7e9, 1e-5, 2e-4), (32e9, 5e-6, 1e-4))
REFERENCE_PARAMS = 7e9
LORA_LR_ETA0 = 2e-4
LORA_LR_N0 = 10_000
LORA_LR_K = 0.22
LORA_LR_DATA_RANGE = (500, 500_000)
DATA_SCALE_EXPONENT = 0.3
FULL_FT_MIN_SAMPLES = 500_000

Method = Literal["full", "lora", "qlora"]
Verdict = Literal["below minimum", "fine", "past saturation"]


def _interpolate_log(n_params: float, points: list[tuple[float, float]]) -> float:
    """Piecewise-linear interpolation of ``log(y)`` in ``log(x)``, clamped to the end points."""
    if n_params <= points[0][0]:
        return points[0][1]
    if n_params >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if n_params == x1:
            return y1  # table points exactly, without rounding through logs
        if n_params < x1:
            t = (math.log(n_params) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    raise AssertionError("unreachable: n_params is inside the table")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be positive.")


def full_learning_rate(n_params: float) -> float:
    """Full fine-tuning learning rate for a model size (log-log interpolation, clamped to 0.6B..32B).

    Example::

        >>> full_learning_rate(7e9)
        1e-05
    """
    _check_positive("n_params", n_params)
    return _interpolate_log(n_params, [(n, full) for n, full, _ in _LR_TABLE])


def lora_size_learning_rate(n_params: float) -> float:
    """LoRA/QLoRA learning rate for a model size at the reference data size (10K samples).

    Example::

        >>> round(lora_size_learning_rate(0.6e9), 6)
        0.0003
    """
    _check_positive("n_params", n_params)
    return _interpolate_log(n_params, [(n, lora) for n, _, lora in _LR_TABLE])


def lora_learning_rate(n_params: float, n_samples: int) -> float:
    """LoRA learning rate from the data-size power law, scaled to the model size.

    ``eta0 * (clamp(n_samples, 500, 500K) / 10,000)^0.22 * lr_lora(n_params) / lr_lora(7B)``.

    Example::

        >>> round(lora_learning_rate(7e9, 10_000), 6)
        0.0002
    """
    _check_positive("n_samples", n_samples)
    low, high = LORA_LR_DATA_RANGE
    data = min(max(n_samples, low), high)
    law = LORA_LR_ETA0 * (data / LORA_LR_N0) ** LORA_LR_K
    return law * lora_size_learning_rate(n_params) / lora_size_learning_rate(REFERENCE_PARAMS)


def lora_learning_rate_rule(n_samples: int) -> float:
    """The study's step rule for a 7B LoRA: 1e-4 below 5K samples, 3e-4 above 100K, 2e-4 between.

    Example::

        >>> lora_learning_rate_rule(2_000)
        0.0001
    """
    _check_positive("n_samples", n_samples)
    if n_samples < 5_000:
        return 1e-4
    if n_samples > 100_000:
        return 3e-4
    return 2e-4


def resolve_lora_rank_auto(n_params: float, n_samples: int) -> int:
    """LoRA rank for ``LoRA(r="auto")``: 64 above 10K samples, 32 for 5K..10K, 16 below 5K.

    The study found the rank rule the same across 0.6B-32B, so ``n_params`` is only validated; it is part of
    the signature so that a size-dependent rule can be added without changing callers.

    Example::

        >>> resolve_lora_rank_auto(7e9, 20_000)
        64
    """
    _check_positive("n_params", n_params)
    _check_positive("n_samples", n_samples)
    if n_samples > 10_000:
        return 64
    if n_samples >= 5_000:
        return 32
    return 16


def recommend_epochs(n_samples: int) -> int:
    """Epoch ceiling: 5 below 5K samples, 3 up to 100K, 2 up to 500K, 1 above (with early stopping).

    Example::

        >>> recommend_epochs(200_000)
        2
    """
    _check_positive("n_samples", n_samples)
    if n_samples < 5_000:
        return 5
    if n_samples <= 100_000:
        return 3
    if n_samples <= FULL_FT_MIN_SAMPLES:
        return 2
    return 1


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Valid tasks: {', '.join(TASKS)}.")


def data_thresholds(task: str, n_params: float) -> dict[str, int]:
    """Minimum / recommended / saturation sample counts for a task, scaled by ``(n_params / 7e9)^0.3``.

    Example::

        >>> data_thresholds("ner", 7e9)
        {'minimum': 1000, 'recommended': 5000, 'saturation': 50000}
    """
    _check_task(task)
    _check_positive("n_params", n_params)
    scale = (n_params / REFERENCE_PARAMS) ** DATA_SCALE_EXPONENT
    low, mid, high = TASKS[task]
    return {"minimum": round(low * scale), "recommended": round(mid * scale), "saturation": round(high * scale)}


def _verdict(n_samples: int, thresholds: dict[str, int]) -> Verdict:
    if n_samples < thresholds["minimum"]:
        return "below minimum"
    if n_samples > thresholds["saturation"]:
        return "past saturation"
    return "fine"


@dataclass(frozen=True)
class Recommendation:
    """A fine-tuning recipe with the reason for each choice.

    Example::

        >>> rec = recommend("7B", "instruction-simple", 20_000)
        >>> rec.method, rec.rank, rec.data_verdict
        ('lora', 64, 'fine')
        >>> print(rec.to_yaml())  # doctest: +SKIP
    """

    model: str
    n_params: int
    task: str
    samples: int
    method: Method
    rank: int | None
    """LoRA rank (``None`` for full fine-tuning)."""
    alpha: int | None
    """LoRA alpha, ``2 * rank``."""
    target_modules: str | None
    dropout: float | None
    learning_rate: float
    epochs: int
    data_verdict: Verdict
    data_thresholds: dict[str, int]
    memory_bytes: dict[str, int]
    """Per-GPU training memory of each method, as ``zenft estimate`` gives it under the settings the config runs
    with (``estimate_commands`` holds each command)."""
    gpu_mem_gb: float | None
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each choice was made, keyed ``method``, ``rank``, ``learning_rate``, ``epochs``, ``data``, ``memory``."""
    batch: int = 1
    """Micro-batch per GPU (``data.batch_size`` of the config)."""
    seq: int = 2048
    """Tokens per example (``data.max_length`` of the config)."""
    checkpointing: bool = False
    """Gradient checkpointing (``model.gradient_checkpointing``); turned on when only that makes the run fit."""
    gpus: int = 1
    nodes: int = 1
    fits: bool | None = None
    """Whether the recommended run fits the GPU memory (``None``: no memory given)."""
    estimate_commands: dict[str, str] = field(default_factory=dict)
    """The ``zenft estimate`` command that prints each method's figure of ``memory_bytes``."""

    def to_dict(self) -> dict[str, object]:
        """Plain dict, JSON-ready."""
        return asdict(self)

    def to_config(
        self, train_file: str = "train.jsonl", val_fraction: float = 0.05, max_steps: int | None = None
    ) -> dict[str, object]:
        """The ``zenft fit`` config as a dict (:func:`~lightning_zenft.planning.fit_config.fit_config`)."""
        from lightning_zenft.planning.fit_config import fit_config

        return fit_config(self, train_file, val_fraction, max_steps)

    def to_yaml(self, train_file: str = "train.jsonl", val_fraction: float = 0.05, max_steps: int | None = None) -> str:
        """The ``zenft fit`` config as YAML text (:func:`~lightning_zenft.planning.fit_config.fit_yaml`)."""
        from lightning_zenft.planning.fit_config import fit_yaml

        return fit_yaml(self, train_file, val_fraction, max_steps)


def recommend(
    model: str | os.PathLike[str] | ModelInfo,
    task: str,
    samples: int,
    gpu_mem_gb: float | None = None,
    *,
    divergent: bool = False,
    max_performance: bool = False,
    nodes: int = 1,
    gpus: int = 1,
    batch: int = 1,
    seq: int = 2048,
    checkpointing: bool = False,
    qlora_available: bool | None = None,
) -> Recommendation:
    """Recommend a fine-tuning recipe for a model, task and dataset size.

    Args:
        model: a Hugging Face model directory or a size string such as ``"7B"``.
        task: one of :data:`TASKS`.
        samples: number of training samples.
        gpu_mem_gb: memory of one GPU in GiB; ``None`` skips the fit check.
        divergent: the task diverges strongly from the base model's distribution (favors full fine-tuning).
        max_performance: maximum task performance is required (favors full fine-tuning).
        nodes: nodes available; more than one favors full fine-tuning.
        gpus: GPUs per node; every method is sharded (FSDP) over ``nodes * gpus``, as ``zenft estimate --gpus``
            assumes, and the config runs :class:`~lightning_zenft.strategies.FSDP2Strategy` there.
        batch: micro-batch size per GPU, for the memory check and the config.
        seq: sequence length, for the memory check and the config.
        checkpointing: gradient checkpointing, for the memory check and the config; when off and nothing fits
            without it, it is turned on if that makes a method fit.
        qlora_available: whether this installation can run QLoRA (``lightning_zenft.NF4Precision`` exists);
            ``None`` looks. Without it QLoRA is never recommended: the reason says when it would have been.

    Example::

        >>> rec = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=24, qlora_available=True)
        >>> rec.method
        'qlora'
    """
    _check_task(task)
    problems = [
        f"{name}={value!r} (must be a positive integer)"
        for name, value in (("samples", samples), ("nodes", nodes), ("gpus", gpus), ("batch", batch), ("seq", seq))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1
    ]
    if gpu_mem_gb is not None and not gpu_mem_gb > 0:
        problems.append(f"gpu_mem_gb={gpu_mem_gb!r} (must be positive GiB, or None to skip the memory check)")
    if problems:
        raise ValueError("Invalid recommend arguments: " + "; ".join(problems) + ".")
    info = resolve_model(model)
    n = info.n_params
    reasons: dict[str, str] = {}

    # Data.
    thresholds = data_thresholds(task, n)
    verdict = _verdict(samples, thresholds)
    scale = (n / REFERENCE_PARAMS) ** DATA_SCALE_EXPONENT
    data_reason = (
        f"{samples:,} samples for {task}: minimum {thresholds['minimum']:,}, recommended "
        f"{thresholds['recommended']:,}, saturation {thresholds['saturation']:,} (7B LoRA r64 figures "
        f"x (N/7e9)^0.3 = {scale:.2f})"
    )
    if verdict == "below minimum":
        data_reason += "; below the minimum, expect weak results: collect more data"
    elif verdict == "past saturation":
        data_reason += "; past saturation, more data adds little: consider full fine-tuning or a larger model"
    elif samples < thresholds["recommended"]:
        data_reason += "; above the minimum but below the recommended amount"
    reasons["data"] = data_reason

    # Method by rule.
    full_why = []
    if divergent:
        full_why.append("the task diverges strongly from the base distribution")
    if samples > FULL_FT_MIN_SAMPLES:
        full_why.append(f"{samples:,} samples exceed {FULL_FT_MIN_SAMPLES:,}")
    if max_performance:
        full_why.append("maximum task performance is required")
    if nodes > 1:
        full_why.append(f"{nodes} nodes are available")
    method: Method = "full" if full_why else "lora"
    method_reason = (
        "full fine-tuning because " + ", ".join(full_why)
        if full_why
        else "LoRA: none of the full fine-tuning conditions holds (divergent task, > 500K samples, maximum "
        "performance, multi-node)"
    )

    # Memory: the figures of `zenft estimate` (one memory model) under the settings the written config runs with.
    rank = resolve_lora_rank_auto(n, samples)
    can_qlora = nf4_precision_available() if qlora_available is None else qlora_available
    choice = choose_by_memory(info, method, rank, gpu_mem_gb, batch, seq, nodes * gpus, checkpointing, can_qlora)
    method = choice.method
    if choice.notes:
        method_reason += "; " + "; ".join(choice.notes)
    reasons["memory"] = choice.reason
    reasons["method"] = method_reason

    # Adapter shape, learning rate, epochs.
    epochs = recommend_epochs(samples)
    if method == "full":
        lr = full_learning_rate(n)
        reasons["rank"] = "full fine-tuning trains every weight: no adapter rank"
        reasons["learning_rate"] = (
            f"full fine-tuning rate for {n / 1e9:.2f}B params, log-log interpolated between 0.6B 2e-5, 7B 1e-5 "
            "and 32B 5e-6 (clamped outside)"
        )
        adapter_rank, alpha, targets, dropout = None, None, None, None
    else:
        lr = lora_learning_rate(n, samples)
        size_factor = lora_size_learning_rate(n) / lora_size_learning_rate(REFERENCE_PARAMS)
        rank_rule = {64: "rank 64 above 10K samples", 32: "rank 32 for 5K-10K samples"}.get(
            rank, "rank 16 below 5K samples, to limit overfitting"
        )
        reasons["rank"] = f"rank {rank} (alpha {2 * rank}) on all linear layers, attention and MLP: {rank_rule}"
        reasons["learning_rate"] = (
            f"2e-4 * (N_data/10,000)^0.22 (data clamped to 500..500K) = "
            f"{lora_learning_rate(REFERENCE_PARAMS, samples):.2e} at 7B, x {size_factor:.2f} for "
            f"{n / 1e9:.2f}B params; the step rule says {lora_learning_rate_rule(samples):.0e}"
        )
        adapter_rank, alpha, targets, dropout = rank, 2 * rank, "all-linear", LORA_DROPOUT
    epoch_rule = "3-5 epochs for small sets" if samples <= 100_000 else "1-2 epochs above 100K samples"
    reasons["epochs"] = (
        f"at most {epochs} ({epoch_rule}); stop early on validation loss (EarlyStopping on val_loss, patience 2)"
    )
    return Recommendation(
        model=info.name,
        n_params=n,
        task=task,
        samples=samples,
        method=method,
        rank=adapter_rank,
        alpha=alpha,
        target_modules=targets,
        dropout=dropout,
        learning_rate=float(f"{lr:.2g}"),
        epochs=epochs,
        data_verdict=verdict,
        data_thresholds=thresholds,
        memory_bytes=choice.memory_bytes,
        gpu_mem_gb=gpu_mem_gb,
        reasons=reasons,
        batch=batch,
        seq=seq,
        checkpointing=choice.checkpointing,
        gpus=gpus,
        nodes=nodes,
        fits=choice.fits,
        estimate_commands=choice.commands,
    )
