"""A plain causal-LM ``LightningModule`` around a Hugging Face ``AutoModelForCausalLM``.

The module holds no adapter or regularizer logic: those come from callbacks and plugins. It only loads the
model, computes the shifted next-token loss that ``transformers`` models compute from ``labels``, and builds
the optimizer over the parameters that are trainable at ``configure_optimizers`` time, which runs after
callbacks' ``setup`` has injected adapters and frozen the base.

Optimizer defaults: AdamW (decoupled weight decay; Loshchilov & Hutter, 2019). Weight decay is applied only to
matrices (``ndim >= 2``); biases and norm scales (``ndim < 2``) are never decayed, because shrinking them toward
zero changes the function rather than regularizing it. ``learning_rate=2e-4`` is the usual LoRA rate; full
fine-tuning wants something ten times smaller. An optional linear warmup raises the rate from
``learning_rate / warmup_steps`` to ``learning_rate`` over ``warmup_steps`` optimizer steps, then holds it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR, check_pretrained_source

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class _LinearWarmup:
    """LR multiplier ``min(1, (step + 1) / warmup_steps)``; a class (not a lambda) so it pickles."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)


def _resolve_dtype(torch_dtype: str | None) -> torch.dtype | str | None:
    if torch_dtype is None or torch_dtype == "auto":
        return torch_dtype
    if torch_dtype not in _DTYPES:
        raise ValueError(
            f"torch_dtype={torch_dtype!r} is not supported. Use one of {sorted(_DTYPES)}, 'auto' (the dtype stored "
            "with the checkpoint), or None (float32)."
        )
    return _DTYPES[torch_dtype]


class CausalLMModule(L.LightningModule):
    """Next-token-prediction training of a Hugging Face causal LM.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss is taken), as
    produced by :class:`~lightning_zenft.data.TextDataModule`.

    Args:
        model: a local directory saved with ``save_pretrained`` (or a hub id, which needs network access).
        model_config: keyword arguments for ``AutoConfig.for_model`` (must hold ``model_type``) to build a
            randomly initialised model instead. Give ``model`` or ``model_config``, not both; with neither, the
            package's embedded base model (:data:`~lightning_zenft.data.DEFAULT_BASE_MODEL_DIR`) is loaded.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not to biases or norms).
        warmup_steps: optimizer steps of linear warmup; ``0`` disables the scheduler.
        torch_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or ``None`` (float32) for the
            model weights. Mixed precision is better chosen with the Trainer's ``precision=``.
        gradient_checkpointing: recompute each decoder layer in backward instead of keeping its activations
            (``transformers``' checkpointing, non-reentrant, so it works with a frozen embedding).

    Example:
        >>> import lightning as L
        >>> from lightning_zenft.data import TextDataModule
        >>> from lightning_zenft.lm import CausalLMModule
        >>> module = CausalLMModule()  # the embedded ~1M-parameter base model
        >>> data = TextDataModule(tokenizer=module.model_name_or_path, max_length=128)
        >>> trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False)
        >>> trainer.fit(module, datamodule=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        torch_dtype: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if model is not None and model_config is not None:
            raise ValueError(
                f"Got both model={model!r} and model_config; give one: a directory to load weights from, or a "
                "config to build a randomly initialised model."
            )
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0 disables warmup), got {warmup_steps}.")
        self.save_hyperparameters()
        dtype = _resolve_dtype(torch_dtype)
        self._model_dir: str | None = None
        self.model: nn.Module = self._build(model, model_config, dtype)
        if gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5 spelling
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _build(self, model: str | None, model_config: dict[str, Any] | None, dtype: torch.dtype | str | None) -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        if model_config is not None:
            cfg = dict(model_config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError(
                    f"model_config needs a 'model_type' entry (e.g. 'llama'), got keys {sorted(model_config)}."
                )
            config = AutoConfig.for_model(model_type, **cfg)
            built = AutoModelForCausalLM.from_config(config)
            if isinstance(dtype, torch.dtype):
                built = built.to(dtype)
            return built
        source = str(DEFAULT_BASE_MODEL_DIR) if model is None else str(model)
        if model is None and not (DEFAULT_BASE_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"The embedded base model is missing from {str(DEFAULT_BASE_MODEL_DIR)!r}. Reinstall the package, "
                "or pass model=<directory> or model_config={...}."
            )
        check_pretrained_source(source, "model")
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        self._model_dir = source
        from lightning_zenft.precision.loader import active_quantized_loading

        quantized = active_quantized_loading()  # inside NF4Precision().module_init_context(): 4-bit, tensor by tensor
        if quantized is not None:
            loaded = quantized.load_pretrained(source, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        return loaded.train()  # from_pretrained returns eval mode; the Trainer keeps submodules' modes as found

    @property
    def model_name_or_path(self) -> str | None:
        """The directory (or hub id) the weights were loaded from; ``None`` for a model built from a config.

        Example:
            >>> CausalLMModule().model_name_or_path.endswith("base_model")
            True
        """
        return self._model_dir

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise KeyError(
                f"The batch has keys {sorted(batch)} but no 'labels'; use TextDataModule or add labels "
                "(input_ids with -100 where no loss is taken)."
            )
        out = self.model(**batch)
        return out.loss

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test_loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with the way out, a checkpoint of adapters when this run has no adapter callback (its tensors would
        otherwise be reported as a list of unexpected keys), or one trained on a 4-bit base when this run's is not."""
        from lightning_zenft.adapters import find_adapters
        from lightning_zenft.callbacks._adapter import CHECKPOINT_KEY
        from lightning_zenft.precision.resume import check_resume_precision

        writers = checkpoint.get(CHECKPOINT_KEY)
        if writers and not any(True for _ in find_adapters(self)):
            raise RuntimeError(
                f"the checkpoint holds adapters written by {writers}, but this model has none: add the same adapter "
                "callback, with the settings of the run that wrote it, to the Trainer's callbacks."
            )
        check_resume_precision(self.trainer, checkpoint)  # a 4-bit run's adapters need the 4-bit base

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups over the trainable parameters: decayed matrices, undecayed biases and norms.

        Example:
            >>> m = CausalLMModule(model_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
            ...     "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64})
            >>> sum(len(g["params"]) for g in m.parameter_groups()) == len(list(m.parameters()))
            True
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": self.hparams.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    @override
    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        if not groups:
            total = sum(p.numel() for p in self.parameters())
            raise RuntimeError(
                f"No parameter of the model requires grad (0 of {total} trainable), so there is nothing to optimize. "
                "Add an adapter callback (e.g. LoRA) or unfreeze some parameters."
            )
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        if self.hparams.warmup_steps == 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LinearWarmup(self.hparams.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["CausalLMModule"]
