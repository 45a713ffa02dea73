"""Sharded training on Lightning's own FSDP strategies, configured for fine-tuning.

* :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` (FSDP2) with the sharding done for you: blocks from
  ``_no_split_modules``, bf16 mixed precision, activation checkpointing, CPU offload, frozen weights stored in bf16.
* :class:`FSDP1Strategy`: Lightning's ``FSDPStrategy`` (FSDP1) with units that keep frozen and trained parameters
  apart, so frozen weights get no gradient (CUDA only).
* Both write checkpoints holding only the trained tensors when an adapter callback asks for it, sharded or whole, and
  load them strictly (:mod:`~lightning_zenft.strategies.checkpoints`).

Example (from YAML: ``trainer.strategy: {class_path: lightning_zenft.strategies.FSDP2Strategy, init_args: {...}}``)::

    trainer = L.Trainer(accelerator="gpu", devices=8, strategy=FSDP2Strategy(activation_checkpointing=True),
                        callbacks=[LoRA(r=16), SaveAdapter("adapter")])
"""

from lightning_zenft.strategies.blocks import resolve_block_classes
from lightning_zenft.strategies.checkpoints import mark_trained_only, trained_only_keys
from lightning_zenft.strategies.fsdp1 import FSDP1Strategy, plan_units
from lightning_zenft.strategies.fsdp2 import FSDP2Strategy
from lightning_zenft.strategies.gather import gathered_for_export, is_sharded

__all__ = [
    "FSDP1Strategy",
    "FSDP2Strategy",
    "gathered_for_export",
    "is_sharded",
    "mark_trained_only",
    "plan_units",
    "resolve_block_classes",
    "trained_only_keys",
]
