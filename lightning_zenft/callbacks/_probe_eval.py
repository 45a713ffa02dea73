"""Running a model over a probe: each process scores its shard, the metrics reduce the counts across processes.

``forward(batch) -> logits (B, T, V)`` runs the model; ``reference_forward`` (optional) runs the base model on the
same batch for the KL. Placeholder rows that even out the shards are run (every process makes the same number of
forward passes, as sharded models need) but not scored.

Language-modelling probe results: ``loss`` (mean next-token NLL over the target tokens, nats), ``perplexity``,
``accuracy`` (next-token, points) and, with a reference, ``kl_to_base`` (mean ``KL(p_base || p)`` per target token).
Multiple-choice results: ``accuracy`` (points) and ``loss`` (mean NLL per token of the right choices).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchmetrics.aggregation import MeanMetric

from lightning_zenft.data.probes import ChoiceProbe, LMProbe, Probe
from lightning_zenft.metrics import ChoiceAccuracy, NextTokenAccuracy, Perplexity, TokenKL
from lightning_zenft.metrics.language_modeling import shift_targets, token_log_probs

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]

HEADLINE = "accuracy"
"""The metric forgetting limits are written for (points, higher is better), in both kinds of probe."""


def evaluate_probe(
    probe: Probe,
    forward: Forward,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    reference_forward: Forward | None = None,
) -> dict[str, float]:
    """The probe's metrics for the model ``forward`` runs, over all processes' shards."""
    if isinstance(probe, LMProbe):
        return _evaluate_lm(probe, forward, device, rank, world_size, reference_forward)
    if isinstance(probe, ChoiceProbe):
        return _evaluate_choice(probe, forward, device, rank, world_size)
    raise TypeError(f"not a probe: {type(probe).__name__}")


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _evaluate_lm(
    probe: LMProbe, forward: Forward, device: torch.device, rank: int, world: int, reference: Forward | None
) -> dict[str, float]:
    ppl, acc, kl = Perplexity().to(device), NextTokenAccuracy().to(device), TokenKL().to(device)
    for batch, valid in probe.batches(rank, world):
        batch, valid = _on(batch, device), valid.to(device)
        model_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = forward(model_batch)[valid]  # (b, T, V): the real rows only
        labels = batch["labels"][valid]  # (b, T)
        ppl.update(logits, labels)
        acc.update(logits, labels)
        if reference is not None:
            kl.update(logits, reference(model_batch)[valid], labels)
    perplexity = float(ppl.compute())
    out = {"loss": math.log(perplexity), "perplexity": perplexity, "accuracy": float(acc.compute())}
    if reference is not None:
        out["kl_to_base"] = float(kl.compute())
    return out


def _evaluate_choice(
    probe: ChoiceProbe, forward: Forward, device: torch.device, rank: int, world: int
) -> dict[str, float]:
    acc = ChoiceAccuracy().to(device)
    loss = MeanMetric().to(device).set_dtype(torch.float64)
    for batch, valid in probe.batches(rank, world):
        batch, valid = _on(batch, device), valid.to(device)
        logits = forward({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})  # (P, T, V)
        scored = batch["labels"][:, 1:] != -100  # (P, T-1): position t predicts token t + 1
        z, y = shift_targets(logits, batch["labels"])  # (n, V), (n,): the choices' tokens, row by row
        pair = scored.nonzero()[:, 0]  # (n,): each scored token's row
        n_pairs = batch["labels"].shape[0]
        pair_logp = torch.zeros(n_pairs, dtype=torch.float64, device=device).index_add_(0, pair, token_log_probs(z, y))
        n_tokens = scored.sum(dim=1)  # (P,)
        pair_score = pair_logp / n_tokens if probe.normalize == "mean" else pair_logp  # (P,)
        n_questions = batch["answers"].numel()
        scores = torch.full((n_questions, probe.num_choices), -math.inf, dtype=torch.float64, device=device)  # (Q, C)
        scores[batch["question"], batch["choice"]] = pair_score
        acc.update(scores[valid], batch["answers"][valid])
        right = (batch["choice"] == batch["answers"][batch["question"]]) & valid[batch["question"]]  # (P,)
        loss.update(-pair_logp[right] / n_tokens[right], n_tokens[right].double())
    return {"accuracy": float(acc.compute()), "loss": float(loss.compute())}


__all__ = ["HEADLINE", "Forward", "evaluate_probe"]
