"""lightning_zenft: LLM fine-tuning for PyTorch Lightning as callbacks and plugins."""

from lightning_zenft.adapters import (
    AdapterModule,
    DoRALinear,
    LoRALinear,
    LowRankUpdate,
    Mergeable,
    Wrapping,
    disable_adapters,
    find_adapters,
    merge_adapters,
    unmerge_adapters,
)
from lightning_zenft.callbacks.adapters import DoRA, LoRA, trainable_parameters
from lightning_zenft.callbacks.distill import DistillToBase
from lightning_zenft.callbacks.ewc import EWC
from lightning_zenft.callbacks.export import SaveAdapter
from lightning_zenft.callbacks.kernels import FusedKernels
from lightning_zenft.callbacks.l2sp import L2SP
from lightning_zenft.callbacks.replay import Replay
from lightning_zenft.config import LoRAConfig
from lightning_zenft.data import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE, TextDataModule, general_probe_batches
from lightning_zenft.inject import count_parameters, inject_adapters, match_targets, unload_adapters
from lightning_zenft.io import load_adapter, save_adapter
from lightning_zenft.lm import CausalLMModule
from lightning_zenft.planning import (
    MemoryEstimate,
    Recommendation,
    estimate_memory,
    lr_find_from_recommendation,
    recommend,
    resolve_lora_rank_auto,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_MODEL_DIR",
    "DEFAULT_TASK_FILE",
    "CausalLMModule",
    "TextDataModule",
    "general_probe_batches",
    "AdapterModule",
    "DoRA",
    "DoRALinear",
    "FusedKernels",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LowRankUpdate",
    "Mergeable",
    "MemoryEstimate",
    "Recommendation",
    "count_parameters",
    "disable_adapters",
    "estimate_memory",
    "find_adapters",
    "inject_adapters",
    "load_adapter",
    "lr_find_from_recommendation",
    "match_targets",
    "merge_adapters",
    "recommend",
    "resolve_lora_rank_auto",
    "SaveAdapter",
    "save_adapter",
    "trainable_parameters",
    "unload_adapters",
    "unmerge_adapters",
    "Wrapping",
    "EWC",
    "L2SP",
    "Replay",
    "DistillToBase",
]
