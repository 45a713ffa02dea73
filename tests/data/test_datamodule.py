"""TextDataModule: default task, file formats, splits, packing and reproducible shuffling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_zenft.data.datamodule import TextDataModule
from lightning_zenft.data.paths import DEFAULT_TASK_FILE, DEFAULT_TASK_VAL_FILE
from lightning_zenft.data.text import IGNORE_INDEX, read_records, record_to_example, tokenize_example


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@pytest.fixture(scope="module")
def default_dm() -> TextDataModule:
    dm = TextDataModule(max_length=64, batch_size=8)
    dm.setup("fit")
    return dm


def test_default_task_is_used_with_its_val_split(default_dm):
    assert len(default_dm.train_dataset) == count_lines(DEFAULT_TASK_FILE)
    assert len(default_dm.val_dataset) == count_lines(DEFAULT_TASK_VAL_FILE)
    tok = default_dm.tokenizer
    first = read_records(DEFAULT_TASK_FILE)[0]
    expected = tokenize_example(record_to_example(first, tok), tok)
    assert (default_dm.train_dataset[0]["input_ids"], default_dm.train_dataset[0]["labels"]) == expected


def test_batches_pad_and_mask(default_dm):
    batch = next(iter(default_dm.val_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 8
    lengths = [len(default_dm.val_dataset[i]["input_ids"]) for i in range(8)]
    assert mask.sum(1).tolist() == lengths
    assert ids.shape[1] == max(lengths)
    pad = default_dm.tokenizer.pad_token_id
    assert (ids[mask == 0] == pad).all() and (labels[mask == 0] == IGNORE_INDEX).all()
    # Trained positions are exactly the completion tokens: they end with EOS on each row.
    eos = default_dm.tokenizer.eos_token_id
    last = torch.tensor(lengths) - 1
    assert (labels[torch.arange(8), last] == eos).all()


def test_shuffling_is_reproducible(default_dm):
    a = next(iter(default_dm.train_dataloader()))["input_ids"]
    b = next(iter(default_dm.train_dataloader()))["input_ids"]
    other = TextDataModule(max_length=64, batch_size=8, seed=1)
    c = next(iter(other.train_dataloader()))["input_ids"]
    assert torch.equal(a, b)
    assert not (a.shape == c.shape and torch.equal(a, c))


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(40)])

    def split(seed):
        dm = TextDataModule(train_file=path, val_fraction=0.25, seed=seed)
        train, val = dm.split_records(read_records(path))
        return [r["prompt"] for r in train], [r["prompt"] for r in val]

    train0, val0 = split(0)
    assert (train0, val0) == split(0)
    assert len(val0) == 10 and len(train0) == 30
    assert set(train0).isdisjoint(val0) and set(train0) | set(val0) == {f"q{i}" for i in range(40)}
    assert set(val0) != set(split(1)[1])
    dm = TextDataModule(train_file=path, val_fraction=0.25, seed=0)
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10


def test_no_validation_source_gives_empty_val_loader(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(5)])
    dm = TextDataModule(train_file=path)
    dm.setup("fit")
    assert dm.val_dataset is None and dm.val_dataloader() == []
    with pytest.raises(ValueError, match="no test_file"):
        dm.test_dataloader()
    dm_test = TextDataModule(train_file=path, test_file=path)
    dm_test.setup("test")
    assert len(dm_test.test_dataset) == 5


def test_packing_blocks(tmp_path):
    records = [{"prompt": f"question number {i}", "completion": " yes" * (i % 7 + 1)} for i in range(60)]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    plain = TextDataModule(train_file=path, max_length=32)
    packed = TextDataModule(train_file=path, max_length=32, packing=True)
    plain.setup("fit")
    packed.setup("fit")
    plain_items = [plain.train_dataset[i] for i in range(len(plain.train_dataset))]
    blocks = [packed.train_dataset[i] for i in range(len(packed.train_dataset))]
    total = sum(len(x["input_ids"]) for x in plain_items)
    assert all(len(b["input_ids"]) == 32 for b in blocks[:-1]) and len(blocks) == -(-total // 32)
    # Same tokens and same trained labels, only reordered into blocks.
    assert sorted(t for b in blocks for t in b["input_ids"]) == sorted(t for x in plain_items for t in x["input_ids"])
    trained = sorted(t for b in blocks for t in b["labels"] if t != IGNORE_INDEX)
    assert trained == sorted(t for x in plain_items for t in x["labels"] if t != IGNORE_INDEX)
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape[1] == 32


def test_constructor_errors_name_the_value():
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        TextDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="got both val_file='v.jsonl' and val_fraction=0.1"):
        TextDataModule(val_file="v.jsonl", val_fraction=0.1)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        TextDataModule(batch_size=0)


def _fit_one_step(data: TextDataModule, tmp_path: Path, **trainer_kwargs) -> None:
    import lightning as L

    from lightning_zenft import CausalLMModule

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        **trainer_kwargs)  # fmt: skip
    trainer.fit(CausalLMModule(), datamodule=data)


def test_val_check_interval_without_validation_data_is_said_at_start(tmp_path, recwarn):
    path = write_jsonl(tmp_path / "t.jsonl", read_records(DEFAULT_TASK_FILE)[:8])
    with pytest.warns(UserWarning, match=r"no validation data .* \(val_check_interval=1\) runs nothing"):
        _fit_one_step(TextDataModule(train_file=path, max_length=32), tmp_path, val_check_interval=1)
    recwarn.clear()
    _fit_one_step(TextDataModule(train_file=path, max_length=32, val_fraction=0.25), tmp_path, val_check_interval=1)
    assert not [w for w in recwarn if "no validation data" in str(w.message)]


def test_validate_without_validation_data_is_an_error(tmp_path):
    import lightning as L

    from lightning_zenft import CausalLMModule

    path = write_jsonl(tmp_path / "t.jsonl", read_records(DEFAULT_TASK_FILE)[:8])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"no validation data .* to run trainer.validate"):
        trainer.validate(CausalLMModule(), datamodule=TextDataModule(train_file=path))


@pytest.mark.parametrize("missing", ["/no/such/dir", "./no/such/dir", "~/no-such-model-dir", "a/b/c"])
def test_a_missing_model_or_tokenizer_directory_is_named(missing):
    from lightning_zenft import CausalLMModule

    with pytest.raises(FileNotFoundError, match=rf"model='{missing}': the directory does not exist\..*'org/name'"):
        CausalLMModule(model=missing)
    with pytest.raises(FileNotFoundError, match=rf"tokenizer='{missing}': the directory does not exist"):
        _ = TextDataModule(tokenizer=missing).tokenizer
