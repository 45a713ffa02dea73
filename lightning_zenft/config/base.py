"""The base of every adapter config: :class:`AdapterConfig`, target specs, pattern values, shared checks."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

TargetSpec = str | list[str]
"""A preset (``"all-linear"``, ``"attention"``, ``"mlp"``), a regex matched against full module names, or a list of
exact names / name suffixes (``["q_proj", "v_proj"]``)."""

PRESETS = ("all-linear", "attention", "mlp")


def _target_problems(name: str, spec: object, allow_none: bool) -> list[str]:
    if spec is None and allow_none:
        return []
    if isinstance(spec, str):
        return [] if spec else [f"{name}='' is empty; use a preset such as 'all-linear', a regex or a list of names"]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(t, str) and t for t in spec):
        return []
    return [f"{name}={spec!r} must be a preset ({', '.join(PRESETS)}), a regex string or a list of layer names"]


@dataclass(kw_only=True)
class AdapterConfig(ABC):
    """What every method shares: where its modules go, and what else trains. Every problem is reported at once."""

    target_modules: TargetSpec = "all-linear"
    """Which modules get adapters (see :data:`TargetSpec`)."""
    exclude_modules: TargetSpec | None = None
    """Modules to leave alone even if ``target_modules`` matches them (same syntax, presets excluded)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, every bias in the model, or only the biases of adapted layers."""
    trainable_norms: bool = False
    """Also train normalization layers (LayerNorm, RMSNorm and similar)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. a classification head); name suffixes."""

    method: ClassVar[str]
    """The registry name of the method (:mod:`lightning_zenft.registry`)."""
    identity_keys: ClassVar[tuple[str, ...]] = ()
    """Per-layer settings that change what the trained tensors mean (checked when loading or resuming)."""
    peft_unsupported: ClassVar[tuple[str, ...]] = ()
    """PEFT config keys that change what a file means and that this library does not implement: refused on load."""
    peft_absent_keys: ClassVar[tuple[str, ...]] = ()
    """Keys every PEFT config of a wrapping method gets that PEFT's config of this method lacks (left out of files)."""
    attach_name: ClassVar[str | None] = None
    """For a method attached to the whole model: the attribute its module is added under (None: no module)."""
    attach_kind: ClassVar[str | None] = None
    """The kind of module this config's targets are (``targets.KINDS``); None: what its method attaches to."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        problems = []
        if not (self.target_modules == [] and self.targets_elsewhere()):
            problems += _target_problems("target_modules", self.target_modules, allow_none=False)
        problems += _target_problems("exclude_modules", self.exclude_modules, allow_none=True)
        if isinstance(self.exclude_modules, str) and self.exclude_modules in PRESETS:
            problems.append(f"exclude_modules={self.exclude_modules!r}: presets cannot be excluded; list the names")
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias={self.bias!r} must be 'none', 'all' or 'lora_only'")
        if not isinstance(self.trainable_norms, bool):
            problems.append(f"trainable_norms={self.trainable_norms!r} must be True or False")
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            problems.append(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        problems += self.method_problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems) + ".")
        self.finalize()

    def method_problems(self) -> list[str]:
        """The method's own checks (every problem, not the first)."""
        return []

    def targets_elsewhere(self) -> bool:
        """True when the config names its targets in another field, so ``target_modules`` may be empty."""
        return False

    def finalize(self) -> None:  # noqa: B027 - an optional hook: most methods derive nothing
        """Fill derived defaults once the config is valid (e.g. ``alpha = 2 r``)."""

    @abstractmethod
    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        """The keyword arguments the module at ``name`` is built with. ``initialize=False``: weights are loaded next,
        so skip any initialization that rewrites the base (e.g. PiSSA's SVD)."""

    def parts(self, model: Any) -> list[AdapterConfig]:
        """For a composite method (e.g. MAM: a parallel adapter plus prefix tuning), or a config whose targets on
        ``model`` are of several kinds: the configs of its parts, whose plans together make its plan. Empty for an
        ordinary config."""
        return []

    def trainable_names(self, model: Any) -> list[str]:
        """Names of parameters of ``model`` the method trains besides its adapter modules' own (e.g. BitFit's)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ PEFT's adapter_config.json
    @classmethod
    def from_peft(cls, peft: dict[str, Any]) -> AdapterConfig:
        """The config equivalent to a PEFT ``adapter_config.json`` of this method."""
        raise TypeError(f"{cls.__name__}: HF PEFT has no file format for the {cls.method!r} method.")

    @classmethod
    def peft_config(cls, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """PEFT's method-specific config keys, from each layer's exported settings (``{name: settings}``)."""
        raise TypeError(f"{cls.__name__}: HF PEFT has no file format for the {cls.method!r} method.")

    @staticmethod
    def param_name(peft_key: str) -> str:
        """A parameter name (relative to the model) from a PEFT tensor key stripped of its prefix."""
        return peft_key


def pattern_value(name: str, patterns: dict[str, int] | dict[str, float], default: Any) -> Any:
    """The value of the first key in ``patterns`` whose regex matches the end of ``name`` on a dot boundary."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def module_kind_problems(config: AdapterConfig, what: str) -> list[str]:
    """Options that make no sense for a method whose modules wrap whole sublayers or blocks, not linear layers."""
    problems = []
    if config.target_modules == "all-linear":
        problems.append(f"target_modules='all-linear' selects linear layers; {what}")
    if config.bias == "lora_only":
        problems.append(f"bias='lora_only' trains the biases of adapted linear layers, and {what}: use 'none' or 'all'")
    return problems
