"""Full fine-tuning of a causal LM sharded with FSDP (every weight trains), on one GPU, one node or several nodes.

Weights, gradients and AdamW states are sharded over every process (16 bytes a parameter in bf16 mixed precision:
112 GB for a 7B model, 14 GB a GPU on 8 GPUs, plus activations; ``zenft estimate --model 7B --method full --gpus 8``
says how much). At the end rank 0 writes the gathered weights as a ``transformers`` checkpoint (``save_pretrained``).

One GPU (memory recorded)::

    python examples/fsdp_full_finetune.py --model path/to/llama --devices 1

One node, 8 GPUs (Lightning starts the 8 processes)::

    python examples/fsdp_full_finetune.py --model path/to/llama --devices 8 --activation-checkpointing

Several nodes with torchrun (the same command on every node; NODE_RANK 0..N-1, MASTER_ADDR the first node)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR --master_port=29500 \\
        examples/fsdp_full_finetune.py --model path/to/llama --devices 8 --num-nodes 2

Several nodes under SLURM (in an sbatch script with ``#SBATCH --nodes=2``, ``--ntasks-per-node=8``,
``--gres=gpu:8``; Lightning reads the SLURM environment)::

    srun python examples/fsdp_full_finetune.py --model path/to/llama --devices 8 --num-nodes 2

``--devices`` and ``--num-nodes`` must match the processes started per node and the number of nodes. On a machine
without a GPU, ``--accelerator cpu --devices 2`` runs the same code on 2 CPU processes (gloo). Each process loads
the model before it is sharded, so CPU memory must hold processes-per-node copies of it in fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from lightning_zenft import CausalLMModule, TextDataModule
from lightning_zenft.strategies import FSDP1Strategy, FSDP2Strategy


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model directory (default: the embedded one)")
    parser.add_argument("--train-file", default=None, help="JSONL records (default: the embedded task)")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="fsdp2", choices=["fsdp2", "fsdp1"], help="fsdp1 needs GPUs")
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "none"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true", help="shards, gradients and AdamW states on the CPU")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--out", default="out/fsdp_full_finetune")
    return parser.parse_args(argv)


class Measure(L.Callback):
    """Step losses, and each rank's peak GPU memory (or none on CPU)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))

    def peak_gib(self, trainer: L.Trainer) -> float | None:
        device = trainer.strategy.root_device
        return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def save_gathered(trainer: L.Trainer, module: CausalLMModule, out: Path) -> Path | None:
    """Gather the whole weights onto rank 0 (every rank takes part) and write them with ``save_pretrained``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = out / "model"
    if trainer.is_global_zero:
        module.model.save_pretrained(path, state_dict=state)
    trainer.strategy.barrier()
    return path if trainer.is_global_zero else None


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(argv)
    L.seed_everything(0, verbose=False)
    options = {
        "mixed_precision": None if args.mixed_precision == "none" else args.mixed_precision,
        "activation_checkpointing": args.activation_checkpointing,
        "cpu_offload": args.cpu_offload,
    }
    strategy = FSDP2Strategy(**options) if args.strategy == "fsdp2" else FSDP1Strategy(**options)
    module = CausalLMModule(model=args.model, learning_rate=args.learning_rate)
    data = TextDataModule(
        train_file=args.train_file,
        tokenizer=module.model_name_or_path,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    measure = Measure()
    out = Path(args.out)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        callbacks=[measure],
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - measure.start
    saved = save_gathered(trainer, module, out)
    report = {
        "world_size": trainer.world_size,
        "steps": trainer.global_step,
        "first_loss": measure.losses[0],
        "last_loss": measure.losses[-1],
        "seconds": round(seconds, 1),
        "peak_gib_rank0": measure.peak_gib(trainer),
        "units": len(strategy.units) if isinstance(strategy, FSDP2Strategy) else None,
        "saved_to": str(saved) if saved else None,
        **options,
    }
    if trainer.is_global_zero:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
