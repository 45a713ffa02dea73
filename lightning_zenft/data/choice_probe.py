"""The embedded multiple-choice probe: Python syntax and standard-library usage questions, four choices each.

The embedded base model was pretrained on Python standard-library source, so what it "knows" is Python: which
bracket closes a call, that a ``for`` header ends with a colon, that Python writes ``None``, ``elif``, ``self``,
``", ".join``, ``except``. Each question is the start of a line of Python code and the choices are continuations,
exactly one of which is the Python way (the others come from other languages or are near misses). A model that
forgets Python while fine-tuning loses these points; chance is 25.

Every question and choice is written by the templates below, with identifiers drawn from the default task's word
list; nothing is taken from any code base. Generation is deterministic for a seed; the right choice's position is
drawn at random. Regenerate the committed file with ``python -m lightning_zenft.data.choice_probe``.

Example:
    >>> records = generate_choice_probe(per_template=1)
    >>> sorted(records[0]), len(records[0]["choices"])
    (['answer', 'choices', 'kind', 'question'], 4)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_zenft.data.default_task import WORDS
from lightning_zenft.data.probes import DEFAULT_CHOICE_PROBE_FILE

_MODULES = ("os", "sys", "re", "collections", "functools", "itertools", "typing", "pathlib", "json", "math")
_CLASSES = ("Reader", "Writer", "Parser", "Handler", "Manager", "Client", "Buffer", "Record", "Loader", "Builder")

Template = Callable[[random.Random], tuple[str, list[str]]]
"""A template returns the question and its choices, the right one first."""


def _w(rng: random.Random, n: int = 1) -> list[str]:
    return rng.sample(WORDS, n)


def _templates() -> dict[str, Template]:
    def close_call(rng: random.Random) -> tuple[str, list[str]]:
        a, f, b = _w(rng, 3)
        return f"{a} = {f}({b}", [")", "]", "}", ">"]

    def close_list(rng: random.Random) -> tuple[str, list[str]]:
        a, b, c = _w(rng, 3)
        return f"{a} = [{b}, {c}", ["]", ")", "}", ">"]

    def close_dict(rng: random.Random) -> tuple[str, list[str]]:
        a, k, b = _w(rng, 3)
        return f'{a} = {{"{k}": {b}', ["}", ")", "]", ">"]

    def def_colon(rng: random.Random) -> tuple[str, list[str]]:
        f, a = _w(rng, 2)
        return f"    def {f}(self, {a})", [":", ";", " {", " =>"]

    def for_colon(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"for {a} in {b}s", [":", ";", " {", " do"]

    def for_in(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"for {a}", [" in", " of", " from", " at"]

    def from_import(rng: random.Random) -> tuple[str, list[str]]:
        return f"from {rng.choice(_MODULES)}", [" import", " include", " require", " using"]

    def try_except(rng: random.Random) -> tuple[str, list[str]]:
        a, f, b = _w(rng, 3)
        return f"try:\n    {a} = {f}({b})\n", ["except", "catch", "rescue", "handle"]

    def is_none(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"if {a} is", [" None", " null", " nil", " NULL"]

    def is_not_none(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"if {a} is not", [" None", " null", " nil", " undefined"]

    def return_true(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"    if {a}:\n        return", [" True", " true", " TRUE", " YES"]

    def elif_kw(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"if {a}:\n    {b} = 1\n", ["elif", "elsif", "elseif", "orif"]

    def self_param(rng: random.Random) -> tuple[str, list[str]]:
        (f,) = _w(rng)
        return f"class {rng.choice(_CLASSES)}:\n    def {f}(", ["self", "this", "me", "that"]

    def dunder_init(rng: random.Random) -> tuple[str, list[str]]:
        return f"class {rng.choice(_CLASSES)}:\n\n    def", [" __init__", " _init_", " init__", " constructor"]

    def super_init(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"    def __init__(self, {a}):\n        super().", ["__init__", "init", "constructor", "_init_"]

    def str_join(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f'{a} = ", ".', [f"join({b}s)", f"implode({b}s)", f"concat({b}s)", f"combine({b}s)"]

    def list_append(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"{a}s = []\n{a}s.", [f"append({b})", f"push({b})", f"pushBack({b})", f"addLast({b})"]

    def length(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"{a} =", [f" len({b})", f" {b}.length", f" {b}.size()", f" length({b})"]

    def lambda_colon(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"{a} = lambda {b}", [":", " =>", " ->", " {"]

    def comment(rng: random.Random) -> tuple[str, list[str]]:
        a, b, c = _w(rng, 3)
        return f"{a} = {b}  ", [f"# {c}", f"// {c}", f"-- {c}", f"% {c}"]

    def and_kw(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"if {a}", [f" and {b}:", f" && {b}:", f" AND {b}:", f" andalso {b}:"]

    def not_kw(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"while {a}", [f" not in {b}s:", f" !in {b}s:", f" notin {b}s:", f" ~in {b}s:"]

    def raise_kw(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"    if {a} is None:\n        ", [
            "raise ValueError",
            "throw ValueError",
            "panic ValueError",
            "die ValueError",
        ]

    def with_as(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"with open({a}_path) as", [" f:", " f;", " f {", " f =>"]

    def docstring(rng: random.Random) -> tuple[str, list[str]]:
        (f,) = _w(rng)
        return f"def {f}(self):\n    ", ['"""Return the', "/** Return the", "/// Return the", "<!-- Return the"]

    def isinstance_check(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return "if", [
            f" isinstance({a}, str):",
            f" instanceof({a}, str):",
            f" {a} instanceof str:",
            f" typeof({a}, str):",
        ]

    def range_loop(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return "for i in", [f" range(len({a}s)):", f" 0..len({a}s):", f" seq(len({a}s)):", f" upto(len({a}s)):"]

    def str_strip(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"{a} = line.", ["strip()", "trim()", "chomp()", "Trim()"]

    def startswith(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"if {a}.", [f'startswith("{b}"):', f'startsWith("{b}"):', f'starts_with("{b}"):', f'beginsWith("{b}"):']

    def main_guard(rng: random.Random) -> tuple[str, list[str]]:
        return "if __name__ ==", [' "__main__":', ' "main":', ' "__init__":', ' "MAIN":']

    def dict_items(rng: random.Random) -> tuple[str, list[str]]:
        k, v, d = _w(rng, 3)
        return f"for {k}, {v} in {d}s.", ["items():", "entries():", "pairs():", "each():"]

    def enumerate_loop(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"for i, {a} in", [f" enumerate({b}s):", f" enum({b}s):", f" indexed({b}s):", f" withIndex({b}s):"]

    def class_pass(rng: random.Random) -> tuple[str, list[str]]:
        (a,) = _w(rng)
        return f"class {a.capitalize()}Error(Exception):\n    ", ["pass", "skip", "nop", "empty"]

    def not_in(rng: random.Random) -> tuple[str, list[str]]:
        a, b = _w(rng, 2)
        return f"if {a} not", [f" in {b}s:", f" of {b}s:", f" within {b}s:", f" inside {b}s:"]

    def staticmethod_kw(rng: random.Random) -> tuple[str, list[str]]:
        return f"class {rng.choice(_CLASSES)}:\n\n    @", ["staticmethod", "static", "Static", "staticfunc"]

    def return_kw(rng: random.Random) -> tuple[str, list[str]]:
        f, a = _w(rng, 2)
        return f"def {f}({a}):\n    ", [f"return {a}", f"returns {a}", f"ret {a}", f"give {a}"]

    return {name: fn for name, fn in locals().items() if callable(fn)}


def generate_choice_probe(per_template: int = 3, seed: int = 0) -> list[dict[str, object]]:
    """``per_template`` questions from each template: ``{"question", "choices", "answer", "kind"}`` records.

    Example:
        >>> r = generate_choice_probe(per_template=1)[0]
        >>> r["kind"], r["question"], r["choices"][r["answer"]]
        ('close_call', 'send = step(buffer', ')')
    """
    if per_template < 1:
        raise ValueError(f"per_template must be at least 1, got {per_template}.")
    rng = random.Random(seed)
    records: list[dict[str, object]] = []
    seen: set[str] = set()
    for kind, template in _templates().items():
        made = 0
        for _ in range(100 * per_template):
            question, choices = template(rng)
            if question in seen:
                continue
            seen.add(question)
            order = list(range(len(choices)))
            rng.shuffle(order)
            records.append(
                {"question": question, "choices": [choices[i] for i in order], "answer": order.index(0), "kind": kind}
            )
            made += 1
            if made == per_template:
                break
    return records


def write_choice_probe(path: str | Path = DEFAULT_CHOICE_PROBE_FILE, per_template: int = 3, seed: int = 0) -> Path:
    """Write the probe as JSONL (atomically: a temporary file, then a rename)."""
    path = Path(path)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_choice_probe(per_template, seed))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the embedded multiple-choice probe.")
    parser.add_argument("--out", default=str(DEFAULT_CHOICE_PROBE_FILE))
    parser.add_argument("--per-template", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_choice_probe(args.out, args.per_template, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
