"""``Replay``: general examples mixed into every training batch, with the user's datamodule and step unchanged.

How it enters the data path: at ``on_train_batch_start`` (after Lightning has fetched the batch, moved it to the
device and before ``training_step`` sees it) the callback appends the general examples this batch is owed to the
batch **in place** (a dict gets new tensors under its keys, a list new items), so the same object reaches
``training_step``. Doing it there rather than by wrapping the dataloader keeps Lightning's own dataloader handling
(distributed samplers, workers, prefetching) untouched, and mixes exactly the batches that are trained: the position
in the general data saved in a checkpoint is the position after the last trained batch, so ``ckpt_path=`` resumes
the same sequence of general examples.

What ``ratio`` means: the share of **examples** (rows) that are general, counted over the whole run (see
:class:`~lightning_zenft.data.replay.ReplayMixer`); the loss weight of general text is then its share of target
tokens. The batch grows by the general rows (about ``ratio / (1 - ratio)`` times its size), so the task data and the
number of steps are unchanged. Under DDP/FSDP each rank draws its own general examples (seeded by rank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_zenft.data.replay import ReplayMixer, batch_size


class Replay(Callback):
    """Mix general examples into training so that about ``ratio`` of all examples are general.

    Args:
        data: general examples: a map-style dataset whose items the train loader's ``collate_fn`` accepts (e.g. a
            ``TextDataModule``'s ``train_dataset``), or a stream (any iterable) with ``buffer_size``.
        ratio: share of examples that are general, in ``(0, 1)``; ``0.1`` adds one general example per nine task ones.
        buffer_size: for a stream: the reservoir's size.
        collate_fn: builds a batch from general examples; default: the train dataloader's ``collate_fn``.
        pad_token_id: pad value of ``input_ids`` when task and general batches differ in length; default: the
            collate function's ``pad_token_id`` (as ``CausalLMCollator`` has).
        padding_side: ``"right"`` (the default collator's) or ``"left"``.
        seed: seed of the order of general examples (offset by the rank under DDP/FSDP).
        name: metric prefix and state key (``"replay"``).

    Example::

        general = TextDataModule(train_file="general.jsonl", tokenizer=tok_dir)
        general.setup("fit")
        trainer = L.Trainer(callbacks=[Replay(general.train_dataset, ratio=0.1)])
        trainer.fit(module, datamodule=task_data)
    """

    def __init__(
        self,
        data: Any,
        ratio: float = 0.1,
        buffer_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pad_token_id: int | None = None,
        padding_side: str = "right",
        seed: int = 0,
        name: str = "replay",
    ) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"Replay: ratio={ratio} must be in (0, 1): the share of examples that are general.")
        self.mixer = ReplayMixer(data, ratio, collate_fn, pad_token_id, buffer_size, seed, padding_side)
        self.ratio = ratio
        self.seed = seed
        self.name = name
        self.general_rows = 0  # general rows appended to the current batch (the last ones)
        self._collate_given = collate_fn is not None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.mixer.task_seen == 0 and trainer.global_rank > 0:  # a fresh run: each rank its own general examples
            self.mixer.seed = self.seed + 7919 * trainer.global_rank
            self.mixer._generator.manual_seed(self.mixer.seed)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if not self._collate_given and isinstance(loader, DataLoader) and loader.collate_fn is not None:
            self.mixer.collate_fn = loader.collate_fn
        if self.mixer.pad_token_id is None:
            self.mixer.pad_token_id = getattr(self.mixer.collate_fn, "pad_token_id", None)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict | list):
            raise TypeError(
                f"Replay changes the batch in place and cannot change a {type(batch).__name__}; return dicts (or "
                "lists) from the train dataloader's collate_fn."
            )
        rows = batch_size(batch)
        mixed = self.mixer.mix(batch)
        self.general_rows = batch_size(mixed) - rows
        if mixed is batch:
            return
        if isinstance(batch, dict):
            batch.update(mixed)
        else:
            batch[:] = list(mixed)
        seen = self.mixer.task_seen + self.mixer.general_given
        pl_module.log(f"{self.name}/general_share", self.mixer.general_given / seen, on_step=True, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.mixer.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mixer.load_state_dict(state_dict)


__all__ = ["Replay"]
