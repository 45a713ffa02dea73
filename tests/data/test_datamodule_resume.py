"""TextDataModule resumes exactly: the losses of N straight steps equal those of k steps + ``ckpt_path=`` + N - k.

The run is the issue's: 32 records, batch 8 (4 batches an epoch), 12 steps, LoRA with dropout (the callback restores
the global torch RNG, which the adapter dropout draws from).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from lightning_zenft import CausalLMModule, LoRA, TextDataModule
from lightning_zenft.data.paths import DEFAULT_TASK_FILE
from lightning_zenft.data.resumable import ResumableDataLoader, ResumableSampler
from lightning_zenft.data.text import read_records

TOTAL_STEPS = 12


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batches: list[torch.Tensor] = []

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))
        self.batches.append(batch["input_ids"].clone())


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("resume") / "train.jsonl"
    records = read_records(DEFAULT_TASK_FILE)[:32]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def fit(
    train_file: str,
    max_steps: int,
    root: Path,
    ckpt_path: str | None = None,
    num_workers: int = 0,
    every_n_train_steps: int | None = None,
) -> tuple[RecordLoss, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = CausalLMModule(learning_rate=3e-3)
    data = TextDataModule(train_file=train_file, max_length=48, batch_size=8, num_workers=num_workers)
    record = RecordLoss()
    callbacks: list[Callback] = [LoRA(r=4, alpha=8, dropout=0.2, target_modules="all-linear"), record]
    if every_n_train_steps:  # checkpoints written during the run, at on_train_batch_end, as a crash would leave them
        callbacks.append(ModelCheckpoint(root, "{step}", every_n_train_steps=every_n_train_steps, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=bool(every_n_train_steps),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return record, trainer


@pytest.fixture(scope="module")
def straight(train_file: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordLoss, Path]:
    """12 uninterrupted steps, writing a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("straight")
    record, _ = fit(train_file, TOTAL_STEPS, root, every_n_train_steps=2)
    return record, root


def check_continuation(straight: RecordLoss, first: int, after: RecordLoss) -> None:
    assert len(after.losses) == TOTAL_STEPS - first
    for got, expected in zip(after.batches, straight.batches[first:], strict=True):
        assert torch.equal(got, expected)
    assert after.losses == straight.losses[first:]


@pytest.mark.slow
@pytest.mark.parametrize("first", [4, 6], ids=["epoch-boundary", "mid-epoch"])
def test_resume_from_a_checkpoint_written_during_the_run(train_file, straight, tmp_path, first):
    record, root = straight
    after, _ = fit(train_file, TOTAL_STEPS, tmp_path, ckpt_path=str(root / f"step={first}.ckpt"))
    check_continuation(record, first, after)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "num_workers"), [(4, 0), (6, 1)], ids=["epoch-boundary", "mid-epoch-worker"])
def test_resume_after_a_run_stopped_by_max_steps(train_file, straight, tmp_path, first, num_workers):
    """The issue's flow: fit(max_steps=k), ``trainer.save_checkpoint``, fit(max_steps=12, ckpt_path=...)."""
    before, trainer = fit(train_file, first, tmp_path, num_workers=num_workers)
    assert before.losses == straight[0].losses[:first]
    ckpt = str(tmp_path / "part.ckpt")
    trainer.save_checkpoint(ckpt)
    after, _ = fit(train_file, TOTAL_STEPS, tmp_path, ckpt_path=ckpt, num_workers=num_workers)
    check_continuation(straight[0], first, after)


def test_each_pass_is_the_next_epoch_of_the_documented_order(train_file):
    data = TextDataModule(train_file=train_file, max_length=48, batch_size=8)
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, ResumableSampler)
    dataset = data.train_dataset
    orders = []
    for epoch in range(3):
        # the documented rule: epoch e is randperm(n) under a generator seeded seed + e (seed 0 here)
        order = torch.randperm(32, generator=torch.Generator().manual_seed(0 + epoch)).tolist()
        expected = [loader.collate_fn([dataset[i] for i in order[k : k + 8]]) for k in range(0, 32, 8)]
        got = list(loader)  # one pass, one epoch
        assert all(torch.equal(g["input_ids"], e["input_ids"]) for g, e in zip(got, expected, strict=True))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_load_state_dict_refuses_other_data_settings(train_file):
    state = TextDataModule(train_file=train_file, max_length=48, batch_size=8).train_dataloader().state_dict()
    other = TextDataModule(train_file=train_file, max_length=48, batch_size=4).train_dataloader()
    with pytest.raises(ValueError, match=r"differs from the checkpoint's .*'batch_size': \(8, 4\)"):
        other.load_state_dict(state)
    reseeded = TextDataModule(train_file=train_file, max_length=48, batch_size=8, seed=3).train_dataloader()
    with pytest.raises(ValueError, match=r"'seed': \(0, 3\)"):
        reseeded.load_state_dict(state)


def test_finished_epoch_resumes_at_the_next_one(train_file):
    data = TextDataModule(train_file=train_file, max_length=48, batch_size=8)
    reference = data.train_dataloader()
    passes = [[b["input_ids"] for b in reference] for _ in range(4)]  # epochs 0..3, 4 batches each
    loader = data.train_dataloader()
    loader.load_state_dict({**loader.state_dict(), "epoch": 2, "batches": 4})  # all 4 batches of epoch 2 done
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(passes[3], loader, strict=True))
    loader.load_state_dict({**loader.state_dict(), "epoch": 2, "batches": 3})
    assert [torch.equal(passes[2][3], b["input_ids"]) for b in loader] == [True]
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batches"] == 4
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(passes[3], loader, strict=True))  # then epoch 3


def test_sampler_shards_by_rank_like_distributed_sampler():
    data = list(range(10))
    shards = [list(ResumableSampler(data, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    reference = [list(torch.utils.data.DistributedSampler(data, 3, r, seed=5)) for r in range(3)]
    assert shards == reference
    with pytest.raises(ValueError, match="start index 9 is outside"):
        ResumableSampler(data, num_replicas=3).start_at(0, 9)


def test_the_position_rank_0_saves_continues_every_rank():
    """Under DDP the checkpoint holds rank 0's loader state; each rank's loader resumes its own share from it."""
    data = list(range(37))  # not a multiple of 2 ranks x batch 4: DistributedSampler pads each share to 19

    def loader(rank: int) -> ResumableDataLoader:
        sampler = ResumableSampler(data, seed=7, num_replicas=2, rank=rank)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler)

    for rank in (0, 1):
        straight = loader(rank)
        batches = [b.tolist() for _ in range(2) for b in straight]  # two epochs of 5 batches
        first = loader(rank)
        it = iter(first)
        done = [next(it).tolist() for _ in range(3)]
        saved = loader(0)  # rank 0 handed out as many batches: its state is the checkpoint's
        it0 = iter(saved)
        for _ in range(3):
            next(it0)
        resumed = loader(rank)
        resumed.load_state_dict(saved.state_dict())
        rest = [b.tolist() for _ in range(2) for b in resumed][: len(batches) - 3]
        assert done + rest == batches


def test_a_loader_whose_sampler_was_replaced_runs_plainly_and_refuses_a_position():
    """What the Trainer's overfit_batches does: the loader rebuilt with a SequentialSampler."""
    data = list(range(6))
    loader = ResumableDataLoader(data, batch_size=4, sampler=torch.utils.data.SequentialSampler(data))
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5]]
    assert loader.state_dict() == {}
    loader.load_state_dict({})  # a checkpoint of such a run holds no position: it starts the epoch over
    position = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data)).state_dict()
    with pytest.raises(TypeError, match="sampler is a SequentialSampler, not a ResumableSampler"):
        loader.load_state_dict(position)
