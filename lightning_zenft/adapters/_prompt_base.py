"""What prompt tuning, p-tuning and prefix tuning share: a module in a causal LM that rewrites the model's calls.

These methods add no layer: they change what the frozen model is called with. Their module is built from the model
(``build(model, ...)``), is added to it as a child (so ``model.parameters()``, ``.to()`` and checkpoints see it)
without holding the model, and installs a forward pre-hook with keyword arguments on the model, so user code such
as ``model(input_ids=..., attention_mask=..., labels=...)`` or ``model.generate(...)`` runs unchanged.
``remove()`` uninstalls the hooks; ``disabled`` makes them pass every call through untouched.

The conventions every method here follows (HF PEFT's, so that files and outputs agree):

* the ``n`` virtual positions come first, before any padding: the attention mask gets ``n`` ones in front;
* the real tokens' positions are shifted by ``n`` (virtual tokens sit at ``0 .. n-1``). Position ids the caller
  gives are shifted; a caller that gives none but an attention mask gets positions counted along the mask
  (``cumsum(mask) - 1``), so a left-padded row has the positions it has without padding, and left- and
  right-padded batches give the results of their unpadded rows (``generate`` passes such position ids itself);
* the attention cache: a call with no cache or an empty one is a first call, which puts the virtual tokens in; the
  cache it fills is marked with their count. A call with a cache that holds tokens only shifts the mask and the
  positions by that count, and refuses a cache without the mark (filled without the adapter).

Only ``transformers`` 5 calling conventions are handled (``cache=``, or ``past_key_values=``, holding a ``Cache``
object); a model whose forward takes ``cache_position`` (older ``transformers``) is refused at build.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

CACHE_MARK = "_zenft_virtual_tokens"
"""Attribute set on a ``Cache`` filled through a prompt method: how many virtual tokens it holds first."""

_CACHE_KEYS = ("cache", "past_key_values")
_RESTART = (
    "A cache that holds tokens takes only the new tokens, with a mask over its real positions plus theirs; "
    "`generate` given back a cache it returned counts the virtual tokens as input tokens: start it without one."
)


def check_virtual_tokens(num_virtual_tokens: object) -> int:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens={num_virtual_tokens!r} must be a positive integer.")
    return num_virtual_tokens


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (``model.dtype`` for ``transformers`` models, else its first float tensor)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted along a ``(B, L)`` attention mask: ``cumsum(mask) - 1``, padding clamped to 0."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L)


class ModelPrompt(nn.Module):
    """Base of the prompt methods' modules: the hooks, ``disabled``, ``remove()``, and the cache bookkeeping.

    A subclass builds its parameters, calls :meth:`_install` last (so a failing build leaves the model untouched),
    and implements :meth:`_start`: the rewrite of a first call (no cache, or an empty one).

    Args:
        model: the causal LM (a ``transformers`` model); checked, hooked, never registered as a submodule.
        num_virtual_tokens: how many virtual positions the method adds in front of every sequence.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = check_virtual_tokens(num_virtual_tokens)
        self.disabled = False
        what = type(self).__name__
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"{what} supports decoder-only causal LMs; {type(model).__name__} is an encoder-decoder model."
            )
        params = inspect.signature(model.forward).parameters
        plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self._takes = frozenset(name for name, p in params.items() if p.kind in plain)
        self._positional = [n for n, p in params.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if "cache_position" in self._takes:
            raise ValueError(
                f"{type(model).__name__}.forward takes `cache_position`: this transformers version passes cache "
                f"positions that {what} would have to shift too, which it does not. Use transformers >= 5."
            )
        self._cache_key = next((key for key in _CACHE_KEYS if key in self._takes), None)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mark_output = False

    # ------------------------------------------------------------------ protocol
    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _install(self, model: nn.Module) -> None:
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Uninstall the hooks: the model computes exactly what it computed before the module was built."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ the hooks
    def _before_forward(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._mark_output = False
        if self.disabled:
            return None
        call = self._named_call(model, args, kwargs)
        cache = call.get(self._cache_key) if self._cache_key else None
        if cache is not None and not callable(getattr(cache, "get_seq_length", None)):
            raise TypeError(
                f"{type(self).__name__}: the attention cache must be a transformers Cache object (e.g. DynamicCache), "
                f"got a {type(cache).__name__}."
            )
        held = cache.get_seq_length() if cache is not None else 0
        if held:
            self._continue(call, cache, held)
        else:
            self._start(model, call)
            filled = call.get(self._cache_key) if self._cache_key else None
            if filled is not None:  # the cache given, or the one the method made
                setattr(filled, CACHE_MARK, self.num_virtual_tokens)
            self._mark_output = True
        return (), call

    def _after_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._mark_output:  # a cache the model made itself in a first call now holds the virtual tokens
            values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple) else ()
            for value in values:
                if callable(getattr(value, "get_seq_length", None)):
                    setattr(value, CACHE_MARK, self.num_virtual_tokens)
        self._mark_output = False

    def _named_call(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument of the call by name (positional ones bound to the forward's parameters)."""
        if len(args) > len(self._positional):
            raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments; pass them by name.")
        call = dict(zip(self._positional, args, strict=False))  # fewer args than parameters
        twice = sorted(set(call) & set(kwargs))
        if twice:
            raise TypeError(f"{type(model).__name__}.forward got {twice} both by position and by name.")
        call.update(kwargs)
        key = self._cache_key
        if key is not None:  # the other spelling of the cache argument goes to the one the forward declares
            other = next(k for k in _CACHE_KEYS if k != key)
            if call.get(key) is None and call.get(other) is not None:
                call[key] = call.pop(other)
            elif other in call and call[other] is None:
                del call[other]
        return call

    # ------------------------------------------------------------------ rewriting a call
    def _start(self, model: nn.Module, call: dict[str, Any]) -> None:
        """Rewrite ``call``, a first call (no cache, or an empty one), so the virtual tokens take part."""
        raise NotImplementedError

    def _continue(self, call: dict[str, Any], cache: Any, held: int) -> None:
        """Rewrite a call on a cache that holds ``held`` positions, the first of them virtual ones."""
        count = getattr(cache, CACHE_MARK, None)
        if count is None:
            raise RuntimeError(
                f"{type(self).__name__}: the attention cache holds {held} positions but was not filled with this "
                "adapter on (its virtual tokens are missing). Start from no cache (or an empty one) with the "
                "adapter on."
            )
        length, real = self._length(call), held - count
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        # `generate` given back a cache it returned takes the virtual tokens for input tokens and re-feeds tokens
        # the cache holds: the mask then covers more than the cache's real positions plus the call's, or (no mask,
        # so no padding) the position ids do not start right after the real positions the cache holds
        if mask is not None and mask.dim() == 2 and length is not None and mask.shape[-1] != real + length:
            raise ValueError(
                f"{type(self).__name__}: the attention mask covers {mask.shape[-1]} positions, but the cache holds "
                f"{real} real positions (after {count} virtual ones) and the call adds {length}. {_RESTART}"
            )
        if mask is None and positions is not None and positions.numel() and bool((positions[..., 0] != real).any()):
            raise ValueError(
                f"{type(self).__name__}: the position ids start at {positions[..., 0].tolist()}, but the cache holds "
                f"{real} real positions (after {count} virtual ones), so the next one is {real}. {_RESTART}"
            )
        self._shift(call, count, length)

    def _shift(self, call: dict[str, Any], count: int, length: int | None) -> torch.Tensor | None:
        """Put ``count`` ones in front of the attention mask and shift the position ids by ``count`` (or count them
        along the mask when the call has none); returns the extended mask."""
        mask = self._extended_mask(call, count)
        positions = call.get("position_ids")
        if positions is not None:
            call["position_ids"] = self._checked_positions(positions) + count
        elif mask is not None and "position_ids" in self._takes and length is not None:
            call["position_ids"] = positions_from_mask(mask)[:, -length:]  # (B, length)
        return mask

    def _extended_mask(self, call: dict[str, Any], count: int) -> torch.Tensor | None:
        mask = call.get("attention_mask")
        if mask is None:
            return None
        if mask.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} extends 2-D attention masks (batch, length); got one of shape "
                f"{tuple(mask.shape)}. Pass the 2-D padding mask and let the model build the rest."
            )
        mask = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)  # (B, count + L)
        call["attention_mask"] = mask
        return mask

    def _checked_positions(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} shifts 2-D position ids (batch, length); got shape {tuple(positions.shape)}."
            )
        return positions

    def _check_not_packed(self, call: dict[str, Any]) -> None:
        """Packed rows (position ids that restart inside a row, no mask) would see the virtual tokens once: refused."""
        positions = call.get("position_ids")
        if positions is None or call.get("attention_mask") is not None or positions.shape[-1] < 2:
            return
        if bool((positions.diff(dim=-1) != 1).any()):
            raise ValueError(
                f"{type(self).__name__}: the position ids restart inside a row (packed sequences), so only the first "
                "sequence of each row would see the virtual tokens. Do not pack sequences with prompt methods."
            )

    @staticmethod
    def _length(call: dict[str, Any]) -> int | None:
        for key in ("input_ids", "inputs_embeds"):
            value = call.get(key)
            if value is not None:
                return int(value.shape[1])
        return None

    @staticmethod
    def _batch(call: dict[str, Any]) -> int | None:
        for key in ("input_ids", "inputs_embeds"):
            value = call.get(key)
            if value is not None:
                return int(value.shape[0])
        return None


__all__ = ["CACHE_MARK", "ModelPrompt", "check_virtual_tokens", "model_dtype", "positions_from_mask"]
