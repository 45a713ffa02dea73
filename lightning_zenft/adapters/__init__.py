"""Adapter layers: each wraps one frozen base layer and satisfies :class:`AdapterModule`."""

from lightning_zenft.adapters._protocol import (
    AdapterModule,
    LowRankUpdate,
    Mergeable,
    Wrapping,
    adapter_parameter_names,
    disable_adapters,
    find_adapters,
    merge_adapters,
    unmerge_adapters,
)
from lightning_zenft.adapters.dora import DoRALinear
from lightning_zenft.adapters.lora import LoRALinear, lora_scaling
from lightning_zenft.adapters.prefix import PrefixKV
from lightning_zenft.adapters.prompt import PromptEncoder, SoftPrompt

__all__ = [
    "AdapterModule",
    "DoRALinear",
    "LowRankUpdate",
    "Mergeable",
    "Wrapping",
    "LoRALinear",
    "adapter_parameter_names",
    "disable_adapters",
    "find_adapters",
    "lora_scaling",
    "merge_adapters",
    "unmerge_adapters",
    "PrefixKV",
    "PromptEncoder",
    "SoftPrompt",
]
