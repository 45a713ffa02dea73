"""Liger-Kernel: the lazy import, and plain-PyTorch references of the Liger kernels the library applies.

The kernels themselves come from ``liger_kernel`` (``pip install liger-kernel``; they need CUDA or Triton's
interpreter). How they are applied to a model (found by what modules compute, checked on probes) is
:mod:`lightning_zenft.fusion.liger`.

Example::

    y = rms_norm_reference(x, norm.weight, 1e-6, offset=0.0, mode="llama")
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F


def require_liger() -> ModuleType:
    """``import liger_kernel``, or an error saying how to install it."""
    try:
        import liger_kernel
    except ImportError as err:
        raise ImportError(
            "Liger kernels were requested but liger_kernel is not installed: `pip install liger-kernel` "
            "(or `pip install lightning_zenft[kernels]`), or turn the Liger switches off."
        ) from err
    return liger_kernel


def liger_available() -> bool:
    """True when ``liger_kernel`` imports."""
    try:
        require_liger()
    except ImportError:
        return False
    return True


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, mode: str) -> torch.Tensor:
    """RMSNorm in plain PyTorch: ``mode="llama"`` casts before scaling, ``"gemma"`` scales in fp32."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "gemma":
        return (normed * (offset + weight.float())).to(x.dtype)
    return (offset + weight) * normed.to(x.dtype)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate-half form: ``x cos + rotate_half(x) sin``."""

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def causal_lm_loss_reference(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
    """Shifted next-token cross-entropy, ``-100`` ignored; summed over ``num_items`` when given, else the mean."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    if num_items is None:
        return F.cross_entropy(logits, target, ignore_index=-100)
    return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / num_items
