"""Replay mixing: general examples appended to task batches so that a set share of all examples is general.

The share is of **examples** (rows), not of loss weight: with ``ratio = r`` the mixer gives
``floor(r / (1 - r) * task_examples_so_far)`` general examples in total, so over any stretch of training
``general / (general + task)`` stays within one example of ``r`` (a running count, not a coin per batch). A causal-LM
loss averages over target tokens, so each general example then weighs in by its token count, as a task example does.

Sources of general examples:

* a **map-style dataset** (``len`` and ``[i]``): read in a seeded random order, a new permutation each pass;
* a **stream** (any iterable) with ``buffer_size=N``: a reservoir of ``N`` examples (Vitter's algorithm R: the
  ``k``-th example read replaces a random slot with probability ``N / k``) from which replayed examples are drawn
  uniformly; each replayed example reads one new example from the stream first. The stream is iterated again from
  its start when it ends, and must repeat its order for an exact resume.

Batches are merged key by key: 2-D+ tensors that differ in length are padded on the right (``padding_side``) to the
longer one, ``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100; general rows come
after the task rows.

Example:
    >>> import torch
    >>> from lightning_zenft.data.text import CausalLMCollator
    >>> general = [{"input_ids": [7, 8, 9], "labels": [7, 8, 9]}] * 10
    >>> mixer = ReplayMixer(general, ratio=0.5, collate_fn=CausalLMCollator(0), pad_token_id=0)
    >>> task = CausalLMCollator(0)([{"input_ids": [1, 2], "labels": [1, 2]}])
    >>> mixer.mix(task)["input_ids"].tolist()
    [[1, 2, 0], [7, 8, 9]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch.utils.data import default_collate

from lightning_zenft.data.text import IGNORE_INDEX

_PAD_KEYS = {"attention_mask": 0, "labels": IGNORE_INDEX}


class ReplayMixer:
    """Draws general examples and merges them into task batches (see the module docstring).

    Args:
        data: a map-style dataset of examples, or an iterable stream (with ``buffer_size``).
        ratio: share of all examples that are general, in ``[0, 1)``.
        collate_fn: turns a list of general examples into a batch like the task batches.
        pad_token_id: pad value of ``input_ids`` when lengths differ.
        buffer_size: reservoir size for a stream; ``None`` for a map-style dataset.
        seed: seed of the order (datasets) or of the reservoir (streams).
        padding_side: ``"right"`` or ``"left"``, as the task batches are padded.
    """

    def __init__(
        self,
        data: Any,
        ratio: float,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pad_token_id: int | None = None,
        buffer_size: int | None = None,
        seed: int = 0,
        padding_side: str = "right",
    ) -> None:
        problems = []
        if not 0.0 <= ratio < 1.0:
            problems.append(f"ratio={ratio} must be in [0, 1) (the share of examples that are general)")
        if buffer_size is not None and buffer_size < 1:
            problems.append(f"buffer_size={buffer_size} must be at least 1")
        if padding_side not in ("right", "left"):
            problems.append(f"padding_side={padding_side!r} must be 'right' or 'left'")
        mapped = hasattr(data, "__len__") and hasattr(data, "__getitem__")
        if buffer_size is None and not mapped:
            problems.append(
                f"data of type {type(data).__name__} has no len() and [i]; for a stream give buffer_size= (a reservoir)"
            )
        if buffer_size is None and mapped and len(data) == 0:
            problems.append("data is empty")
        if not isinstance(data, Iterable) and buffer_size is not None:
            problems.append(f"data of type {type(data).__name__} is not iterable")
        if problems:
            raise ValueError("Replay: " + "; ".join(problems) + ".")
        self.data = data
        self.ratio = float(ratio)
        self._per_task = Fraction(self.ratio).limit_denominator(10**6) / (
            1 - Fraction(self.ratio).limit_denominator(10**6)
        )
        self.collate_fn = collate_fn or default_collate
        self.pad_token_id = pad_token_id
        self.buffer_size = buffer_size
        self.seed = seed
        self.padding_side = padding_side
        self.task_seen = 0
        self.general_given = 0
        self.passes = 0  # completed passes over the dataset or stream
        self.position = 0  # examples read in the current pass
        self.buffer: list[Any] = []
        self.stream_seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._order: torch.Tensor | None = None
        self._stream: Iterator[Any] | None = None

    # ------------------------------------------------------------------ counts and draws
    def count_for(self, task_examples: int) -> int:
        """How many general examples go with the next ``task_examples`` task examples (running count)."""
        self.task_seen += task_examples
        target = int(self._per_task * self.task_seen)  # floor
        count = target - self.general_given
        self.general_given = target
        return count

    def draw(self, count: int) -> list[Any]:
        """The next ``count`` general examples."""
        return [self._next_stream() if self.buffer_size is not None else self._next_mapped() for _ in range(count)]

    def _next_mapped(self) -> Any:
        n = len(self.data)
        if self._order is None:
            self._order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.passes))
        item = self.data[int(self._order[self.position])]
        self.position += 1
        if self.position == n:
            self.passes, self.position, self._order = self.passes + 1, 0, None
        return item

    def _read_stream(self) -> Any:
        if self._stream is None:
            self._stream = iter(self.data)
            for _ in range(self.position):  # resume: skip what the saved run had read in this pass
                next(self._stream)
        try:
            item = next(self._stream)
        except StopIteration:
            if self.position == 0:
                raise ValueError("Replay: the general data stream yielded no example.") from None
            self.passes, self.position, self._stream = self.passes + 1, 0, None
            return self._read_stream()
        self.position += 1
        return item

    def _next_stream(self) -> Any:
        item = self._read_stream()
        self.stream_seen += 1
        assert self.buffer_size is not None
        if len(self.buffer) < self.buffer_size:
            self.buffer.append(item)
        else:
            slot = int(torch.randint(0, self.stream_seen, (1,), generator=self._generator))
            if slot < self.buffer_size:
                self.buffer[slot] = item
        return self.buffer[int(torch.randint(0, len(self.buffer), (1,), generator=self._generator))]

    # ------------------------------------------------------------------ batches
    def mix(self, batch: Any) -> Any:
        """``batch`` with the general examples it is owed appended (a new batch; ``batch`` itself is not changed)."""
        count = self.count_for(batch_size(batch))
        if count == 0:
            return batch
        return merge_batches(batch, self.collate_fn(self.draw(count)), self.pad_token_id, self.padding_side)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "task_seen": self.task_seen,
            "general_given": self.general_given,
            "passes": self.passes,
            "position": self.position,
            "stream_seen": self.stream_seen,
            "buffer": list(self.buffer),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["ratio"] != self.ratio:
            raise ValueError(
                f"Replay: the checkpoint was written with ratio={state['ratio']}, this callback has "
                f"ratio={self.ratio}; resume with the ratio it was saved with."
            )
        self.task_seen, self.general_given = int(state["task_seen"]), int(state["general_given"])
        self.passes, self.position = int(state["passes"]), int(state["position"])
        self.stream_seen, self.buffer = int(state["stream_seen"]), list(state["buffer"])
        self._generator.set_state(state["generator"])
        self._order, self._stream = None, None


def batch_size(batch: Any) -> int:
    """Rows of a dict/list/tuple/tensor batch (the first dimension of its tensors)."""
    tensors = _tensors(batch)
    if not tensors:
        raise TypeError(f"Replay: a {type(batch).__name__} batch holds no tensors to count examples in.")
    return int(tensors[0].shape[0])


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, Sequence) else []
    return [v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]


def merge_batches(task: Any, general: Any, pad_token_id: int | None, padding_side: str = "right") -> Any:
    """Rows of ``general`` after those of ``task``, key by key, padding sequence tensors to a common length."""
    if isinstance(task, dict):
        if not isinstance(general, dict) or set(general) != set(task):
            raise ValueError(
                f"Replay: general batches have keys {sorted(general) if isinstance(general, dict) else type(general)}, "
                f"task batches {sorted(task)}; give a collate_fn that builds task-like batches from the general data."
            )
        return {k: _cat(k, task[k], general[k], pad_token_id, padding_side) for k in task}
    if isinstance(task, list | tuple):
        if not isinstance(general, list | tuple) or len(general) != len(task):
            raise ValueError("Replay: general batches do not have the task batches' structure; pass a collate_fn.")
        pairs = enumerate(zip(task, general, strict=True))
        return type(task)(_cat(str(i), a, b, pad_token_id, padding_side) for i, (a, b) in pairs)
    return _cat("batch", task, general, pad_token_id, padding_side)


def _cat(key: str, a: Any, b: Any, pad_token_id: int | None, padding_side: str) -> Any:
    if not isinstance(a, torch.Tensor):
        if isinstance(a, list) and isinstance(b, list):
            return a + b
        raise TypeError(f"Replay: batch entry {key!r} is a {type(a).__name__}; only tensors and lists can be merged.")
    b = b.to(device=a.device, dtype=a.dtype)
    if a.dim() >= 2 and a.shape[1] != b.shape[1]:
        pad = _PAD_KEYS.get(key, pad_token_id if key == "input_ids" else None)
        if pad is None:
            raise ValueError(
                f"Replay: batch entry {key!r} has length {a.shape[1]} in the task batch and {b.shape[1]} in the "
                "general one, and no pad value is known for it"
                + ("; pass pad_token_id=" if key == "input_ids" else "; make both the same length")
                + "."
            )
        a, b = _pad(a, b.shape[1], pad, padding_side), _pad(b, a.shape[1], pad, padding_side)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"Replay: batch entry {key!r} is {tuple(a.shape[1:])} per example in the task batch and "
            f"{tuple(b.shape[1:])} in the general one."
        )
    return torch.cat([a, b], dim=0)


def _pad(t: torch.Tensor, length: int, value: int, side: str) -> torch.Tensor:
    if t.shape[1] >= length:
        return t
    extra = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, extra] if side == "right" else [extra, t], dim=1)


def general_examples(tokenizer: Any, n: int, seq_len: int, max_chars: int | None = 2_000_000) -> list[dict[str, Any]]:
    """``n`` examples of ``seq_len`` tokens of general text from the *train* split (never the probe), for ``Replay``
    and EWC's Fisher data: windows at evenly spaced offsets of the tokenized stream, every token a target.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
        >>> items = general_examples(AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR), n=4, seq_len=32)
        >>> len(items), len(items[0]["input_ids"])
        (4, 32)
    """
    from lightning_zenft.data.corpus import general_text

    if n < 1 or seq_len < 2:
        raise ValueError(f"general_examples: n={n} must be >= 1 and seq_len={seq_len} >= 2.")
    stream: list[int] = []
    documents = general_text("train", max_chars=max_chars)  # whole documents, cut into seq_len windows below
    for ids in tokenizer(documents, add_special_tokens=True, verbose=False)["input_ids"]:
        stream.extend(ids)
    if len(stream) < n * seq_len:
        raise ValueError(
            f"general_examples: the general text gave {len(stream)} tokens, fewer than n * seq_len = {n * seq_len}; "
            f"ask for fewer or shorter examples or raise max_chars (now {max_chars})."
        )
    starts = torch.linspace(0, len(stream) - seq_len, n).long().tolist()
    return [{"input_ids": stream[s : s + seq_len], "labels": stream[s : s + seq_len]} for s in starts]


__all__ = ["ReplayMixer", "batch_size", "general_examples", "merge_batches"]
