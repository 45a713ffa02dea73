"""The embedded default task: committed files, answer correctness, determinism."""

from __future__ import annotations

import re

from lightning_zenft.data.default_task import WORDS, generate_default_task, to_jsonl
from lightning_zenft.data.paths import DEFAULT_TASK_FILE, DEFAULT_TASK_VAL_FILE
from lightning_zenft.data.text import read_records


def test_committed_files_equal_generator_output():
    train, val = generate_default_task()
    assert DEFAULT_TASK_FILE.read_text(encoding="utf-8") == to_jsonl(train)
    assert DEFAULT_TASK_VAL_FILE.read_text(encoding="utf-8") == to_jsonl(val)
    assert len(train) == 2000 and len(val) == 200


def test_generation_is_seeded():
    assert generate_default_task(50, 5, seed=3) == generate_default_task(50, 5, seed=3)
    assert generate_default_task(50, 5, seed=3) != generate_default_task(50, 5, seed=4)


def _reference_answer(prompt: str) -> str:
    """An independent solution of each instruction, written with regular expressions."""
    head, payload = re.fullmatch(r"(.+?): (.+)\nAnswer:", prompt).groups()
    if head == "Convert to snake_case":
        return re.sub(r"(?<!^)([A-Z])", r"_\1", payload).lower()
    if head == "Convert to camelCase":
        return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), payload)
    if head == "Join with hyphens":
        return payload.replace(" ", "-")
    if head == "Reverse the words":
        return " ".join(payload.split()[::-1])
    raise AssertionError(f"unknown instruction {head!r}")


def test_answers_are_correct_and_splits_disjoint():
    train, val = read_records(DEFAULT_TASK_FILE), read_records(DEFAULT_TASK_VAL_FILE)
    for record in train + val:
        assert record["completion"] == " " + _reference_answer(record["prompt"])
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
    assert len({r["prompt"] for r in train}) == len(train)
    heads = {r["prompt"].split(":")[0] for r in train}
    assert heads == {"Convert to snake_case", "Convert to camelCase", "Join with hyphens", "Reverse the words"}
    vocabulary = set(WORDS)
    for record in val:
        words = re.split(r"[ _-]", _reference_answer(record["prompt"].replace("camelCase", "snake_case")).strip())
        assert set(words) <= vocabulary
