"""``SaveAdapter``: write the trained adapter in PEFT's format when fitting ends.

Example::

    trainer = L.Trainer(callbacks=[LoRA(r=16), SaveAdapter("out/adapter")])
    trainer.fit(module)        # out/adapter/adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_zenft.io import save_adapter


class SaveAdapter(Callback):
    """Save the adapters of ``pl_module.<model_attr>`` to ``dirpath`` at the end of ``fit`` (on global rank 0).

    Args:
        dirpath: the adapter directory; relative paths are taken under the Trainer's ``default_root_dir``.
        model_attr: the attribute of the LightningModule that holds the model (key paths are relative to it, as
            ``PeftModel.from_pretrained(base, dirpath)`` expects); ``""`` saves relative to the module itself.
    """

    def __init__(self, dirpath: str = "adapter", model_attr: str = "model") -> None:
        self.dirpath = dirpath
        self.model_attr = model_attr
        self.saved_to: Path | None = None

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.get_submodule(self.model_attr) if self.model_attr else pl_module
        path = Path(self.dirpath)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        self.saved_to = save_adapter(model, path)
        print(f"adapter saved to {self.saved_to}")
