"""A training loader whose position is part of the checkpoint, so ``ckpt_path=`` continues the batch order exactly.

Lightning saves the state of every training loader that has ``state_dict``/``load_state_dict`` (its ``_Stateful``
check) in the checkpoint and, on ``trainer.fit(..., ckpt_path=...)``, loads it into the fresh loader before the
first batch is drawn. Two parts make the order exact:

* :class:`ResumableSampler` draws epoch ``e``'s order from ``(seed, e)`` alone (``torch.randperm`` with a generator
  seeded ``seed + e``, the rule of torch's ``DistributedSampler``, which it extends), so a resumed run meets the
  same order as an uninterrupted one at any epoch, and it can start an epoch part-way in;
* :class:`ResumableDataLoader` counts its passes (one pass, one epoch) and the batches it has handed out in the
  current one. The count is taken where Lightning receives the batches, so it is exact with worker processes too
  (their read-ahead is not counted). Counting passes, rather than reading the Trainer's epoch number, keeps the
  order right where Lightning numbers epochs differently after a resume: a run stopped by ``max_steps`` at the end
  of an epoch and saved with ``trainer.save_checkpoint`` resumes into an epoch Lightning counts as already done.

It never draws from the global torch RNG: the loader holds its own generator for the workers' base seed, which a
plain ``DataLoader`` draws from the global RNG each time an epoch starts. That keeps callbacks that restore the
global RNG (``LoRA`` does, for adapter dropout) exact across a resume.

Under several processes (DDP, FSDP) each rank takes every ``world_size``-th index of the epoch's order, padded to
equal length as ``DistributedSampler`` does; all ranks hand out the same number of batches, so the count that rank 0
saves holds for every rank.

Example::

    sampler = ResumableSampler(dataset, seed=0)
    loader = ResumableDataLoader(dataset, batch_size=8, sampler=sampler)
    state = loader.state_dict()        # {"epoch": 0, "batches": 0, ...}; Lightning saves it in checkpoints
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Epoch-seeded order that can start part-way into an epoch.

    Args:
        dataset: a sized dataset.
        seed: epoch ``e`` is ordered by ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``.
        shuffle: ``False`` keeps the dataset order.
        num_replicas: processes sharing the data (the Trainer's ``world_size``).
        rank: this process's global rank.

    Example:
        >>> sampler = ResumableSampler(list(range(6)), seed=0)
        >>> first = list(sampler)
        >>> sampler.start_at(epoch=0, index=4)
        >>> list(sampler) == first[4:], sorted(first) == list(range(6))
        (True, True)
    """

    def __init__(
        self, dataset: Sized, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self._start = 0

    @property
    def start(self) -> int:
        """Index (into this rank's share of the epoch) that the next pass starts at."""
        return self._start

    def start_at(self, epoch: int, index: int) -> None:
        """Make the next pass run ``epoch``'s order from ``index`` on (0 <= index <= len(self)).

        Example:
            >>> s = ResumableSampler(list(range(4)), shuffle=False)
            >>> s.start_at(epoch=3, index=1)
            >>> s.epoch, list(s)
            (3, [1, 2, 3])
        """
        if not 0 <= index <= len(self):
            raise ValueError(f"start index {index} is outside this epoch's {len(self)} samples.")
        self.epoch = epoch
        self._start = index

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())  # this rank's share of epoch `self.epoch`, padded as DistributedSampler does
        start, self._start = self._start, 0
        return iter(order[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning saves and restores with the checkpoint.

    Each pass over the loader (each ``iter()`` that draws a batch) is one epoch of the sampler's order: pass ``k``
    uses epoch ``first_epoch + k``'s order, whatever epoch number the caller sets on the sampler. ``state_dict()`` is
    ``{"epoch", "batches"}`` (the pass and the batches handed out in it) plus the settings that fix the order
    (``seed``, ``shuffle``, ``batch_size``, ``num_samples``, ``num_replicas``); after ``load_state_dict`` the next pass
    continues after the saved batch, or starts the next epoch if the saved one was finished. A state whose settings
    differ is refused, since its position would point into another order.

    Args:
        first_epoch: the epoch the first pass uses (``TextDataModule`` gives the Trainer's ``current_epoch``, so a
            loader rebuilt each epoch by ``reload_dataloaders_every_n_epochs`` goes on with the next epoch's order).
        args, kwargs: as for ``DataLoader``; ``sampler`` must be a :class:`ResumableSampler`, and ``generator`` (the
            workers' base seed) defaults to a generator of the loader's own, so no pass draws from the global RNG.

    Example:
        >>> data = list(range(10))
        >>> loader = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=1))
        >>> it = iter(loader)
        >>> first = next(it)
        >>> state = loader.state_dict()
        >>> state["epoch"], state["batches"]
        (0, 1)
        >>> other = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=1))
        >>> other.load_state_dict(state)
        >>> [b.tolist() for b in other] == [b.tolist() for b in it]
        True
    """

    def __init__(self, *args: Any, first_epoch: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self.first_epoch = first_epoch
        self._epoch, self._batches = first_epoch, 0  # the pass in progress (or next) and its batches handed out
        self._next_epoch, self._next_batch = first_epoch, 0  # where the next pass starts

    def _sampler(self) -> ResumableSampler:
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(
                f"this loader's sampler is a {type(self.sampler).__name__}, not a ResumableSampler (was the loader "
                "rebuilt with another sampler, e.g. by the Trainer's overfit_batches?), so its position cannot be "
                "restored; resume without overfit_batches, or pass sampler=ResumableSampler(dataset)."
            )
        return self.sampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not isinstance(self.sampler, ResumableSampler):  # replaced by the Trainer (overfit_batches): plain loader
            yield from super().__iter__()
            return
        # A generator: the pass starts at its first batch, so an iterator made and dropped unused takes no epoch.
        epoch, batch = self._next_epoch, self._next_batch
        self._next_epoch, self._next_batch = epoch + 1, 0
        self.sampler.start_at(epoch, batch * self.batch_size)  # type: ignore[operator]
        self._epoch, self._batches = epoch, batch
        for item in super().__iter__():
            self._batches += 1
            yield item

    def _settings(self) -> dict[str, Any]:
        sampler = self._sampler()
        return {
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
            "batch_size": self.batch_size,
            "num_samples": len(sampler.dataset),  # type: ignore[arg-type]
            "num_replicas": sampler.num_replicas,
        }

    def state_dict(self) -> dict[str, Any]:
        """The pass (epoch) in progress, the batches handed out in it, and the settings that fix the order (``{}``
        without a :class:`ResumableSampler`)."""
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"epoch": self._epoch, "batches": self._batches, **self._settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass continue after the saved batch (or start the next epoch if the saved one was done)."""
        if not state_dict:
            return
        settings = self._settings()
        differ = {k: (state_dict.get(k), v) for k, v in settings.items() if state_dict.get(k) != v}
        if differ:
            raise ValueError(
                f"the training data differs from the checkpoint's (saved, now): {differ}, so the saved position does "
                "not point into this order. Resume with the data settings the checkpoint was written with (same "
                "file, batch_size, seed and number of processes), or start a new run from the checkpoint's weights "
                "without ckpt_path."
            )
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # the saved epoch was finished: the next one starts from its first batch
            epoch, batches = epoch + 1, 0
        self._epoch, self._batches = epoch, batches
        self._next_epoch, self._next_batch = epoch, batches
