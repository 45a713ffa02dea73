"""LoReFT's config: :class:`LoReFTConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_zenft.config.base import (
    AdapterConfig,
    TargetSpec,
    is_count,
    is_number,
    module_kind_problems,
)


@dataclass(kw_only=True)
class LoReFTConfig(AdapterConfig):
    """LoReFT (Wu et al. 2024): ``h + R^T (W h + b - R h)`` on the hidden states that chosen transformer blocks
    output, at the first ``first_positions`` and last ``last_positions`` real tokens of each sequence.

    Example::

        cfg = LoReFTConfig(r=4, first_positions=2, last_positions=2, target_modules=["layers.0", "layers.2"])
    """

    target_modules: TargetSpec = "all"
    """Which transformer blocks get an intervention on their output: ``"all"``, names or suffixes (``["layers.3"]``)
    or a regex over full names."""
    r: int = 4
    """Rank of the intervention: the number of orthonormal rows of ``R`` (at most the hidden size)."""
    first_positions: int = 1
    """Intervene on the first this many real tokens of each sequence (the attention mask says which are real)."""
    last_positions: int = 1
    """Intervene on the last this many real tokens of each sequence."""
    dropout: float = 0.0
    """Dropout on the edit ``R^T (W h + b - R h)``."""

    method: ClassVar[str] = "loreft"
    identity_keys: ClassVar[tuple[str, ...]] = ("r", "first_positions", "last_positions")

    def method_problems(self) -> list[str]:
        problems = module_kind_problems(self, "LoReFT intervenes on block outputs: use 'all', names or a regex")
        if not is_count(self.r, 1):
            problems.append(f"r={self.r!r} must be a positive integer")
        for name in ("first_positions", "last_positions"):
            if not is_count(getattr(self, name), 0):
                problems.append(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if self.first_positions == 0 and self.last_positions == 0:
            problems.append("first_positions=0 and last_positions=0 intervene nowhere; set at least one")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {
            "r": self.r,
            "first_positions": self.first_positions,
            "last_positions": self.last_positions,
            "dropout": float(self.dropout),
        }
