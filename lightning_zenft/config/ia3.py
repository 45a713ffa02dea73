"""IA3's config: :class:`IA3Config` and its default targets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightning_zenft.config.base import (
    PRESETS,
    AdapterConfig,
    TargetSpec,
)

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
        from lightning_zenft.targets import name_matches  # targets imports config: imported when first used

        return name_matches(name, spec)

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
