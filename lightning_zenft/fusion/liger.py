r"""Applying Liger-Kernel's Triton kernels (RMSNorm, RoPE, fused linear cross-entropy) to any model, generically.

Nothing here is per architecture. Each patch finds its targets by what they compute, checked on a small probe input
against a plain-PyTorch formula (:mod:`lightning_zenft.kernels.liger`), and is installed only if the module's own
computation matches it:

* **RMSNorm**: a module with a 1-D ``weight`` and an ``eps``/``variance_epsilon`` whose forward equals
  ``(x / rms(x)) * w`` (Llama casting: normalize in fp32, cast, then scale) or ``* (1 + w)`` (Gemma casting: scale
  in fp32). Its forward becomes ``LigerRMSNormFunction`` with the matching ``offset`` and ``casting_mode``.
* **RoPE**: the ``apply_rotary_pos_emb(q, k, cos, sin, ...)`` function of an attention module's Python module,
  when it equals the rotate-half formula ``q cos + rotate_half(q) sin``; it is replaced by Liger's in that module
  (and restored by :func:`restore_liger`).
* **Fused linear cross-entropy**: a causal LM with ``get_decoder()`` and an output head whose loss equals
  cross-entropy over ``head(decoder(x))`` with shifted labels. Its forward then runs the decoder and
  ``LigerFusedLinearCrossEntropyFunction`` on the hidden states, never building the ``tokens x vocab`` logits, when
  it is training with labels (logits are then not returned). A low-rank adapter on the head
  (:class:`~lightning_zenft.adapters.LowRankUpdate`) keeps its gradient: the head is computed as
  ``[h, s\,\mathrm{dropout}(h) A^T] [W, B]^T``, one fused call on concatenated inputs, so ``A`` and ``B`` get exact
  gradients (cost: one copy of ``[W, B]`` per step). Other adapters on the head (DoRA) are skipped with a warning.

Liger must be installed (``pip install liger-kernel``) and its kernels need CUDA (or Triton's interpreter).

Example::

    patches = apply_liger(model, rms_norm=True, rope=True, fused_linear_cross_entropy=True)
    ...
    restore_liger(patches)
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_zenft.adapters import AdapterModule, LowRankUpdate, Wrapping
from lightning_zenft.adapters._base import dense_weight
from lightning_zenft.kernels.liger import (
    require_liger,
    rms_norm_reference,
    rope_reference,
)


@dataclass
class LigerPatches:
    """What :func:`apply_liger` changed, so :func:`restore_liger` can undo it.

    Example::

        patches = apply_liger(model)
        patches.names("rms_norm")       # ['rms_norm:model.norm', ...]
    """

    forwards: list[tuple[nn.Module, str]] = field(default_factory=list)  # (module, what) with an instance forward
    functions: list[tuple[ModuleType, str, Any]] = field(default_factory=list)  # (python module, name, original)
    skipped: dict[str, str] = field(default_factory=dict)

    def names(self, what: str) -> list[str]:
        return [w for _, w in self.forwards if w.startswith(what)]


# ---------------------------------------------------------------------------------------------------- RMSNorm
def _rms_norm_kind(module: nn.Module) -> tuple[float, float, str] | None:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    if isinstance(module, (nn.Linear, nn.Embedding, AdapterModule)) or len(list(module.children())):
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, weight.shape[0], generator=gen).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            want = module(x)
    except Exception:  # noqa: BLE001 - a module of another signature is simply not an RMSNorm
        return None
    for offset, mode in ((0.0, "llama"), (1.0, "gemma"), (0.0, "gemma"), (1.0, "llama")):
        got = rms_norm_reference(x, weight.detach(), eps, offset, mode)
        if got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3):
            return eps, offset, mode
    return None


class _LigerRMSNormForward:
    def __init__(self, module: nn.Module, eps: float, offset: float, mode: str) -> None:
        from liger_kernel.transformers.functional import liger_rms_norm

        self.fn = liger_rms_norm
        self.module = module
        self.eps, self.offset, self.mode = eps, offset, mode

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden_states, self.module.weight, self.eps, self.offset, self.mode, False)


# ---------------------------------------------------------------------------------------------------- RoPE
def _rope_matches(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    angle = torch.randn(1, 5, 4, generator=gen)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    try:
        got = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: not the function we patch
        return False
    want = rope_reference(q, k, cos, sin)
    return all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------------------------------------------- FLCE
def _head_operands(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(input, weight, bias)`` such that ``head(hidden) == input @ weight.T + bias`` (LoRA heads concatenated)."""
    active = isinstance(head, AdapterModule) and not (head.disabled or getattr(head, "merged", False))
    if active and isinstance(head, LowRankUpdate) and isinstance(head, Wrapping):
        base = head.base_layer
        a, b, s = head.low_rank_factors()  # (r, H), (V, r)
        xa = F.linear(head.lora_dropout(hidden.to(a.dtype)), a) * s  # (M, r)
        inp = torch.cat([hidden, xa.to(hidden.dtype)], dim=-1)  # (M, H + r)
        weight = torch.cat([dense_weight(base).to(hidden.dtype), b.to(hidden.dtype)], dim=1)  # (V, H + r)
        return inp, weight, getattr(base, "bias", None)
    if isinstance(head, Wrapping):  # merged or disabled: the base layer computes the head
        head = head.base_layer
    return hidden, dense_weight(head), getattr(head, "bias", None)


class _FusedLinearCEForward:
    """Instance forward of a causal LM: decoder, then fused linear cross-entropy when training with labels."""

    def __init__(self, model: nn.Module, use_liger: bool = True) -> None:
        self.model = model
        self.use_liger = use_liger

    def __call__(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        model = self.model
        if labels is None or not model.training or args or kwargs.get("logits_to_keep", 0) not in (0, None):
            return type(model).forward(model, *args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.get("num_items_in_batch")
        outputs = model.get_decoder()(**kwargs)
        hidden = outputs[0][:, :-1]  # (B, T-1, H)
        target = labels[:, 1:].reshape(-1)  # (B*(T-1),)
        inp, weight, bias = _head_operands(model.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]))
        reduction = "mean" if num_items is None else "sum"
        if self.use_liger:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            loss = liger_fused_linear_cross_entropy(inp, weight, target, bias, ignore_index=-100, reduction=reduction)
        else:  # the same computation unfused: used to verify the structure on a probe
            loss = F.cross_entropy(F.linear(inp, weight, bias).float(), target, ignore_index=-100, reduction=reduction)
        if num_items is not None:
            loss = loss / num_items
        from transformers.modeling_outputs import CausalLMOutputWithPast

        names = {f.name for f in fields(CausalLMOutputWithPast)}
        extra = {k: v for k, v in outputs.items() if k in names and k not in ("loss", "logits")}
        return CausalLMOutputWithPast(loss=loss, logits=None, **extra)


def _flce_matches(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if head is None or vocab is None:
        return False
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 6), generator=gen).to(device)
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():  # dropout off, training flag on (the patched path only runs in training)
        if isinstance(m, nn.Dropout):
            m.eval()
    try:
        with torch.no_grad():
            want = type(model).forward(model, input_ids=ids, labels=ids).loss
            got = _FusedLinearCEForward(model, use_liger=False)(input_ids=ids, labels=ids).loss
    except Exception:  # noqa: BLE001 - a model whose forward differs in signature is not patched
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode
    return torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- apply
def apply_liger(
    model: nn.Module, *, rms_norm: bool = True, rope: bool = True, fused_linear_cross_entropy: bool = True
) -> LigerPatches:
    """Install the requested Liger kernels on ``model`` (see the module docstring); returns what was patched.

    Example::

        patches = apply_liger(model, rope=False)
        print(patches.names("rms_norm"))
    """
    require_liger()
    patches = LigerPatches()
    if rms_norm:
        for name, module in model.named_modules():
            kind = _rms_norm_kind(module)
            if kind is not None and "forward" not in module.__dict__:
                module.forward = _LigerRMSNormForward(module, *kind)
                patches.forwards.append((module, f"rms_norm:{name}"))
    if rope:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        seen: set[str] = set()
        for _, module in model.named_modules():
            py_name = type(module).__module__
            py_mod = sys.modules.get(py_name)
            fn = getattr(py_mod, "apply_rotary_pos_emb", None)
            if py_mod is None or py_name in seen or fn is None:
                continue
            seen.add(py_name)
            if _rope_matches(fn):
                py_mod.apply_rotary_pos_emb = liger_rotary_pos_emb
                patches.functions.append((py_mod, "apply_rotary_pos_emb", fn))
            else:
                patches.skipped[f"rope:{py_name}"] = "its apply_rotary_pos_emb is not the rotate-half formula"
    if fused_linear_cross_entropy:
        lms = [
            (name, m)
            for name, m in model.named_modules()
            if all(callable(getattr(m, a, None)) for a in ("get_decoder", "get_output_embeddings"))
            and m.get_output_embeddings() is not None
        ]
        if not lms:
            patches.skipped["fused_linear_cross_entropy"] = "no module has get_decoder() and an output head"
        for name, lm in lms:
            if "forward" in lm.__dict__:
                continue
            out_head = lm.get_output_embeddings()
            if isinstance(out_head, AdapterModule) and not isinstance(out_head, LowRankUpdate):
                patches.skipped[f"fused_linear_cross_entropy:{name}"] = (
                    f"its output head is a {type(out_head).__name__}, whose change the fused cross-entropy cannot "
                    "express as one linear layer (e.g. DoRA's magnitude)"
                )
            elif _flce_matches(lm):
                lm.forward = _FusedLinearCEForward(lm)
                patches.forwards.append((lm, f"fused_linear_cross_entropy:{name}"))
            else:
                patches.skipped[f"fused_linear_cross_entropy:{name}"] = (
                    "its loss is not cross-entropy over head(decoder(x)) with shifted labels (e.g. soft-capped logits)"
                )
    for what, why in patches.skipped.items():
        warnings.warn(f"Liger kernels: {what} not applied: {why}.", stacklevel=2)
    return patches


def restore_liger(patches: LigerPatches) -> None:
    """Undo :func:`apply_liger`."""
    for module, _ in patches.forwards:
        module.__dict__.pop("forward", None)
    for py_mod, name, original in patches.functions:
        setattr(py_mod, name, original)
    patches.forwards.clear()
    patches.functions.clear()
