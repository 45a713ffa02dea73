"""Locations of the data files shipped inside the installed package.

Both paths point inside ``lightning_zenft/data/`` so they resolve the same way from a source checkout and from an
installed wheel.

Example:
    >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE
    >>> (DEFAULT_BASE_MODEL_DIR / "config.json").is_file(), DEFAULT_TASK_FILE.suffix
    (True, '.jsonl')
"""

from __future__ import annotations

import re
from pathlib import Path

_DATA_DIR = Path(__file__).resolve().parent

DEFAULT_BASE_MODEL_DIR: Path = _DATA_DIR / "base_model"
"""A ~1M-parameter Llama pretrained on Python standard-library text, with its tokenizer (``save_pretrained`` layout)."""

DEFAULT_TASK_FILE: Path = _DATA_DIR / "default_task.jsonl"
"""Train split of the embedded instruction task (``{"prompt", "completion"}`` JSONL)."""

DEFAULT_TASK_VAL_FILE: Path = _DATA_DIR / "default_task_val.jsonl"
"""Held-out split of the embedded instruction task, disjoint from :data:`DEFAULT_TASK_FILE`."""

_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
"""The form of a Hugging Face hub id: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``)."""


def check_pretrained_source(source: str, argument: str) -> None:
    """Raise a clear error when ``source`` is meant as a local directory that does not exist.

    ``from_pretrained`` takes a directory or a hub id; given a missing path such as ``/no/such/dir`` it reports
    only that the "repo id" is malformed. A string that cannot be a hub id (an absolute path, ``./``, ``~``, more than
    one ``/``) and does not exist is reported here as a missing directory; a hub id is left to ``from_pretrained``.

    Example:
        >>> check_pretrained_source("meta-llama/Llama-3.2-1B", "model")  # a hub id: not checked here
        >>> check_pretrained_source("/no/such/dir", "model")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model='/no/such/dir': the directory does not exist. ...
    """
    if Path(source).expanduser().exists() or _HUB_ID.match(source):
        return
    raise FileNotFoundError(
        f"{argument}={source!r}: the directory does not exist. Give a directory written by save_pretrained (it holds "
        "config.json), or, for a model on the Hugging Face hub, its id such as 'org/name' (downloading needs network "
        "access)."
    )


__all__ = ["DEFAULT_BASE_MODEL_DIR", "DEFAULT_TASK_FILE", "DEFAULT_TASK_VAL_FILE", "check_pretrained_source"]
