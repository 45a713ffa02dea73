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

from lightning_zenft.config.base import PRESETS, AdapterConfig, TargetSpec, pattern_value
from lightning_zenft.config.bitfit import BitFitConfig
from lightning_zenft.config.bottleneck import NON_LINEARITIES, BottleneckConfig, NonLinearity, ParallelAdapterConfig
from lightning_zenft.config.ia3 import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES, IA3Config
from lightning_zenft.config.lora import LoRAConfig
from lightning_zenft.config.mam import MAMConfig
from lightning_zenft.config.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from lightning_zenft.config.reft import LoReFTConfig

__all__ = [
    "IA3_FEEDFORWARD_MODULES",
    "IA3_TARGET_MODULES",
    "NON_LINEARITIES",
    "PRESETS",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LoRAConfig",
    "LoReFTConfig",
    "MAMConfig",
    "NonLinearity",
    "PTuningConfig",
    "ParallelAdapterConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TargetSpec",
    "pattern_value",
]
