"""Locations of the data files shipped inside the installed package.

Both paths point inside ``lightning_zenft/data/`` so they resolve the same way from a source checkout and from an
installed wheel.

Example:
    >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE
    >>> (DEFAULT_BASE_MODEL_DIR / "config.json").is_file(), DEFAULT_TASK_FILE.suffix
    (True, '.jsonl')
"""

from __future__ import annotations

from pathlib import Path

_DATA_DIR = Path(__file__).resolve().parent

DEFAULT_BASE_MODEL_DIR: Path = _DATA_DIR / "base_model"
"""A ~1M-parameter Llama pretrained on Python standard-library text, with its tokenizer (``save_pretrained`` layout)."""

DEFAULT_TASK_FILE: Path = _DATA_DIR / "default_task.jsonl"
"""Train split of the embedded instruction task (``{"prompt", "completion"}`` JSONL)."""

DEFAULT_TASK_VAL_FILE: Path = _DATA_DIR / "default_task_val.jsonl"
"""Held-out split of the embedded instruction task, disjoint from :data:`DEFAULT_TASK_FILE`."""

__all__ = ["DEFAULT_BASE_MODEL_DIR", "DEFAULT_TASK_FILE", "DEFAULT_TASK_VAL_FILE"]
