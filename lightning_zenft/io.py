"""Adapter files in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format, as PEFT writes it for LoRA/DoRA:

* weights keyed ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``lora_A``: ``(r, in)``,
  ``lora_B``: ``(out, r)``), DoRA's magnitude as ``...lora_magnitude_vector`` (``(out,)``); trained biases and
  fully-trained modules under their own path (``...<layer>.base_layer.bias``, ``...<module>.weight``);
* the config's ``r``/``lora_alpha`` hold the common values and ``rank_pattern``/``alpha_pattern`` the per-layer
  exceptions; ``use_rslora``/``use_dora`` select the scaling and method; ``fan_in_fan_out`` is set for GPT-2 style
  ``Conv1D`` layers.

Our layers use the same module structure (``base_layer``, ``lora_A``, ``lora_B``), so a key maps to a parameter by
stripping the ``base_model.model.`` prefix. Only safetensors are read: nothing is ever unpickled.

Example::

    save_adapter(module.model, "out/adapter")          # then: PeftModel.from_pretrained(base, "out/adapter")
    load_adapter(fresh_model, "out/adapter")           # injects as the config says, loads, checks every tensor
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_zenft.adapters import DoRALinear, LoRALinear, adapter_parameter_names, find_adapters
from lightning_zenft.adapters._base import is_conv1d
from lightning_zenft.config import LoRAConfig
from lightning_zenft.inject import inject_adapters, pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT options that change what a file means and that this loader does not implement: refused, never ignored.
_UNSUPPORTED = (
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


def _unwrap(model: nn.Module) -> nn.Module:
    """Accept a LightningModule holding the model in ``.model`` where the adapters live under that attribute."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "trainer") and hasattr(inner, "config"):
        return inner
    return model


def _export_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A, B, r, alpha)`` describing the layer's change relative to the ORIGINAL base weight.

    A PiSSA layer's base holds ``W - s B0 A0``; relative to ``W`` its update is ``s (B A - B0 A0)``, a rank-``2r``
    LoRA ``[B, -B0] [A; A0]`` with the same scaling (so ``alpha`` is rescaled for the doubled rank).
    """
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    if layer.pissa_A0 is None:
        return a, b, layer.r, layer.alpha
    a = torch.cat([a, layer.pissa_A0], dim=0)  # (2r, in)
    b = torch.cat([b, -layer.pissa_B0], dim=1)  # (out, 2r)
    r = 2 * layer.r
    alpha = layer.scaling * (math.sqrt(r) if layer.use_rslora else r)
    return a, b, r, alpha


def save_adapter(model: nn.Module, save_directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` (and any other trained parameters) in PEFT's format; returns the directory.

    Args:
        model: the model holding adapter layers (a ``transformers`` model, or a LightningModule whose ``.model`` is
            one); key paths are relative to it, as PEFT expects for ``PeftModel.from_pretrained(base, dir)``.
        save_directory: created if missing.
        base_model_name_or_path: recorded in the config; defaults to the model's ``config._name_or_path``.
    """
    model = _unwrap(model)
    layers = list(find_adapters(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no adapter layers to save. Add the LoRA callback to the Trainer (or call "
            "lightning_zenft.inject_adapters) before saving, and pass the model the adapters were injected into."
        )
    unknown = sorted({type(layer).__name__ for _, layer in layers if not isinstance(layer, LoRALinear)})
    if unknown:
        raise ValueError(f"PEFT's LoRA format holds LoRA and DoRA layers; this model also has {unknown}.")
    kinds = {DoRALinear if isinstance(layer, DoRALinear) else LoRALinear for _, layer in layers}  # fused ones too
    if len(kinds) > 1:
        raise ValueError(f"one adapter file holds one method; this model mixes {sorted(k.__name__ for k in kinds)}.")
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("the adapters mix rsLoRA and plain scaling; PEFT's format has one `use_rslora` per file.")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer in layers:
        a, b, r, alpha = _export_factors(layer)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
        if isinstance(layer, DoRALinear):
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
        ranks[name], alphas[name] = r, alpha

    adapter_names = set(adapter_parameter_names(model))
    extra = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in adapter_names}
    bias, modules_to_save = _describe_extras(model, extra, [n for n, _ in layers])
    for pname, p in extra.items():
        tensors[PREFIX + pname] = p.detach()
    for module_name in modules_to_save:
        for pname, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{PREFIX}{module_name}.{pname}"] = p.detach()

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else None,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": Counter(_dropout(layer) for _, layer in layers).most_common(1)[0][0],
        "target_modules": [name for name, _ in layers],
        "exclude_modules": None,
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_rslora": rslora.pop(),
        "use_dora": DoRALinear in kinds,
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in layers),
        "bias": bias,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _dropout(layer: LoRALinear) -> float:
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _describe_extras(model: nn.Module, extra: dict[str, nn.Parameter], adapted: list[str]) -> tuple[str, list[str]]:
    """Express trained non-adapter parameters as PEFT's ``bias`` and ``modules_to_save`` settings."""
    all_biases = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    lora_biases = {f"{name}.base_layer.bias" for name in adapted} & all_biases
    trained_biases = {n for n in extra if n.rsplit(".", 1)[-1] == "bias"}
    if trained_biases and trained_biases == all_biases:
        bias = "all"
    elif trained_biases and trained_biases == lora_biases:
        bias = "lora_only"
    else:
        bias = "none"
    covered = trained_biases if bias != "none" else set()
    modules = sorted({n.rsplit(".", 1)[0] for n in extra if n not in covered})
    return bias, modules


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, with a clear error when it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; only LORA adapters (incl. DoRA) load here.")
    bad = {k: config[k] for k in _UNSUPPORTED if config.get(k) not in (None, False, [], {}, "", "megatron.core")}
    if bad:
        raise ValueError(f"{path} uses options this loader does not implement: {bad}. Re-save without them.")
    if config.get("target_modules") in (None, [], ""):
        raise ValueError(f"{path} has no target_modules; cannot tell which layers the adapter belongs to.")
    return config


def config_from_peft(config: dict[str, Any]) -> LoRAConfig:
    """A :class:`LoRAConfig` equivalent to a PEFT LoRA config dict."""
    targets = config["target_modules"]
    return LoRAConfig(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else list(targets),
        exclude_modules=config.get("exclude_modules"),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
    )


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a PEFT-format LoRA/DoRA/rsLoRA adapter into ``model``; returns the adapted layer names.

    A model without adapters gets them injected as the file's config says; a model that has adapters must have
    exactly the file's layers, ranks and method. Every tensor is checked: a missing, unexpected or misshapen one
    raises an error naming it.
    """
    model = _unwrap(model)
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} does not exist (only safetensors adapter files are read).")
    lora_config = config_from_peft(config)
    if not any(True for _ in find_adapters(model)):
        inject_adapters(model, lora_config, initialize=False)
    _check_layers(model, lora_config, config)

    state = {_param_name(k): v for k, v in load_file(str(weights_path)).items()}
    params = dict(model.named_parameters())
    expected = set(adapter_parameter_names(model))
    missing = sorted(expected - state.keys())
    unexpected = sorted(k for k in state if k not in params)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not fit {type(model).__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}"
            f" (base_model_name_or_path in the file: {config.get('base_model_name_or_path')!r})."
        )
    with torch.no_grad():
        for key, value in state.items():
            param = params[key]
            if param.shape != value.shape:
                raise ValueError(
                    f"tensor {PREFIX}{key} in {weights_path} has shape {tuple(value.shape)} but the model's parameter "
                    f"has {tuple(param.shape)}: the adapter was made for another base "
                    f"({config.get('base_model_name_or_path')!r}) or another rank."
                )
            param.copy_(value.to(param.dtype))
    return [name for name, _ in find_adapters(model)]


def _param_name(key: str) -> str:
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    name = name.replace(".default.", ".")
    return name[: -len(".weight")] if name.endswith("lora_magnitude_vector.weight") else name


def _check_layers(model: nn.Module, lora_config: LoRAConfig, config: dict[str, Any]) -> None:
    for name, layer in find_adapters(model):
        if not isinstance(layer, LoRALinear):
            raise ValueError(f"layer {name} is a {type(layer).__name__}, not a LoRA layer the file can fill.")
        want_dora = bool(config.get("use_dora", False))
        if isinstance(layer, DoRALinear) != want_dora:
            raise ValueError(
                f"layer {name}: the file says use_dora={want_dora} but the layer is {type(layer).__name__}."
            )
        r = int(pattern_value(name, lora_config.rank_pattern, lora_config.r))
        alpha = float(pattern_value(name, lora_config.alpha_pattern, lora_config.alpha or 2 * r))
        if layer.r != r or not math.isclose(layer.alpha, alpha) or layer.use_rslora != lora_config.use_rslora:
            raise ValueError(
                f"layer {name} has r={layer.r}, alpha={layer.alpha:g}, rslora={layer.use_rslora} but the file says "
                f"r={r}, alpha={alpha:g}, rslora={lora_config.use_rslora}; load into a model without adapters instead."
            )
