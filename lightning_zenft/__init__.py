"""lightning_zenft: LLM fine-tuning for PyTorch Lightning as callbacks and plugins."""

from lightning_zenft.adapters import (
    AdapterModule,
    DoRALinear,
    LoRALinear,
    LowRankUpdate,
    Mergeable,
    PrefixKV,
    PromptEncoder,
    SoftPrompt,
    Wrapping,
    disable_adapters,
    find_adapters,
    merge_adapters,
    unmerge_adapters,
)
from lightning_zenft.adapters.bottleneck import BottleneckAdapterLayer, ParallelAdapterLayer
from lightning_zenft.adapters.ia3 import IA3Linear
from lightning_zenft.adapters.reft import LoReFTLayer
from lightning_zenft.callbacks._adapter import AdapterCallback, trainable_parameters
from lightning_zenft.callbacks.bitfit import BitFit
from lightning_zenft.callbacks.bottleneck import BottleneckAdapter, ParallelAdapter
from lightning_zenft.callbacks.distill import DistillToBase
from lightning_zenft.callbacks.ewc import EWC
from lightning_zenft.callbacks.export import SaveAdapter
from lightning_zenft.callbacks.forgetting_monitor import ForgettingMonitor
from lightning_zenft.callbacks.ia3 import IA3
from lightning_zenft.callbacks.kernels import FusedKernels
from lightning_zenft.callbacks.l2sp import L2SP
from lightning_zenft.callbacks.lora import DoRA, LoRA
from lightning_zenft.callbacks.mam import MAMAdapter
from lightning_zenft.callbacks.merge import MergeAdapters
from lightning_zenft.callbacks.pareto_checkpoint import ParetoCheckpoint
from lightning_zenft.callbacks.prompt import PrefixTuning, PromptTuning, PTuning
from lightning_zenft.callbacks.reft import LoReFT
from lightning_zenft.callbacks.replay import Replay
from lightning_zenft.config import (
    AdapterConfig,
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoRAConfig,
    LoReFTConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)
from lightning_zenft.data import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE, TextDataModule, general_probe_batches
from lightning_zenft.inject import (
    AdapterPlan,
    count_parameters,
    inject_adapters,
    match_targets,
    plan_adapters,
    unload_adapters,
)
from lightning_zenft.io import load_adapter, save_adapter
from lightning_zenft.lm import CausalLMModule
from lightning_zenft.named import (
    active_adapter,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_adapter,
    using_adapter,
)
from lightning_zenft.planning import (
    MemoryEstimate,
    Recommendation,
    estimate_memory,
    lr_find_from_recommendation,
    recommend,
    resolve_lora_rank_auto,
)
from lightning_zenft.precision import NF4Precision
from lightning_zenft.strategies import FSDP1Strategy, FSDP2Strategy

__version__ = "0.1.0"

__all__ = [
    "active_adapter",
    "AdapterCallback",
    "AdapterConfig",
    "AdapterModule",
    "AdapterPlan",
    "add_adapter",
    "BitFit",
    "BitFitConfig",
    "BottleneckAdapter",
    "BottleneckAdapterLayer",
    "BottleneckConfig",
    "CausalLMModule",
    "count_parameters",
    "DEFAULT_BASE_MODEL_DIR",
    "DEFAULT_TASK_FILE",
    "delete_adapter",
    "disable_adapters",
    "DistillToBase",
    "DoRA",
    "DoRALinear",
    "estimate_memory",
    "EWC",
    "find_adapters",
    "ForgettingMonitor",
    "FSDP1Strategy",
    "FSDP2Strategy",
    "FusedKernels",
    "general_probe_batches",
    "IA3",
    "IA3Config",
    "IA3Linear",
    "inject_adapters",
    "L2SP",
    "list_adapters",
    "load_adapter",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LoReFT",
    "LoReFTConfig",
    "LoReFTLayer",
    "LowRankUpdate",
    "lr_find_from_recommendation",
    "MAMAdapter",
    "MAMConfig",
    "match_targets",
    "MemoryEstimate",
    "merge_adapters",
    "Mergeable",
    "MergeAdapters",
    "NF4Precision",
    "ParallelAdapter",
    "ParallelAdapterConfig",
    "ParallelAdapterLayer",
    "ParetoCheckpoint",
    "plan_adapters",
    "PrefixKV",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptTuning",
    "PromptTuningConfig",
    "PTuning",
    "PTuningConfig",
    "recommend",
    "Recommendation",
    "Replay",
    "resolve_lora_rank_auto",
    "save_adapter",
    "SaveAdapter",
    "set_adapter",
    "SoftPrompt",
    "TextDataModule",
    "trainable_parameters",
    "unload_adapters",
    "unmerge_adapters",
    "using_adapter",
    "Wrapping",
]
