"""Adapter files in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``, for every method the
registry gives a ``peft_type``.

The format, as PEFT writes it:

* weights keyed ``base_model.model.<module path>.<parameter>`` with the adapter module's own parameter names (LoRA:
  ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``; DoRA adds ``lora_magnitude_vector.weight``);
  trained biases and fully-trained modules under their own path (``...<layer>.base_layer.bias``,
  ``...<module>.weight``);
* the config's method keys come from the method's config class (:meth:`~lightning_zenft.config.AdapterConfig.
  peft_config`; for LoRA ``r``/``lora_alpha`` hold the common values and ``rank_pattern``/``alpha_pattern`` the
  per-layer exceptions), plus the keys every method shares (``peft_type``, ``target_modules``, ``bias``,
  ``modules_to_save``, ``base_model_name_or_path``...).

Our modules use PEFT's module structure (``base_layer``, ``lora_A``, ``lora_B``), so a key maps to a parameter by
stripping the ``base_model.model.`` prefix. A method attached to the whole model (prompt tuning) names its tensors
itself, as PEFT does (``prompt_embeddings``, at the top level of the file), and its config's ``param_name`` maps
such a key to the parameter it fills, relative to the method's module. Methods PEFT lacks (``peft_type=None`` in the
registry) are saved in the same two files with a config of ours::

    {"format": "lightning_zenft", "method": "<registry name>", "layers": {"<module path>": {<build arguments>}},
     "base_model_name_or_path": ..., "bias": ..., "modules_to_save": [...]}

Each module's tensors are keyed as in PEFT's files (``base_model.model.<module path>.<parameter>``). Only safetensors
are read: nothing is ever unpickled. Files are written atomically (a temporary file, then a rename), so an
interrupted save leaves the previous file whole.

Example::

    save_adapter(module.model, "out/adapter")          # then: PeftModel.from_pretrained(base, "out/adapter")
    load_adapter(fresh_model, "out/adapter")           # injects as the config says, loads, checks every tensor
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_zenft.adapters import Wrapping, adapter_parameter_names, find_adapters
from lightning_zenft.adapters._base import is_conv1d
from lightning_zenft.config import AdapterConfig
from lightning_zenft.inject import (
    AdapterPlan,
    LayerPlan,
    apply_plan,
    build_plan,
    plan_adapters,
    set_trainable_names,
    unwrap_model,
)
from lightning_zenft.registry import Method, method_for_module, method_for_name, method_for_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
OWN_FORMAT = "lightning_zenft"


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


# ---------------------------------------------------------------------------------------------------- save
def save_adapter(
    model: nn.Module,
    save_directory: str | Path,
    base_model_name_or_path: str | None = None,
    method: str | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Write the adapters of ``model`` (and any other trained parameters); returns the directory.

    PEFT's format for a method PEFT has (``PeftModel.from_pretrained(base, dir)`` then works), else ours (see the
    module docstring).

    Args:
        model: the model holding adapter layers (a ``transformers`` model, or a LightningModule whose ``.model`` is
            one); key paths are relative to it, as PEFT expects.
        save_directory: created if missing.
        base_model_name_or_path: recorded in the config; defaults to the model's ``config._name_or_path``.
        method: the registry name of the method, for methods that inject no module and only change what trains
            (BitFit); otherwise read from the adapter modules.
        adapter_name: save this named adapter (:mod:`lightning_zenft.named`) instead of the active one.
    """
    model = unwrap_model(model)
    if adapter_name is not None:
        from lightning_zenft.named import active_adapter, using_adapter

        if adapter_name != active_adapter(model):
            with using_adapter(model, adapter_name):
                return save_adapter(model, save_directory, base_model_name_or_path, method)
    layers = list(find_adapters(model))
    methods = _methods_of(layers)
    if not layers and method is None:
        raise ValueError(
            f"{type(model).__name__} holds no adapter layers to save. Add an adapter callback to the Trainer (or call "
            "lightning_zenft.inject_adapters) before saving, and pass the model the adapters were injected into; for "
            "a method that only changes what trains (BitFit), pass method='bitfit'."
        )
    named = {m.name for m in methods.values()} | ({method} if method else set())
    single = method_for_name(next(iter(named))) if len(named) == 1 else None
    peft = single is not None and single.peft_type is not None and bool(layers)
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        own, settings[name] = layer.export_state()  # type: ignore[attr-defined]
        whole_model = peft and methods[name].attaches_to == "model"
        tensors.update({key if whole_model else f"{PREFIX}{name}.{key}": value for key, value in own.items()})

    adapter_names = set(adapter_parameter_names(model))
    extra = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in adapter_names}
    common = {
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(model),
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else None,
        "inference_mode": True,
    }
    if not peft:
        for pname, p in extra.items():
            tensors[PREFIX + pname] = p.detach()
        config = {
            "format": OWN_FORMAT,
            "method": single.name if single else sorted(named),
            "layers": {n: {"method": methods[n].name, "settings": settings[n]} for n, _ in layers},
            "trained_parameters": sorted(extra),
            **common,
        }
    else:
        assert single is not None
        absent = set(single.config_cls.peft_absent_keys)  # shared keys PEFT's config of the method lacks
        bias, modules_to_save = _describe_extras(model, extra, [n for n, _ in layers], "bias" not in absent)
        for pname, p in extra.items():
            tensors[PREFIX + pname] = p.detach()
        for module_name in modules_to_save:
            for pname, p in model.get_submodule(module_name).named_parameters():
                tensors[f"{PREFIX}{module_name}.{pname}"] = p.detach()
        config = {"peft_type": single.peft_type, **common}
        if single.attaches_to != "model":
            config |= {
                "bias": bias,
                "modules_to_save": modules_to_save or None,
                "target_modules": [name for name, _ in layers],
                "exclude_modules": None,
                "layers_to_transform": None,
                "layers_pattern": None,
            }
        # PEFT records the layout of GPT-2's Conv1D weights (fan_in_fan_out) per file
        layouts = {n: isinstance(layer, Wrapping) and is_conv1d(layer.base_layer) for n, layer in layers}
        config |= single.config_cls.peft_config({n: {**s, "fan_in_fan_out": layouts[n]} for n, s in settings.items()})
        for key in absent:
            config.pop(key, None)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / WEIGHTS_NAME, lambda path: save_file(_contiguous(tensors), path, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(out / CONFIG_NAME, lambda path: Path(path).write_text(text))
    return out


def _methods_of(layers: list[tuple[str, nn.Module]]) -> dict[str, Method]:
    found = {}
    for name, layer in layers:
        method = method_for_module(layer)
        if method is None:
            why = "no registered method makes it"
            raise ValueError(f"{name} is a {type(layer).__name__}: {why}, so it cannot be saved.")
        found[name] = method
    return found


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)`` to a temporary file in ``path``'s directory, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _describe_extras(
    model: nn.Module, extra: dict[str, nn.Parameter], adapted: list[str], bias_key: bool = True
) -> tuple[str, list[str]]:
    """Express trained non-adapter parameters as PEFT's ``bias`` and ``modules_to_save`` settings (only the latter
    when the method's PEFT config has no ``bias`` key: ``bias_key=False``)."""
    all_biases = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    lora_biases = {f"{name}.base_layer.bias" for name in adapted} & all_biases
    trained_biases = {n for n in extra if n.rsplit(".", 1)[-1] == "bias"}
    if not bias_key:
        bias = "none"
    elif trained_biases and trained_biases == all_biases:
        bias = "all"
    elif trained_biases and trained_biases == lora_biases:
        bias = "lora_only"
    else:
        bias = "none"
    covered = trained_biases if bias != "none" else set()
    modules = sorted({n.rsplit(".", 1)[0] for n in extra if n not in covered})
    return bias, modules


# ---------------------------------------------------------------------------------------------------- load
def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, with a clear error when it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter or fix the file.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not the object of an adapter config.")
    if config.get("format") == OWN_FORMAT:
        layers = config.get("layers")
        ok = isinstance(layers, dict) and all(isinstance(v, dict) and "method" in v for v in layers.values())
        if not ok or not isinstance(config.get("trained_parameters", []), list):
            raise ValueError(
                f"{path}: 'layers' must map module names to {{'method', 'settings'}} and 'trained_parameters' must "
                "be a list; re-save the adapter."
            )
        for entry in layers.values():
            method_for_name(entry["method"], path)
        return config
    method = method_for_peft_type(config.get("peft_type"), path)
    bad = {
        k: config[k]
        for k in method.config_cls.peft_unsupported
        if config.get(k) not in (None, False, [], {}, "", "megatron.core")
    }
    if bad:
        raise ValueError(f"{path} uses options this loader does not implement: {bad}. Re-save without them.")
    if method.attaches_to != "model" and config.get("target_modules") in (None, [], ""):
        raise ValueError(f"{path} has no target_modules; cannot tell which layers the adapter belongs to.")
    return config


def config_from_peft(config: dict[str, Any]) -> AdapterConfig:
    """The config (of the right method) equivalent to a PEFT ``adapter_config.json`` dict."""
    return method_for_peft_type(config.get("peft_type")).config_cls.from_peft(config)


def _plan_from_file(model: nn.Module, config: dict[str, Any], include_adapted: bool) -> AdapterPlan:
    """The plan a file describes: from its config (PEFT), or its per-layer methods and settings as saved (ours)."""
    if config.get("format") != OWN_FORMAT:
        return plan_adapters(model, config_from_peft(config), initialize=False, include_adapted=include_adapted)
    entries = config["layers"].items()
    layers = [LayerPlan(n, dict(e.get("settings", {})), method_for_name(e["method"])) for n, e in entries]
    first = layers[0].method if layers else method_for_name(config["method"])
    assert first is not None
    return AdapterPlan(first, None, layers)


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.safetensors``; a clear error naming the file when it is corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (only safetensors adapter files are read).")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt: re-save the adapter."
        ) from None


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> list[str]:
    """Load an adapter file into ``model``; returns the adapted module names.

    A model without adapters gets them injected as the file's config says; a model that has adapters must hold
    exactly the file's layers, method and per-layer settings (else: an error saying to unload them first). Every
    tensor is checked: a missing, unexpected or misshapen one raises an error naming it. With ``adapter_name`` the
    file becomes a named adapter (:mod:`lightning_zenft.named`), kept aside while another adapter is active.
    """
    model = unwrap_model(model)
    if adapter_name is not None:
        from lightning_zenft.named import add_loaded_adapter

        return add_loaded_adapter(model, adapter_name, lambda: load_adapter(model, directory))
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    state_raw = read_adapter_weights(weights_path)
    _warn_other_base(model, config, directory)
    has_adapters = any(True for _ in find_adapters(model))
    plan = _plan_from_file(model, config, has_adapters)
    if has_adapters:
        _check_existing(model, plan, directory)
    elif plan.config is None:  # our format: the modules as saved, then exactly the saved parameters train
        build_plan(model, plan)
        set_trainable_names(model, config.get("trained_parameters", []))
    else:
        apply_plan(model, plan)

    param_name = plan.method.config_cls.param_name
    if config.get("format") != OWN_FORMAT and plan.method.attaches_to == "model":
        # the method names its tensors as PEFT does (``prompt_embeddings``); param_name gives the parameter they fill,
        # relative to the method's module, which sits where the plan puts it
        (module_name,) = plan.names
        state = {f"{module_name}.{param_name(k)}": v for k, v in state_raw.items()}
    else:
        state = {param_name(_strip(k)): v for k, v in state_raw.items()}
    params = dict(model.named_parameters())
    expected = set(adapter_parameter_names(model))
    if config.get("format") == OWN_FORMAT:  # our files also name every other tensor that trained
        expected |= set(config.get("trained_parameters", []))
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


def _strip(key: str) -> str:
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    return name.replace(".default.", ".")


def _check_existing(model: nn.Module, plan: AdapterPlan, directory: Path) -> None:
    problems = plan.mismatches(model)
    if problems:
        raise ValueError(
            f"{type(model).__name__} already holds adapters that differ from {directory}'s: {'; '.join(problems)}. "
            "Unload them first (lightning_zenft.unload_adapters(model, merge=False), or merge=True to keep their "
            "effect in the base weights), then load this adapter."
        )


def _warn_other_base(model: nn.Module, config: dict[str, Any], directory: Path) -> None:
    saved, here = config.get("base_model_name_or_path"), _name_or_path(model)
    if saved and here and Path(str(saved)).name != Path(str(here)).name and str(saved) != str(here):
        warnings.warn(
            f"{directory} was saved for base model {saved!r} but is loaded into {here!r}; the shapes fit, but the "
            "adapter only means what it was trained for on its own base.",
            stacklevel=3,
        )
