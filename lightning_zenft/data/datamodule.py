"""``TextDataModule``: JSONL / text files to padded causal-LM batches.

The file formats, prompt templates and masking rules are described in :mod:`lightning_zenft.data.text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_zenft.data.paths import (
    DEFAULT_BASE_MODEL_DIR,
    DEFAULT_TASK_FILE,
    DEFAULT_TASK_VAL_FILE,
    check_pretrained_source,
)
from lightning_zenft.data.resumable import ResumableDataLoader, ResumableSampler
from lightning_zenft.data.text import CausalLMCollator, TokenizedDataset, pack, read_records, tokenize_records


class TextDataModule(L.LightningDataModule):
    """Tokenized prompt/completion data for causal-LM fine-tuning.

    Args:
        train_file: JSONL (``{"prompt", "completion"}``, ``{"instruction", "input", "output"}``, ``{"messages"}``
            or ``{"text"}`` records) or ``.txt`` (blank-line-separated paragraphs). ``None``: the embedded
            default task (:data:`~lightning_zenft.data.DEFAULT_TASK_FILE`).
        val_file: same formats. ``None`` with ``train_file=None`` and ``val_fraction=0``: the default task's
            embedded val split; ``None`` otherwise: no validation unless ``val_fraction > 0``.
        test_file: same formats; ``None``: no test set.
        tokenizer: a directory or hub id for ``AutoTokenizer.from_pretrained``. ``None``: the embedded base
            model's tokenizer. Use the model's own tokenizer (``CausalLMModule.model_name_or_path``).
        max_length: tokens per example (longer ones are truncated, with one warning giving the count) or, with
            ``packing``, per block.
        batch_size: examples (or blocks) per batch.
        packing: concatenate all examples of a split and cut them into ``max_length`` blocks: no padding and no
            truncation (a long example continues in the next block). Labels keep their masking, but attention
            crosses example boundaries inside a block: an example can attend to the ones before it.
        mask_prompt: take no loss on prompt tokens (``labels == -100`` there); ``False`` trains on all tokens.
        val_fraction: with no ``val_file``, hold out this share of the train records (chosen with ``seed``) for
            validation.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the val split and of the train shuffling: epoch ``e`` is shuffled by a generator seeded
            ``seed + e``, so runs repeat.

    Resuming: the training loader's position (epoch and batches handed out) goes into Lightning checkpoints, so
    ``trainer.fit(..., ckpt_path=...)`` continues with exactly the batches an uninterrupted run would have seen, at an
    epoch boundary or mid-epoch, with worker processes too, and under several processes (each rank takes its share
    of the epoch's order). It holds while the data and its settings (file, ``batch_size``, ``seed``, ``max_length``,
    ``packing``, number of processes) are those of the checkpoint; a changed size, seed, batch size or process count
    is an error at resume, while a changed file of the same length is not detected. The Trainer's
    ``overfit_batches`` replaces the shuffling sampler: such a run resumes from the start of its epoch.

    Example:
        >>> data = TextDataModule(max_length=64, batch_size=4)  # the embedded default task
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(batch), batch["input_ids"].shape[0]
        (['attention_mask', 'input_ids', 'labels'], 4)
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        packing: bool = False,
        mask_prompt: bool = True,
        val_fraction: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if max_length < 2:
            problems.append(f"max_length must be at least 2 tokens, got {max_length}")
        if batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction > 0 and val_file is not None:
            problems.append(
                f"got both val_file={val_file!r} and val_fraction={val_fraction}; give one source of validation data"
            )
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if problems:
            raise ValueError("TextDataModule: " + "; ".join(problems) + ".")
        self.save_hyperparameters()
        self._tokenizer: Any = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.test_dataset: TokenizedDataset | None = None
        self._fit_ready = False

    @property
    def tokenizer(self) -> Any:
        """The ``transformers`` tokenizer, loaded on first use.

        Example:
            >>> TextDataModule().tokenizer.eos_token
            '</s>'
        """
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.hparams.tokenizer if self.hparams.tokenizer is not None else str(DEFAULT_BASE_MODEL_DIR)
            check_pretrained_source(str(source), "tokenizer")
            self._tokenizer = AutoTokenizer.from_pretrained(source)
        return self._tokenizer

    def _files(self) -> tuple[Path, Path | None]:
        hp = self.hparams
        if hp.train_file is None:
            val = DEFAULT_TASK_VAL_FILE if hp.val_file is None and hp.val_fraction == 0 else hp.val_file
            return DEFAULT_TASK_FILE, None if val is None else Path(val)
        return Path(hp.train_file), None if hp.val_file is None else Path(hp.val_file)

    def _build(self, records: list[dict[str, Any]], source: str) -> TokenizedDataset:
        hp = self.hparams
        packing = hp.packing
        items = tokenize_records(
            records, self.tokenizer, hp.max_length, mask_prompt=hp.mask_prompt, truncate=not packing, source=source
        )
        if packing:
            order = torch.randperm(len(items), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            items = pack([items[i] for i in order], hp.max_length)
        return TokenizedDataset(items)

    def split_records(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split train records into (train, val) by ``val_fraction`` with a generator seeded by ``seed``.

        Example:
            >>> dm = TextDataModule(val_fraction=0.25)
            >>> train, val = dm.split_records([{"text": str(i)} for i in range(8)])
            >>> len(train), len(val)
            (6, 2)
        """
        fraction = self.hparams.val_fraction
        if fraction == 0:
            return records, []
        n_val = max(1, round(len(records) * fraction))
        if n_val >= len(records):
            raise ValueError(
                f"val_fraction={fraction} of {len(records)} records leaves no train record; lower val_fraction or "
                "add records."
            )
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        val_idx = set(order[:n_val])
        train = [r for i, r in enumerate(records) if i not in val_idx]
        val = [r for i, r in enumerate(records) if i in val_idx]
        return train, val

    @override
    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and not self._fit_ready:
            train_path, val_path = self._files()
            train_records, val_records = self.split_records(read_records(train_path))
            self.train_dataset = self._build(train_records, str(train_path))
            if val_path is not None:
                self.val_dataset = self._build(read_records(val_path), str(val_path))
            elif val_records:
                self.val_dataset = self._build(val_records, f"{train_path} (val_fraction split)")
            self._fit_ready = True
        if stage == "test" and self.test_dataset is None and self.hparams.test_file is not None:
            self.test_dataset = self._build(read_records(self.hparams.test_file), str(self.hparams.test_file))

    def _loader(self, dataset: TokenizedDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=CausalLMCollator.for_tokenizer(self.tokenizer),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        """The shuffled training batches; their position is saved in Lightning checkpoints (see the class doc).

        Example:
            >>> dm = TextDataModule(max_length=64, batch_size=4)
            >>> loader = dm.train_dataloader()
            >>> _ = next(iter(loader))
            >>> loader.state_dict()["batches"]
            1
        """
        self.setup("fit")
        assert self.train_dataset is not None
        trainer = self.trainer
        world, rank, epoch = (1, 0, 0) if trainer is None else (trainer.world_size, trainer.global_rank,
                                                                trainer.current_epoch)  # fmt: skip
        sampler = ResumableSampler(self.train_dataset, seed=self.hparams.seed, num_replicas=world, rank=rank)
        return ResumableDataLoader(
            self.train_dataset,
            first_epoch=epoch,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=CausalLMCollator.for_tokenizer(self.tokenizer),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @override
    def val_dataloader(self) -> DataLoader | list[Any]:
        """The validation batches; ``[]`` when there is no validation data (a warning in ``fit``, an error in
        ``validate``), so that a Trainer's ``val_check_interval`` is never silently a no-op.

        Example:
            >>> len(TextDataModule(max_length=64).val_dataloader())  # the default task's val split, batch 8
            25
        """
        self.setup("validate")
        if self.val_dataset is not None:
            return self._loader(self.val_dataset, shuffle=False)
        why = "TextDataModule has no validation data (no val_file, val_fraction=0)"
        fn = None if self.trainer is None else self.trainer.state.fn
        if fn == TrainerFn.VALIDATING:
            raise ValueError(f"{why}; pass val_file=<path.jsonl> or val_fraction=0.05 to run trainer.validate.")
        if fn == TrainerFn.FITTING:
            rank_zero_warn(
                f"{why}, so the validation this fit asks for (val_check_interval="
                f"{self.trainer.val_check_interval!r}) runs nothing. Pass val_file=<path.jsonl> or val_fraction=0.05 "
                "for validation, or set the Trainer's limit_val_batches=0 to skip it."
            )
        return []

    @override
    def test_dataloader(self) -> DataLoader:
        if self.hparams.test_file is None:
            raise ValueError("TextDataModule has no test_file; pass test_file=<path.jsonl> to run trainer.test.")
        if self.test_dataset is None:
            self.setup("test")
        assert self.test_dataset is not None
        return self._loader(self.test_dataset, shuffle=False)


__all__ = ["TextDataModule"]
