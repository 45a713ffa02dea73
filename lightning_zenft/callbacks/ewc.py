r"""``EWC``: elastic weight consolidation with the true (sampled) Fisher, as a callback.

Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (arXiv:1612.00796):

.. math::  \Omega = \frac{\lambda}{2} \sum_i F_i\, (\theta_i - \theta^*_i)^2

``theta*`` are the weights at fit start (the anchor) and ``F`` the diagonal Fisher of the model's predictive
distribution at the anchor on ``fisher_data`` (general text: what the fine-tune should not forget), estimated per
target token by :func:`~lightning_zenft.regularizers.fisher_diagonal` at fit start, loaded from a safetensors file,
or carried over from the previous task.

* **Scale of ``strength``.** ``F`` is a per-token average, and the task loss is usually a per-token mean too, so
  ``strength`` reads as "how many tokens of evidence for the anchor": the penalty is, to second order, the rise of
  the summed general loss over ``strength`` tokens. ``benchmarks/forgetting.py`` sweeps it (10 to 1000 on a small
  model: from 67% of the forgetting prevented at 93% of the task gain kept, to 95% at 48%); the main job uses 100.
* **Online EWC** (Schwarz et al. 2018, "Progress & Compress"): with ``online=True`` each new fit (a new task, same
  callback) sets ``F <- decay * F + F_new`` and moves the anchor to the new start: one Fisher and one anchor whatever
  the number of tasks. ``online=False`` replaces both at each new fit.
* **LoRA.** The penalty acts on the adapted layer's effective weight change ``s B A`` with the base weight's Fisher,
  factored as ``F_ij ~ u_i v_j`` (row and column sums of the per-example squared gradients, see
  :mod:`lightning_zenft.regularizers.fisher`), so it costs ``out + in`` numbers per layer instead of ``out x in``, and
  ``r x r`` products per step.
* **Checkpoints.** The Fisher and the anchors are saved in the checkpoint (gathered to whole CPU tensors under FSDP)
  and restored on ``ckpt_path=``: a resumed run continues exactly as an uninterrupted one.

Put ``EWC`` before ``FusedKernels`` in the callbacks: the Fisher's hooks need the adapter layers' own forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_zenft.callbacks._weight_penalty import WeightPenalty, gather_like, local, shard_like
from lightning_zenft.regularizers.fisher import (
    ESTIMATORS,
    Estimator,
    Fisher,
    LogitsFn,
    Unit,
    causal_lm_logits,
    fisher_diagonal,
)
from lightning_zenft.regularizers.fisher_io import load_fisher, save_fisher

FisherSource = Iterable[Any] | str | os.PathLike[str] | Fisher


def module_logits(module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ``logits_fn`` of the callbacks: the LightningModule's ``.model`` (or itself) as a causal LM."""
    model = getattr(module, "model", None)
    return causal_lm_logits(model if isinstance(model, nn.Module) else module, batch)


class EWC(WeightPenalty):
    """Elastic weight consolidation: ``strength / 2 * sum F (theta - theta*)^2`` added to the gradients.

    Args:
        fisher_data: general data to estimate the Fisher on (an iterable of batches, e.g. a ``DataLoader`` of
            causal-LM dicts; under FSDP every rank must give the same batches), a safetensors file written by
            :meth:`save_fisher`, or a :class:`~lightning_zenft.regularizers.Fisher`.
        strength: ``lambda`` (> 0).
        estimator: ``"sampled"`` (the true Fisher), ``"empirical"`` or ``"exact"``.
        online: keep one Fisher across tasks, ``F <- decay * F + F_new`` (otherwise each fit replaces it).
        decay: ``gamma`` of online EWC, in ``(0, 1]``.
        samples: label draws per token for ``"sampled"``.
        unit: ``"sequence"`` or ``"token"`` (see :func:`~lightning_zenft.regularizers.fisher_diagonal`).
        max_batches: read at most this many batches of ``fisher_data``.
        logits_fn: ``(pl_module, batch) -> (logits, labels)``; default: ``pl_module.model`` as a causal LM.
        seed: seed of the sampled labels.
        name: metric prefix and state key (``"ewc"``); two EWC callbacks need two names.

    Example::

        general = DataLoader(general_dataset, batch_size=8, collate_fn=collator)
        trainer = L.Trainer(callbacks=[LoRA(r=16), EWC(fisher_data=general, strength=100.0)])
        trainer.fit(module, datamodule)
    """

    kind = "ewc"

    def __init__(
        self,
        fisher_data: FisherSource,
        strength: float = 100.0,
        estimator: Estimator = "sampled",
        online: bool = False,
        decay: float = 1.0,
        samples: int = 1,
        unit: Unit | None = None,
        max_batches: int | None = None,
        logits_fn: LogitsFn | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(strength, name)
        problems = []
        if estimator not in ESTIMATORS:
            problems.append(f"estimator={estimator!r} is not one of {ESTIMATORS}")
        if not 0.0 < decay <= 1.0:
            problems.append(f"decay={decay} must be in (0, 1]")
        if samples < 1:
            problems.append(f"samples={samples} must be at least 1")
        if unit not in (None, "token", "sequence"):
            problems.append(f"unit={unit!r} is not 'token' or 'sequence'")
        if unit == "sequence" and estimator != "sampled":
            problems.append(f"unit='sequence' needs estimator='sampled' (got {estimator!r})")
        if max_batches is not None and max_batches < 1:
            problems.append(f"max_batches={max_batches} must be at least 1 (or None for all)")
        if isinstance(fisher_data, str | os.PathLike) and not Path(fisher_data).is_file():
            problems.append(f"fisher_data file {str(fisher_data)!r} does not exist")
        if problems:
            raise ValueError("EWC: " + "; ".join(problems) + ".")
        self.fisher_data = fisher_data
        self.estimator = estimator
        self.online = online
        self.decay = float(decay)
        self.samples = samples
        self.unit = unit
        self.max_batches = max_batches
        self.logits_fn = logits_fn or module_logits
        self.seed = seed
        self.fisher: Fisher | None = None  # local shards for sharded parameters
        self._tokens = 0  # the restored Fisher's token count and estimator (from state_dict)
        self._estimated: str = estimator

    # ------------------------------------------------------------------ the Fisher
    @override
    def begin_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        new = self._new_fisher(trainer, pl_module)
        if self.online and self.fisher is not None:
            self.fisher = self.fisher.combined(new, self.decay)
        else:
            self.fisher = new
        rank_zero_info(
            f"EWC({self.name}): task {self.task_count}, Fisher ({self.fisher.estimator}) over {self.fisher.tokens:,} "
            f"tokens on {len(self.fisher.diagonal)} tensors and {len(self.fisher.factors)} adapted layers."
        )

    def _new_fisher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Fisher:
        assert self.targets is not None
        source = self.fisher_data
        if isinstance(source, str | os.PathLike):
            return self._placed(load_fisher(source), str(source))
        if isinstance(source, Fisher):
            return self._placed(source, "the given Fisher")
        batches = _to_device(source, trainer)
        fisher = fisher_diagonal(
            pl_module,
            batches,
            self.estimator,
            params=self.targets.dense,
            factored=self.targets.factored,
            logits_fn=self.logits_fn,
            samples=self.samples,
            unit=self.unit,
            seed=self.seed,
            max_batches=self.max_batches,
        )
        if trainer.world_size > 1:
            fisher = self._across_ranks(fisher, trainer)
        return fisher

    def _across_ranks(self, fisher: Fisher, trainer: pl.Trainer) -> Fisher:
        """Sharded: check every rank read the same data. Replicated (DDP): the token-weighted mean over ranks."""
        strategy = trainer.strategy
        tokens = strategy.all_gather(torch.tensor(float(fisher.tokens), device=strategy.root_device))
        if self._sharded:
            if bool((tokens != tokens.reshape(-1)[0]).any()):
                raise RuntimeError(
                    f"EWC({self.name}): the ranks read different Fisher data ({tokens.reshape(-1).tolist()} tokens). "
                    "Under a sharded strategy each rank holds a shard of every gradient, so every rank must read the "
                    "same batches: give fisher_data without a DistributedSampler."
                )
            return fisher
        total = float(tokens.sum())
        out = Fisher(estimator=fisher.estimator, tokens=int(total))
        for name, value in fisher.diagonal.items():
            out.diagonal[name] = strategy.reduce(value * fisher.tokens, reduce_op="sum") / total
        for name, (row, col) in fisher.factors.items():
            raw_row = row * fisher.tokens  # row sums
            raw_total = raw_row.sum()
            raw_col = col * raw_total  # column sums
            row_sum = strategy.reduce(raw_row, reduce_op="sum")
            col_sum = strategy.reduce(raw_col, reduce_op="sum")
            grand = row_sum.sum()
            out.factors[name] = (row_sum / total, col_sum / grand if grand > 0 else torch.zeros_like(col_sum))
        return out

    def _placed(self, fisher: Fisher, where: str) -> Fisher:
        """A whole (loaded) Fisher checked against the targets and cut to this rank's shards on their devices."""
        assert self.targets is not None
        dense, layers = self.targets.dense, self.targets.factored
        missing = sorted(set(dense) - set(fisher.diagonal)) + sorted(set(layers) - set(fisher.factors))
        extra = sorted(set(fisher.diagonal) - set(dense)) + sorted(set(fisher.factors) - set(layers))
        if missing or extra:
            raise ValueError(
                f"EWC({self.name}): {where} does not match the model's trainable parts: missing {missing[:4]}"
                f"{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}. "
                "Use a Fisher estimated on this model with the same adapters."
            )
        out = Fisher(estimator=fisher.estimator, tokens=fisher.tokens)
        for name, p in dense.items():
            value = fisher.diagonal[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"EWC({self.name}): {where} has shape {tuple(value.shape)} for {name!r}, the parameter is "
                    f"{tuple(p.shape)}."
                )
            out.diagonal[name] = shard_like(value.float(), p).to(local(p).device)
        for name, layer in layers.items():
            row, col = fisher.factors[name]
            shape = (int(getattr(layer, "out_features", -1)), int(getattr(layer, "in_features", -1)))
            if (row.numel(), col.numel()) != shape:
                raise ValueError(
                    f"EWC({self.name}): {where} has factors of sizes {(row.numel(), col.numel())} for layer {name!r}, "
                    f"which is (out, in) = {shape}."
                )
            device = next(layer.parameters()).device
            out.factors[name] = (row.float().to(device), col.float().to(device))
        return out

    def save_fisher(self, path: str | os.PathLike[str]) -> None:
        """Write the current Fisher (whole tensors) to a safetensors file; under FSDP every rank must call it."""
        if self.fisher is None or self.targets is None:
            raise RuntimeError(f"EWC({self.name}) has no Fisher yet; it is estimated at fit start.")
        whole = Fisher(estimator=self.fisher.estimator, tokens=self.fisher.tokens, factors=dict(self.fisher.factors))
        whole.diagonal = {n: gather_like(v, self.targets.dense[n]) for n, v in self.fisher.diagonal.items()}
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            save_fisher(whole, path)

    @override
    def weights(self, name: str) -> torch.Tensor | None:
        assert self.fisher is not None
        return self.fisher.diagonal[name]

    @override
    def factors(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert self.fisher is not None
        return self.fisher.factors[name]

    # ------------------------------------------------------------------ checkpoints
    @override
    def tensor_state(self) -> dict[str, Any]:
        out = super().tensor_state()
        assert self.fisher is not None and self.targets is not None
        out["fisher"] = {n: gather_like(v, self.targets.dense[n]).cpu() for n, v in self.fisher.diagonal.items()}
        out["fisher_factors"] = {n: (r.cpu(), c.cpu()) for n, (r, c) in self.fisher.factors.items()}
        return out

    @override
    def load_tensor_state(self, state: dict[str, Any], pl_module: pl.LightningModule) -> None:
        super().load_tensor_state(state, pl_module)
        saved = Fisher(state["fisher"], dict(state["fisher_factors"]), tokens=self._tokens, estimator=self._estimated)
        self.fisher = self._placed(saved, "the checkpoint's Fisher")

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        fisher = self.fisher
        state.update(
            estimator=self.estimator,
            online=self.online,
            decay=self.decay,
            tokens=0 if fisher is None else fisher.tokens,
            estimated=None if fisher is None else fisher.estimator,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("online", self.online) != self.online:
            raise RuntimeError(
                f"EWC({self.name}): the checkpoint was written with online={state_dict['online']}, this callback has "
                f"online={self.online}; resume with the settings it was saved with."
            )
        super().load_state_dict(state_dict)
        self._tokens = int(state_dict.get("tokens", 0))
        self._estimated = str(state_dict.get("estimated") or self.estimator)


def _to_device(batches: Iterable[Any], trainer: pl.Trainer) -> Iterator[Any]:
    for batch in batches:
        yield trainer.strategy.batch_to_device(batch)


__all__ = ["EWC", "module_logits"]
