"""Planning tools: recipe recommender, memory estimator, learning-rate finder around a recommendation."""

from lightning_zenft.planning.commands import estimate_main, recommend_main
from lightning_zenft.planning.lr import lr_find_from_recommendation
from lightning_zenft.planning.measure import saved_activation_bytes, saved_tensor_bytes
from lightning_zenft.planning.memory import MemoryEstimate, estimate_memory, resolve_target_modules
from lightning_zenft.planning.model_info import ModelInfo, ModelResolutionError, parse_size, resolve_model
from lightning_zenft.planning.recommend import (
    TASKS,
    Recommendation,
    data_thresholds,
    full_learning_rate,
    lora_learning_rate,
    lora_learning_rate_rule,
    lora_size_learning_rate,
    recommend,
    recommend_epochs,
    resolve_lora_rank_auto,
)

__all__ = [
    "TASKS",
    "MemoryEstimate",
    "ModelInfo",
    "ModelResolutionError",
    "Recommendation",
    "data_thresholds",
    "estimate_main",
    "estimate_memory",
    "full_learning_rate",
    "lora_learning_rate",
    "lora_learning_rate_rule",
    "lora_size_learning_rate",
    "lr_find_from_recommendation",
    "parse_size",
    "recommend",
    "recommend_epochs",
    "recommend_main",
    "resolve_lora_rank_auto",
    "resolve_model",
    "resolve_target_modules",
    "saved_activation_bytes",
    "saved_tensor_bytes",
]
