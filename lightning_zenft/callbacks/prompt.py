"""The ``PromptTuning``, ``PrefixTuning`` and ``PTuning`` callbacks: virtual tokens for any LightningModule's causal LM.

Each adds one module to the model the LightningModule holds (``module.model.prompt_tuning``...), which hooks the
model's forward: ``training_step`` calling ``self.model(**batch)`` and ``generate`` run unchanged. Injection,
freezing, adapter-only checkpoints, resume, optimizer checks and counts are :class:`AdapterCallback`'s.

Example::

    trainer = L.Trainer(callbacks=[PromptTuning(num_virtual_tokens=20), SaveAdapter("out/adapter")])
"""

from __future__ import annotations

from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.config import PrefixTuningConfig, PromptTuningConfig, PTuningConfig


class PromptTuning(AdapterCallback):
    """Prompt tuning (Lester et al. 2021): trained soft tokens in front of every sequence, injected at ``setup``.

    Args:
        num_virtual_tokens: how many soft tokens.
        init: ``"random"`` (on the scale of the model's embeddings), ``"vocab"`` (embeddings of sampled tokens) or
            ``"text"`` (embeddings of ``init_text``'s tokens, repeated or cut to ``num_virtual_tokens``).
        init_text: the text for ``init="text"``.
        tokenizer: tokenizer name or directory for ``init="text"``; None: the model's own directory.
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    The shared options ``target_modules``, ``exclude_modules``, ``bias``, ``trainable_norms`` and ``modules_to_save``
    must stay unset: only the soft tokens train.

    Example::

        trainer = L.Trainer(callbacks=[PromptTuning(num_virtual_tokens=20, init="text", init_text="Answer briefly:")])
        trainer.fit(module)
        save_adapter(module.model, "out/adapter")     # PEFT's PROMPT_TUNING format
    """

    config_cls = PromptTuningConfig


class PrefixTuning(AdapterCallback):
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes at every attention layer, injected at ``setup``.

    Args:
        num_virtual_tokens: the prefix length.
        prefix_projection: train the prefix through a two-layer tanh MLP (the paper's reparametrization).
        encoder_hidden_size: hidden size of that MLP; None: the key/value width.
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    The shared options ``target_modules``, ``exclude_modules``, ``bias``, ``trainable_norms`` and ``modules_to_save``
    must stay unset. Not with gradient checkpointing (``transformers`` drops the cache that carries the prefix).

    Example::

        trainer = L.Trainer(callbacks=[PrefixTuning(num_virtual_tokens=20, prefix_projection=True)])
    """

    config_cls = PrefixTuningConfig


class PTuning(AdapterCallback):
    """P-tuning (Liu et al. 2021): virtual tokens made by a trained prompt encoder, injected at ``setup``.

    Args:
        num_virtual_tokens: how many virtual tokens.
        encoder_type: ``"mlp"``, ``"lstm"`` (bidirectional LSTM plus MLP) or ``"none"``.
        encoder_hidden_size: hidden size of the encoder; None: the model's embedding size.
        encoder_num_layers: LSTM layers (``"lstm"`` only; None: 2).
        encoder_dropout: dropout between LSTM layers (``"lstm"`` only; None: 0).
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    The shared options ``target_modules``, ``exclude_modules``, ``bias``, ``trainable_norms`` and ``modules_to_save``
    must stay unset.

    Example::

        trainer = L.Trainer(callbacks=[PTuning(num_virtual_tokens=20, encoder_type="lstm")])
    """

    config_cls = PTuningConfig


__all__ = ["PTuning", "PrefixTuning", "PromptTuning"]
