"""The ``zenft fit`` config a :class:`~lightning_zenft.planning.recommend.Recommendation` writes, and what stands
between it and a run.

The config runs the recipe under the settings its memory figures were estimated with (one memory model, the one
``zenft estimate`` prints): the micro-batch and sequence length as ``data.batch_size`` and ``data.max_length``,
gradient checkpointing as ``model.gradient_checkpointing``, the adapters' dropout, bf16 weights for LoRA/QLoRA
(``model.torch_dtype: bfloat16``: the estimate's ``--precision bf16``), bf16 mixed precision for full fine-tuning
(fp32 weights, gradients and AdamW states with bf16 compute: the estimate's 16 bytes per parameter), and, on several
GPUs, Lightning's FSDP strategy over ``devices`` x ``num_nodes``. The adapter is saved in PEFT's format at the end
(``SaveAdapter``).

Example::

    rec = recommend("path/to/model", "ner", 20_000, gpu_mem_gb=24)
    print(fit_yaml(rec, train_file="train.jsonl"))
    run_blockers(rec, "train.jsonl")      # [] when `zenft fit --config` runs the file as written
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_zenft.planning.recommend import Recommendation

__all__ = ["ADAPTER_DIR", "fit_config", "fit_yaml", "run_blockers"]

ADAPTER_DIR = "adapter"
"""Where ``SaveAdapter`` writes the PEFT-format adapter, under the Trainer's ``default_root_dir``."""


def fit_config(
    rec: Recommendation, train_file: str = "train.jsonl", val_fraction: float = 0.05, max_steps: int | None = None
) -> dict[str, object]:
    """The ``zenft fit`` config of a recommendation, as a dict.

    Example::

        >>> from lightning_zenft.planning.recommend import recommend
        >>> config = fit_config(recommend("7B", "ner", 20_000), max_steps=100)
        >>> config["trainer"]["max_steps"], config["data"]["max_length"]
        (100, 2048)
    """
    callbacks: list[dict[str, object]] = []
    if rec.method != "full":
        lora = {"r": rec.rank, "alpha": rec.alpha, "target_modules": rec.target_modules, "dropout": rec.dropout}
        callbacks.append({"class_path": "lightning_zenft.LoRA", "init_args": lora})
        callbacks.append({"class_path": "lightning_zenft.SaveAdapter", "init_args": {"dirpath": ADAPTER_DIR}})
    # Checked after each validation: a run that max_steps ends inside an epoch has no val_loss at the epoch's end.
    stopping = {"monitor": "val_loss", "patience": 2, "check_on_train_epoch_end": False}
    callbacks.append({"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": stopping})
    trainer: dict[str, object] = {"max_epochs": rec.epochs}
    if max_steps is not None:
        trainer["max_steps"] = max_steps
    if rec.nodes * rec.gpus > 1:
        # FSDP2 through lightning_zenft's strategy, which zenft estimate --gpus models: frozen weights keep no gradient
        # or optimizer state (Lightning's "fsdp" flattens frozen and trained weights together) and 4-bit bases shard
        strategy = {"class_path": "lightning_zenft.strategies.FSDP2Strategy"}
        trainer.update({"devices": rec.gpus, "num_nodes": rec.nodes, "strategy": strategy})
    if rec.method == "full":
        trainer["precision"] = "bf16-mixed"
    trainer["callbacks"] = callbacks
    if rec.method == "qlora":
        trainer["plugins"] = [{"class_path": "lightning_zenft.NF4Precision"}]
    model: dict[str, object] = {"model": rec.model, "learning_rate": rec.learning_rate}
    if rec.method != "full":
        model["torch_dtype"] = "bfloat16"
    if rec.checkpointing:
        model["gradient_checkpointing"] = True
    data = {"train_file": train_file, "val_fraction": val_fraction, "batch_size": rec.batch, "max_length": rec.seq}
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def run_blockers(rec: Recommendation, train_file: str = "train.jsonl") -> list[str]:
    """What must change before ``zenft fit --config`` runs the written file as it is; ``[]`` when nothing.

    Example::

        >>> from lightning_zenft.planning.recommend import recommend
        >>> run_blockers(recommend("7B", "ner", 20_000), "train.jsonl")[0]
        "set model.model to the model's directory: '7B' is a size, not a directory"
    """
    blockers = []
    if not Path(rec.model).is_dir():
        blockers.append(f"set model.model to the model's directory: {rec.model!r} is a size, not a directory")
    if not Path(train_file).is_file():
        blockers.append(f"write the training data to {train_file!r} (JSONL records) or set data.train_file")
    if rec.fits is False:
        blockers.append(
            f"the run does NOT fit in {rec.gpu_mem_gb:g} GiB per GPU (see the memory line): lower data.batch_size or "
            "data.max_length, or use more GPUs (--gpus/--nodes)"
        )
    return blockers


def fit_yaml(
    rec: Recommendation, train_file: str = "train.jsonl", val_fraction: float = 0.05, max_steps: int | None = None
) -> str:
    """The ``zenft fit`` config as YAML text, headed by a comment for each blocker of :func:`run_blockers`.

    Example::

        >>> from lightning_zenft.planning.recommend import recommend
        >>> fit_yaml(recommend("7B", "ner", 20_000)).splitlines()[0]
        "# Before running: set model.model to the model's directory: '7B' is a size, not a directory"
    """
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml ships with jsonargparse
        raise ImportError("Writing the YAML config needs PyYAML: pip install pyyaml") from err
    text = yaml.safe_dump(fit_config(rec, train_file, val_fraction, max_steps), sort_keys=False)
    header = "".join(f"# Before running: {blocker}\n" for blocker in run_blockers(rec, train_file))
    return header + text
