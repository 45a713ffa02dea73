"""Helpers for the forgetting-prevention tests (EWC, L2-SP, replay, distillation): two token distributions, a tiny
causal-LM module, quick pretraining."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader
from zenft_testing import VOCAB, tiny_model

PAD = 0


def markov_rows(n: int, t: int, seed: int, narrow: bool) -> torch.Tensor:
    """``n`` sequences of ``t`` tokens from a fixed random first-order Markov chain over the vocabulary.

    ``narrow=False``: the "general" chain (every token has 8 likely successors); ``narrow=True``: the "task" chain,
    a deterministic walk over 16 tokens that the general chain seldom produces.
    """
    g = torch.Generator().manual_seed(1234 if not narrow else 4321)
    if narrow:
        cycle = torch.randperm(VOCAB - 1, generator=g)[:16] + 1
        succ = {int(a): int(b) for a, b in zip(cycle, cycle.roll(-1), strict=True)}
        start = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(seed))
        rows = torch.zeros(n, t, dtype=torch.long)
        rows[:, 0] = cycle[start]
        for j in range(1, t):
            rows[:, j] = torch.tensor([succ[int(x)] for x in rows[:, j - 1]])
        return rows
    successors = torch.randint(1, VOCAB, (VOCAB, 8), generator=g)  # (V, 8)
    r = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, t, dtype=torch.long)
    rows[:, 0] = torch.randint(1, VOCAB, (n,), generator=r)
    for j in range(1, t):
        pick = torch.randint(0, 8, (n,), generator=r)
        rows[:, j] = successors[rows[:, j - 1], pick]
    return rows


def to_batches(rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Dict batches, every token a target (no padding)."""
    out = []
    for i in range(0, len(rows), batch_size):
        ids = rows[i : i + batch_size]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def general_batches(n: int = 16, t: int = 16, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return to_batches(markov_rows(n, t, seed, narrow=False), batch_size)


def task_batches(n: int = 16, t: int = 16, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return to_batches(markov_rows(n, t, seed, narrow=True), batch_size)


_PRETRAINED: dict[int, dict[str, torch.Tensor]] = {}


def pretrained_model(seed: int = 0, steps: int = 40) -> torch.nn.Module:
    """A tiny Llama trained for ``steps`` AdamW steps on fresh general-chain batches (cached per seed).

    General loss about 2.7 after (4.85 at init; the chain's entropy is log 8 = 2.08); task loss about 5.6.
    """
    model = tiny_model("llama", seed)
    if seed not in _PRETRAINED:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = general_batches(n=32 * steps, t=16, batch_size=32, seed=100)
        model.train()
        for batch in data:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        _PRETRAINED[seed] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_PRETRAINED[seed])
    return model.train()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    was = model.training
    model.eval()
    value = sum(model(**b).loss.item() for b in batches) / len(batches)
    model.train(was)
    return value


class LM(L.LightningModule):
    """A causal LM trained on fixed dict batches; records each step's loss; ``model(**batch).loss``."""

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.batches = batches
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


class GradProbe(L.Callback):
    """Records ``.grad`` and the value of every trainable parameter in ``on_before_optimizer_step``.

    Put one before and one after a penalty callback: the difference of their gradients is what the penalty added.
    """

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        self.params.append({n: p.detach().clone() for n, p in named})

    def added(self, after: GradProbe, step: int) -> dict[str, torch.Tensor]:
        """What happened to the gradients between this probe and ``after`` at optimizer step ``step``."""
        return {n: g - self.grads[step].get(n, torch.zeros_like(g)) for n, g in after.grads[step].items()}


__all__ = [
    "LM",
    "PAD",
    "GradProbe",
    "general_batches",
    "markov_rows",
    "mean_loss",
    "pretrained_model",
    "task_batches",
    "to_batches",
]
