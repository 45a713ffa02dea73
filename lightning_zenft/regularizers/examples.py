"""Splitting a batch into one-example batches (tensors, or dicts/lists/tuples of tensors sharing the first dim)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def split_examples(batch: Any) -> Iterator[Any]:
    """Yield one-example batches of ``batch`` (a tensor, or a dict/list/tuple of tensors sharing the first dim).

    In a dict batch with an ``attention_mask``, trailing positions no row attends to are cut (right padding).
    """
    size = _batch_size(batch)
    for i in range(size):
        example = _index(batch, slice(i, i + 1))
        if isinstance(example, Mapping) and isinstance(example.get("attention_mask"), torch.Tensor):
            mask = example["attention_mask"]
            if mask.dim() == 2 and mask.shape[1] > 0:
                length = int(mask[0].nonzero().max().item()) + 1 if mask[0].any() else 0
                if length < mask.shape[1]:
                    full = mask.shape[1]
                    example = {
                        k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == full else v
                        for k, v in example.items()
                    }
        yield example


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    elif isinstance(batch, list | tuple):
        sizes = {v.shape[0] for v in batch if isinstance(v, torch.Tensor) and v.dim() > 0}
    else:
        raise TypeError(f"cannot split a {type(batch).__name__} batch into examples; use tensors, dicts or tuples.")
    if len(sizes) != 1:
        raise ValueError(f"the tensors of a Fisher batch disagree on the batch size: {sorted(sizes)}.")
    return sizes.pop()


def _index(batch: Any, index: slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _index(v, index) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_index(v, index) for v in batch)
    return batch


__all__ = ["split_examples"]
