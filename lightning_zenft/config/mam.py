"""MAM's config: :class:`MAMConfig`, a composite of a parallel adapter and prefix tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_zenft.config.base import AdapterConfig, TargetSpec
from lightning_zenft.config.bottleneck import NonLinearity, ParallelAdapterConfig
from lightning_zenft.config.prompt import PrefixTuningConfig


@dataclass(kw_only=True)
class MAMConfig(AdapterConfig):
    """MAM, "mix-and-match" (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"): a
    parallel adapter on the feed-forward modules plus prefix tuning on attention. It is built from those two methods'
    configs (:meth:`parts`), not a third implementation: its plan is theirs together.

    Defaults follow the paper's MAM: 30 prefix tokens, a parallel adapter scaled by 4 with a ReLU.

    Example::

        cfg = MAMConfig(num_virtual_tokens=30, bottleneck_size=64)
    """

    target_modules: TargetSpec = "mlp"
    """Where the parallel adapter goes (``"mlp"``: every feed-forward module)."""
    num_virtual_tokens: int = 30
    """Prefix length (the prefix-tuning part)."""
    prefix_projection: bool = False
    """Train the prefix through the reparametrization MLP."""
    encoder_hidden_size: int | None = None
    """Hidden size of that MLP; None: the key/value width."""
    reduction_factor: float | None = None
    """The parallel adapter's bottleneck = module width / this; None: 16 unless ``bottleneck_size`` is given."""
    bottleneck_size: int | None = None
    """The parallel adapter's bottleneck size itself."""
    non_linearity: NonLinearity = "relu"
    """The parallel adapter's non-linearity."""
    scaling: float = 4.0
    """The scale of the parallel adapter's output."""
    dropout: float = 0.0
    """Dropout on the parallel adapter's bottleneck activations."""

    method: ClassVar[str] = "mam"

    def _parallel(self) -> ParallelAdapterConfig:
        shared = ("target_modules", "exclude_modules", "bias", "trainable_norms", "modules_to_save")
        own = ("reduction_factor", "bottleneck_size", "non_linearity", "scaling", "dropout")
        return ParallelAdapterConfig(**{k: getattr(self, k) for k in shared + own})

    def _prefix(self) -> PrefixTuningConfig:
        own = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size")
        return PrefixTuningConfig(**{k: getattr(self, k) for k in own})

    def method_problems(self) -> list[str]:
        problems = []
        for build in (self._parallel, self._prefix):
            try:
                build()
            except ValueError as err:  # the part's own checks, all of its problems in one message
                problems.append(str(err).rstrip("."))
        return problems

    def parts(self, model: Any) -> list[AdapterConfig]:
        return [self._parallel(), self._prefix()]

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        raise TypeError("MAM's modules are built by its parts (a parallel adapter and prefix tuning).")
