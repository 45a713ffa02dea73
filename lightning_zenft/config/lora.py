"""LoRA's config (DoRA, rsLoRA, PiSSA; expert parameters of MoE models): :class:`LoRAConfig`."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lightning_zenft.config.base import (
    AdapterConfig,
    pattern_value,
)


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
    init: Literal["kaiming", "gaussian", "pissa", "loftq"] = "kaiming"
    """Initialization of A and B (PiSSA rewrites the base weight to its SVD residual; LoftQ, with NF4Precision, sets
    A, B and the 4-bit base so that ``Q + s B A`` is close to ``W``)."""
    loftq_iters: int = 1
    """LoftQ's alternations of quantization and SVD (``init="loftq"`` only)."""
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
        if self.init not in ("kaiming", "gaussian", "pissa", "loftq"):
            problems.append(f"init={self.init!r} must be 'kaiming', 'gaussian', 'pissa' or 'loftq'")
        if self.init == "loftq" and self.use_dora:
            problems.append("init='loftq' is for LoRA (DoRA's magnitude rescales rows); use LoRA or another init")
        if not isinstance(self.loftq_iters, int) or isinstance(self.loftq_iters, bool) or self.loftq_iters < 1:
            problems.append(f"loftq_iters={self.loftq_iters!r} must be a positive integer")
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
        # weights loaded next: no initialization that rewrites the base (PiSSA's SVD, LoftQ's quantized base)
        init = self.init if initialize or self.init not in ("pissa", "loftq") else "kaiming"
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
