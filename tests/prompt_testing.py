"""Test helpers for the prompt methods: padded batches, greedy references, stand-in training, and stub models."""

from __future__ import annotations

import torch
from torch import nn

PAD = 0


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Stand-in for training: every trainable tensor moves by random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def rows(seed: int = 5, lengths: tuple[int, ...] = (6, 3)) -> list[torch.Tensor]:
    """Token rows of different lengths (no padding token inside)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g) for n in lengths]


def padded(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of ``seqs`` padded on ``side`` ("left" or "right") to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, where] = s
        mask[i, where] = 1
    return ids, mask


def greedy_no_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the whole sequence at every step (no attention cache)."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=PAD
        )


class NoCacheLM(nn.Module):
    """A causal-LM-shaped model with input embeddings and no attention cache argument."""

    def __init__(self, vocab: int = 128, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return self.head(x)


class CachePositionLM(NoCacheLM):
    """A model whose forward takes ``cache_position`` (the calling convention of transformers 4)."""

    def forward(  # type: ignore[override]
        self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None, cache_position=None
    ):
        return super().forward(input_ids, inputs_embeds, attention_mask)


class NoEmbeddings(nn.Module):
    """A model of linear layers only: nothing to put virtual tokens in front of."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)
