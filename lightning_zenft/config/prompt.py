"""The configs of prompt tuning, prefix tuning and p-tuning (virtual tokens for the whole model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lightning_zenft.config.base import (
    AdapterConfig,
    TargetSpec,
)


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
