"""``SaveAdapter``: write the trained adapter in PEFT's format when fitting ends.

Under sharded strategies (FSDP2, FSDP1) the trained tensors are gathered whole onto rank 0 first (every rank takes
part; only the adapters are gathered, never the frozen base) and rank 0 writes the file, as one process would.

Example::

    trainer = L.Trainer(callbacks=[LoRA(r=16), SaveAdapter("out/adapter")])
    trainer.fit(module)        # out/adapter/adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_zenft.adapters import find_adapters
from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.io import save_adapter
from lightning_zenft.strategies.gather import gathered_for_export


class SaveAdapter(Callback):
    """Save the adapters of ``pl_module.<model_attr>`` to ``dirpath`` at the end of ``fit`` (written by global rank 0;
    under a sharded strategy every rank helps gather the adapter tensors).

    Args:
        dirpath: the adapter directory; relative paths are taken under the Trainer's ``default_root_dir``.
        model_attr: the attribute of the LightningModule that holds the model (key paths are relative to it, as
            ``PeftModel.from_pretrained(base, dirpath)`` expects); ``""`` saves relative to the module itself.

    A method that adds no module and only chooses what trains (``BitFit``) is named by the Trainer's adapter callback.

    Example::

        trainer = L.Trainer(strategy=FSDP2Strategy(), callbacks=[LoRA(r=16), SaveAdapter("adapter")])
    """

    def __init__(self, dirpath: str = "adapter", model_attr: str = "model") -> None:
        self.dirpath = dirpath
        self.model_attr = model_attr
        self.saved_to: Path | None = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.dirpath)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        root = trainer.strategy.model if trainer.strategy.model is not pl_module else None
        with gathered_for_export(pl_module, rank_zero=trainer.is_global_zero, root=root):
            if trainer.is_global_zero:
                model = pl_module.get_submodule(self.model_attr) if self.model_attr else pl_module
                self.saved_to = save_adapter(model, path, method=_method_without_modules(trainer, model))
                print(f"adapter saved to {self.saved_to}")
        trainer.strategy.barrier("zenft-save-adapter")


def _method_without_modules(trainer: pl.Trainer, model: nn.Module) -> str | None:
    """The method of the Trainer's adapter callback when ``model`` holds no adapter module (a method such as BitFit,
    which only changes what trains); None otherwise (``save_adapter`` reads the method from the modules)."""
    if any(True for _ in find_adapters(model)):
        return None
    methods = {type(c.config).method for c in trainer.callbacks if isinstance(c, AdapterCallback)}
    return methods.pop() if len(methods) == 1 else None
