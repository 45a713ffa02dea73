"""Prefix tuning: trained key/value prefixes at every attention layer, given to the model as its attention cache.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation". Every attention layer ``l`` attends
over ``n`` trained positions before the real ones: with ``K_l, V_l`` the keys and values of the input,

    attention_l(Q, [Pk_l; K_l], [Pv_l; V_l]),    Pk_l, Pv_l of shape (heads_kv, n, head_dim),

the prefixes ``Pk_l``/``Pv_l`` being the trained tensors (no RoPE is applied to them: they are keys as the cache
stores them). The model stays frozen and unchanged; its attention cache carries the prefix: on a first call (no
cache, or an empty one) the module fills the cache with the prefix, the attention mask gets ``n`` ones in front and
the real tokens' positions are shifted by ``n`` (see :mod:`lightning_zenft.adapters._prompt_base`); generation then
continues on that cache. The outputs cover the real tokens only.

All prefixes are one table, ``P`` ``(n, L * 2 * heads_kv * head_dim)``, laid out per virtual token as
``(layer, key|value, head, dim)`` (PEFT's layout, so its files load as they are). The paper trains ``P`` through a
reparametrization for stability, ``P = MLP(P')`` with ``P'`` ``(n, d')`` and ``MLP = Linear(d', h), tanh,
Linear(h, L * 2 * heads_kv * head_dim)`` (``prefix_projection=True``; ``d' = heads_kv * head_dim``, ``h`` =
``encoder_hidden_size``, default ``d'``, as PEFT); after training only ``P`` matters, and that is what a file holds
(it loads with ``prefix_projection=False``).

Defaults: 20 virtual tokens (the paper uses 10 for table-to-text, 200 for summarization); ``P`` (or ``P'``) starts at
``N(0, 1)`` and the MLP at PyTorch's default, as PEFT. Models with grouped-query attention get ``heads_kv`` prefix
heads, as their cache holds.

Refused at build, with the reason: a model whose forward takes no attention cache (prefix tuning is impossible
there), a model without the layer/head counts in its config, encoder-decoder models. Refused at run time: gradient
checkpointing in training (``transformers`` drops the cache, hence the prefix, in checkpointed layers).

Example::

    prefix = PrefixKV(model, num_virtual_tokens=8)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)    # every layer attends over 8 + T positions
    prefix.remove()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_zenft.adapters._prompt_base import ModelPrompt, model_dtype


def kv_shape(model: nn.Module, what: str = "prefix tuning") -> tuple[int, int, int]:
    """``(layers, key/value heads, head dim)`` of a ``transformers`` model's attention cache, from its config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"{what} gives the prefix to the model as its attention cache; {type(model).__name__} is not a "
            "transformers model (no .config saying its layers and heads). Use a method that adapts layers (LoRA)."
        )
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(text, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head", "num_heads")
    hidden = first("hidden_size", "n_embd", "d_model")
    kv_heads = first("num_key_value_heads") or (1 if getattr(text, "multi_query", False) else heads)
    head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise ValueError(
            f"{what}: {type(config).__name__} does not give the attention shape (found layers={layers}, "
            f"key/value heads={kv_heads}, head dim={head_dim}); the prefix cannot be shaped for this model."
        )
    return layers, kv_heads, head_dim


class PrefixKV(ModelPrompt):
    """Prefix tuning: trained keys and values in front of every attention layer's, through the attention cache.

    Args:
        model: the causal LM (a ``transformers`` model whose forward takes an attention cache).
        num_virtual_tokens: ``n``, the prefix length.
        prefix_projection: train ``P`` through the reparametrization MLP (see the module docstring).
        encoder_hidden_size: ``h`` of the MLP; None: ``heads_kv * head_dim``.
        num_layers: the layer count the prefix was made for (checked; None: the model's).
        num_key_value_heads: the key/value head count it was made for (checked; None: the model's).
        head_dim: the head size it was made for (checked; None: the model's).

    Example::

        prefix = PrefixKV(model, num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=64)
        prefix.prefix().shape               # (8, layers * 2 * heads_kv * head_dim)
    """

    def __init__(
        self,
        model: nn.Module,
        num_virtual_tokens: int = 20,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        num_layers: int | None = None,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(model, num_virtual_tokens)
        what = type(self).__name__
        if self._cache_key is None:
            raise ValueError(
                f"{what} gives the prefix to the model as its attention cache, but {type(model).__name__}.forward "
                "takes no `cache` or `past_key_values`: the model exposes no attention cache, so prefix tuning is "
                "impossible. Use prompt tuning or p-tuning (they need input embeddings only), or LoRA."
            )
        shape = kv_shape(model, what)
        wanted = (num_layers, num_key_value_heads, head_dim)
        if any(w is not None and w != s for w, s in zip(wanted, shape, strict=True)):
            raise ValueError(
                f"{what} was made for (layers, key/value heads, head dim) = {wanted}; {type(model).__name__} has "
                f"{shape}: the adapter belongs to another base model."
            )
        if not isinstance(prefix_projection, bool):
            raise ValueError(f"prefix_projection={prefix_projection!r} must be True or False.")
        if encoder_hidden_size is not None and not prefix_projection:
            raise ValueError(f"encoder_hidden_size={encoder_hidden_size!r} sizes the MLP of prefix_projection=True.")
        self.num_layers, self.num_key_value_heads, self.head_dim = shape
        self.prefix_projection = prefix_projection
        kv_dim = self.num_key_value_heads * self.head_dim
        width = self.num_layers * 2 * kv_dim
        self.encoder_hidden_size = encoder_hidden_size  # as given (None: the default), so settings() rebuild it
        if prefix_projection:
            hidden = kv_dim if encoder_hidden_size is None else int(encoder_hidden_size)
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, kv_dim))  # P' (n, d')
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, width))  # P (n, L*2*Hkv*D)
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        if reference is not None:
            self.to(device=reference.device, dtype=model_dtype(model))
        self._install(model)

    def prefix(self) -> torch.Tensor:
        """The table ``P`` ``(n, L * 2 * heads_kv * head_dim)`` (live: gradients flow through it)."""
        return self.transform(self.embedding) if self.prefix_projection else self.prompt_embeddings

    def key_values(self) -> torch.Tensor:
        """The prefixes as the cache holds them: ``(L, 2, heads_kv, n, head_dim)`` (index 1: 0 keys, 1 values)."""
        n = self.num_virtual_tokens
        table = self.prefix().view(n, self.num_layers, 2, self.num_key_value_heads, self.head_dim)  # (n, L, 2, H, D)
        return table.permute(1, 2, 3, 0, 4)  # (L, 2, H, n, D)

    def _start(self, model: nn.Module, call: dict[str, Any]) -> None:
        self._check_not_packed(call)
        if (
            model.training
            and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        ):
            raise RuntimeError(
                f"{type(self).__name__}: gradient checkpointing is on, and transformers drops the attention cache in "
                "checkpointed layers, so the prefix would be ignored. Disable it "
                "(model.gradient_checkpointing_disable()) or use prompt tuning."
            )
        batch, length = self._batch(call), self._length(call)
        if batch is None:
            return  # the model raises its own error for a call without inputs
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[-1] != length:
            raise ValueError(
                f"{type(self).__name__}: the attention mask covers {mask.shape[-1]} positions but the call has "
                f"{length} tokens and no cache."
            )
        key = self._cache_key
        assert key is not None
        cache = call.get(key)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            call[key] = cache
        prefix = self.key_values().to(model_dtype(model))  # (L, 2, H, n, D)
        for layer in range(self.num_layers):
            keys = prefix[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, n, D)
            values = prefix[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, n, D)
            cache.update(keys, values, layer)
        self._shift(call, self.num_virtual_tokens, length)

    def settings(self) -> dict[str, Any]:
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "prefix_projection": self.prefix_projection,
            "encoder_hidden_size": self.encoder_hidden_size,
            "num_layers": self.num_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """PEFT's file: the table ``P`` as ``prompt_embeddings``; it rebuilds with ``prefix_projection=False``."""
        with torch.no_grad():
            table = self.prefix().detach().clone()
        return {"prompt_embeddings": table}, {
            **self.settings(),
            "prefix_projection": False,
            "encoder_hidden_size": None,
        }


__all__ = ["PrefixKV", "kv_shape"]
