"""Replay: the share of general examples over an epoch, what training_step sees, reservoir streams, resume, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from prevention_testing import markov_rows, mean_loss, pretrained_model, to_batches
from torch.utils.data import DataLoader
from zenft_testing import make_trainer

from lightning_zenft import Replay
from lightning_zenft.data.replay import ReplayMixer, merge_batches
from lightning_zenft.data.text import CausalLMCollator

PAD = 0


def examples(n: int, narrow: bool, seed: int, lengths: tuple[int, ...] = (6, 9, 12)) -> list[dict[str, list[int]]]:
    rows = markov_rows(n, max(lengths), seed=seed, narrow=narrow)
    out = []
    for i, row in enumerate(rows):
        ids = row[: lengths[i % len(lengths)]].tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


class Stream:
    """A re-iterable stream without len(): the general examples in a fixed order."""

    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


class MixLM(L.LightningModule):
    """Trains on variable-length task examples padded by CausalLMCollator; records what training_step receives."""

    def __init__(self, task: list[dict[str, list[int]]], batch_size: int = 4) -> None:
        super().__init__()
        self.model = pretrained_model()
        self.task = task
        self.batch_size = batch_size
        self.losses: list[float] = []
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append({k: v.clone() for k, v in batch.items()})
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.task, batch_size=self.batch_size, collate_fn=CausalLMCollator(PAD))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_share_of_general_examples_over_an_epoch(tmp_path, ratio):
    task, general = examples(37, True, seed=1), examples(50, False, seed=2)  # 10 batches, the last one of 1
    module = MixLM(task)
    replay = Replay(general, ratio=ratio)
    make_trainer(tmp_path, [replay], max_epochs=1, max_steps=-1).fit(module)
    rows = sum(b["input_ids"].shape[0] for b in module.seen)
    general_rows = rows - len(task)
    assert general_rows == int(ratio / (1 - ratio) * len(task))  # the running count, floor
    assert abs(general_rows / rows - ratio) <= 1 / rows
    # every appended row is a general example, right-padded as the collator pads, after the task rows
    used = {tuple(e["input_ids"]) for e in general}
    for step, batch in enumerate(module.seen):
        n_task = min(4, len(task) - 4 * step)
        for i in range(n_task, batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            assert tuple(batch["input_ids"][i, :n].tolist()) in used
            assert (batch["input_ids"][i, n:] == PAD).all() and (batch["labels"][i, n:] == -100).all()


def test_replay_lowers_the_general_loss_rise(tmp_path):
    task, general = examples(48, True, seed=1, lengths=(16,)), examples(64, False, seed=2, lengths=(16,))
    probe = to_batches(markov_rows(16, 16, seed=7, narrow=False), 4)
    before = mean_loss(pretrained_model(), probe)
    rises = {}
    for label, callbacks in [("none", []), ("replay", [Replay(general, ratio=0.5)])]:
        module = MixLM(task)
        make_trainer(tmp_path, callbacks, max_steps=12).fit(module)
        rises[label] = mean_loss(module.model, probe) - before
    assert rises["none"] > 1.0
    assert rises["replay"] < 0.5 * rises["none"], rises


@pytest.mark.parametrize("stream", [False, True], ids=["dataset", "reservoir"])
def test_resume_gives_the_uninterrupted_losses(tmp_path, stream):
    task = examples(16, True, seed=1)
    general_items = examples(30, False, seed=2)

    def callbacks():
        data = Stream(general_items) if stream else general_items
        return [Replay(data, ratio=0.3, buffer_size=8 if stream else None)]

    straight = MixLM(task)
    make_trainer(tmp_path / "a", callbacks(), max_steps=8).fit(straight)
    first = MixLM(task)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(tmp_path / "b", [*callbacks(), saver], max_steps=4, enable_checkpointing=True).fit(first)
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = MixLM(task)
    again = callbacks()
    make_trainer(tmp_path / "c", again, max_steps=8).fit(resumed, ckpt_path=ckpt)
    assert first.losses + resumed.losses == straight.losses
    for a, b in zip(first.seen + resumed.seen, straight.seen, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    items = [{"input_ids": [i], "labels": [i]} for i in range(100)]
    counts = torch.zeros(100)
    for seed in range(300):
        mixer = ReplayMixer(Stream(items), ratio=0.5, buffer_size=10, seed=seed)
        drawn = mixer.draw(100)  # reads the whole stream once
        assert all(item in items[: i + 1] for i, item in enumerate(drawn))  # only what was read so far
        for item in mixer.buffer:
            counts[item["input_ids"][0]] += 1
    assert counts.sum() == 3000
    # each item ends in the reservoir with probability 10/100: the first and last halves of the stream alike
    first, last = counts[:50].sum().item(), counts[50:].sum().item()
    assert abs(first - last) < 0.1 * 3000


def test_merge_pads_each_key_with_its_own_value():
    collate = CausalLMCollator(5)
    a = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    b = collate([{"input_ids": [4], "labels": [4]}])
    merged = merge_batches(b, a, pad_token_id=5)
    assert merged["input_ids"].tolist() == [[4, 5, 5], [1, 2, 3]]
    assert merged["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert merged["labels"].tolist() == [[4, -100, -100], [1, 2, 3]]
    left = merge_batches(b, a, pad_token_id=5, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 5, 4], [1, 2, 3]]


def test_errors(tmp_path):
    general = examples(4, False, seed=2)
    for ratio in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=f"ratio={ratio}"):
            Replay(general, ratio=ratio)
    with pytest.raises(ValueError, match="buffer_size="):
        Replay(Stream(general), ratio=0.1)
    with pytest.raises(ValueError, match="buffer_size=0"):
        Replay(Stream(general), ratio=0.1, buffer_size=0)
    with pytest.raises(ValueError, match="data is empty"):
        Replay([], ratio=0.1)
    with pytest.raises(ValueError, match="padding_side='middle'"):
        Replay(general, ratio=0.1, padding_side="middle")
    with pytest.raises(ValueError, match="pass pad_token_id="):
        merge_batches(
            {"input_ids": torch.ones(1, 2, dtype=torch.long)}, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, None
        )
    with pytest.raises(ValueError, match="keys"):
        merge_batches({"input_ids": torch.ones(1, 2)}, {"x": torch.ones(1, 2)}, 0)
    with pytest.raises(ValueError, match="yielded no example"):
        ReplayMixer(Stream([]), ratio=0.5, buffer_size=2).draw(1)

    class TupleLM(MixLM):
        def train_dataloader(self):
            ids = torch.ones(8, 4, dtype=torch.long)
            pairs = [(row, row) for row in ids]
            return DataLoader(pairs, batch_size=4, collate_fn=lambda rows: (torch.stack([a for a, _ in rows]),))

    with pytest.raises(TypeError, match="cannot change a tuple"):
        make_trainer(tmp_path, [Replay(general, ratio=0.5)], max_steps=1).fit(TupleLM([]))
    mixer = ReplayMixer(general, ratio=0.2)
    with pytest.raises(ValueError, match="ratio=0.2, this callback has ratio=0.3"):
        ReplayMixer(general, ratio=0.3).load_state_dict(mixer.state_dict())


def test_general_examples_come_from_the_train_split():
    from transformers import AutoTokenizer

    from lightning_zenft.data import DEFAULT_BASE_MODEL_DIR, general_text
    from lightning_zenft.data.replay import general_examples

    tok = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
    items = general_examples(tok, n=3, seq_len=16, max_chars=20_000)
    assert [len(i["input_ids"]) for i in items] == [16, 16, 16] and all(i["labels"] == i["input_ids"] for i in items)
    train = "".join(general_text("train", max_chars=20_000))
    words = tok.decode(items[1]["input_ids"][2:-2]).split()
    assert words and all(w in train for w in words)
    with pytest.raises(ValueError, match="fewer than n \\* seq_len"):
        general_examples(tok, n=1000, seq_len=512, max_chars=1_000)
    with pytest.raises(ValueError, match="seq_len=1"):
        general_examples(tok, n=1, seq_len=1)
