"""Typed, validated configuration of adapters: one dataclass per method, all sharing :class:`AdapterConfig`.

A config says where a method's modules go (``target_modules``...), what else trains (``bias``...), and, through
:meth:`AdapterConfig.layer_kwargs`, the primitives each adapted layer is built with. It also translates itself to
and from HF PEFT's ``adapter_config.json`` where PEFT has the method. Configs become modules in one place only:
:func:`lightning_zenft.inject.plan_adapters`.

Adding an option to a method touches its config (the field, its check, ``layer_kwargs`` and the PEFT mapping), its
module (the constructor argument) and nothing else: callbacks take their arguments from the config's fields.

Example::

    cfg = LoRAConfig(r=16, alpha=32, target_modules="all-linear", rank_pattern={"o_proj": 8})
    cfg.layer_kwargs("model.layers.0.self_attn.o_proj")   # {'r': 8, 'alpha': 32.0, ...}
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections import Counter
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
    attach_name: ClassVar[str | None] = None
    """For a method attached to the whole model: the attribute its module is added under (None: no module)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        problems = _target_problems("target_modules", self.target_modules, allow_none=False)
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

    def finalize(self) -> None:  # noqa: B027 - an optional hook: most methods derive nothing
        """Fill derived defaults once the config is valid (e.g. ``alpha = 2 r``)."""

    @abstractmethod
    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        """The keyword arguments the module at ``name`` is built with. ``initialize=False``: weights are loaded next,
        so skip any initialization that rewrites the base (e.g. PiSSA's SVD)."""

    def parts(self) -> list[AdapterConfig]:
        """For a composite method (e.g. MAM: a parallel adapter plus prefix tuning): the configs of its parts, whose
        plans together make its plan. Empty for an ordinary method."""
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


@dataclass(kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA (and DoRA, rsLoRA, PiSSA): a low-rank update ``s B A`` on each target linear layer.

    Example::

        cfg = LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"], use_rslora=True)
    """

    r: int | Literal["auto"] = 8
    """Rank of the update; ``"auto"`` is resolved by the ``LoRA`` callback from the model and data size."""
    alpha: float | None = None
    """Scale numerator; ``None`` means ``2 * r`` (scaling 2, or ``2 sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (learned per-output magnitude)."""
    init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    """Initialization of A and B (PiSSA rewrites the base weight to its SVD residual)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer rank overrides: a key matches a layer whose full name ends with it (regex, dot-aligned)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-layer alpha overrides, matched as ``rank_pattern``."""

    method: ClassVar[str] = "lora"
    identity_keys: ClassVar[tuple[str, ...]] = ("r", "alpha", "use_rslora", "use_dora")
    peft_unsupported: ClassVar[tuple[str, ...]] = (
        "layers_to_transform",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "use_qalora",
        "lora_bias",
        "alora_invocation_tokens",
        "use_bdlora",
        "megatron_config",
    )

    def method_problems(self) -> list[str]:
        problems: list[str] = []
        r_ok = self.r == "auto" or (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1)
        if not r_ok:
            problems.append(f"r={self.r!r} must be a positive integer (or 'auto')")
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0
        ):
            problems.append(f"alpha={self.alpha!r} must be a positive number (or None for 2*r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.init not in ("kaiming", "gaussian", "pissa"):
            problems.append(f"init={self.init!r} must be 'kaiming', 'gaussian' or 'pissa'")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"rank_pattern[{key!r}]={value!r} must be a positive integer")
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                problems.append(f"alpha_pattern[{key!r}]={value!r} must be positive")
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as err:
                    problems.append(f"{name} key {key!r} is not a valid regex ({err})")
        return problems

    def finalize(self) -> None:
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        if self.alpha is None and self.r != "auto":
            self.alpha = float(2 * self.r)

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        if self.r == "auto":
            raise ValueError("LoRAConfig(r='auto') must be resolved to a rank first (the LoRA callback does it).")
        init = self.init if initialize or self.init != "pissa" else "kaiming"
        return {
            "r": int(pattern_value(name, self.rank_pattern, self.r)),
            "alpha": float(pattern_value(name, self.alpha_pattern, self.alpha)),
            "dropout": float(self.dropout),
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init": init,
        }

    # ------------------------------------------------------------------ PEFT
    @classmethod
    def from_peft(cls, peft: dict[str, Any]) -> LoRAConfig:
        targets = peft["target_modules"]
        return cls(
            r=int(peft.get("r", 8)),
            alpha=float(peft.get("lora_alpha", 8)),
            dropout=float(peft.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else list(targets),
            exclude_modules=peft.get("exclude_modules"),
            use_rslora=bool(peft.get("use_rslora", False)),
            use_dora=bool(peft.get("use_dora", False)),
            rank_pattern={k: int(v) for k, v in (peft.get("rank_pattern") or {}).items()},
            alpha_pattern={k: float(v) for k, v in (peft.get("alpha_pattern") or {}).items()},
        )

    @classmethod
    def peft_config(cls, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        settings = list(layers.values())
        for key in ("use_rslora", "use_dora"):
            if len({s[key] for s in settings}) > 1:
                raise ValueError(f"the adapters mix {key}=True and False; PEFT's format has one `{key}` per file.")
        r = Counter(s["r"] for s in settings).most_common(1)[0][0]
        alpha = Counter(s["alpha"] for s in settings).most_common(1)[0][0]
        return {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": Counter(s["dropout"] for s in settings).most_common(1)[0][0],
            "rank_pattern": {re.escape(n): s["r"] for n, s in layers.items() if s["r"] != r},
            "alpha_pattern": {
                re.escape(n): s["alpha"] for n, s in layers.items() if not math.isclose(s["alpha"], alpha)
            },
            "use_rslora": settings[0]["use_rslora"],
            "use_dora": settings[0]["use_dora"],
            "fan_in_fan_out": any(s.get("fan_in_fan_out", False) for s in settings),
            "init_lora_weights": True,
        }

    @staticmethod
    def param_name(peft_key: str) -> str:
        # PEFT stores DoRA's magnitude as a module's weight; here it is a parameter of the layer.
        return peft_key[: -len(".weight")] if peft_key.endswith("lora_magnitude_vector.weight") else peft_key


__all__ = ["PRESETS", "AdapterConfig", "LoRAConfig", "TargetSpec", "pattern_value"]


# ---------------------------------------------------------------------------------------------------- adapters
NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _module_kind_problems(config: AdapterConfig, what: str) -> list[str]:
    """Options that make no sense for a method whose modules wrap whole sublayers or blocks, not linear layers."""
    problems = []
    if config.target_modules == "all-linear":
        problems.append(f"target_modules='all-linear' selects linear layers; {what}")
    if config.bias == "lora_only":
        problems.append(f"bias='lora_only' trains the biases of adapted linear layers, and {what}: use 'none' or 'all'")
    return problems


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
        problems = _module_kind_problems(
            self, f"{name} adapts whole attention and mlp modules: use 'all', 'attention', 'mlp', names or a regex"
        )
        if self.reduction_factor is not None and (not _is_number(self.reduction_factor) or self.reduction_factor <= 0):
            problems.append(f"reduction_factor={self.reduction_factor!r} must be a positive number")
        if self.bottleneck_size is not None and not _is_count(self.bottleneck_size, 1):
            problems.append(f"bottleneck_size={self.bottleneck_size!r} must be a positive integer")
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            problems.append(
                f"reduction_factor={self.reduction_factor!r} and bottleneck_size={self.bottleneck_size!r} both set "
                "the bottleneck size; give one"
            )
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(f"non_linearity={self.non_linearity!r} must be one of {NON_LINEARITIES}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
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
        if not _is_number(self.scaling) or self.scaling <= 0:
            problems.append(f"scaling={self.scaling!r} must be a positive number")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {**super().layer_kwargs(name, initialize=initialize), "scaling": float(self.scaling)}


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
        problems = _module_kind_problems(self, "LoReFT intervenes on block outputs: use 'all', names or a regex")
        if not _is_count(self.r, 1):
            problems.append(f"r={self.r!r} must be a positive integer")
        for name in ("first_positions", "last_positions"):
            if not _is_count(getattr(self, name), 0):
                problems.append(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if self.first_positions == 0 and self.last_positions == 0:
            problems.append("first_positions=0 and last_positions=0 intervene nowhere; set at least one")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {
            "r": self.r,
            "first_positions": self.first_positions,
            "last_positions": self.last_positions,
            "dropout": float(self.dropout),
        }


__all__ += ["NON_LINEARITIES", "BottleneckConfig", "LoReFTConfig", "NonLinearity", "ParallelAdapterConfig"]
