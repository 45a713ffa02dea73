"""Resolve a ``--model`` argument into a parameter count and a Llama-like shape.

Two forms are accepted:

* a local Hugging Face model directory: its ``config.json`` gives the shape; the parameter count is read
  exactly from the ``*.safetensors`` headers when they are there (8-byte little-endian header length, then a
  JSON table of tensor shapes; no weights are loaded), otherwise it is computed from the shape;
* a size string such as ``"7B"``, ``"0.6B"``, ``"1.1b"``, ``"500M"``: the count is the number given, and the
  shape is an approximation (see below).

Parameter count of a Llama-like decoder (hidden ``h``, ``L`` layers, MLP width ``i``, ``a`` query heads and
``k`` key/value heads of size ``d``, vocabulary ``V``)::

    per layer  = h*a*d + 2*h*k*d + a*d*h          (q, k, v, o projections)
               + 3*h*i                            (SwiGLU gate, up, down)
               + 2*h                              (two RMSNorm weights)
    N = L * per layer + V*h * (1 if tied else 2) + h   (embeddings, lm_head, final norm)

A size string picks the reference shape (hidden size, heads, MLP width, 32,000-token untied vocabulary) whose
nominal size is nearest in log space, then solves the formula above for the number of layers. The shape only
feeds the activation and adapter-size estimates; pass a model directory for exact figures.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["ModelInfo", "ModelResolutionError", "parse_size", "resolve_model"]

LINEAR_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear layers of a Llama-like decoder block, in forward order."""

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmbt])\s*$", re.IGNORECASE)
_MIN_SIZE = 10e6

# (nominal parameters, hidden, query heads, key/value heads, MLP width): common open decoder shapes.
_REFERENCE_SHAPES: tuple[tuple[float, int, int, int, int], ...] = (
    (3.0e7, 384, 6, 6, 1024),
    (1.25e8, 768, 12, 12, 2048),
    (5.0e8, 1024, 16, 8, 4096),
    (1.1e9, 2048, 32, 4, 5632),
    (3.0e9, 3072, 24, 8, 8192),
    (7.0e9, 4096, 32, 32, 11008),
    (13.0e9, 5120, 40, 40, 13824),
    (32.0e9, 5120, 40, 8, 27648),
    (70.0e9, 8192, 64, 8, 28672),
)
_REFERENCE_VOCAB = 32000


class ModelResolutionError(ValueError):
    """Raised when a ``--model`` value is neither a model directory nor a size string."""


@dataclass(frozen=True)
class ModelInfo:
    """Parameter count and decoder shape of a model, as the planning tools see it.

    Example::

        >>> info = resolve_model("7B")
        >>> info.n_params
        7000000000
        >>> info.hidden_size
        4096
    """

    name: str
    """What the user passed: a directory path or a size string."""
    n_params: int
    """Total parameter count (embeddings and lm_head included, tied weights counted once)."""
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    source: Literal["config", "size"]
    """``"config"`` for a model directory, ``"size"`` for a size string (approximate shape)."""
    path: str | None = None
    """The model directory, when there is one."""

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the lm_head matrix."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def norm_params(self) -> int:
        """RMSNorm weights: two per layer plus the final norm."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def linear_params(self) -> int:
        """Parameters inside the decoder blocks' linear layers (what a 4-bit base quantizes)."""
        return max(self.n_params - self.embedding_params - self.norm_params, 0)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def describe(self) -> str:
        """One line for printing: count and shape."""
        kind = "exact shape" if self.source == "config" else "approximate Llama-like shape"
        return (
            f"{self.name}: {self.n_params / 1e9:.2f}B params ({kind}: hidden {self.hidden_size}, "
            f"{self.num_layers} layers, MLP {self.intermediate_size}, {self.num_heads} heads / "
            f"{self.num_kv_heads} kv heads, vocab {self.vocab_size})"
        )


def llama_param_count(
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    tied: bool,
    attention_bias: bool = False,
    mlp_bias: bool = False,
) -> int:
    """Parameter count of a Llama-like decoder (formula in the module docstring).

    Example::

        >>> llama_param_count(2048, 22, 5632, 32, 4, 64, 32000, tied=False)
        1100048384
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate + 2 * hidden
    if attention_bias:
        per_layer += q + 2 * kv + hidden
    if mlp_bias:
        per_layer += 2 * intermediate + hidden
    return layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


def parse_size(text: str) -> int:
    """Parse a size string (``"7B"``, ``"0.6b"``, ``"500M"``, ``"1.5T"``) into a parameter count.

    Example::

        >>> parse_size("1.1b")
        1100000000
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ModelResolutionError(
            f"{text!r} is not a size string. Write a number with a K/M/B/T suffix, such as '7B', '0.6B' or '500M'."
        )
    return int(round(float(match.group(1)) * _SUFFIXES[match.group(2).lower()]))


def _shape_from_size(name: str, n_params: int) -> ModelInfo:
    if n_params < _MIN_SIZE:
        raise ModelResolutionError(
            f"Model size {name!r} ({n_params:,} params) is below {_MIN_SIZE:,.0f}, too small for a Llama-like "
            "shape to be guessed. Pass the model directory (with its config.json) instead."
        )
    nominal, hidden, heads, kv_heads, inter = min(
        _REFERENCE_SHAPES, key=lambda ref: abs(math.log(ref[0]) - math.log(n_params))
    )
    head_dim = hidden // heads
    one_layer = llama_param_count(hidden, 1, inter, heads, kv_heads, head_dim, 0, False) - hidden
    rest = _REFERENCE_VOCAB * hidden * 2 + hidden
    layers = max(1, round((n_params - rest) / one_layer))
    return ModelInfo(
        name=name,
        n_params=n_params,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_REFERENCE_VOCAB,
        tie_word_embeddings=False,
        source="size",
    )


def _int_key(config: dict[str, Any], *keys: str) -> int | None:
    """The first of ``keys`` present in ``config`` (not null), as an int."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    return None


def _safetensors_param_count(directory: Path) -> int | None:
    """Exact parameter count from the safetensors headers, or None when the directory has none."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def _shape_from_directory(name: str, directory: Path) -> ModelInfo:
    config_path = directory / "config.json"
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings")}
    hidden = _int_key(config, "hidden_size", "n_embd", "d_model")
    layers = _int_key(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int_key(config, "num_attention_heads", "n_head")
    vocab = _int_key(config, "vocab_size")
    if hidden is None or layers is None or heads is None or vocab is None:
        found = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "vocab_size": vocab}
        missing = ", ".join(key for key, value in found.items() if value is None)
        raise ModelResolutionError(
            f"{config_path} lacks {missing}, so its shape cannot be read. Pass a size string such as '7B' instead."
        )
    kv_heads = _int_key(config, "num_key_value_heads") or heads
    head_dim = _int_key(config, "head_dim") or hidden // heads
    inter = _int_key(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    tied = bool(config.get("tie_word_embeddings", False))
    experts = _int_key(config, "num_local_experts", "num_experts", "n_routed_experts")
    if experts is not None and experts > 1:
        warnings.warn(
            f"{config_path} describes a mixture-of-experts model ({experts} experts); the planning tools treat it "
            "as a dense Llama-like model, so activation and adapter estimates are rough.",
            stacklevel=3,
        )
    counted = _safetensors_param_count(directory)
    n_params = counted or llama_param_count(
        hidden,
        layers,
        inter,
        heads,
        kv_heads,
        head_dim,
        vocab,
        tied,
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
    )
    return ModelInfo(
        name=name,
        n_params=n_params,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        source="config",
        path=str(directory),
    )


def resolve_model(model: str | os.PathLike[str] | ModelInfo) -> ModelInfo:
    """Turn a model directory or a size string into a :class:`ModelInfo`.

    Example::

        >>> resolve_model("0.6B").n_params
        600000000
    """
    if isinstance(model, ModelInfo):
        return model
    name = os.fspath(model)
    directory = Path(name).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise ModelResolutionError(
                f"--model {name!r} is a directory without a config.json. Point it at a Hugging Face model "
                "directory (one with config.json) or pass a size like '7B'."
            )
        return _shape_from_directory(name, directory)
    try:
        n_params = parse_size(name)
    except ModelResolutionError:
        raise ModelResolutionError(
            f"--model {name!r} is neither a directory with a config.json nor a size like '7B', '0.6B' or '500M'."
        ) from None
    return _shape_from_size(name, n_params)
