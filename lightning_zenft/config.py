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
import warnings
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
    target_parameters: list[str] = field(default_factory=list)
    """Parameters adapted in place of layers: the stacked 3-D expert weights of mixture-of-experts models, as names or
    suffixes (``["experts.gate_up_proj", "experts.down_proj"]``); the presets ``"all-linear"`` and ``"mlp"`` include
    every expert weight of the model."""

    method: ClassVar[str] = "lora"
    identity_keys: ClassVar[tuple[str, ...]] = ("r", "alpha", "use_rslora", "use_dora")
    peft_unsupported: ClassVar[tuple[str, ...]] = (
        "layers_to_transform",
        "layer_replication",
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
        if not isinstance(self.target_parameters, (list, tuple)) or not all(
            isinstance(t, str) and t for t in self.target_parameters
        ):
            problems.append(f"target_parameters={self.target_parameters!r} must be a list of parameter names")
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as err:
                    problems.append(f"{name} key {key!r} is not a valid regex ({err})")
        return problems

    def finalize(self) -> None:
        self.target_parameters = list(self.target_parameters)
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        if self.alpha is None and self.r != "auto":
            self.alpha = float(2 * self.r)
        elif self.alpha is not None:
            self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    def targets_elsewhere(self) -> bool:
        return bool(self.target_parameters)

    def parts(self, model: Any) -> list[AdapterConfig]:
        params = list(self.target_parameters)
        if not params and self.target_modules in ("all-linear", "mlp"):
            from lightning_zenft.targets import expert_parameter_names, name_matches

            found = expert_parameter_names(model, include_adapted=True)  # stacked experts: the MLP of MoE layers
            excluded = self.exclude_modules
            params = [n for n in found if not (excluded and name_matches(n, excluded))]
        if not params:
            return []
        if self.dropout:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in params})
            raise ValueError(
                f"LoRA(dropout={self.dropout}) cannot adapt the expert weights {params[:2]}: dropout would have to "
                "drop the experts' input for one weight only. Set dropout=0.0, or leave the experts out with "
                f"exclude_modules={leaves} (or target only attention)."
            )
        shared = {k: v for k, v in self.to_dict().items() if k not in ("target_modules", "target_parameters")}
        linear = [_LoRALinearPart(**shared, target_modules=self.target_modules)] if self.target_modules else []
        return [*linear, _LoRAParameterPart(**shared, target_modules=params)]

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
        targets = peft.get("target_modules") or []
        return cls(
            target_parameters=list(peft.get("target_parameters") or []),
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
        params = {n: s for n, s in layers.items() if "parameter_name" in s}
        if params:
            linear = {n: s for n, s in layers.items() if n not in params}
            for key in ("r", "alpha"):
                values = {s[key] for s in params.values()} | {s[key] for s in linear.values()}
                if len(values) > 1:
                    raise ValueError(
                        f"PEFT's format cannot give expert-weight adapters their own {key} ({sorted(values)}): use one "
                        f"{key} for every adapted layer and parameter."
                    )
            out = cls.peft_config(linear) if linear else {**cls.peft_config(params), "rank_pattern": {}}
            # inner wrappers first: PEFT nests a module's parameters in the order target_parameters lists them
            ordered = sorted(params, key=lambda n: (n.replace(".base_layer", ""), -n.count(".base_layer")))
            names = [f"{n.replace('.base_layer', '')}.{params[n]['parameter_name']}" for n in ordered]
            return {**out, "target_modules": list(linear), "target_parameters": names}
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


@dataclass(kw_only=True)
class _LoRALinearPart(LoRAConfig):
    """The linear layers of a LoRA config whose targets also include expert parameters."""

    def parts(self, model: Any) -> list[AdapterConfig]:
        return []


@dataclass(kw_only=True)
class _LoRAParameterPart(LoRAConfig):
    """The expert parameters of a LoRA config (``target_modules`` holds parameter names or suffixes)."""

    attach_kind: ClassVar[str | None] = "parameter"

    def parts(self, model: Any) -> list[AdapterConfig]:
        return []

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        kwargs = super().layer_kwargs(name, initialize=initialize)
        return {**kwargs, "parameter_name": name.rsplit(".", 1)[-1], "dropout": 0.0}
# ---------------------------------------------------------------------------------------------------- IA3
IA3_TARGET_MODULES = [
    "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "key", "value",  # attention keys and values
    "down_proj", "mlp.c_proj", "dense_4h_to_h", "fc2", "output.dense",  # the feed-forward down projection
]  # fmt: skip
"""``IA3Config``'s default targets: the paper's keys, values and feed-forward down projection under the names of
Llama/Mistral/Qwen2/Gemma (``k_proj``, ``v_proj``, ``down_proj``), GPT-2 (``c_attn``, ``mlp.c_proj``), Phi-3
(``qkv_proj``), GPT-NeoX/Falcon/Bloom (``query_key_value``, ``dense_4h_to_h``), Phi/OPT (``fc2``) and BERT/RoBERTa
(``key``, ``value``, ``output.dense``). On Llama, GPT-2 and BERT these are HF PEFT's defaults (with PEFT, BERT's
attention ``output.dense`` matches too, and scales its input); where q/k/v are one fused layer its whole output is
scaled, as in PEFT."""
IA3_FEEDFORWARD_MODULES = ["down_proj", "mlp.c_proj", "dense_4h_to_h", "fc2", "output.dense"]
"""The targets that scale their input when ``feedforward_modules`` is None: the feed-forward down projections."""


def _spec_matches(name: str, spec: str | list[str]) -> bool:
    """Target syntax (:mod:`lightning_zenft.targets`): a regex over the full name, or a plain name taken as a dotted
    suffix; a list of names or dotted suffixes."""
    if isinstance(spec, str):
        if re.fullmatch(spec, name):
            return True
        return bool(re.fullmatch(r"[\w.]+", spec)) and (name == spec or name.endswith("." + spec))
    return any(name == s or name.endswith("." + s) for s in spec)


@dataclass(kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)^3: a learned vector scales the output of each target layer, or the input of its feed-forward ones.

    Mirrors HF PEFT's ``IA3Config`` (``target_modules``, ``exclude_modules``, ``feedforward_modules``,
    ``init_ia3_weights``, ``modules_to_save``); ``fan_in_fan_out`` is read from each layer (GPT-2's ``Conv1D``).

    Example::

        cfg = IA3Config()  # keys, values and the FFN down projection (IA3_TARGET_MODULES)
        cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    """

    target_modules: TargetSpec = field(default_factory=lambda: list(IA3_TARGET_MODULES))
    """Which layers get a vector (:data:`TargetSpec`); by default the paper's k, v and FFN down projections."""
    feedforward_modules: TargetSpec | None = None
    """Which targets scale their INPUT, as the FFN down projection does (target syntax, no presets; ``[]``: none). A
    list must be a subset of a ``target_modules`` list (PEFT's rule). None: those named in IA3_FEEDFORWARD_MODULES."""
    init_ia3_weights: bool = True
    """Start every vector at ones, i.e. at the base model; False draws ``N(0, 1)`` (PEFT's option, for tests)."""

    method: ClassVar[str] = "ia3"
    identity_keys: ClassVar[tuple[str, ...]] = ("feedforward",)
    peft_absent_keys: ClassVar[tuple[str, ...]] = ("bias", "layers_to_transform", "layers_pattern")
    """Keys every PEFT config of a wrapping method gets that PEFT's ``IA3Config`` lacks (left out of its files)."""

    def method_problems(self) -> list[str]:
        problems: list[str] = []
        if self.bias != "none":
            problems.append(
                f"bias={self.bias!r}: IA3 trains no biases (PEFT's IA3 files have no bias setting); train whole "
                "modules with modules_to_save, or use LoRA(bias=...) or BitFit"
            )
        ff = self.feedforward_modules
        if isinstance(ff, tuple):
            ff = self.feedforward_modules = list(ff)
        if isinstance(ff, str):
            if ff in PRESETS or not ff:
                problems.append(f"feedforward_modules={ff!r} must be layer names or a regex (presets select layers)")
            else:
                try:
                    re.compile(ff)
                except re.error as err:
                    problems.append(f"feedforward_modules={ff!r} is not a valid regex ({err})")
        elif ff is not None and not (isinstance(ff, list) and all(isinstance(f, str) and f for f in ff)):
            problems.append(f"feedforward_modules={ff!r} must be a list of layer names, a regex or None")
        elif isinstance(ff, list) and isinstance(self.target_modules, list):
            outside = [f for f in ff if f not in self.target_modules]
            if outside:
                problems.append(
                    f"feedforward_modules {outside} are not in target_modules {self.target_modules}: every "
                    "feed-forward module must also be a target (list it in both)"
                )
        if not isinstance(self.init_ia3_weights, bool):
            problems.append(f"init_ia3_weights={self.init_ia3_weights!r} must be True or False")
        return problems

    def is_feedforward(self, name: str) -> bool:
        """Whether the target layer ``name`` scales its input (``feedforward_modules``, or the default names)."""
        spec = IA3_FEEDFORWARD_MODULES if self.feedforward_modules is None else self.feedforward_modules
        return _spec_matches(name, spec)

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {"feedforward": self.is_feedforward(name), "init_ia3_weights": self.init_ia3_weights}

    # ------------------------------------------------------------------ PEFT
    @classmethod
    def from_peft(cls, peft: dict[str, Any]) -> IA3Config:
        # PEFT matches a string as a regex over the whole name only, and a feed-forward list entry as a plain suffix
        # (`name.endswith(entry)`): both are rewritten as regexes that select exactly what PEFT selects.
        targets = peft["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            targets = f"(?:{targets})"
        ff = peft.get("feedforward_modules")
        if isinstance(ff, str):
            ff = f"(?:{ff})"
        elif ff:
            ff = ".*(?:" + "|".join(re.escape(f) for f in ff) + ")"
        elif ff is not None:
            ff = []
        return cls(
            target_modules=targets if isinstance(targets, str) else list(targets),
            exclude_modules=peft.get("exclude_modules"),
            feedforward_modules=ff,
            init_ia3_weights=bool(peft.get("init_ia3_weights", True)),
        )

    @classmethod
    def peft_config(cls, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "feedforward_modules": [name for name, s in layers.items() if s["feedforward"]],
            "fan_in_fan_out": any(s.get("fan_in_fan_out", False) for s in layers.values()),
            "init_ia3_weights": True,
        }


# ---------------------------------------------------------------------------------------------------- BitFit
@dataclass(kw_only=True)
class BitFitConfig(AdapterConfig):
    """BitFit (Ben Zaken et al. 2022): only the model's biases train, and, as options, its norms, the output head, or
    chosen blocks in full ("selected layers" fine-tuning: by depth with ``blocks``, by type with ``block_parts``).
    Nothing is injected: the method only chooses which of the model's own parameters train.

    Example::

        cfg = BitFitConfig()                                          # every bias
        cfg = BitFitConfig(blocks="last:2", block_parts="mlp")        # and the MLPs of the last two blocks
        cfg = BitFitConfig(bias="none", blocks=[0, -1], trainable_norms=True)  # selected layers, no biases
    """

    bias: Literal["none", "all", "lora_only"] = "all"
    """``"all"``: every bias of the model trains (BitFit); ``"none"``: only what the other options select."""
    train_head: bool = False
    """Also train the output head (a head tied to the input embedding trains the embedding too, with a warning)."""
    blocks: str | list[int] | None = None
    """Transformer blocks that also train in full: ``"all"``, ``"first:K"``, ``"last:K"`` or a list of block indices
    (negative ones count from the end); None: none."""
    block_parts: Literal["all", "attention", "mlp"] = "all"
    """What of each chosen block trains: all of it, its attention module, or its feed-forward module."""

    method: ClassVar[str] = "bitfit"

    def method_problems(self) -> list[str]:
        problems: list[str] = []
        if self.target_modules != "all-linear" or self.exclude_modules is not None:
            problems.append(
                f"target_modules={self.target_modules!r}, exclude_modules={self.exclude_modules!r}: BitFit adds no "
                "modules, so it has no targets; choose what trains with bias, trainable_norms, train_head, blocks, "
                "block_parts and modules_to_save"
            )
        if self.bias == "lora_only":
            problems.append("bias='lora_only' means the biases of adapter layers, and BitFit has none; use 'all'")
        if not isinstance(self.train_head, bool):
            problems.append(f"train_head={self.train_head!r} must be True or False")
        if isinstance(self.blocks, tuple):
            self.blocks = list(self.blocks)
        blocks = self.blocks
        if isinstance(blocks, str):
            if blocks != "all" and not re.fullmatch(r"(first|last):[1-9]\d*", blocks):
                problems.append(f"blocks={blocks!r} must be 'all', 'first:K', 'last:K' (K >= 1) or a list of indices")
        elif isinstance(blocks, list):
            if not blocks or not all(isinstance(i, int) and not isinstance(i, bool) for i in blocks):
                problems.append(f"blocks={blocks!r} must be a non-empty list of block indices (integers)")
            elif len(set(blocks)) != len(blocks):
                problems.append(f"blocks={blocks!r} lists a block twice")
        elif blocks is not None:
            problems.append(f"blocks={blocks!r} must be 'all', 'first:K', 'last:K', a list of indices or None")
        if self.block_parts not in ("all", "attention", "mlp"):
            problems.append(f"block_parts={self.block_parts!r} must be 'all', 'attention' or 'mlp'")
        elif self.block_parts != "all" and blocks is None:
            problems.append(f"block_parts={self.block_parts!r} needs blocks= (which blocks' {self.block_parts} trains)")
        others = self.train_head or blocks is not None or self.trainable_norms or self.modules_to_save
        if self.bias == "none" and not others:
            problems.append(
                "bias='none' with no other option trains nothing; keep bias='all' or add trainable_norms, train_head, "
                "blocks or modules_to_save"
            )
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {}  # BitFit builds no modules

    def block_indices(self, n_blocks: int) -> list[int]:
        """The indices (``0 <= i < n_blocks``, in order) of the blocks ``blocks`` selects in a model of ``n_blocks``."""
        blocks = self.blocks
        if blocks is None:
            return []
        if blocks == "all":
            return list(range(n_blocks))
        if isinstance(blocks, str):
            where, k = blocks.split(":")
            if int(k) > n_blocks:
                raise ValueError(f"BitFit(blocks={blocks!r}): the model has only {n_blocks} blocks.")
            return list(range(int(k))) if where == "first" else list(range(n_blocks - int(k), n_blocks))
        bad = [i for i in blocks if not -n_blocks <= i < n_blocks]
        if bad:
            raise ValueError(
                f"BitFit(blocks={blocks!r}): {bad} out of range; the model has {n_blocks} blocks (indices "
                f"0..{n_blocks - 1}, or -{n_blocks}..-1 from the end)."
            )
        return sorted({i % n_blocks for i in blocks})

    def trainable_names(self, model: Any) -> list[str]:
        # targets.py finds blocks and heads; it imports this module, so it is imported here, when a model is adapted.
        from lightning_zenft.targets import module_candidates, output_head_names

        canonical = {id(p): n for n, p in model.named_parameters()}  # a tied parameter under its first name
        chosen: dict[str, None] = {}
        kind = type(model).__name__
        if self.train_head:
            heads = sorted(output_head_names(model))
            if not heads:
                raise ValueError(
                    f"BitFit(train_head=True): {kind} has no output head (get_output_embeddings() or a module named "
                    "lm_head); name the module in modules_to_save instead."
                )
            for head in heads:
                for pname, p in model.get_submodule(head).named_parameters():
                    if canonical[id(p)] != f"{head}.{pname}":
                        warnings.warn(
                            f"BitFit(train_head=True): {head}.{pname} is tied to {canonical[id(p)]}, which trains too.",
                            stacklevel=2,
                        )
                    chosen[canonical[id(p)]] = None
        if self.blocks is not None:
            names = module_candidates(model, "block")
            if not names:
                raise ValueError(
                    f"BitFit(blocks={self.blocks!r}): {kind} has no transformer blocks (modules holding an attention "
                    "module); name what should train in modules_to_save instead."
                )
            for index in self.block_indices(len(names)):
                block = model.get_submodule(names[index])
                parts = [""] if self.block_parts == "all" else module_candidates(block, self.block_parts)
                if not parts:
                    raise ValueError(
                        f"BitFit(block_parts={self.block_parts!r}): block {names[index]} has no {self.block_parts} "
                        "module; use block_parts='all'."
                    )
                for part in parts:
                    for p in block.get_submodule(part).parameters():
                        chosen[canonical[id(p)]] = None
        if self.bias == "all" and not any(n.rsplit(".", 1)[-1] == "bias" for n in canonical.values()):
            if not (chosen or self.trainable_norms or self.modules_to_save):
                raise ValueError(
                    f"BitFit: {kind} has no bias parameters (Llama-style models use bias-free layers), so BitFit would "
                    "train nothing. Train other parts instead: bias='none' with trainable_norms=True, train_head=True, "
                    "blocks='last:2' (selected layers) or modules_to_save; or use LoRA/IA3."
                )
            warnings.warn(
                f"BitFit: {kind} has no bias parameters; only the norms, head, blocks or modules asked for train. "
                "Pass bias='none' to say so.",
                stacklevel=2,
            )
        return list(chosen)


__all__ += ["IA3_FEEDFORWARD_MODULES", "IA3_TARGET_MODULES", "BitFitConfig", "IA3Config"]


# ---------------------------------------------------------------------------------------------------- prompt methods
@dataclass(kw_only=True)
class _PromptConfig(AdapterConfig):
    """What prompt tuning, prefix tuning and p-tuning share: virtual tokens for the whole model, nothing else trains."""

    target_modules: TargetSpec = "all"
    """Prompt methods act on the whole model (one module beside it): only ``"all"`` is accepted."""
    num_virtual_tokens: int = 20
    """How many virtual positions come before every sequence."""

    peft_unsupported: ClassVar[tuple[str, ...]] = ("modules_to_save",)

    def method_problems(self) -> list[str]:
        problems = []
        n, method = self.num_virtual_tokens, type(self).method
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            problems.append(f"num_virtual_tokens={n!r} must be a positive integer")
        if self.target_modules != "all" or self.exclude_modules is not None:
            problems.append(
                f"target_modules={self.target_modules!r}, exclude_modules={self.exclude_modules!r}: {method} adds "
                "virtual tokens to the whole model and has no target modules; leave them unset"
            )
        if self.bias != "none" or self.trainable_norms or self.modules_to_save:
            problems.append(
                f"bias={self.bias!r}, trainable_norms={self.trainable_norms!r}, "
                f"modules_to_save={self.modules_to_save!r}: {method} trains its virtual tokens only (PEFT's files "
                "for it hold nothing else); leave them unset"
            )
        return problems + self.prompt_problems()

    def prompt_problems(self) -> list[str]:
        return []

    @staticmethod
    def _positive_or_none(name: str, value: object) -> list[str]:
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return []
        return [f"{name}={value!r} must be a positive integer (or None)"]

    @staticmethod
    def peft_shared(peft: dict[str, Any], path: str = "adapter_config.json") -> int:
        """The virtual-token count of a PEFT prompt-learning config, refusing encoder-decoder files."""
        if peft.get("num_transformer_submodules") not in (None, 1):
            raise ValueError(
                f"{path}: num_transformer_submodules={peft['num_transformer_submodules']!r} (an encoder-decoder "
                "adapter); only decoder-only causal LMs are supported."
            )
        return int(peft["num_virtual_tokens"])

    @staticmethod
    def param_name(peft_key: str) -> str:
        # PEFT's `prompt_embeddings` (the table the model reads) is the module's parameter of that name
        return peft_key


@dataclass(kw_only=True)
class PromptTuningConfig(_PromptConfig):
    """Prompt tuning (Lester et al. 2021): ``n`` trained soft tokens in front of every sequence's embeddings.

    Example::

        cfg = PromptTuningConfig(num_virtual_tokens=20, init="text", init_text="Classify the sentiment:")
    """

    init: Literal["random", "vocab", "text"] = "random"
    """Initial soft tokens: random on the embeddings' scale, sampled vocabulary embeddings, or a text's embeddings."""
    init_text: str | None = None
    """The text whose token embeddings (repeated or cut to ``num_virtual_tokens``) start the prompt, for ``"text"``."""
    tokenizer: str | None = None
    """Tokenizer name or directory for ``init="text"``; None: the model's own directory."""

    method: ClassVar[str] = "prompt_tuning"
    attach_name: ClassVar[str | None] = "prompt_tuning"
    identity_keys: ClassVar[tuple[str, ...]] = ("num_virtual_tokens",)

    def prompt_problems(self) -> list[str]:
        problems = []
        if self.init not in ("random", "vocab", "text"):
            problems.append(f"init={self.init!r} must be 'random', 'vocab' or 'text'")
        elif self.init == "text" and not (isinstance(self.init_text, str) and self.init_text):
            problems.append(f"init='text' needs init_text, a non-empty string (got {self.init_text!r})")
        if self.init != "text" and (self.init_text is not None or self.tokenizer is not None):
            problems.append(
                f"init_text={self.init_text!r} and tokenizer={self.tokenizer!r} are used by init='text' only "
                f"(init={self.init!r})"
            )
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        text = initialize and self.init == "text"
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "init": self.init if initialize else "random",
            "init_text": self.init_text if text else None,
            "tokenizer": self.tokenizer if text else None,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any]) -> PromptTuningConfig:
        init = str(peft.get("prompt_tuning_init") or "RANDOM").upper()
        inits = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}
        if init not in inits:
            raise ValueError(f"adapter_config.json: prompt_tuning_init={init!r} is not one of {sorted(inits)}.")
        text = inits[init] == "text"
        return cls(
            num_virtual_tokens=cls.peft_shared(peft),
            init=inits[init],  # type: ignore[arg-type]
            init_text=peft.get("prompt_tuning_init_text") if text else None,
            tokenizer=peft.get("tokenizer_name_or_path") if text else None,
        )

    @classmethod
    def peft_config(cls, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        (settings,) = layers.values()
        inits = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
        return {
            "num_virtual_tokens": settings["num_virtual_tokens"],
            "token_dim": settings["token_dim"],
            "num_transformer_submodules": 1,
            "num_attention_heads": None,
            "num_layers": None,
            "prompt_tuning_init": inits[settings["init"]],
            "prompt_tuning_init_text": settings["init_text"],
            "tokenizer_name_or_path": settings["tokenizer"],
            "tokenizer_kwargs": None,
            "modules_to_save": None,
        }


@dataclass(kw_only=True)
class PrefixTuningConfig(_PromptConfig):
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes at every attention layer, through the cache.

    Also a part of composite methods (MAM: a parallel adapter plus this prefix).

    Example::

        cfg = PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512)
    """

    prefix_projection: bool = False
    """Train the prefix through a two-layer tanh MLP (the paper's reparametrization) instead of directly."""
    encoder_hidden_size: int | None = None
    """Hidden size of that MLP; None: the key/value width (heads x head dim)."""

    method: ClassVar[str] = "prefix_tuning"
    attach_name: ClassVar[str | None] = "prefix_tuning"
    identity_keys: ClassVar[tuple[str, ...]] = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size")

    def prompt_problems(self) -> list[str]:
        problems = []
        if not isinstance(self.prefix_projection, bool):
            problems.append(f"prefix_projection={self.prefix_projection!r} must be True or False")
        problems += self._positive_or_none("encoder_hidden_size", self.encoder_hidden_size)
        if self.encoder_hidden_size is not None and self.prefix_projection is False:
            problems.append(f"encoder_hidden_size={self.encoder_hidden_size!r} sizes the MLP of prefix_projection=True")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "prefix_projection": self.prefix_projection,
            "encoder_hidden_size": self.encoder_hidden_size,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any]) -> PrefixTuningConfig:
        # the file holds the prefix itself (PEFT saves the MLP's output), so it loads without the MLP
        return cls(num_virtual_tokens=cls.peft_shared(peft))

    @classmethod
    def peft_config(cls, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        (settings,) = layers.values()
        kv_dim = settings["num_key_value_heads"] * settings["head_dim"]
        return {
            "num_virtual_tokens": settings["num_virtual_tokens"],
            "token_dim": kv_dim,
            "num_attention_heads": settings["num_key_value_heads"],
            "num_layers": settings["num_layers"],
            "num_transformer_submodules": 1,
            "encoder_hidden_size": kv_dim,
            "prefix_projection": False,
            "modules_to_save": None,
        }


@dataclass(kw_only=True)
class PTuningConfig(_PromptConfig):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens made by a trained prompt encoder.

    Example::

        cfg = PTuningConfig(num_virtual_tokens=20, encoder_type="lstm", encoder_hidden_size=128)
    """

    encoder_type: Literal["mlp", "lstm", "none"] = "mlp"
    """The prompt encoder: a 3-layer ReLU MLP, a bidirectional LSTM plus MLP, or none (the tokens train directly)."""
    encoder_hidden_size: int | None = None
    """Hidden size of the encoder; None: the model's embedding size."""
    encoder_num_layers: int | None = None
    """LSTM layers (``"lstm"`` only); None: 2."""
    encoder_dropout: float | None = None
    """Dropout between LSTM layers (``"lstm"`` only); None: 0."""

    method: ClassVar[str] = "p_tuning"
    attach_name: ClassVar[str | None] = "p_tuning"
    identity_keys: ClassVar[tuple[str, ...]] = (
        "num_virtual_tokens",
        "encoder_type",
        "encoder_hidden_size",
        "encoder_num_layers",
    )

    def prompt_problems(self) -> list[str]:
        problems = []
        if self.encoder_type not in ("mlp", "lstm", "none"):
            problems.append(f"encoder_type={self.encoder_type!r} must be 'mlp', 'lstm' or 'none'")
        problems += self._positive_or_none("encoder_hidden_size", self.encoder_hidden_size)
        problems += self._positive_or_none("encoder_num_layers", self.encoder_num_layers)
        dropout = self.encoder_dropout
        bad_dropout = isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1
        if dropout is not None and bad_dropout:
            problems.append(f"encoder_dropout={dropout!r} must be in [0, 1) (or None)")
        if self.encoder_type != "lstm" and (self.encoder_num_layers is not None or dropout is not None):
            problems.append(
                f"encoder_num_layers={self.encoder_num_layers!r} and encoder_dropout={dropout!r} apply to the 'lstm' "
                f"encoder only (encoder_type={self.encoder_type!r})"
            )
        if self.encoder_type == "lstm" and dropout and (self.encoder_num_layers or 2) < 2:
            problems.append(f"encoder_dropout={dropout!r} acts between LSTM layers; encoder_num_layers=1 has none")
        if self.encoder_type == "none" and self.encoder_hidden_size is not None:
            problems.append(f"encoder_hidden_size={self.encoder_hidden_size!r} needs an encoder (encoder_type='none')")
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "encoder_type": self.encoder_type,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    @classmethod
    def from_peft(cls, peft: dict[str, Any]) -> PTuningConfig:
        # the file holds the encoder's output, so it loads as the table itself
        return cls(num_virtual_tokens=cls.peft_shared(peft), encoder_type="none")

    @classmethod
    def peft_config(cls, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        (settings,) = layers.values()
        return {
            "num_virtual_tokens": settings["num_virtual_tokens"],
            "token_dim": settings["token_dim"],
            "num_transformer_submodules": 1,
            "num_attention_heads": None,
            "num_layers": None,
            # PEFT needs a type; with inference_mode it builds no encoder and reads the table as it is
            "encoder_reparameterization_type": "MLP",
            "encoder_hidden_size": settings["token_dim"],
            "encoder_num_layers": 2,
            "encoder_dropout": 0.0,
            "modules_to_save": None,
        }


__all__ += ["PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig"]


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
