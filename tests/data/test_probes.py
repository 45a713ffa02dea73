"""Probe sets: building them from loaders and JSONL, sharding, and scoring against unpadded per-example references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader
from zenft_testing import tiny_model

from lightning_zenft.callbacks._probe_eval import evaluate_probe
from lightning_zenft.data.choice_probe import generate_choice_probe
from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
from lightning_zenft.data.probes import (
    DEFAULT_CHOICE_PROBE_FILE,
    ChoiceItem,
    ChoiceProbe,
    LMProbe,
    choice_probe_from_records,
    default_probes,
    general_probe,
    lm_probe_from_texts,
    load_probe,
    read_jsonl,
    shard_indices,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("n", "world"), [(7, 2), (5, 3), (2, 4), (6, 1)])
def test_shards_cover_every_example_once_with_equal_lengths(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal forward passes on every rank
    real = sorted(i for s in shards for i in s if i >= 0)
    assert real == list(range(n))


def test_lm_probe_batches_pad_and_mark_placeholders():
    probe = LMProbe.from_rows([torch.arange(1, 5), torch.arange(1, 3), torch.arange(1, 4)], batch_size=2)
    assert probe.target_tokens == 3 + 1 + 2
    ((batch, valid),) = list(probe.batches(rank=1, world_size=2))  # rank 1 of 2: row 1 and a placeholder
    assert valid.tolist() == [True, False]
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 2, -100, -100], [1, 2, 3, 4]]


def test_lm_probe_from_loader_keeps_masks_and_labels():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 6, 7, -100], [-100, 9, -100, -100]])
    loader = [
        {"input_ids": ids, "attention_mask": mask, "labels": labels},
        {"input_ids": ids[:1], "attention_mask": mask[:1]},
    ]
    probe = load_probe(loader)
    assert isinstance(probe, LMProbe) and probe.batch_size == 2
    assert [r.tolist() for r in probe.input_ids] == [[5, 6, 7], [8, 9], [5, 6, 7]]
    assert [r.tolist() for r in probe.labels] == [[-100, 6, 7], [-100, 9], [5, 6, 7]]  # labels default to the ids
    tuples = load_probe(DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2))
    assert [r.tolist() for r in tuples.labels] == ids.tolist()


def test_lm_probe_scores_equal_per_row_reference():
    """Padded, batched scoring equals running each row alone (loss, perplexity, accuracy)."""
    model = tiny_model("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 128, (n,), generator=g) for n in (9, 4, 12, 7, 2)]
    probe = LMProbe.from_rows(rows, batch_size=2)
    got = evaluate_probe(probe, lambda b: model(**b).logits, CPU)
    nll, right, n = 0.0, 0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=row[None]).logits[0, :-1].double()  # (T-1, V)
            target = row[1:]
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            right += int((logits.argmax(-1) == target).sum())
            n += target.numel()
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["accuracy"] == pytest.approx(100.0 * right / n, abs=1e-9)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_choice_probe_scores_equal_per_choice_reference(normalize):
    """Each choice's log-likelihood, computed alone without padding, decides the same answers."""
    model = tiny_model("llama", seed=2)
    g = torch.Generator().manual_seed(1)
    items = []
    for q in range(7):
        context = torch.randint(0, 128, (3 + q % 3,), generator=g).tolist()
        choices = [torch.randint(0, 128, (1 + (q + c) % 3,), generator=g).tolist() for c in range(2 + q % 3)]
        items.append(ChoiceItem(context, choices, answer=q % len(choices)))
    probe = ChoiceProbe(items, batch_size=3, normalize=normalize)
    got = evaluate_probe(probe, lambda b: model(**b).logits, CPU)
    right, nll, n = 0, 0.0, 0
    with torch.no_grad():
        for item in items:
            scores = []
            for c, choice in enumerate(item.choices):
                ids = torch.tensor(item.context + choice)
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)  # (T, V)
                token_logp = [logp[len(item.context) + k - 1, tok].item() for k, tok in enumerate(choice)]
                scores.append(sum(token_logp) / (len(choice) if normalize == "mean" else 1))
                if c == item.answer:
                    nll -= sum(token_logp)
                    n += len(choice)
            right += max(range(len(scores)), key=lambda k: (scores[k], -k)) == item.answer
    assert got["accuracy"] == pytest.approx(100.0 * right / len(items), abs=1e-9)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_choice_probe_from_jsonl_and_loader(tmp_path, tokenizer):
    records = [
        {"question": "x = [1, 2", "choices": ["]", ")"], "answer": 0},
        {"question": "def f(a)", "choices": [":", ";", " {"], "answer": ":"},  # the answer as a choice's text
    ]
    probe = load_probe(_write_jsonl(tmp_path / "mc.jsonl", records), tokenizer=tokenizer, batch_size=4)
    assert isinstance(probe, ChoiceProbe) and [it.answer for it in probe.items] == [0, 0]
    assert probe.items[1].context == tokenizer("def f(a)")["input_ids"]
    assert probe.items[1].choices[2] == tokenizer(" {", add_special_tokens=False)["input_ids"]
    batch, valid = next(probe.batches())
    assert batch["question"].tolist() == [0, 0, 1, 1, 1] and batch["choice"].tolist() == [0, 1, 0, 1, 2]
    lengths = [len(probe.items[q].context) for q in batch["question"].tolist()]
    for row, start in enumerate(lengths):  # labels hold exactly the choice's tokens
        q, c = batch["question"][row].item(), batch["choice"][row].item()
        assert [t for t in batch["labels"][row].tolist() if t != -100] == probe.items[q].choices[c]
        assert (batch["labels"][row, :start] == -100).all()
    from_loader = load_probe([[dict(r) for r in records]], tokenizer=tokenizer)  # a loader with collate_fn=list
    assert [it.choices for it in from_loader.items] == [it.choices for it in probe.items]
    collated = {"question": ["x = [1, 2"], "choices": [["]"], [")"]], "answer": torch.tensor([0])}  # default_collate
    assert load_probe([collated], tokenizer=tokenizer).items[0].choices == probe.items[0].choices


def test_text_jsonl_makes_rows_of_max_length(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "text.jsonl", [{"text": "def main():\n    return 0\n" * 4}, {"text": "import os"}])
    probe = load_probe(path, tokenizer=tokenizer, max_length=8)
    first = tokenizer("def main():\n    return 0\n" * 4)["input_ids"]
    expected = [first[i : i + 8] for i in range(0, len(first), 8)] + [tokenizer("import os")["input_ids"]]
    assert [r.tolist() for r in probe.input_ids] == [e for e in expected if len(e) >= 2]


@pytest.mark.slow
def test_embedded_choice_probe_is_what_the_generator_writes_and_the_base_model_knows_it(tokenizer):
    assert read_jsonl(DEFAULT_CHOICE_PROBE_FILE) == generate_choice_probe()
    probes = default_probes(tokenizer)
    assert set(probes) == {"general", "python_choice"}
    assert len(probes["python_choice"]) == len(generate_choice_probe()) and probes["python_choice"].num_choices == 4
    assert len(probes["general"]) == 32 and {r.numel() for r in probes["general"].input_ids} == {128}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(DEFAULT_BASE_MODEL_DIR).eval()
    with torch.no_grad():
        score = evaluate_probe(probes["python_choice"], lambda b: base(**b).logits, CPU)
    assert score["accuracy"] > 50.0  # chance is 25: the questions measure something the base model has


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([{"question": "q", "choices": ["a", "b"]}], r"missing \['answer'\]"),
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], "not an index into 2 choices"),
        ([{"question": "q", "choices": ["a", "b"], "answer": "c"}], "must be a choice index or one of the choices"),
        ([{"question": "q", "choices": "ab", "answer": 0}], "must be a list of strings"),
        ([{"question": "q", "choices": ["a"], "answer": 0}], "at least 2"),
        ([{"question": "q", "choices": ["a", ""], "answer": 0}], "encodes to no tokens"),
        ([{"text": "a"}, {"question": "q", "choices": ["a", "b"], "answer": 0}], "all be multiple-choice"),
    ],
)
def test_bad_probe_files_name_the_problem(tmp_path, tokenizer, records, match):
    with pytest.raises(ValueError, match=match):
        load_probe(_write_jsonl(tmp_path / "bad.jsonl", records), tokenizer=tokenizer)


def test_probe_source_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_probe(tmp_path / "missing.jsonl", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not a .jsonl file"):
        load_probe(tmp_path / "probe.csv", tokenizer=tokenizer)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        load_probe(tmp_path / "broken.jsonl", tokenizer=tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_probe(tmp_path / "empty.jsonl", tokenizer=tokenizer)
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    with pytest.raises(ValueError, match=r"tokenizer=\.\.\."):
        load_probe(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match=r"tokenizer=\.\.\."):
        load_probe([[{"question": "q", "choices": ["a", "b"], "answer": 0}]])
    with pytest.raises(TypeError, match="cannot build a probe from a int"):
        load_probe(3)
    with pytest.raises(TypeError, match="dict with 'input_ids'"):
        load_probe([{"ids": torch.zeros(1, 3)}])
    with pytest.raises(ValueError, match="yielded no batch"):
        load_probe([])
    with pytest.raises(ValueError, match="mixes"):
        load_probe([torch.zeros(1, 3, dtype=torch.long), [{"question": "q", "choices": ["a", "b"], "answer": 0}]])
    with pytest.raises(ValueError, match="scores no token"):
        LMProbe.from_rows([torch.tensor([3])])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        LMProbe.from_rows([torch.arange(3)], batch_size=0)
    with pytest.raises(ValueError, match="normalize='max'"):
        ChoiceProbe([ChoiceItem([1], [[2], [3]], 0)], normalize="max")  # type: ignore[arg-type]


def test_probe_object_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="2 rows of input_ids but 1 of labels"):
        LMProbe([torch.arange(3), torch.arange(3)], [torch.arange(3)])
    with pytest.raises(ValueError, match="must be 1-D"):
        LMProbe([torch.zeros(2, 3, dtype=torch.long)], [torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="has no rows"):
        LMProbe([], [])
    with pytest.raises(ValueError, match=r"answer 2 is not a choice index in \[0, 2\)"):
        ChoiceProbe([ChoiceItem([1], [[2], [3]], 2)])
    with pytest.raises(ValueError, match="empty context"):
        ChoiceProbe([ChoiceItem([], [[2], [3]], 0)])
    with pytest.raises(ValueError, match="no questions"):
        ChoiceProbe([])
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        shard_indices(4, 2, 2)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="list.jsonl:1 holds a list, not a JSON object"):
        read_jsonl(tmp_path / "list.jsonl")
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        lm_probe_from_texts(["abc"], tokenizer, max_length=1)
    with pytest.raises(ValueError, match="longer than max_length=2"):
        choice_probe_from_records(
            [{"question": "q", "choices": [" a b c d", " e"], "answer": 0}], tokenizer, max_length=2
        )
    with pytest.raises(ValueError, match="rows=10 must be a multiple of batch_size=8"):
        general_probe(tokenizer, rows=10)
    from lightning_zenft.data.choice_probe import generate_choice_probe as generate

    with pytest.raises(ValueError, match="per_template must be at least 1"):
        generate(per_template=0)


def test_long_questions_keep_their_last_tokens(tokenizer):
    question = "x = " + " + ".join(["value"] * 40)
    probe = choice_probe_from_records(
        [{"question": question, "choices": [" a", " bb"], "answer": 0}], tokenizer, max_length=16
    )
    longest = max(len(c) for c in probe.items[0].choices)
    assert probe.items[0].context == tokenizer(question)["input_ids"][-(16 - longest) :]
