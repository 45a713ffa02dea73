"""Reading, tokenizing and collating text for causal-LM fine-tuning.

Record shapes (detected per record in a JSONL file; keys other than the ones read, such as ids or metadata, are
not used):

``{"prompt": ..., "completion": ...}``
    the prompt is context (masked), the completion is trained, then EOS.
``{"instruction": ..., "input": ... (optional), "output": ...}``
    the prompt is built with this fixed template (``input`` block only when ``input`` is non-empty)::

        ### Instruction:
        {instruction}

        ### Input:
        {input}

        ### Response:
        {output}

    everything up to and including ``"### Response:\\n"`` is the prompt; ``output`` + EOS is trained.
``{"messages": [{"role": ..., "content": ...}, ...]}``
    with a tokenizer that has a chat template, the conversation is rendered by it and only the text each
    assistant turn adds (its content and the template's end-of-turn markers) is trained. Without one, each
    turn is rendered as ``"<|{role}|>\\n{content}\\n"``; for assistant turns ``"<|assistant|>\\n"`` is context and
    ``content`` + EOS is trained.
``{"text": ...}``
    plain text, all tokens trained, then EOS.

A ``.txt`` file is read as ``{"text"}`` records, one per blank-line-separated paragraph.

Tokenization: an example is a list of segments ``(text, trained)``. The first segment is encoded with the
tokenizer's special tokens (e.g. a leading BOS), the others without; segments are tokenized separately, so the
boundary between prompt and completion is exact. Labels are the token ids on trained segments and ``-100``
elsewhere (with ``mask_prompt=False`` every token is trained). The model shifts labels itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

IGNORE_INDEX = -100
"""Label value on which ``transformers`` models (and ``F.cross_entropy``) take no loss."""

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

Segment = tuple[str, bool]
"""A piece of an example's text and whether its tokens are trained."""

_SHAPES = "{'prompt', 'completion'}, {'instruction', 'output'} (+ optional 'input'), {'messages'} or {'text'}"


@dataclass(frozen=True)
class Example:
    """One example as segments of text, before tokenization.

    Attributes:
        segments: ``(text, trained)`` pieces in order.
        eos_after: append the EOS token (trained) after each trained segment listed here (by index).
        special_tokens: encode the first segment with the tokenizer's special tokens (e.g. BOS); ``False`` where
            the text already holds them (a rendered chat template).
    """

    segments: tuple[Segment, ...]
    eos_after: tuple[int, ...] = ()
    special_tokens: bool = True


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` file (one JSON object per line) or a ``.txt`` file (paragraphs as ``{"text"}``).

    Each record gets a ``"_line"`` key with its 1-based line number, for error messages.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_text("first paragraph\\n\\nsecond\\nparagraph\\n")
        >>> [r["text"] for r in read_records(p)]
        ['first paragraph', 'second\\nparagraph']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist. Check the path (relative to {Path.cwd()}).")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        records: list[dict[str, Any]] = []
        lineno, start, lines = 0, 0, []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                if not lines:
                    start = lineno
                lines.append(line)
            elif lines:
                records.append({"text": "\n".join(lines), "_line": start})
                lines = []
        if lines:
            records.append({"text": "\n".join(lines), "_line": start})
        return records
    if suffix != ".jsonl":
        raise ValueError(
            f"Cannot read {str(path)!r}: the suffix {path.suffix!r} is not supported. Use a .jsonl file (one JSON "
            "object per line) or a .txt file (one example per blank-line-separated paragraph)."
        )
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one object."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
            record["_line"] = lineno
            records.append(record)
    return records


def _str_field(record: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} ({value!r:.60}).")
    return value


def record_to_example(record: dict[str, Any], tokenizer: Any, where: str = "record") -> Example:
    """Turn one record into an :class:`Example`, detecting its shape from its keys.

    Example:
        >>> record_to_example({"prompt": "2+2=", "completion": "4"}, tokenizer=None).segments
        (('2+2=', False), ('4', True))
    """
    keys = {k for k in record if k != "_line"}
    if "messages" in keys:
        return _messages_example(record["messages"], tokenizer, where)
    if {"prompt", "completion"} <= keys:
        prompt, completion = _str_field(record, "prompt", where), _str_field(record, "completion", where)
        return Example(((prompt, False), (completion, True)), eos_after=(1,))
    if {"instruction", "output"} <= keys:
        instruction = _str_field(record, "instruction", where)
        inp = _str_field(record, "input", where, optional=True)
        output = _str_field(record, "output", where)
        if inp.strip():
            prompt = ALPACA_TEMPLATE.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)
        return Example(((prompt, False), (output, True)), eos_after=(1,))
    if "text" in keys:
        return Example(((_str_field(record, "text", where), True),), eos_after=(0,))
    raise ValueError(f"{where}: record has keys {sorted(keys)}; expected one of {_SHAPES}.")


def _messages_example(messages: Any, tokenizer: Any, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content', got {msg!r:.80}."
            )
    if getattr(tokenizer, "chat_template", None):
        return _chat_template_example(messages, tokenizer, where)
    segments: list[Segment] = []
    eos_after: list[int] = []
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "assistant":
            segments.append(("<|assistant|>\n", False))
            segments.append((content, True))
            eos_after.append(len(segments) - 1)
            segments.append(("\n", False))
        else:
            segments.append((f"<|{role}|>\n{content}\n", False))
    return Example(tuple(segments), eos_after=tuple(eos_after))


def _chat_template_example(messages: list[dict[str, str]], tokenizer: Any, where: str) -> Example:
    """Split the rendered conversation at the points where each assistant turn starts and ends."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    segments: list[Segment] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_text = render(messages[:i], True)
        end_text = render(messages[: i + 1], False)
        if not (full.startswith(start_text) and full.startswith(end_text) and len(start_text) >= pos):
            raise ValueError(
                f"{where}: the tokenizer's chat template does not render the conversation as a growing prefix, so "
                "assistant turns cannot be located for masking. Give prompt/completion records instead, or set "
                "tokenizer.chat_template = None to use the built-in plain template."
            )
        if start_text[pos:]:
            segments.append((start_text[pos:], False))
        segments.append((end_text[len(start_text) :], True))
        pos = len(end_text)
    if full[pos:]:
        segments.append((full[pos:], False))
    return Example(tuple(segments), special_tokens=False)


def tokenize_example(example: Example, tokenizer: Any, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (labels ``-100`` on masked tokens).

    Example:
        >>> from transformers import AutoTokenizer
        >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
        >>> tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
        >>> ids, labels = tokenize_example(Example((("Q: ", False), ("yes", True)), eos_after=(1,)), tok)
        >>> labels[-1] == tok.eos_token_id and labels[0] == -100
        True
    """
    eos = tokenizer.eos_token_id
    if example.eos_after and eos is None:
        raise ValueError("The tokenizer has no eos_token; set one (tokenizer.eos_token = '...') to end completions.")
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(example.segments):
        special = example.special_tokens and i == 0
        piece = tokenizer(text, add_special_tokens=special)["input_ids"] if text or special else []
        if i in example.eos_after:
            piece = [*piece, eos]
        ids.extend(piece)
        labels.extend(piece if (trained or not mask_prompt) else [IGNORE_INDEX] * len(piece))
    return ids, labels


class TokenizedDataset(Dataset):
    """A list of ``{"input_ids", "labels"}`` token lists (variable length), one per example or packed block.

    Example:
        >>> ds = TokenizedDataset([([1, 2, 3], [-100, 2, 3])])
        >>> ds[0]["labels"]
        [-100, 2, 3]
    """

    def __init__(self, items: Sequence[tuple[list[int], list[int]]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids, labels = self.items[index]
        return {"input_ids": ids, "labels": labels}


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    mask_prompt: bool = True,
    truncate: bool = True,
    source: str = "data",
) -> list[tuple[list[int], list[int]]]:
    """Tokenize records; truncate each to ``max_length`` (warning once with the count) unless ``truncate=False``.

    Examples left with no trained token (e.g. a prompt longer than ``max_length``) are dropped, and counted in
    the same warning.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
        >>> tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
        >>> items = tokenize_records([{"text": "x = 1"}], tok, max_length=64)
        >>> items[0][0] == items[0][1]
        True
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}.")
    out: list[tuple[list[int], list[int]]] = []
    truncated = dropped = 0
    for record in records:
        where = f"{source}:{record.get('_line', '?')}"
        ids, labels = tokenize_example(record_to_example(record, tokenizer, where), tokenizer, mask_prompt)
        if truncate and len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        out.append((ids, labels))
    if truncated or dropped:
        rank_zero_warn(
            f"{source}: {truncated} of {len(records)} examples were longer than max_length={max_length} tokens and "
            f"were truncated; {dropped} had no trained token left and were dropped. Raise max_length, shorten the "
            "prompts, or use packing=True (which splits long examples across blocks instead of cutting them)."
        )
    if not out:
        raise ValueError(f"{source}: no example with a trained token ({len(records)} records read).")
    return out


def pack(items: Sequence[tuple[list[int], list[int]]], block_size: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate tokenized examples and cut the stream into ``block_size`` blocks.

    No token is dropped: the last block may be shorter (the collator pads it). Labels keep their masking.
    Attention is not reset at example boundaries: inside a block, later examples attend to earlier ones (each
    example starts with the tokenizer's BOS, where it has one, which marks the boundary for the model).

    Example:
        >>> pack([([1, 2, 3], [1, 2, 3]), ([4, 5], [-100, 5])], block_size=4)
        [([1, 2, 3, 4], [1, 2, 3, -100]), ([5], [5])]
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}.")
    ids = [t for item in items for t in item[0]]
    labels = [t for item in items for t in item[1]]
    return [(ids[i : i + block_size], labels[i : i + block_size]) for i in range(0, len(ids), block_size)]


class CausalLMCollator:
    """Pad a list of ``{"input_ids", "labels"}`` items to the longest one (right padding).

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with ``-100``, ``attention_mask`` is 1 on real
    tokens and 0 on padding.

    Example:
        >>> batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [5, 6]},
        ...                                           {"input_ids": [7], "labels": [7]}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[5, 6], [7, 0]], [[1, 1], [1, 0]], [[5, 6], [7, -100]])
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> CausalLMCollator:
        """Use the tokenizer's pad token, or its EOS token when it has no pad token."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                f"The tokenizer {type(tokenizer).__name__} has neither a pad_token nor an eos_token to pad with. "
                "Set one, e.g. tokenizer.pad_token = tokenizer.unk_token."
            )
        return cls(pad)

    def __call__(self, items: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("Cannot collate an empty batch.")
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)  # (B, T)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "Example",
    "TokenizedDataset",
    "pack",
    "read_records",
    "record_to_example",
    "tokenize_example",
    "tokenize_records",
]
