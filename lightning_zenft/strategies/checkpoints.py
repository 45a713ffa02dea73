"""Checkpoints of sharded models that hold only what trains, written sharded or whole, and loaded strictly.

Lightning's sharded strategies collect the whole model's state for every checkpoint and load it back by key: an
adapter run's checkpoint then either holds the frozen base (tens of GB for a 7B model) or, filtered to the adapters,
cannot be loaded (the distributed loader asks for every key of the model). The strategies of this package use torch's
``torch.distributed.checkpoint.state_dict`` functions instead, for FSDP2 and FSDP1 alike:

* **What is written.** When the LightningModule is marked trained-only (:func:`mark_trained_only`; adapter callbacks
  do it unless ``save_full_state_dict=True``), frozen parameters are never collected: not gathered for a whole
  checkpoint, not copied for a sharded one. Optimizer states are keyed by parameter name.
* **How.** ``state_dict="sharded"``: a directory in torch's distributed checkpoint format, each rank writing its own
  shards of the trained tensors, plus ``meta.pt`` (loops, callbacks) from rank 0; ``state_dict="full"``: one file
  written by rank 0, whole tensors, readable without a process group.
* **Loading.** The tensors a checkpoint holds are compared with the model before anything loads: a trained tensor
  the checkpoint lacks, a key the model lacks, or a shape that differs is an error naming them; frozen tensors a
  trained-only checkpoint leaves out keep the values the model was built with. With ``strict_loading = False`` on the
  LightningModule only shape differences are errors. Both formats load under both strategies, on any world size,
  and a whole file written by a single-device run loads too.

Example::

    trainer = L.Trainer(strategy=FSDP2Strategy(state_dict="sharded"), callbacks=[LoRA(r=16), ModelCheckpoint(...)])
    trainer.fit(module, ckpt_path="checkpoints/epoch=0-step=500.ckpt")   # a directory of adapter shards
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

TRAINED_ONLY_ATTR = "_zenft_trained_only_keys"
"""Attribute of a LightningModule: the state-dict keys its checkpoints hold (set by :func:`mark_trained_only`)."""
METADATA_FILE = "meta.pt"
"""The non-tensor part of a sharded checkpoint directory (Lightning's name for it)."""


def mark_trained_only(pl_module: nn.Module, keys: set[str]) -> None:
    """Ask sharding strategies to write only ``keys`` (the trained tensors) into ``pl_module``'s checkpoints and to
    accept checkpoints that lack the other (frozen) tensors."""
    setattr(pl_module, TRAINED_ONLY_ATTR, frozenset(keys))


def trained_only_keys(pl_module: nn.Module | None) -> frozenset[str] | None:
    """The keys set by :func:`mark_trained_only`, or None when the whole state is checkpointed."""
    return getattr(pl_module, TRAINED_ONLY_ATTR, None) if pl_module is not None else None


def model_state(model: nn.Module, pl_module: nn.Module, *, full: bool) -> dict[str, Any]:
    """The model's state for a checkpoint: sharded tensors, or whole ones (on rank 0 only) when ``full``; without
    frozen parameters when ``pl_module`` is marked trained-only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = trained_only_keys(pl_module)
    options = StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=keys is not None)
    state = get_model_state_dict(model, options=options)
    return state if keys is None else {k: v for k, v in state.items() if k in keys}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, full: bool) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name: sharded, or whole on rank 0 when ``full``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def saved_shapes(path: Path, weights_only: bool | None) -> tuple[dict[str, tuple[int, ...]], dict[str, Any] | None]:
    """The model tensors a checkpoint holds, with their (whole) shapes; and the loaded file for a whole checkpoint."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = FileSystemReader(path).read_metadata()
        prefix = "state_dict."
        shapes = {
            key[len(prefix) :]: tuple(md.size)
            for key, md in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
        }
        return shapes, None
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (neither a file nor a sharded directory).")
    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint: it has no 'state_dict' (keys {list(checkpoint)})."
        )
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, checkpoint


def check_keys(
    path: Path, saved: dict[str, tuple[int, ...]], current: Mapping[str, Any], pl_module: nn.Module, strict: bool
) -> None:
    """Compare a checkpoint's tensors with the model's before loading (see the module docstring)."""
    keys = trained_only_keys(pl_module)
    required = set(current) if keys is None else set(current) & keys
    problems = []
    shapes = {
        k: (saved[k], tuple(current[k].shape))
        for k in saved
        if k in current and isinstance(current[k], torch.Tensor) and saved[k] != tuple(current[k].shape)
    }
    if shapes:
        shown = ", ".join(f"{k}: saved {s} vs model {m}" for k, (s, m) in list(shapes.items())[:3])
        problems.append(f"{len(shapes)} tensors differ in shape ({shown})")
    if strict:
        missing = sorted(required - set(saved))
        unexpected = sorted(set(saved) - set(current))
        if missing:
            kind = "trained tensors" if keys is not None else "tensors"
            problems.append(f"{len(missing)} {kind} are missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors are not in the model (e.g. {unexpected[:3]})")
    if problems:
        what = "trained tensors only" if keys is not None else "every tensor of the model"
        raise RuntimeError(
            f"checkpoint {str(path)!r} does not fit this model, which expects {what}: {'; '.join(problems)}. Resume "
            "with the model, adapter callback and settings the checkpoint was written with."
        )


def load_into(
    path: Path,
    model: nn.Module,
    pl_module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    weights_only: bool | None,
) -> dict[str, Any]:
    """Load a checkpoint (directory or file) into a sharded ``model`` and its ``optimizers``; returns the rest of the
    checkpoint (loops, callbacks...) for Lightning to restore."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    strict = bool(getattr(pl_module, "strict_loading", True))
    saved, checkpoint = saved_shapes(path, weights_only)
    current = get_model_state_dict(model)
    check_keys(path, saved, current, pl_module, strict)
    if checkpoint is None:  # a sharded directory
        template = {k: v for k, v in current.items() if k in saved}
        dcp_load({"state_dict": template}, checkpoint_id=path)
        set_model_state_dict(model, template, options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(optimizers):
            key = f"optimizer_{idx}"
            state = {key: get_optimizer_state_dict(model, optimizer)}
            dcp_load(state, checkpoint_id=path)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key])
        return torch.load(path / METADATA_FILE, weights_only=weights_only)
    state = {k: v for k, v in checkpoint.pop("state_dict").items() if k in current}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    saved_optimizers = checkpoint.get("optimizer_states") or []
    if optimizers and saved_optimizers:
        if len(saved_optimizers) != len(optimizers):
            raise RuntimeError(
                f"checkpoint {str(path)!r} holds {len(saved_optimizers)} optimizer states but the LightningModule "
                f"configures {len(optimizers)} optimizers; resume with the optimizers it was written with."
            )
        for optimizer, osd in zip(optimizers, saved_optimizers, strict=True):
            osd = _keyed_by_name(osd, model, optimizer)
            set_optimizer_state_dict(
                model, optimizer, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True)
            )
    return checkpoint


def _keyed_by_name(osd: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state saved by a plain (unsharded) run, keyed by position in its parameter groups, re-keyed by
    parameter name through this optimizer's groups (which hold the same parameters in the same order)."""
    state = osd.get("state", {})
    ids = [i for group in osd.get("param_groups", []) for i in group["params"]]
    if not ids or not all(isinstance(i, int) for i in ids):
        return osd  # already keyed by name
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(ours) != len(ids):
        raise RuntimeError(
            f"the checkpoint's optimizer holds {len(ids)} tensors but this run's holds {len(ours)}; resume with the "
            "optimizer and trained parameters the checkpoint was written with."
        )
    to_name = dict(zip(ids, ours, strict=True))
    groups = [{**g, "params": [to_name[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {to_name[i]: v for i, v in state.items()}, "param_groups": groups}


def save_sharded_or_full(strategy: Any, checkpoint: dict[str, Any], filepath: str | Path, sharded: bool) -> None:
    """Write ``checkpoint`` as a sharded directory (every rank) or one whole file (rank 0), as the module docstring
    says. ``strategy`` is a Lightning parallel strategy (for ``broadcast``, ``global_rank``, ``checkpoint_io``)."""
    import shutil

    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    path = Path(strategy.broadcast(filepath))
    if sharded:
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        for idx, state in enumerate(checkpoint.pop("optimizer_states", [])):
            tensors[f"optimizer_{idx}"] = state
        _distributed_checkpoint_save(tensors, path)
        if strategy.global_rank == 0:
            torch.save(checkpoint, path / METADATA_FILE)
        return
    if path.is_dir():
        if not (path / METADATA_FILE).is_file():
            raise IsADirectoryError(f"the checkpoint path {str(path)!r} is a directory that is not a checkpoint.")
        if strategy.global_rank == 0:
            shutil.rmtree(path)  # a sharded checkpoint of the same name, replaced by a whole file
    if strategy.global_rank == 0:
        strategy.checkpoint_io.save_checkpoint(checkpoint, path)


__all__ = [
    "METADATA_FILE",
    "TRAINED_ONLY_ATTR",
    "check_keys",
    "load_into",
    "mark_trained_only",
    "model_state",
    "optimizer_state",
    "save_sharded_or_full",
    "saved_shapes",
    "trained_only_keys",
]


class TrainedOnlyCheckpointHooks:
    """The checkpoint hooks of :class:`~lightning_zenft.strategies.FSDP2Strategy` and
    :class:`~lightning_zenft.strategies.FSDP1Strategy`, ahead of Lightning's strategy in their bases: trained-only
    states, written sharded or whole as ``state_dict_kind`` says, loaded strictly (the functions above)."""

    state_dict_kind: str
    """``"sharded"`` or ``"full"``."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        strategy: Any = self
        assert strategy.model is not None
        return model_state(strategy.model, strategy.lightning_module, full=self.state_dict_kind == "full")

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        strategy: Any = self
        assert strategy.model is not None
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's wrapped optimizer
        return optimizer_state(strategy.model, inner, full=self.state_dict_kind == "full")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(storage_options=...) is not supported: it writes itself."
            )
        save_sharded_or_full(self, checkpoint, filepath, sharded=self.state_dict_kind == "sharded")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        strategy: Any = self
        assert strategy.model is not None and strategy.lightning_module is not None
        path = Path(strategy.broadcast(checkpoint_path))
        optimizers = [getattr(o, "_optimizer", o) for o in strategy.optimizers]
        return load_into(path, strategy.model, strategy.lightning_module, optimizers, weights_only)
