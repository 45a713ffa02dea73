"""An adapter file as adapter layers, without the base model: what streaming merges call ``merged_weight`` on.

:func:`load_adapter_layers` is the one place a PEFT-format file becomes layers here. Each adapter layer is built
around a stand-in base on the meta device (an ``nn.Linear`` of the right shape that holds no memory), its adapter
tensors are assigned from the file, and the merge math stays in the layer: ``layer.merged_weight(W)`` for a base
weight ``W`` read from a shard. The layer is built as the file loader builds it: the method and its per-layer
arguments come from the registry and the file's config (:func:`lightning_zenft.io.config_from_peft`), the file keys
map to parameters through the config's ``param_name``; only ``in``/``out`` features are read from the factors'
shapes (no base model is loaded). Also from the file:

* ``fan_in_fan_out``: the base tensor of a GPT-2 ``Conv1D`` is stored ``(in, out)``;
* the other tensors of the file (trained biases ``<layer>.base_layer.bias``, ``modules_to_save``), which replace base
  tensors of the same name.

Example::

    adapter = load_adapter_layers("out/adapter")
    w = adapter.merged_tensor("model.layers.0.self_attn.q_proj.weight", base_weight)   # in the base's layout
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_zenft.adapters import Mergeable
from lightning_zenft.config import AdapterConfig
from lightning_zenft.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, config_from_peft, read_adapter_config
from lightning_zenft.registry import method_for_config

# Factor tensors PEFT may write that this loader cannot turn into a layer: refused by name, never skipped.
_UNSUPPORTED_PARTS = ("lora_embedding_A", "lora_embedding_B", "lora_E", "lora_bias")


@dataclass
class AdapterFile:
    """The layers of one adapter directory, keyed by module path, plus the base tensors it replaces."""

    path: Path
    config: dict[str, Any]
    layers: dict[str, nn.Module]
    """Module path -> a :class:`Mergeable` adapter layer around a meta-device stand-in base."""
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    """Base tensor name -> the adapter's trained value (trained biases, ``modules_to_save``)."""

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def weight_keys(self) -> dict[str, str]:
        """Base tensor name (``<module path>.weight``) -> module path, for every adapted layer."""
        return {f"{path}.weight": path for path in self.layers}

    def expected_shape(self, path: str) -> tuple[int, int]:
        """The shape the base weight of layer ``path`` must have: ``(out, in)``, or ``(in, out)`` for ``Conv1D``."""
        layer = self.layers[path]
        shape = (int(layer.out_features), int(layer.in_features))  # type: ignore[arg-type]
        return shape[::-1] if self.fan_in_fan_out else shape

    def merged_tensor(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """The adapted value of base tensor ``key`` (an adapted weight, or a replaced tensor), in ``base``'s layout.

        Computed in ``base``'s dtype; pass a float32 ``base`` for a float32 result.
        """
        if key in self.replacements:
            return self.replacements[key].to(base.dtype)
        layer = self.layers[self.weight_keys()[key]]
        if self.fan_in_fan_out:
            return layer.merged_weight(base.t()).t()  # type: ignore[operator]  # (in, out)
        return layer.merged_weight(base)  # type: ignore[operator]  # (out, in)

    def touches(self) -> set[str]:
        """Every base tensor name this adapter changes."""
        return set(self.weight_keys()) | set(self.replacements)


def _parameter_name(file_key: str) -> str:
    """A file key without PEFT's prefix and adapter name: ``<module path>.<parameter>``."""
    name = file_key[len(PREFIX) :] if file_key.startswith(PREFIX) else file_key
    return name.replace(".default.", ".")


def _build_layer(adapter: AdapterConfig, path: str, parts: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """One adapter layer of the file's method around a meta-device base, its tensors assigned from ``parts``.

    The layer is built as :func:`~lightning_zenft.load_adapter` builds it: the method from the registry, its per-layer
    arguments from the config (:meth:`~lightning_zenft.config.AdapterConfig.layer_kwargs`); only the stand-in
    base's shape is read from the factors here, since no base model is loaded.
    """
    if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
        raise ValueError(f"{where}: layer {path} has {sorted(parts)} but needs lora_A.weight and lora_B.weight.")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]  # (r, in), (out, r)
    kwargs = adapter.layer_kwargs(path, initialize=False)
    r = kwargs["r"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
        raise ValueError(
            f"{where}: layer {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the config says "
            f"r={r} for it; the file is inconsistent."
        )
    method = method_for_config(adapter)
    with torch.device("meta"):
        stand_in = nn.Linear(a.shape[1], b.shape[0], bias=False, dtype=a.dtype)
        layer = method.build(stand_in, **{**kwargs, "dropout": 0.0})
    param_name = type(adapter).param_name
    given = {param_name(name): value for name, value in parts.items()}
    missing = [name for name in layer.adapter_params() if name not in given]  # type: ignore[operator]
    if missing:
        raise ValueError(f"{where}: layer {path} lacks its {missing} tensors (a {type(layer).__name__} needs them).")
    extra = sorted(set(given) - set(layer.adapter_params()))  # type: ignore[operator]
    if extra:
        raise ValueError(f"{where}: layer {path} also has {extra}, which a {type(layer).__name__} does not hold.")
    layer.load_state_dict(given, strict=False, assign=True)
    layer.requires_grad_(False)
    if not isinstance(layer, Mergeable):
        raise ValueError(f"{where}: {type(layer).__name__} adapters cannot be merged into base weights.")
    return layer


def load_adapter_layers(directory: str | Path) -> AdapterFile:
    """Read a PEFT-format adapter directory into mergeable layers (see the module docstring for what it needs).

    Raises:
        FileNotFoundError: when the directory lacks ``adapter_config.json`` or ``adapter_model.safetensors``.
        ValueError: for a tensor whose shape disagrees with the config, or a kind of tensor no layer here holds.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist; an adapter directory holds {CONFIG_NAME} and the weights.")
    factor_names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(weights)).items():
        name = _parameter_name(key)
        bad = [part for part in _UNSUPPORTED_PARTS if f".{part}" in f".{name}"]
        if bad:
            raise ValueError(f"{weights}: tensor {key} is a {bad[0]} tensor, which merging does not implement.")
        suffix = next((s for s in factor_names if name.endswith("." + s)), None)
        if suffix is not None:
            grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
        else:  # a trained bias or a module trained in full: it replaces the base tensor of the same name
            replacements[name.replace(".base_layer.", ".")] = value
    if not grouped:
        raise ValueError(f"{weights} holds no lora_A/lora_B tensors; nothing to merge.")
    adapter = config_from_peft(config)
    layers = {path: _build_layer(adapter, path, parts, weights) for path, parts in sorted(grouped.items())}
    clash = sorted(set(replacements) & {f"{path}.weight" for path in layers})
    if clash:
        raise ValueError(f"{weights}: {clash[0]} is both adapted and replaced in full; the file is inconsistent.")
    return AdapterFile(directory, config, layers, replacements)
