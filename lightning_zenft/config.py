"""Typed, validated configuration for adapters. Configs become modules in one place only: :mod:`lightning_zenft.inject`.

Example::

    cfg = LoRAConfig(r=16, alpha=32, target_modules="all-linear", rank_pattern={"o_proj": 8})
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TargetSpec = str | list[str]
"""A preset (``"all-linear"``, ``"attention"``, ``"mlp"``), a regex matched against full module names, or a list of
exact names / name suffixes (``["q_proj", "v_proj"]``)."""

PRESETS = ("all-linear", "attention", "mlp")


@dataclass
class LoRAConfig:
    """What to adapt and how. Every problem is reported at once when the config is built."""

    r: int = 8
    """Rank of the update."""
    alpha: float | None = None
    """Scale numerator; ``None`` means ``2 * r`` (scaling 2, or ``2 sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: TargetSpec = "all-linear"
    """Which linear layers get adapters (see :data:`TargetSpec`)."""
    exclude_modules: TargetSpec | None = None
    """Layers to leave alone even if ``target_modules`` matches them (same syntax, presets excluded)."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (learned per-output magnitude)."""
    init: Literal["kaiming", "gaussian", "pissa", "loftq"] = "kaiming"
    """Initialization of A and B (PiSSA rewrites the base weight to its SVD residual; LoftQ, with NF4Precision, sets
    A, B and the 4-bit base so that ``Q + s B A`` is close to ``W``)."""
    loftq_iters: int = 1
    """LoftQ's alternations of quantization and SVD (``init="loftq"`` only)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer rank overrides: a key matches a layer whose full name ends with it (regex, dot-aligned)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-layer alpha overrides, matched as ``rank_pattern``."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, every bias in the model, or only the biases of adapted layers."""
    trainable_norms: bool = False
    """Also train normalization layers (LayerNorm, RMSNorm and similar)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. a classification head); name suffixes."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            problems.append(f"r={self.r!r} must be a positive integer")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"alpha={self.alpha!r} must be positive (or None for 2*r)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                problems.append("target_modules='' is empty; use a preset such as 'all-linear'")
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            problems.append(f"target_modules={self.target_modules!r} must be a preset, a regex or a list of names")
        if isinstance(self.exclude_modules, str) and self.exclude_modules in PRESETS:
            problems.append(f"exclude_modules={self.exclude_modules!r}: presets cannot be excluded; list the names")
        if self.init not in ("kaiming", "gaussian", "pissa", "loftq"):
            problems.append(f"init={self.init!r} must be 'kaiming', 'gaussian', 'pissa' or 'loftq'")
        if self.init == "loftq" and self.use_dora:
            problems.append("init='loftq' is for LoRA (DoRA's magnitude rescales rows); use LoRA or another init")
        if not isinstance(self.loftq_iters, int) or isinstance(self.loftq_iters, bool) or self.loftq_iters < 1:
            problems.append(f"loftq_iters={self.loftq_iters!r} must be a positive integer")
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias={self.bias!r} must be 'none', 'all' or 'lora_only'")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                problems.append(f"rank_pattern[{key!r}]={value!r} must be a positive integer")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, int | float) or value <= 0:
                problems.append(f"alpha_pattern[{key!r}]={value!r} must be positive")
        if problems:
            raise ValueError("invalid LoRAConfig: " + "; ".join(problems) + ".")
        if self.alpha is None:
            self.alpha = float(2 * self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
