"""Data: the embedded default task and base model, general text, and the text data module."""

from lightning_zenft.data.corpus import general_probe_batches, general_text
from lightning_zenft.data.datamodule import TextDataModule
from lightning_zenft.data.default_task import generate_default_task
from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE, DEFAULT_TASK_VAL_FILE
from lightning_zenft.data.resumable import ResumableDataLoader, ResumableSampler
from lightning_zenft.data.text import IGNORE_INDEX, CausalLMCollator, pack, read_records, tokenize_records

__all__ = [
    "DEFAULT_BASE_MODEL_DIR",
    "DEFAULT_TASK_FILE",
    "DEFAULT_TASK_VAL_FILE",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextDataModule",
    "general_probe_batches",
    "general_text",
    "generate_default_task",
    "pack",
    "read_records",
    "tokenize_records",
]
