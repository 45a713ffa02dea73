"""General text read from the local Python installation, for pretraining and for measuring forgetting.

The source files of the Python standard library (code, comments and docstrings) are a sizeable, license-clean
body of general English-and-code text that every machine running this package already has. Nothing is
downloaded and nothing is copied into the package: the text is read at run time from
``sysconfig.get_paths()["stdlib"]``.

Which files are read:
    every ``*.py`` file under the stdlib directory, in sorted path order, except test packages (any directory
    named ``test``, ``tests`` or ``idle_test``), ``idlelib``, ``site-packages``, ``encodings`` (generated
    code-page tables, not prose or ordinary code), ``ensurepip`` bundles and the generated ``_sysconfigdata``
    modules. Bytes that are not valid UTF-8 are replaced, so an odd file never stops a run.

How the split is made:
    each module goes wholly to ``"train"`` or to ``"probe"`` by a stable hash (BLAKE2b) of its dotted module
    name: about 5 % of modules form the probe. The probe is therefore held-out general text: no probe module is
    ever seen in pretraining, and the split does not change between runs or machines (the file *contents* do
    follow the local Python version).

Example:
    >>> from lightning_zenft.data.corpus import general_text
    >>> probe = general_text("probe", max_chars=10_000)
    >>> sum(len(t) for t in probe) <= 10_000
    True
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path
from typing import Any, Literal

import torch

PROBE_PERCENT = 5
"""Share of stdlib modules (by name hash) held out as the probe split."""

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "encodings", "ensurepip"})


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_probe(module: str) -> bool:
    digest = hashlib.blake2b(module.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < PROBE_PERCENT


def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library.

    Example:
        >>> (stdlib_dir() / "os.py").is_file()
        True
    """
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=2)
def _modules(split: str) -> tuple[tuple[str, str], ...]:
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(
            f"The Python standard library directory {str(root)!r} (from sysconfig) does not exist, so there is no "
            "general text to read. Run with a full CPython installation (not an embedded or zipped stdlib)."
        )
    out: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        module = _module_name(rel)
        if not module or _is_probe(module) != (split == "probe"):
            continue
        try:
            raw = path.read_bytes()
        except OSError:
            continue  # an unreadable file (permissions, broken link) has no text to give
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            out.append((module, text))
    return tuple(out)


def general_modules(split: Literal["train", "probe"]) -> list[str]:
    """The dotted names of the stdlib modules in ``split``, in the order :func:`general_text` returns them.

    Example:
        >>> set(general_modules("train")).isdisjoint(general_modules("probe"))
        True
    """
    _check_split(split)
    return [name for name, _ in _modules(split)]


def general_text(split: Literal["train", "probe"], max_chars: int | None = None) -> list[str]:
    """Source texts of the local Python standard library, one string per module, in a fixed order.

    Args:
        split: ``"train"`` (about 95 % of modules) or ``"probe"`` (the rest, held out from pretraining).
        max_chars: stop once this many characters are collected; the last text is cut to fit. ``None`` reads all.

    Example:
        >>> texts = general_text("train", max_chars=2_000)
        >>> len("".join(texts))
        2000
    """
    _check_split(split)
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be a positive number of characters or None for all, got {max_chars}.")
    texts: list[str] = []
    total = 0
    for _, text in _modules(split):
        if max_chars is not None and total + len(text) >= max_chars:
            texts.append(text[: max_chars - total])
            break
        texts.append(text)
        total += len(text)
    return texts


def general_probe_batches(
    tokenizer: Any, n_batches: int, batch_size: int, seq_len: int, max_chars: int | None = 2_000_000
) -> list[dict[str, torch.Tensor]]:
    """Fixed batches of held-out general text, for measuring how well a model still models general text.

    The probe modules are tokenized (each as BOS + text + EOS where the tokenizer has them), concatenated, and
    ``n_batches * batch_size`` windows of ``seq_len`` tokens are taken at evenly spaced offsets across the whole
    stream, so the batches cover all probe modules rather than the first few. Every token is a target
    (``labels == input_ids``); the model shifts labels itself.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        n_batches: number of batches to return.
        batch_size: rows per batch.
        seq_len: tokens per row.
        max_chars: characters of probe text to tokenize at most (``None``: all of it).

    Returns:
        A list of ``{"input_ids", "attention_mask", "labels"}`` dicts of ``(batch_size, seq_len)`` long tensors.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
        >>> tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
        >>> batches = general_probe_batches(tok, n_batches=2, batch_size=4, seq_len=64)
        >>> batches[0]["input_ids"].shape
        torch.Size([4, 64])
    """
    for name, value in (("n_batches", n_batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    # whole documents, cut into seq_len windows below: the tokenizer's warning about the model's length does not apply
    encoded = tokenizer(general_text("probe", max_chars=max_chars), add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    n_rows = n_batches * batch_size
    if len(stream) < n_rows * seq_len:
        raise ValueError(
            f"The probe text holds {len(stream)} tokens, fewer than n_batches * batch_size * seq_len = "
            f"{n_rows * seq_len}. Ask for fewer or shorter batches, or raise max_chars (now {max_chars})."
        )
    tokens = torch.tensor(stream, dtype=torch.long)  # (N,)
    starts = torch.linspace(0, len(stream) - seq_len, n_rows).long()  # (n_rows,)
    rows = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])  # (n_rows, T)
    batches = []
    for chunk in rows.split(batch_size):
        batches.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
    return batches


def _check_split(split: str) -> None:
    if split not in ("train", "probe"):
        raise ValueError(f"split must be 'train' or 'probe', got {split!r}.")


__all__ = ["PROBE_PERCENT", "general_modules", "general_probe_batches", "general_text", "stdlib_dir"]
