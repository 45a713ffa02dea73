"""Probe sets for measuring forgetting: language-modelling probes and multiple-choice probes.

A **language-modelling probe** (:class:`LMProbe`) is a fixed set of token rows with labels (``-100`` where no token
is scored); it is measured by its per-token loss, perplexity and next-token accuracy. A **multiple-choice probe**
(:class:`ChoiceProbe`) is a set of questions, each with choices and the index of the right one; each choice is scored
by the log-likelihood the model gives its tokens after the question (summed, or averaged per token with
``normalize="mean"``), and the accuracy is the share of questions whose best-scored choice is right.

Where probes come from (:func:`load_probe`):

* a ``DataLoader`` (or any iterable) of language-modelling batches: dicts with ``input_ids`` and optionally
  ``attention_mask`` and ``labels`` (labels default to ``input_ids`` where the mask is 1), tuples whose first item is
  ``input_ids``, or bare ``(B, T)`` tensors; or of multiple-choice records (dicts with ``question``, ``choices`` and
  ``answer``, one record or a collated batch of them);
* a JSONL file: ``{"question", "choices", "answer"}`` records make a multiple-choice probe, ``{"text"}`` records a
  language-modelling probe (each text cut into rows of ``max_length`` tokens);
* the built-in probes for the embedded base model (:func:`default_probes`): ``"general"``, held-out Python
  standard-library text read from the local installation (the modules the base model never saw in pretraining), and
  ``"python_choice"``, the shipped multiple-choice file :data:`DEFAULT_CHOICE_PROBE_FILE` (Python syntax and
  standard-library usage questions, written by :mod:`lightning_zenft.data.choice_probe`).

A probe is evaluated in shards, one per process: :meth:`LMProbe.batches` and :meth:`ChoiceProbe.batches` give rank
``r`` of ``w`` the examples ``r, r + w, r + 2w, ...`` and pad the shorter shards with placeholder examples marked
invalid, so every process runs the same number of forward passes (sharded models all-gather in each one).

Example:
    >>> probe = LMProbe.from_rows([torch.arange(6), torch.arange(4)], batch_size=2)
    >>> batch, valid = next(probe.batches())
    >>> batch["input_ids"].shape, batch["labels"][1].tolist(), valid.tolist()
    (torch.Size([2, 6]), [0, 1, 2, 3, -100, -100], [True, True])
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_zenft.data.paths import _DATA_DIR

IGNORE_INDEX = -100

DEFAULT_CHOICE_PROBE_FILE: Path = _DATA_DIR / "default_choice_probe.jsonl"
"""The embedded multiple-choice probe for the default base model (``{"question", "choices", "answer"}`` JSONL)."""

Normalize = Literal["sum", "mean"]


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of rank ``rank``'s share of ``n`` examples, padded with ``-1`` to ``ceil(n / world_size)`` entries.

    Example:
        >>> shard_indices(5, 0, 2), shard_indices(5, 1, 2)
        ([0, 2, 4], [1, 3, -1])
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
    mine = list(range(rank, n, world_size))
    return mine + [-1] * (math.ceil(n / world_size) - len(mine))


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")


@dataclass
class LMProbe:
    """A language-modelling probe: token rows ``(T_i,)`` and their labels (``-100`` where not scored).

    Args:
        input_ids: one long tensor per row.
        labels: one per row, the same length; the model scores ``labels[t + 1]`` from position ``t``.
        batch_size: rows per forward pass.
        pad_id: the id right padding uses (masked out by ``attention_mask`` and never scored).

    Example:
        >>> p = LMProbe.from_rows([torch.tensor([5, 6, 7])])
        >>> len(p), p.target_tokens
        (1, 2)
    """

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    batch_size: int = 8
    pad_id: int = 0
    kind: str = field(default="lm", init=False)

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} rows of input_ids but {len(self.labels)} of labels.")
        if not self.input_ids:
            raise ValueError("the language-modelling probe has no rows; give it at least one sequence.")
        for i, (ids, lab) in enumerate(zip(self.input_ids, self.labels, strict=True)):
            if ids.ndim != 1 or ids.shape != lab.shape:
                raise ValueError(f"row {i}: input_ids {tuple(ids.shape)} and labels {tuple(lab.shape)} must be 1-D.")
        if self.target_tokens == 0:
            raise ValueError("the probe scores no token (all labels are -100 after the first position of each row).")

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor], batch_size: int = 8, pad_id: int = 0) -> LMProbe:
        """A probe scoring every token of each row (labels equal to the ids)."""
        ids = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
        return cls(ids, [r.clone() for r in ids], batch_size=batch_size, pad_id=pad_id)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        """How many tokens the probe scores (labels after the first position that are not ``-100``)."""
        return int(sum(int((lab[1:] != IGNORE_INDEX).sum()) for lab in self.labels))

    def batches(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """This rank's batches: ``({"input_ids", "attention_mask", "labels"}, valid)``, right-padded ``(B, T)``.

        ``valid`` ``(B,)`` is False for the placeholder rows that even out the shards (copies of row 0).
        """
        for chunk in _chunks(shard_indices(len(self), rank, world_size), self.batch_size):
            rows = [max(i, 0) for i in chunk]
            length = max(self.input_ids[i].numel() for i in rows)
            ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
            for b, i in enumerate(rows):
                n = self.input_ids[i].numel()
                ids[b, :n], labels[b, :n], mask[b, :n] = self.input_ids[i], self.labels[i], 1
            valid = torch.tensor([i >= 0 for i in chunk])  # (B,)
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}, valid


@dataclass
class ChoiceItem:
    """One tokenized question: the context ids, the ids of each choice, and the index of the right choice."""

    context: list[int]
    choices: list[list[int]]
    answer: int


@dataclass
class ChoiceProbe:
    """A multiple-choice probe scored by log-likelihood.

    Args:
        items: the tokenized questions.
        batch_size: questions per forward pass (each runs one row per choice).
        pad_id: the id right padding uses.
        normalize: ``"sum"`` scores a choice by the summed log-likelihood of its tokens, ``"mean"`` by the mean per
            token (favours no length; use it when choices differ much in length).

    Example:
        >>> p = ChoiceProbe([ChoiceItem([1, 2], [[3], [4, 5]], answer=1)])
        >>> batch, valid = next(p.batches())
        >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["question"].tolist()
        ([[1, 2, 3, 0], [1, 2, 4, 5]], [[-100, -100, 3, -100], [-100, -100, 4, 5]], [0, 0])
    """

    items: list[ChoiceItem]
    batch_size: int = 8
    pad_id: int = 0
    normalize: Normalize = "sum"
    kind: str = field(default="choice", init=False)

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)
        if self.normalize not in ("sum", "mean"):
            raise ValueError(f"normalize={self.normalize!r} must be 'sum' or 'mean'.")
        if not self.items:
            raise ValueError("the multiple-choice probe has no questions.")
        for i, item in enumerate(self.items):
            if len(item.choices) < 2:
                raise ValueError(f"question {i} has {len(item.choices)} choice(s); a question needs at least 2.")
            if not 0 <= item.answer < len(item.choices):
                raise ValueError(
                    f"question {i}: answer {item.answer} is not a choice index in [0, {len(item.choices)})."
                )
            if not item.context or any(not c for c in item.choices):
                raise ValueError(f"question {i} has an empty context or an empty choice (no tokens to score).")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_choices(self) -> int:
        """The most choices any question has (the width of the score matrix)."""
        return max(len(item.choices) for item in self.items)

    def batches(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """This rank's batches, one row per (question, choice) pair, and ``valid`` ``(Q,)`` per question.

        The batch holds ``input_ids``, ``attention_mask`` and ``labels`` (the choice's tokens, ``-100`` elsewhere)
        ``(P, T)``, ``question`` and ``choice`` ``(P,)`` (each row's question in the batch and its choice index) and
        ``answers`` ``(Q,)``.
        """
        for chunk in _chunks(shard_indices(len(self), rank, world_size), self.batch_size):
            items = [self.items[max(i, 0)] for i in chunk]
            pairs = [(q, c) for q, item in enumerate(items) for c in range(len(item.choices))]
            length = max(len(items[q].context) + len(items[q].choices[c]) for q, c in pairs)
            ids = torch.full((len(pairs), length), self.pad_id, dtype=torch.long)  # (P, T)
            labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)  # (P, T)
            mask = torch.zeros((len(pairs), length), dtype=torch.long)  # (P, T)
            for row, (q, c) in enumerate(pairs):
                context, choice = items[q].context, items[q].choices[c]
                n = len(context) + len(choice)
                ids[row, :n] = torch.tensor(context + choice)
                labels[row, len(context) : n] = torch.tensor(choice)
                mask[row, :n] = 1
            batch = {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": labels,
                "question": torch.tensor([q for q, _ in pairs]),
                "choice": torch.tensor([c for _, c in pairs]),
                "answers": torch.tensor([item.answer for item in items]),
            }
            yield batch, torch.tensor([i >= 0 for i in chunk])


Probe = LMProbe | ChoiceProbe
"""Either kind of probe."""


# --------------------------------------------------------------------------------------------- building from sources
def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, with the line number in any parse error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe file {str(path)!r} does not exist.")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not valid JSON ({err.msg}).") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n} holds a {type(record).__name__}, not a JSON object.")
        records.append(record)
    if not records:
        raise ValueError(f"probe file {str(path)!r} holds no records.")
    return records


def choice_probe_from_records(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int = 256,
    normalize: Normalize = "sum",
    source: str = "records",
) -> ChoiceProbe:
    """Tokenize ``{"question", "choices", "answer"}`` records into a :class:`ChoiceProbe`.

    The question is encoded with the tokenizer's special tokens (a BOS where it adds one) and each choice without,
    as written (give choices their leading space, e.g. ``" Paris"``). A question longer than ``max_length`` minus its
    longest choice keeps its last tokens.
    """
    items = []
    for n, record in enumerate(records):
        missing = {"question", "choices", "answer"} - set(record)
        if missing:
            raise ValueError(f"{source}, record {n}: missing {sorted(missing)} (has {sorted(record)}).")
        choices = record["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{source}, record {n}: 'choices' must be a list of strings, got {choices!r}.")
        answer = record["answer"]
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(
                f"{source}, record {n}: 'answer' must be a choice index or one of the choices, got {answer!r}."
            )
        if not 0 <= answer < len(choices):
            raise ValueError(f"{source}, record {n}: answer {answer} is not an index into {len(choices)} choices.")
        choice_ids = [_encode(tokenizer, c, special=False) for c in choices]
        if any(not c for c in choice_ids):
            raise ValueError(f"{source}, record {n}: a choice encodes to no tokens: {choices!r}.")
        room = max_length - max(len(c) for c in choice_ids)
        if room < 1:
            raise ValueError(f"{source}, record {n}: a choice alone is longer than max_length={max_length}.")
        context = _encode(tokenizer, str(record["question"]), special=True)[-room:]
        items.append(ChoiceItem(context, choice_ids, answer))
    return ChoiceProbe(items, batch_size=batch_size, pad_id=_pad_id(tokenizer), normalize=normalize)


def lm_probe_from_texts(texts: Iterable[str], tokenizer: Any, batch_size: int = 8, max_length: int = 256) -> LMProbe:
    """Tokenize texts (with special tokens) and cut each into rows of at most ``max_length`` tokens, all scored."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one context and one target token), got {max_length}.")
    rows = []
    for text in texts:
        ids = _encode(tokenizer, text, special=True)
        rows.extend(torch.tensor(ids[s : s + max_length]) for s in range(0, len(ids), max_length))
    return LMProbe.from_rows([r for r in rows if r.numel() >= 2], batch_size=batch_size, pad_id=_pad_id(tokenizer))


def _rows_of_lm_batch(batch: Any, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        ids, mask, labels = batch, None, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        ids, mask, labels = batch[0], None, None
    elif isinstance(batch, dict) and "input_ids" in batch:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    else:
        raise TypeError(
            f"{where}: a language-modelling probe batch must be a dict with 'input_ids' (and optionally "
            f"'attention_mask', 'labels'), a tuple whose first item is input_ids, or a tensor; got "
            f"{type(batch).__name__}."
        )
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 2:
        raise ValueError(f"{where}: input_ids must be (B, T), got shape {tuple(ids.shape)}.")
    if labels is None:
        labels = ids.clone()
        if mask is not None:
            labels[torch.as_tensor(mask) == 0] = IGNORE_INDEX
    labels = torch.as_tensor(labels, dtype=torch.long)
    if mask is not None:
        # rows keep their real tokens only; padding is rebuilt when the probe batches them
        keep = torch.as_tensor(mask).bool()
        return [(ids[b][keep[b]], labels[b][keep[b]]) for b in range(ids.shape[0])]
    return [(ids[b], labels[b]) for b in range(ids.shape[0])]


def _choice_records_of_batch(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Records from one record or from a default-collated batch (choices transposed to per-choice lists)."""
    question = batch["question"]
    if isinstance(question, str):
        return [batch]
    answers = torch.as_tensor(batch["answer"]).tolist()
    per_choice = batch["choices"]  # default_collate: one list per choice position, over the batch
    return [
        {"question": q, "choices": [str(col[i]) for col in per_choice], "answer": int(a)}
        for i, (q, a) in enumerate(zip(question, answers, strict=True))
    ]


def probe_from_batches(
    batches: Iterable[Any],
    tokenizer: Any = None,
    batch_size: int | None = None,
    max_length: int = 256,
    normalize: Normalize = "sum",
    name: str = "probe",
) -> Probe:
    """A probe from a ``DataLoader`` (or iterable) of LM batches or multiple-choice records (read once, kept)."""
    lm_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    records: list[dict[str, Any]] = []
    first_size = None
    for n, batch in enumerate(batches):
        where = f"probe {name!r}, batch {n}"
        if isinstance(batch, list) and batch and all(isinstance(b, dict) and "choices" in b for b in batch):
            records.extend(batch)
        elif isinstance(batch, dict) and "choices" in batch:
            records.extend(_choice_records_of_batch(batch))
        else:
            rows = _rows_of_lm_batch(batch, where)
            first_size = first_size or len(rows)
            lm_rows.extend(rows)
        if records and lm_rows:
            raise ValueError(f"{where}: the loader mixes language-modelling batches and multiple-choice records.")
    if records:
        if tokenizer is None:
            raise ValueError(
                f"probe {name!r} holds multiple-choice text records; give ForgettingMonitor(tokenizer=...) to "
                "encode them."
            )
        return choice_probe_from_records(records, tokenizer, batch_size or 8, max_length, normalize, f"probe {name!r}")
    if not lm_rows:
        raise ValueError(f"probe {name!r}: the loader yielded no batch.")
    return LMProbe([r[0] for r in lm_rows], [r[1] for r in lm_rows], batch_size=batch_size or first_size or 8, pad_id=0)


def load_probe(
    spec: Any,
    tokenizer: Any = None,
    batch_size: int | None = None,
    max_length: int = 256,
    normalize: Normalize = "sum",
    name: str = "probe",
) -> Probe:
    """A probe from a probe object, a JSONL path, or a ``DataLoader``/iterable (see the module docstring).

    Example:
        >>> load_probe([torch.tensor([[1, 2, 3]])]).target_tokens
        2
    """
    if isinstance(spec, (LMProbe, ChoiceProbe)):
        return spec
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.suffix != ".jsonl":
            raise ValueError(f"probe {name!r}: {str(path)!r} is not a .jsonl file; probes are read from JSONL records.")
        records = read_jsonl(path)
        if tokenizer is None:
            raise ValueError(f"probe {name!r} ({path}) holds text; give ForgettingMonitor(tokenizer=...) to encode it.")
        if all("choices" in r for r in records):
            return choice_probe_from_records(records, tokenizer, batch_size or 8, max_length, normalize, str(path))
        if all("text" in r for r in records):
            return lm_probe_from_texts([str(r["text"]) for r in records], tokenizer, batch_size or 8, max_length)
        raise ValueError(
            f"{path}: records must all be multiple-choice ({{'question', 'choices', 'answer'}}) or all text "
            f"({{'text'}}); the first has keys {sorted(records[0])}."
        )
    if isinstance(spec, Iterable):
        return probe_from_batches(spec, tokenizer, batch_size, max_length, normalize, name)
    raise TypeError(
        f"probe {name!r}: cannot build a probe from a {type(spec).__name__}; give an LMProbe/ChoiceProbe, a JSONL path "
        "or a DataLoader."
    )


def general_probe(tokenizer: Any, rows: int = 32, seq_len: int = 128, batch_size: int = 8) -> LMProbe:
    """Held-out general text (the probe split of the local Python standard library), ``rows`` x ``seq_len`` tokens."""
    from lightning_zenft.data.corpus import general_probe_batches

    if rows % batch_size:
        raise ValueError(f"rows={rows} must be a multiple of batch_size={batch_size}.")
    batches = general_probe_batches(tokenizer, n_batches=rows // batch_size, batch_size=batch_size, seq_len=seq_len)
    ids = [row for b in batches for row in b["input_ids"]]
    return LMProbe(ids, [r.clone() for r in ids], batch_size=batch_size, pad_id=_pad_id(tokenizer))


def default_probes(tokenizer: Any, batch_size: int = 8) -> dict[str, Probe]:
    """The built-in probes: ``"general"`` (held-out stdlib text) and ``"python_choice"`` (the shipped questions).

    Example:
        >>> from transformers import AutoTokenizer
        >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
        >>> probes = default_probes(AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR))
        >>> sorted(probes), probes["python_choice"].num_choices
        (['general', 'python_choice'], 4)
    """
    records = read_jsonl(DEFAULT_CHOICE_PROBE_FILE)
    return {
        "general": general_probe(tokenizer, batch_size=batch_size),
        "python_choice": choice_probe_from_records(
            records, tokenizer, batch_size=batch_size, source=str(DEFAULT_CHOICE_PROBE_FILE)
        ),
    }


__all__ = [
    "DEFAULT_CHOICE_PROBE_FILE",
    "ChoiceItem",
    "ChoiceProbe",
    "LMProbe",
    "Probe",
    "choice_probe_from_records",
    "default_probes",
    "general_probe",
    "lm_probe_from_texts",
    "load_probe",
    "probe_from_batches",
    "read_jsonl",
    "shard_indices",
]
