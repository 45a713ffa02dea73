r"""LoftQ: a LoRA start that corrects the quantization error of a 4-bit base.

Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models" (arXiv:2310.08659). QLoRA starts
from ``Q + s B A`` with ``B = 0``, i.e. from the quantized weight ``Q``, whose error ``W - Q`` training must first
undo. LoftQ alternates, for ``t = 1..T``:

.. math::  Q_t = \mathrm{quant}(W - s B_{t-1} A_{t-1}), \qquad s B_t A_t = \mathrm{SVD}_r(W - \mathrm{dequant}(Q_t))

from ``B_0 A_0 = 0``, and starts training from ``(Q_T, A_T, B_T)``, so ``||W - (Q_T + s B_T A_T)||_F < ||W - Q_1||_F``.
The square root of the singular values goes to each factor: ``B = U_r \sqrt{S_r / s}``, ``A = \sqrt{S_r / s} V_r^T``.

LQ-LoRA (Guo et al. 2024, arXiv:2311.12023) weights the decomposition by a diagonal Fisher ``F`` (squared gradients,
``(out, in)``): with the rank-1 approximation ``F ~ d e^T / sum(F)`` (``d``, ``e`` its row and column sums), the
weighted problem ``min ||sqrt(F) * (R - L)||`` becomes ``L = D^{-1/2} SVD_r(D^{1/2} R E^{1/2}) E^{-1/2}``.

The quantization is the plugin's own (same mode, block size, double quantization), and the 4-bit base the layer keeps
IS ``Q_T``: this module replaces the adapter's base layer by a bitsandbytes ``Linear4bit`` holding that exact
``Params4bit``, which ``NF4Precision`` then leaves as it is (re-quantizing ``dequant(Q_T)`` is not always the
identity: with double quantization the scales move). ``LoRA(init="loftq")`` runs :func:`apply_loftq` at ``setup``,
before checkpoint restore, so a resumed run recomputes the same ``Q_T`` and loads the trained ``A``, ``B``.

Example::

    q, a, b = loftq_decompose(weight, r=16, scaling=2.0, spec=QuantSpec(), iters=5)
    # ||weight - (dequantize(q) + 2.0 * b @ a)|| < ||weight - dequantize(quantize_weight(weight, spec))||
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters import LowRankUpdate, Wrapping, find_adapters
from lightning_zenft.precision.quantize import QuantSpec, dequantize, quantize_weight, to_linear4bit
from lightning_zenft.precision.select import is_4bit_layer

_EPS = 1e-12


def _low_rank(residual: torch.Tensor, r: int, fisher: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r S_r^{1/2}, S_r^{1/2} V_r^T)`` of the (Fisher-weighted) best rank-``r`` approximation of ``residual``."""
    if fisher is None:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:r].sqrt()  # (r,)
        return u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
    f = fisher.float().clamp_min(0)
    row = f.sum(dim=1).clamp_min(_EPS).sqrt()  # (out,)  D^{1/2}
    col = (f.sum(dim=0) / f.sum().clamp_min(_EPS)).clamp_min(_EPS).sqrt()  # (in,)  E^{1/2}
    u, s, vh = torch.linalg.svd(row[:, None] * residual * col[None, :], full_matrices=False)
    root = s[:r].sqrt()  # (r,)
    return (u[:, :r] * root) / row[:, None], (root[:, None] * vh[:r]) / col[None, :]  # (out, r), (r, in)


def loftq_decompose(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    spec: QuantSpec,
    iters: int = 1,
    fisher: torch.Tensor | None = None,
) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
    """``(Q, A, B)`` with ``dequant(Q) + scaling * B A`` close to ``weight`` (see the module docstring).

    Args:
        weight: the full-precision ``(out, in)`` weight.
        r: the LoRA rank.
        scaling: the LoRA scale ``s`` (``alpha / r``).
        spec: the quantization (the plugin's).
        iters: ``T``, the number of alternations (1 to 5 are usual).
        fisher: a diagonal Fisher ``(out, in)`` for LQ-LoRA's weighted decomposition, or None.

    Returns:
        ``Q`` as a bitsandbytes ``Params4bit`` (on ``weight``'s device), ``A (r, in)`` and ``B (out, r)`` in float32.
    """
    if iters < 1:
        raise ValueError(f"LoftQ needs iters >= 1; got {iters}.")
    if not 1 <= r <= min(weight.shape):
        raise ValueError(
            f"LoftQ rank r={r} must be in [1, min(out, in)={min(weight.shape)}] for shape {tuple(weight.shape)}."
        )
    if fisher is not None and fisher.shape != weight.shape:
        raise ValueError(f"the Fisher has shape {tuple(fisher.shape)}; the weight {tuple(weight.shape)}.")
    w = weight.detach().float()  # (out, in)
    low_rank = torch.zeros_like(w)  # s B A
    b = a = None
    quantized = None
    for _ in range(iters):
        quantized = quantize_weight(w - low_rank, spec)
        b, a = _low_rank(w - dequantize(quantized, torch.float32), r, fisher)
        low_rank = b @ a  # (out, in)
    assert quantized is not None and a is not None and b is not None
    root = scaling**0.5
    return quantized, a / root, b / root


def _loftq_layers(model: nn.Module) -> list[tuple[str, Any]]:
    layers = []
    for name, layer in find_adapters(model):
        if getattr(layer, "init", None) != "loftq":
            continue
        if not isinstance(layer, LowRankUpdate) or not isinstance(layer, Wrapping) or layer.low_rank_factors is None:
            raise TypeError(
                f"{name} ({type(layer).__name__}) asks for init='loftq', which is defined for LoRA layers (output "
                "base(x) + s B A x); DoRA's magnitude rescales rows. Use LoRA, or another init for this adapter."
            )
        layers.append((name, layer))
    return layers


def pending_loftq(model: nn.Module) -> list[str]:
    """Adapter layers that ask for ``init="loftq"`` but whose base is not quantized yet."""
    return [name for name, layer in _loftq_layers(model) if not is_4bit_layer(layer.base_layer)]


@torch.no_grad()
def apply_loftq(
    model: nn.Module,
    quantizer: Any,
    iters: int = 1,
    fisher: dict[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> list[str]:
    """Initialize every ``init="loftq"`` LoRA layer of ``model`` by LoftQ and quantize its base to that ``Q``.

    Args:
        model: a model holding LoRA layers made with ``init="loftq"`` (``inject_adapters`` or the ``LoRA`` callback).
        quantizer: the ``NF4Precision`` (or ``FabricNF4Precision``) that will run the model, or a ``QuantSpec``.
        iters: LoftQ's ``T``.
        fisher: LQ-LoRA: ``{adapter layer name: diagonal Fisher (out, in)}``; layers not in it use plain LoftQ.
        device: where to compute (default: the plugin's device, else where each weight is).

    Returns:
        The names of the layers initialized.

    Raises:
        TypeError: when ``quantizer`` is not a 4-bit plugin or spec, or a LoftQ layer is not a LoRA layer.
        ValueError: when a layer's full-precision weight is not available (a base quantized without LoftQ).
    """
    spec = quantizer if isinstance(quantizer, QuantSpec) else getattr(quantizer, "spec", None)
    if not isinstance(spec, QuantSpec):
        raise TypeError(
            f"LoRA(init='loftq') quantizes the base as the 4-bit precision plugin does, but the precision plugin is "
            f"{type(quantizer).__name__}. Add plugins=[lightning_zenft.NF4Precision(...)] to the Trainer (or pass a "
            "QuantSpec to apply_loftq)."
        )
    device = device if device is not None else getattr(quantizer, "device", None)
    names = []
    for name, layer in _loftq_layers(model):
        base = layer.base_layer
        weight = _full_precision_weight(name, base)
        if device is not None:
            weight = weight.to(device)
        a_param, b_param, scaling = layer.low_rank_factors()
        weight_fisher = None if fisher is None else fisher.get(name)
        if weight_fisher is not None:
            weight_fisher = weight_fisher.to(weight.device)
        q, a, b = loftq_decompose(weight, a_param.shape[0], scaling, spec, iters, weight_fisher)
        a_param.copy_(a.to(a_param))
        b_param.copy_(b.to(b_param))
        layer.base_layer = to_linear4bit(_shell(base), spec, weight=q)
        names.append(name)
    return names


def _shell(base: nn.Module) -> nn.Module:
    """An ``nn.Linear`` stand-in carrying ``base``'s sizes and bias, for :func:`to_linear4bit`."""
    shell = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    shell.bias = base.bias
    shell.train(base.training)
    return shell


def _full_precision_weight(name: str, base: nn.Module) -> torch.Tensor:
    if not is_4bit_layer(base):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoftQ quantizes nn.Linear bases; {name}'s base is {type(base).__name__}.")
        return base.weight
    source = getattr(base, "source_weight", None)
    if source is None:
        raise ValueError(
            f"{name}'s base is already 4-bit and its full-precision weight is gone, which LoftQ needs. Load the model "
            "in full precision (LoftQ quantizes it), or with NF4Precision's low-memory loader, which can re-read it."
        )
    return source.read()
