"""Prompt tuning and p-tuning: trained virtual token embeddings put in front of every sequence.

Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): the
frozen model reads ``[P; E(x)]``, where ``E(x)`` ``(T, d)`` are the token embeddings of the input and ``P`` ``(n, d)``
is a trained table of ``n`` "soft" tokens, the only trained tensor (``n d`` parameters).

P-tuning (Liu et al. 2021, "GPT Understands, Too"): the virtual embeddings are the output of a small trained prompt
encoder over a trained input table, ``P = f(P0)``: an MLP (``Linear d->h, ReLU, Linear h->h, ReLU, Linear h->d``) or
a bidirectional LSTM followed by ``Linear 2h->2h, ReLU, Linear 2h->d``. The encoder couples the virtual tokens, which
the paper finds trains more stably than a free table. After training only ``P`` matters: a p-tuning file (PEFT's
format) holds ``P``, and loads as ``encoder_type="none"`` (the table itself).

How the model is called (see :mod:`lightning_zenft.adapters._prompt_base`): on a first call (no cache or an empty
one) ``inputs_embeds = [P; E(x)]`` ``(B, n + T, d)``, the attention mask gets ``n`` ones in front, ``labels`` get
``n`` entries of ``-100`` (no loss on virtual positions; the last virtual position predicts the first real token, as
in PEFT), virtual tokens take positions ``0 .. n-1`` and real tokens are shifted by ``n``. The outputs (logits,
hidden states) cover the ``n + T`` positions, as PEFT's do. Later calls on the cache only shift the mask and
positions. ``token_type_ids`` are refused (there is no type for a virtual token).

Defaults and why:

* ``num_virtual_tokens=20``: Lester et al. find 20 tokens close to the best of 1-150 from the 1B scale up.
* ``init="random"``: ``P ~ N(0, s^2)`` with ``s`` the standard deviation of the model's token embeddings, so the
  virtual tokens start on the scale of real ones (PEFT draws ``N(0, 1)``, far larger than the embeddings of most
  models). ``"vocab"`` copies the embeddings of uniformly sampled vocabulary tokens (the paper's better
  initialization); ``"text"`` those of a text's tokens, repeated or cut to ``n`` (as PEFT does), e.g. a task
  description.
* p-tuning: an MLP encoder with ``h = d`` (PEFT's default; the LSTM is the paper's original encoder), 2 LSTM layers.

Example::

    prompt = SoftPrompt(model, num_virtual_tokens=8)      # hooks installed on the causal LM
    out = model(input_ids=ids, attention_mask=mask, labels=ids)   # (B, 8 + T, vocab) logits, loss on real tokens
    prompt.remove()                                       # the model is untouched again
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from lightning_zenft.adapters._prompt_base import ModelPrompt

PromptInit = Literal["random", "vocab", "text"]
EncoderType = Literal["mlp", "lstm", "none"]


def input_embeddings(model: nn.Module, what: str) -> nn.Module:
    """The model's input embedding module (``get_input_embeddings()``), with a clear error when there is none."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        embedding = None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{what} puts virtual tokens in front of the token embeddings, but {type(model).__name__} has no input "
            "embeddings (get_input_embeddings() returning an embedding with a 2-D weight). Use a transformers "
            "causal LM, or a method that adapts layers (LoRA)."
        )
    return embedding


class _InputPrompt(ModelPrompt):
    """Virtual token embeddings ``(n, d)`` in front of the input embeddings (prompt tuning and p-tuning)."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int, token_dim: int | None) -> None:
        super().__init__(model, num_virtual_tokens)
        what = type(self).__name__
        embedding = input_embeddings(model, what)
        if "inputs_embeds" not in self._takes:
            raise ValueError(f"{what}: {type(model).__name__}.forward takes no `inputs_embeds` to put prompts into.")
        self.token_dim = int(embedding.weight.shape[1])
        if token_dim is not None and token_dim != self.token_dim:
            raise ValueError(
                f"{what} was made for token embeddings of size {token_dim}; {type(model).__name__}'s are "
                f"{self.token_dim}: the adapter belongs to another base model."
            )

    def virtual_embeddings(self) -> torch.Tensor:
        """The ``(n, d)`` embeddings put in front of every sequence (live: gradients flow through them)."""
        raise NotImplementedError

    def _start(self, model: nn.Module, call: dict[str, Any]) -> None:
        n = self.num_virtual_tokens
        self._check_not_packed(call)
        if call.get("token_type_ids") is not None:
            raise ValueError(f"{type(self).__name__}: token_type_ids cannot be given for virtual tokens; drop them.")
        embeds = call.get("inputs_embeds")
        if embeds is None:
            ids = call.get("input_ids")
            if ids is None:
                return  # the model raises its own error for a call without inputs
            embeds = model.get_input_embeddings()(ids)  # (B, T, d)
        batch = embeds.shape[0]
        prompts = self.virtual_embeddings().to(embeds.dtype)  # (n, d)
        call["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)  # (B, n+T, d)
        call["input_ids"] = None
        labels = call.get("labels")
        if labels is not None:
            call["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)  # (B, n+T)
        positions = call.pop("position_ids", None)
        mask = self._shift(call, n, n + embeds.shape[1])  # with no position ids: counted along the mask, if any
        if positions is not None:
            positions = self._checked_positions(positions)
            lead = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            call["position_ids"] = torch.cat([lead, positions + n], dim=-1)  # (B, n+T)
        elif mask is None:
            call["position_ids"] = None


class SoftPrompt(_InputPrompt):
    """Prompt tuning: a trained ``(n, d)`` table of virtual token embeddings, ``prompt_embeddings``.

    Args:
        model: the causal LM (its input embeddings give ``d`` and the initial values).
        num_virtual_tokens: ``n``.
        init: ``"random"``, ``"vocab"`` or ``"text"`` (see the module docstring).
        init_text: the text for ``init="text"``.
        tokenizer: the tokenizer (name or directory) for ``init="text"``; None: the model's own directory
            (``config._name_or_path``).
        token_dim: the embedding size the adapter was made for (checked; None: the model's).

    Example::

        prompt = SoftPrompt(model, num_virtual_tokens=8, init="vocab")
        prompt.prompt_embeddings.shape          # (8, hidden_size)
    """

    def __init__(
        self,
        model: nn.Module,
        num_virtual_tokens: int = 20,
        init: PromptInit = "random",
        init_text: str | None = None,
        tokenizer: str | None = None,
        token_dim: int | None = None,
    ) -> None:
        super().__init__(model, num_virtual_tokens, token_dim)
        if init not in ("random", "vocab", "text"):
            raise ValueError(f"init={init!r} must be 'random', 'vocab' or 'text'.")
        if (init == "text") != (init_text is not None) or (tokenizer is not None and init != "text"):
            raise ValueError(
                f"init_text={init_text!r} and tokenizer={tokenizer!r} go with init='text' (and init='text' needs "
                f"init_text); got init={init!r}."
            )
        self.init, self.init_text = init, init_text
        self.tokenizer = (tokenizer or _model_dir(model)) if init == "text" else None  # recorded as used
        weight = model.get_input_embeddings().weight  # (V, d)
        self.prompt_embeddings = nn.Parameter(self._initial(model, weight).to(weight.dtype))
        self._install(model)

    def _initial(self, model: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        n = self.num_virtual_tokens
        with torch.no_grad():
            if self.init == "random":
                return torch.randn(n, weight.shape[1], device=weight.device) * weight.float().std()  # (n, d)
            if self.init == "vocab":
                ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
                return weight[ids].detach().clone()  # (n, d)
            ids = text_token_ids(self.init_text or "", self.tokenizer or "", n)
            if max(ids) >= weight.shape[0]:
                raise ValueError(
                    f"the tokenizer gives token id {max(ids)} for init_text, beyond the model's {weight.shape[0]} "
                    "embeddings: it is not this model's tokenizer. Pass tokenizer=<the model's tokenizer>."
                )
            return weight[torch.tensor(ids, device=weight.device)].detach().clone()  # (n, d)

    def virtual_embeddings(self) -> torch.Tensor:
        return self.prompt_embeddings

    def settings(self) -> dict[str, Any]:
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "init": self.init,
            "init_text": self.init_text,
            "tokenizer": self.tokenizer,
            "token_dim": self.token_dim,
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """PEFT's file: ``prompt_embeddings`` ``(n, d)``."""
        return {"prompt_embeddings": self.prompt_embeddings.detach()}, self.settings()


def text_token_ids(text: str, tokenizer: str, n: int) -> list[int]:
    """The token ids of ``text`` (with the tokenizer's special tokens, as PEFT does), repeated or cut to ``n``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"init='text' needs a tokenizer; loading {tokenizer!r} failed ({err}). Pass tokenizer=<name or directory> "
            "of the model's tokenizer."
        ) from None
    ids = list(tok(text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text={text!r} gives no tokens; give a non-empty text.")
    return (ids * math.ceil(n / len(ids)))[:n]


def _model_dir(model: nn.Module) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError(
            f"init='text' needs a tokenizer and {type(model).__name__} does not say where it was loaded from; "
            "pass tokenizer=<name or directory>."
        )
    return str(path)


class PromptEncoder(_InputPrompt):
    """P-tuning: virtual token embeddings made by a trained prompt encoder from a trained input table.

    Args:
        model: the causal LM (its input embeddings give ``d``).
        num_virtual_tokens: ``n``.
        encoder_type: ``"mlp"``, ``"lstm"``, or ``"none"`` (no encoder: the table is trained directly; what a
            p-tuning file loads as, since it holds the encoder's output).
        encoder_hidden_size: ``h``; None: ``d``.
        encoder_num_layers: LSTM layers (``"lstm"`` only; None: 2).
        encoder_dropout: dropout between LSTM layers (``"lstm"`` only; None: 0).
        token_dim: the embedding size the adapter was made for (checked; None: the model's).

    Example::

        encoder = PromptEncoder(model, num_virtual_tokens=8, encoder_type="lstm", encoder_hidden_size=64)
        encoder.virtual_embeddings().shape      # (8, hidden_size)
    """

    def __init__(
        self,
        model: nn.Module,
        num_virtual_tokens: int = 20,
        encoder_type: EncoderType = "mlp",
        encoder_hidden_size: int | None = None,
        encoder_num_layers: int | None = None,
        encoder_dropout: float | None = None,
        token_dim: int | None = None,
    ) -> None:
        super().__init__(model, num_virtual_tokens, token_dim)
        if encoder_type not in ("mlp", "lstm", "none"):
            raise ValueError(f"encoder_type={encoder_type!r} must be 'mlp', 'lstm' or 'none'.")
        if encoder_type != "lstm" and (encoder_num_layers is not None or encoder_dropout is not None):
            raise ValueError(
                f"encoder_num_layers={encoder_num_layers!r} and encoder_dropout={encoder_dropout!r} apply to the "
                f"'lstm' encoder only; encoder_type={encoder_type!r}."
            )
        if encoder_type == "none" and encoder_hidden_size is not None:
            raise ValueError(f"encoder_hidden_size={encoder_hidden_size!r} needs an encoder; encoder_type='none'.")
        d = self.token_dim
        h = d if encoder_hidden_size is None else int(encoder_hidden_size)
        lstm = encoder_type == "lstm"
        self.encoder_type = encoder_type  # the arguments as given (None: the default), so settings() rebuild it
        self.encoder_hidden_size, self.encoder_num_layers = encoder_hidden_size, encoder_num_layers
        self.encoder_dropout = encoder_dropout
        weight = model.get_input_embeddings().weight  # (V, d)
        if encoder_type == "none":  # the virtual embeddings themselves, on the scale of the model's embeddings
            table = torch.randn(num_virtual_tokens, d, device=weight.device) * weight.detach().float().std()
            self.prompt_embeddings = nn.Parameter(table.to(weight.dtype))  # (n, d)
        else:  # the encoder's input
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, d, device=weight.device, dtype=weight.dtype))
        if encoder_type == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        elif lstm:
            layers = 2 if encoder_num_layers is None else int(encoder_num_layers)
            dropout = 0.0 if encoder_dropout is None else float(encoder_dropout)
            self.lstm_head = nn.LSTM(d, h, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        self.to(device=weight.device, dtype=weight.dtype)
        self._install(model)

    def virtual_embeddings(self) -> torch.Tensor:
        if self.encoder_type == "none":
            return self.prompt_embeddings
        x = self.embedding.unsqueeze(0)  # (1, n, d): the virtual tokens as one sequence
        if self.encoder_type == "lstm":
            x = self.lstm_head(x)[0]  # (1, n, 2h)
        return self.mlp_head(x)[0]  # (n, d)

    def settings(self) -> dict[str, Any]:
        return {
            "num_virtual_tokens": self.num_virtual_tokens,
            "encoder_type": self.encoder_type,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
            "token_dim": self.token_dim,
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """PEFT's file: the encoder's output, ``prompt_embeddings`` ``(n, d)``; it rebuilds as
        ``encoder_type="none"``."""
        training = self.training
        self.eval()  # the table the model reads at inference (no LSTM dropout)
        with torch.no_grad():
            table = self.virtual_embeddings().detach().clone()
        self.train(training)
        folded = {"num_virtual_tokens": self.num_virtual_tokens, "encoder_type": "none", "token_dim": self.token_dim}
        return {"prompt_embeddings": table}, folded


__all__ = ["PromptEncoder", "SoftPrompt", "input_embeddings", "text_token_ids"]
