"""Reading, tokenizing, masking, packing and collating text records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
from lightning_zenft.data.text import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    IGNORE_INDEX,
    CausalLMCollator,
    pack,
    read_records,
    record_to_example,
    tokenize_example,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)


def encode(tok, record, mask_prompt=True):
    return tokenize_example(record_to_example(record, tok), tok, mask_prompt)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_prompt_completion_masks_exactly_the_prompt(tok):
    prompt, completion = "Convert to snake_case: readFile\nAnswer:", " read_file"
    ids, labels = encode(tok, {"prompt": prompt, "completion": completion})
    p = tok(prompt)["input_ids"]  # with BOS
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert p[0] == tok.bos_token_id
    assert ids == p + c
    assert labels == [IGNORE_INDEX] * len(p) + c


def test_mask_prompt_false_trains_every_token(tok):
    ids, labels = encode(tok, {"prompt": "a b c", "completion": " d"}, mask_prompt=False)
    assert labels == ids


@pytest.mark.parametrize("inp", ["some context", ""])
def test_alpaca_template(tok, inp):
    record = {"instruction": "Sort the list.", "input": inp, "output": "1 2 3"}
    ids, labels = encode(tok, record)
    if inp:
        prompt = ALPACA_TEMPLATE.format(instruction="Sort the list.", input=inp)
        assert "### Input:\nsome context\n\n" in prompt
    else:
        prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction="Sort the list.")
        assert "### Input" not in prompt
    assert prompt.endswith("### Response:\n")
    p = tok(prompt)["input_ids"]
    c = tok("1 2 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == p + c
    assert labels == [IGNORE_INDEX] * len(p) + c


def test_text_record_trains_all_tokens_and_ends_with_eos(tok):
    ids, labels = encode(tok, {"text": "def f(x):\n    return x"})
    assert ids == tok("def f(x):\n    return x")["input_ids"] + [tok.eos_token_id]
    assert labels == ids


def test_messages_plain_template_masks_all_but_assistant_turns(tok):
    assert not getattr(tok, "chat_template", None)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    ids, labels = encode(tok, {"messages": messages})

    def enc(text, special=False):
        return tok(text, add_special_tokens=special)["input_ids"]

    eos = tok.eos_token_id
    pieces = [
        (enc("<|system|>\nBe brief.\n", special=True), False),
        (enc("<|user|>\nHi\n"), False),
        (enc("<|assistant|>\n"), False),
        (enc("Hello") + [eos], True),
        (enc("\n"), False),
        (enc("<|user|>\nBye\n"), False),
        (enc("<|assistant|>\n"), False),
        (enc("Goodbye") + [eos], True),
        (enc("\n"), False),
    ]
    assert ids == [t for piece, _ in pieces for t in piece]
    assert labels == [t if trained else IGNORE_INDEX for piece, trained in pieces for t in piece]


def test_messages_with_chat_template_trains_only_assistant_text(tmp_path):
    tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    messages = [
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "thanks"},
    ]
    ids, labels = encode(tok, {"messages": messages})
    # Reference: the rendered conversation split by hand at the assistant turn.
    context = "<s>[user] two plus two</s>[assistant] "
    answer = "four</s>"
    rest = "[user] thanks</s>"
    assert tok.apply_chat_template(messages, tokenize=False) == context + answer + rest
    a, b, c = (tok(t, add_special_tokens=False)["input_ids"] for t in (context, answer, rest))
    assert ids == a + b + c
    assert labels == [IGNORE_INDEX] * len(a) + b + [IGNORE_INDEX] * len(c)
    assert a.count(tok.bos_token_id) == 1  # the template's BOS only, no second one from the tokenizer


def test_bad_record_error_names_line_and_keys(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: record has keys \['answer', 'question'\]"):
        tokenize_records(read_records(path), tok, max_length=32, source=str(path))


def test_non_string_field_and_invalid_json_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'completion' must be a string, got int"):
        tokenize_records(read_records(path), tok, max_length=32, source=str(path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        read_records(broken)
    with pytest.raises(ValueError, match=r"suffix '\.csv' is not supported"):
        (tmp_path / "x.csv").write_text("a,b\n")
        read_records(tmp_path / "x.csv")


def test_txt_file_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nstill first\n\n\nsecond\n\nthird\n", encoding="utf-8")
    records = read_records(path)
    assert [r["text"] for r in records] == ["first line\nstill first", "second", "third"]
    assert [r["_line"] for r in records] == [1, 5, 7]


def test_truncation_warns_once_with_count(tok):
    long = " ".join(["word"] * 200)
    records = [{"prompt": "p", "completion": long}, {"prompt": "p", "completion": "short"}, {"text": long}]
    with pytest.warns(UserWarning, match=r"2 of 3 examples were longer than max_length=16") as record:
        items = tokenize_records(records, tok, max_length=16)
    assert len([w for w in record if "max_length" in str(w.message)]) == 1
    assert [len(ids) for ids, _ in items] == [16, len(encode(tok, records[1])[0]), 16]
    full_ids, full_labels = encode(tok, records[0])
    assert items[0] == (full_ids[:16], full_labels[:16])


def test_examples_without_trained_tokens_are_dropped_and_counted(tok):
    records = [{"prompt": " ".join(["context"] * 50), "completion": " x"}, {"prompt": "q", "completion": " y"}]
    with pytest.warns(UserWarning, match=r"1 had no trained token left and were dropped"):
        items = tokenize_records(records, tok, max_length=8)
    assert items == [encode(tok, records[1])]


def test_pack_keeps_every_token_and_masking(tok):
    records = [{"prompt": f"question {i}", "completion": " answer " * (i % 5 + 1)} for i in range(23)]
    items = [encode(tok, r) for r in records]
    blocks = pack(items, block_size=32)
    total = sum(len(ids) for ids, _ in items)
    assert [len(ids) for ids, _ in blocks[:-1]] == [32] * (len(blocks) - 1)
    assert 0 < len(blocks[-1][0]) <= 32
    assert len(blocks) == -(-total // 32)
    assert [t for ids, _ in blocks for t in ids] == [t for ids, _ in items for t in ids]
    assert [t for _, lab in blocks for t in lab] == [t for _, lab in items for t in lab]


def test_collate_pads_to_longest(tok):
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = CausalLMCollator.for_tokenizer(tok)(items)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_falls_back_to_eos_and_errors_without_either():
    tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
    tok.pad_token = None
    assert CausalLMCollator.for_tokenizer(tok).pad_token_id == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad_token nor an eos_token"):
        CausalLMCollator.for_tokenizer(tok)
