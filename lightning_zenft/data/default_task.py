"""The embedded default fine-tuning task: small identifier and word-order rewrites.

The task is built so that the embedded ~1M-parameter base model can visibly learn it with LoRA in a minute or two
on a CPU: every answer is a rearrangement of words that appear in the prompt, so it needs copying and simple
rules, not knowledge. Four kinds of records, in equal expectation:

- ``Convert to snake_case: parseHttpResponse`` -> ``parse_http_response``
- ``Convert to camelCase: user_account_id`` -> ``userAccountId``
- ``Join with hyphens: max retry count`` -> ``max-retry-count``
- ``Reverse the words: open the cache file`` -> ``file cache the open``

Each prompt ends with ``"\\nAnswer:"`` and each completion starts with a space. Words come from a short list
written for this module. Generation is deterministic for a seed; the val split shares no prompt with the train
split. Regenerate the committed files with ``python -m lightning_zenft.data.default_task``.

Example:
    >>> train, val = generate_default_task(n_train=4, n_val=2)
    >>> sorted(train[0])
    ['completion', 'prompt']
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_zenft.data.paths import DEFAULT_TASK_FILE, DEFAULT_TASK_VAL_FILE

# fmt: off
WORDS: tuple[str, ...] = (
    "account", "active", "address", "agent", "alpha", "array", "batch", "block", "blue", "board", "buffer",
    "cache", "call", "card", "cell", "chain", "check", "city", "clock", "cloud", "code", "color", "count",
    "data", "date", "delay", "depth", "draw", "entry", "error", "event", "field", "file", "filter", "first",
    "flag", "float", "frame", "green", "group", "handle", "hash", "header", "height", "http", "image", "index",
    "input", "item", "key", "label", "last", "layer", "level", "limit", "line", "list", "load", "local", "lock",
    "loop", "main", "map", "max", "message", "min", "mode", "model", "name", "node", "number", "object", "offset",
    "open", "order", "owner", "page", "parse", "path", "point", "port", "price", "queue", "range", "rate", "read",
    "record", "red", "request", "reset", "response", "retry", "root", "row", "rule", "sample", "scale", "score",
    "send", "server", "session", "shape", "size", "sort", "source", "start", "state", "step", "stop", "store",
    "stream", "table", "target", "task", "text", "time", "token", "total", "tree", "type", "update", "user",
    "value", "view", "weight", "width", "window", "word", "write", "zone",
)
# fmt: on
"""Word list the records are made of (lowercase ASCII, no underscores or hyphens)."""

Record = dict[str, str]


def _snake_case(rng: random.Random) -> tuple[str, str]:
    words = _pick(rng, 2, 4)
    camel = words[0] + "".join(w.capitalize() for w in words[1:])
    if rng.random() < 0.3:  # PascalCase input sometimes
        camel = camel[0].upper() + camel[1:]
    return f"Convert to snake_case: {camel}", "_".join(words)


def _camel_case(rng: random.Random) -> tuple[str, str]:
    words = _pick(rng, 2, 4)
    return f"Convert to camelCase: {'_'.join(words)}", words[0] + "".join(w.capitalize() for w in words[1:])


def _hyphens(rng: random.Random) -> tuple[str, str]:
    words = _pick(rng, 2, 4)
    return f"Join with hyphens: {' '.join(words)}", "-".join(words)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _pick(rng, 3, 5)
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _pick(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


TASKS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (_snake_case, _camel_case, _hyphens, _reverse)


def generate_default_task(n_train: int = 2000, n_val: int = 200, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Generate the train and val records of the default task (no prompt appears twice, in or across splits).

    Example:
        >>> train, val = generate_default_task(n_train=50, n_val=10, seed=1)
        >>> len(train), len(val), {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
        (50, 10, True)
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"Need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}.")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[Record] = []
    while len(records) < n_train + n_val:
        instruction, answer = rng.choice(TASKS)(rng)
        if instruction in seen:
            continue
        seen.add(instruction)
        records.append({"prompt": f"{instruction}\nAnswer:", "completion": f" {answer}"})
    return records[:n_train], records[n_train:]


def to_jsonl(records: Sequence[Record]) -> str:
    """The JSONL text written for ``records`` (one compact object per line, trailing newline).

    Example:
        >>> to_jsonl([{"prompt": "a", "completion": " b"}])
        '{"prompt": "a", "completion": " b"}\\n'
    """
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_default_task(
    train_file: Path = DEFAULT_TASK_FILE, val_file: Path = DEFAULT_TASK_VAL_FILE, seed: int = 0
) -> tuple[Path, Path]:
    """Write the default task's train and val JSONL files.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> train, val = write_default_task(d / "t.jsonl", d / "v.jsonl")
        >>> len(train.read_text().splitlines()), len(val.read_text().splitlines())
        (2000, 200)
    """
    train, val = generate_default_task(seed=seed)
    train_file.write_text(to_jsonl(train), encoding="utf-8")
    val_file.write_text(to_jsonl(val), encoding="utf-8")
    return train_file, val_file


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lightning_zenft.data.default_task [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(description="Regenerate the embedded default task files.")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_TASK_FILE.parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_default_task(
        args.out_dir / DEFAULT_TASK_FILE.name, args.out_dir / DEFAULT_TASK_VAL_FILE.name, args.seed
    )
    for path in paths:
        print(f"wrote {path}")


__all__ = ["TASKS", "WORDS", "generate_default_task", "to_jsonl", "write_default_task"]

if __name__ == "__main__":
    main()
