"""4-bit checkpoints (``transformers`` + bitsandbytes ``save_pretrained``) read as dense tensors, one at a time.

A 4-bit layer ``P`` is stored as its packed codes ``P.weight`` and the parts of its quant state: ``P.weight.absmax``,
``P.weight.quant_map``, with double quantization ``P.weight.nested_absmax``/``nested_quant_map``, and
``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a JSON record of the block size, dense shape and dtype.
:class:`DequantizedWeights` shows such a directory as the dense model it stands for: ``P.weight`` reads as the
dequantized ``(out, in)`` tensor (bitsandbytes' own dequantization: the weight the 4-bit layer computes with), in the
dtype recorded for it, and the quant-state parts are hidden; ``config()`` drops the ``quantization_config``. Merging
from it therefore writes a dense checkpoint.

Example::

    weights = open_weights("llama-4bit")          # a DequantizedWeights, or PretrainedWeights for a dense model
    w = weights.read("model.layers.0.self_attn.q_proj.weight")      # (out, in), dense
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning_zenft.adapters._bnb import _bnb_functional
from lightning_zenft.merging.streaming import PretrainedWeights
from lightning_zenft.safetensors_io import TensorEntry

_STATE = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", *_STATE)


def _record(packed: torch.Tensor) -> dict:
    """The JSON record bitsandbytes packs into a uint8 tensor."""
    return json.loads(bytes(packed.to(torch.uint8).tolist()).decode("utf-8"))


class DequantizedWeights:
    """A ``save_pretrained`` directory of a 4-bit model, seen as the dense model (same interface as
    :class:`~lightning_zenft.merging.streaming.PretrainedWeights`)."""

    def __init__(self, weights: PretrainedWeights) -> None:
        self.weights = weights
        self.directory = weights.directory
        self.parts: dict[str, dict[str, str]] = {}  # "P.weight" -> {part name: stored key}
        self._entries: dict[str, TensorEntry] = {}
        for key in weights.keys():
            for state in _STATE:
                if key.endswith("." + state):
                    weight = key[: -len(state) - 1]
                    found = {p: f"{weight}.{p}" for p in _PARTS if f"{weight}.{p}" in weights.shard_of}
                    record = _record(weights.read(key))
                    dtype = getattr(torch, str(record["dtype"]).removeprefix("torch."))
                    self.parts[weight] = found
                    self._entries[weight] = TensorEntry(weight, dtype, tuple(int(n) for n in record["shape"]))
        hidden = {key for found in self.parts.values() for key in found.values()}
        self.shard_of = {k: s for k, s in weights.shard_of.items() if k not in hidden}

    @property
    def is_quantized(self) -> bool:
        return bool(self.parts)

    def keys(self) -> list[str]:
        return [key for key in self.weights.keys() if key in self.shard_of]

    def entry(self, name: str) -> TensorEntry:
        return self._entries.get(name) or self.weights.entry(name)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.parts:
            return self.weights.read(name)
        functional = _bnb_functional()
        state = functional.QuantState.from_dict(
            {part: self.weights.read(key) for part, key in self.parts[name].items()}, device=torch.device("cpu")
        )
        return functional.dequantize_4bit(self.weights.read(name), state).to(self.entry(name).dtype)  # (out, in)

    def layout(self) -> dict[str, list[str]]:
        return {shard: [n for n in names if n in self.shard_of] for shard, names in self.weights.layout().items()}

    def config(self) -> dict:
        config = self.weights.config()
        config.pop("quantization_config", None)
        return config


def open_weights(directory: str | Path) -> PretrainedWeights | DequantizedWeights:
    """The weights of a ``save_pretrained`` directory; a 4-bit (bitsandbytes) one reads as dense tensors."""
    weights = PretrainedWeights(directory)
    quantization = weights.config().get("quantization_config") or {}
    if quantization.get("quant_method") == "bitsandbytes" and quantization.get("load_in_8bit"):
        raise ValueError(
            f"{directory} holds an 8-bit bitsandbytes checkpoint; merging reads dense and 4-bit checkpoints. Load it "
            "with transformers, dequantize it (model.dequantize()) and save it again."
        )
    dequantized = DequantizedWeights(weights)
    return dequantized if dequantized.is_quantized else weights
