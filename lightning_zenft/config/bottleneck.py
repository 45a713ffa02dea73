"""The configs of bottleneck (serial) and parallel adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lightning_zenft.config.base import (
    AdapterConfig,
    TargetSpec,
    is_count,
    is_number,
    module_kind_problems,
)

NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass(kw_only=True)
class _BottleneckFields(AdapterConfig):
    """What serial (:class:`BottleneckConfig`) and parallel (:class:`ParallelAdapterConfig`) adapters share."""

    reduction_factor: float | None = None
    """Bottleneck size = the module's output width / ``reduction_factor`` (it must divide it); None: 16, unless
    ``bottleneck_size`` is given."""
    bottleneck_size: int | None = None
    """The bottleneck size itself, for every adapted module (instead of ``reduction_factor``)."""
    non_linearity: NonLinearity = "gelu"
    """The bottleneck's non-linearity."""
    dropout: float = 0.0
    """Dropout on the bottleneck's activations (after the non-linearity)."""

    def method_problems(self) -> list[str]:
        name = type(self).__name__.removesuffix("Config")
        problems = module_kind_problems(
            self, f"{name} adapts whole attention and mlp modules: use 'all', 'attention', 'mlp', names or a regex"
        )
        if self.reduction_factor is not None and (not is_number(self.reduction_factor) or self.reduction_factor <= 0):
            problems.append(f"reduction_factor={self.reduction_factor!r} must be a positive number")
        if self.bottleneck_size is not None and not is_count(self.bottleneck_size, 1):
            problems.append(f"bottleneck_size={self.bottleneck_size!r} must be a positive integer")
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            problems.append(
                f"reduction_factor={self.reduction_factor!r} and bottleneck_size={self.bottleneck_size!r} both set "
                "the bottleneck size; give one"
            )
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(f"non_linearity={self.non_linearity!r} must be one of {NON_LINEARITIES}")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {  # reduction_factor=None with no bottleneck_size: the module's default, 16
            "reduction_factor": None if self.reduction_factor is None else float(self.reduction_factor),
            "bottleneck_size": self.bottleneck_size,
            "non_linearity": self.non_linearity,
            "dropout": float(self.dropout),
        }


@dataclass(kw_only=True)
class BottleneckConfig(_BottleneckFields):
    """Serial bottleneck adapters (Houlsby et al. 2019): ``h + up(act(down(h)))`` on the output ``h`` of each
    attention and feed-forward module, before the residual add.

    Example::

        cfg = BottleneckConfig(reduction_factor=8, target_modules="mlp", non_linearity="relu")
    """

    target_modules: TargetSpec = "all"
    """Which modules get an adapter: ``"all"`` (attention and feed-forward), ``"attention"``, ``"mlp"``, names or
    suffixes (``["layers.0.mlp"]``) or a regex over full names."""

    method: ClassVar[str] = "bottleneck"
    identity_keys: ClassVar[tuple[str, ...]] = ("reduction_factor", "bottleneck_size", "non_linearity")


@dataclass(kw_only=True)
class ParallelAdapterConfig(_BottleneckFields):
    """Parallel adapters (He et al. 2022): ``f(x) + s * up(act(down(x)))`` beside each target module ``f``, reading
    its input ``x``. On the feed-forward modules by default; usable as a part of a composite method (MAM).

    Example::

        cfg = ParallelAdapterConfig(bottleneck_size=64, scaling=4.0)          # every FFN
    """

    target_modules: TargetSpec = "mlp"
    """Which modules get an adapter beside them: ``"mlp"`` (feed-forward), ``"attention"``, ``"all"``, names or
    suffixes, or a regex over full names."""
    non_linearity: NonLinearity = "relu"
    """The bottleneck's non-linearity (ReLU, as He et al.)."""
    scaling: float = 4.0
    """The scale ``s`` of the adapter's output."""

    method: ClassVar[str] = "parallel_adapter"
    identity_keys: ClassVar[tuple[str, ...]] = ("reduction_factor", "bottleneck_size", "non_linearity", "scaling")

    def method_problems(self) -> list[str]:
        problems = super().method_problems()
        if not is_number(self.scaling) or self.scaling <= 0:
            problems.append(f"scaling={self.scaling!r} must be a positive number")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {**super().layer_kwargs(name, initialize=initialize), "scaling": float(self.scaling)}
