r"""LoReFT: low-rank linear subspace representation fine-tuning, on the hidden states a transformer block outputs.

Wu et al. 2024, "ReFT: Representation Finetuning for Language Models" (arXiv:2404.03592). At chosen positions, the
block's output ``h`` is edited inside an ``r``-dimensional subspace:

.. math::  \Phi(h) = h + R^\top (W h + b - R h), \qquad R \in \mathbb{R}^{r \times d} \text{ with } R R^\top = I_r,
           \; W \in \mathbb{R}^{r \times d}, \; b \in \mathbb{R}^r

The span of ``R``'s rows is the subspace; within it, ``h``'s coordinates ``R h`` are replaced by the learned
``W h + b``; the orthogonal complement is untouched.

* ``R`` stays orthonormal DURING training: it is a parametrization (``torch.nn.utils.parametrizations.orthogonal``,
  Householder reflectors, no trivialization buffer, the reflectors' unused diagonal pinned to 1 so weight decay
  cannot zero a row), so every optimizer step moves a free tensor and ``R`` is recomputed from it; nothing projects
  ``R`` back after a step. The trained tensor is ``rotate.parametrizations.weight.original`` (``r x d``; its
  diagonal gets no gradient); ``rotate.weight`` is ``R``, computed in float32 whatever the model's dtype. It starts
  as a random orthonormal matrix, ``W, b`` as ``nn.Linear``'s default, as the paper's code does; the edit is
  therefore not zero at start.
* Positions: the first ``first_positions`` and the last ``last_positions`` REAL tokens of each sequence (their union
  when they overlap), read from the ``attention_mask`` the model was called with, so left- and right-padded batches
  intervene on the same tokens as unpadded ones. A sequence with fewer real tokens than a position needs raises an
  error. A model called without an attention mask has no padding: every token is real.
* Generation with a KV cache: the positions are those of the prompt (the forward that starts the sequence); the
  decoding steps that continue a cache are not intervened on, as in the paper. Their keys and values attend to the
  prompt's edited states. (With ``use_cache=False`` every step re-reads the whole sequence, so its "last" tokens move.)
* The attention mask is not an input of a block: :meth:`LoReFTLayer.install` (called when the layer is put in place)
  adds a forward pre-hook to the innermost module above the block whose ``forward`` takes an ``attention_mask``
  (``LlamaModel``, ``GPT2Model``...), which hands each call's mask and cache length to the layer; :meth:`remove`
  takes it away.
* Not mergeable (the edit depends on the position); dropout, when set, acts on the edit ``R^T (W h + b - R h)``.

Example::

    layer = LoReFTLayer(model.model.layers[1], r=4, first_positions=1, last_positions=1)
    model.model.layers[1] = layer
    layer.install(model)                      # inject_adapters does both
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal
from torch.utils.hooks import RemovableHandle

from lightning_zenft.adapters._sublayer import float_dtype_device, join_output, module_widths, split_output


class _UnitDiagonal(nn.Module):
    """The Householder factors in float32 (``householder_product`` has no bf16/fp16 kernels), their diagonal set to 1:
    PyTorch's Householder map reads column signs from it with an integer cast, so weight decay (which still shrinks
    entries that get no gradient) would turn a 1 into 0.99 and then 0, zeroing a row of ``R``. With the diagonal
    fixed these entries are unused; a sign flip of a row of ``R`` is absorbed by ``W, b`` anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.diagonal_scatter(x, torch.ones(min(x.shape), dtype=x.dtype, device=x.device))

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LoReFTLayer(nn.Module):
    """A frozen transformer block whose output hidden states are edited by LoReFT at chosen token positions.

    Args:
        base: the block to wrap (its parameters are frozen); it returns the hidden states ``(B, T, d)`` (or a tuple
            starting with them).
        r: the rank of the intervention, at most the hidden size ``d``.
        first_positions: intervene on the first this many real tokens of each sequence.
        last_positions: intervene on the last this many real tokens of each sequence.
        dropout: dropout on the edit.

    Example::

        layer = LoReFTLayer(block, r=4, first_positions=0, last_positions=2)
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 4,
        first_positions: int = 1,
        last_positions: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden_size = module_widths(base, "LoReFTLayer")[1]
        if not 1 <= r <= self.hidden_size:
            raise ValueError(f"LoReFT rank r={r} must be between 1 and the hidden size {self.hidden_size}.")
        if first_positions < 0 or last_positions < 0 or first_positions + last_positions == 0:
            raise ValueError(
                f"LoReFT first_positions={first_positions}, last_positions={last_positions}: both must be >= 0 and "
                "one of them positive."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoReFT dropout={dropout} must be in [0, 1).")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        dtype, device = float_dtype_device(base)
        self.r, self.first_positions, self.last_positions = r, first_positions, last_positions
        self.rotate = nn.Linear(self.hidden_size, r, bias=False, device=device, dtype=torch.float32)  # R: (r, d)
        nn.init.orthogonal_(self.rotate.weight)  # QR: float32 (no half-precision kernels), then the model's dtype
        parametrize.register_parametrization(self.rotate, "weight", _UnitDiagonal())
        orthogonal(self.rotate, orthogonal_map="householder", use_trivialization=False)
        self.rotate.to(dtype)
        self.learned_source = nn.Linear(self.hidden_size, r, device=device, dtype=dtype)  # W: (r, d), b: (r,)
        self.edit_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self._hooks: list[RemovableHandle] = []
        self._installed = False
        self._mask: torch.Tensor | None = None
        self._past = 0

    # ------------------------------------------------------------------ protocol
    def adapter_params(self) -> list[str]:
        return ["rotate.parametrizations.weight.original", "learned_source.weight", "learned_source.bias"]

    def settings(self) -> dict[str, Any]:
        """The primitives this layer was built with (``LoReFTLayer(base, **settings())`` rebuilds it)."""
        dropout = self.edit_dropout.p if isinstance(self.edit_dropout, nn.Dropout) else 0.0
        return {
            "r": self.r,
            "first_positions": self.first_positions,
            "last_positions": self.last_positions,
            "dropout": float(dropout),
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trained tensors (relative to this layer) and the settings recorded for them."""
        return {name: self.get_parameter(name).detach() for name in self.adapter_params()}, self.settings()

    # ------------------------------------------------------------------ the attention mask of each call
    def install(self, model: nn.Module) -> None:
        """Read each call's attention mask and cache length from the innermost module of ``model`` above this layer
        whose ``forward`` takes an ``attention_mask`` (none: every token is real). Called by ``inject_adapters``.

        Raises:
            ValueError: when this layer is not inside ``model``.
        """
        self.remove()
        names = {id(m): n for n, m in model.named_modules()}
        if id(self) not in names:
            raise ValueError(f"this LoReFTLayer is not inside the {type(model).__name__} given to install().")
        path = names[id(self)].split(".") if names[id(self)] else []
        for depth in range(len(path) - 1, -1, -1):
            ancestor = model.get_submodule(".".join(path[:depth]))
            params = list(inspect.signature(ancestor.forward).parameters)
            if "attention_mask" in params:
                read = functools.partial(self._read_call, params.index("attention_mask"))
                self._hooks.append(ancestor.register_forward_pre_hook(read, with_kwargs=True))
                break
        self._installed = True

    def remove(self) -> None:
        """Take away what :meth:`install` added."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._installed = False

    def _read_call(self, mask_index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else None
        if "attention_mask" not in kwargs and len(args) > mask_index:
            mask = args[mask_index]
        self._mask = mask if isinstance(mask, torch.Tensor) else None
        self._past = 0
        for value in (*args, *kwargs.values()):
            length = getattr(value, "get_seq_length", None)  # a transformers Cache
            if callable(length):
                self._past = int(length())
                break

    # ------------------------------------------------------------------ forward
    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """``R^T (W h + b - R h)`` for hidden states ``h`` (..., d), in the adapter's dtype."""
        h = h.to(self.learned_source.weight.dtype)
        rotation = self.rotate.weight.to(h.dtype)  # (r, d), orthonormal rows (computed in float32)
        delta = self.learned_source(h) - h @ rotation.T  # (..., r)
        return self.edit_dropout(delta @ rotation)  # (..., d)

    def positions(self, mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """A ``(batch, length)`` boolean mask of the positions intervened on: the first and last real tokens.

        Raises:
            ValueError: when the mask does not fit the hidden states, or a sequence is too short for the positions.
        """
        if mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
                raise ValueError(
                    f"LoReFT reads real tokens from a 2-D attention_mask (batch, tokens) = ({batch}, {length}), but "
                    f"the model was called with one of shape {tuple(mask.shape)}."
                )
            real = mask.to(device=device) != 0
        count = real.sum(dim=1)  # (B,)
        need = max(self.first_positions, self.last_positions)
        short = (count < need).nonzero().flatten().tolist() if mask is not None else ([0] if length < need else [])
        if short:
            row = short[0]
            raise ValueError(
                f"LoReFT(first_positions={self.first_positions}, last_positions={self.last_positions}) needs "
                f"{need} real tokens per sequence, but sequence {row} of the batch has {int(count[row])} "
                f"({len(short)} sequences are that short); give fewer positions or longer inputs."
            )
        rank = real.cumsum(dim=1) - 1  # (B, T): index of each token among its sequence's real tokens
        first = rank < self.first_positions
        last = rank >= (count - self.last_positions).unsqueeze(1)
        return real & (first | last)  # (B, T)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.disabled:
            return output
        if not self._installed:
            raise RuntimeError(
                "LoReFTLayer reads which tokens are real from the model's attention mask: call layer.install(model) "
                "once it is in place (inject_adapters and load_adapter do)."
            )
        hidden, rest = split_output(output, "LoReFTLayer")  # (B, T, d)
        if self._past > 0:  # a decoding step continuing a cached prompt: the prompt's positions were edited
            return output
        batch, length = hidden.shape[0], hidden.shape[1]
        chosen = self.positions(self._mask, batch, length, hidden.device)  # (B, T)
        edited = hidden + self.edit(hidden).to(hidden.dtype)  # (B, T, d)
        return join_output(torch.where(chosen.unsqueeze(-1), edited, hidden), rest)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, r={self.r}, first_positions={self.first_positions}, "
            f"last_positions={self.last_positions}, installed={self._installed}"
        )


__all__ = ["LoReFTLayer"]
