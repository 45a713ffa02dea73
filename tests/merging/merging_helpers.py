"""Helpers for the merging tests: adapted tiny models, saved adapters, logits."""

from __future__ import annotations

from pathlib import Path

import torch
from zenft_testing import load_base

from lightning_zenft import LoRAConfig, inject_adapters, save_adapter


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Stand-in for training: every trainable tensor moves by random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def adapted(base_dir: Path, seed: int = 0, **lora) -> torch.nn.Module:
    """The base loaded from ``base_dir`` with adapters injected and 'trained' (randomized)."""
    model = load_base(base_dir)
    inject_adapters(model, LoRAConfig(**lora))
    randomize(model, seed)
    return model.eval()


def make_adapter(base_dir: Path, out: Path, seed: int = 0, **lora) -> tuple[torch.nn.Module, Path]:
    model = adapted(base_dir, seed, **lora)
    return model, save_adapter(model, out)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
