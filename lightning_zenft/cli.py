"""The ``zenft`` command: a ``LightningCLI`` for causal-LM fine-tuning, plus planning helpers.

``zenft fit|validate|test --config run.yaml`` trains :class:`~lightning_zenft.lm.CausalLMModule` on a
:class:`~lightning_zenft.data.TextDataModule`; callbacks and plugins come from the YAML::

    trainer:
      callbacks:
        - class_path: lightning_zenft.LoRA
          init_args: {r: 16, target_modules: all-linear}
    model:
      model: path/to/model_dir          # the tokenizer is read from the same directory
    data:
      train_file: train.jsonl

With a 4-bit plugin among ``trainer.plugins`` (``lightning_zenft.NF4Precision``), the model is built inside the plugin's
``module_init_context()``: ``model.model``'s safetensors are read and quantized tensor by tensor on the CPU, so the
full-precision model never exists in memory (the Trainer then moves the 4-bit model to its device).

``zenft recommend ...`` and ``zenft estimate ...`` answer "which recipe?" and "will it fit?" before a run;
``zenft merge ...`` merges adapters or fine-tunes into their base afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

HELPER_COMMANDS = ("recommend", "estimate")
DESCRIPTION = (
    "Fine-tune a causal LM with Lightning: zenft fit|validate|test --config run.yaml. "
    "Planning: zenft recommend --help (method, rank, learning rate, epochs, data verdict) and "
    "zenft estimate --help (per-GPU memory). Merging: zenft merge --help."
)


class ZenftCLI(LightningCLI):
    """``LightningCLI`` with the model's directory linked to the data module's tokenizer."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")

    @override
    def instantiate_classes(self) -> None:
        loader = self.quantized_loader()
        with loader.module_init_context() if loader is not None else contextlib.nullcontext():
            super().instantiate_classes()

    def quantized_loader(self) -> Any:
        """A 4-bit plugin built from the config's ``trainer.plugins`` (the Trainer builds its own from the same
        settings), whose ``module_init_context()`` the model is built in; None without one."""
        from lightning_zenft.precision.fabric import FabricNF4Precision

        config = self.config[self.subcommand] if self.subcommand else self.config
        plugins = config.get("trainer.plugins") or []
        for plugin in plugins if isinstance(plugins, list) else [plugins]:
            class_path = getattr(plugin, "class_path", None)
            if not isinstance(class_path, str) or "." not in class_path:
                continue
            module_name, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module_name), name, None)
            if isinstance(cls, type) and issubclass(cls, FabricNF4Precision):
                init_args = getattr(plugin, "init_args", None)
                return cls(**(dict(vars(init_args)) if init_args is not None else {}))
        return None

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
        }


def cli_main(args: list[str] | None = None, **kwargs: Any) -> ZenftCLI:
    """Run the Lightning part of the CLI (``fit``/``validate``/``test``) with ``args`` instead of ``sys.argv``."""
    from lightning_zenft.data.datamodule import TextDataModule
    from lightning_zenft.lm import CausalLMModule

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
    return ZenftCLI(CausalLMModule, TextDataModule, args=args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zenft``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "merge":
        from lightning_zenft.merging.command import merge_main

        return merge_main(args[1:])
    if args and args[0] in HELPER_COMMANDS:
        from lightning_zenft.planning.commands import estimate_main, recommend_main

        handler = recommend_main if args[0] == "recommend" else estimate_main
        return handler(args[1:])
    cli_main(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
