"""Step-time overhead of the EWC and L2SP callbacks, measured side by side in one training run.

    python benchmarks/regularizer_overhead.py                      # CPU shape (below), full fine-tuning and LoRA
    python benchmarks/regularizer_overhead.py --size 1b --batch 4 --seq 2048 --modes full      # GPU, bf16
    python benchmarks/regularizer_overhead.py --size 8b --batch 2 --seq 2048 --modes lora      # GPU, bf16

One model, one optimizer, one ``L.Trainer`` run per (mode, penalty): a switch callback turns the penalty on and off
every ``--block`` steps (on, off, on, off...), so both halves see the same weights, data and machine state; each
step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (CUDA synchronized). Reported: the median step
time with and without the penalty and their ratio, the median time of the penalty's own hook (the only work it adds
to a step besides one ``detach`` of the loss) as a share of the step without it (much less noisy on a shared
machine), for EWC (the sampled Fisher, estimated once at fit start on 4
random sequences, its time reported apart) and L2SP, on full fine-tuning (penalty on every weight) and on LoRA r=16
(penalty on ``s B A`` from the factors). Target (issue 10): at most 5% (the published EWC figure is 15%).

Shapes: ``--size cpu`` (default; hidden 256, 4 layers, vocab 4096, batch 4 x 256, fp32, 1 thread) or the GPU shapes
of ``benchmarks/_shapes.py`` (``1b``: TinyLlama, ``8b``: Llama-3-8B; random weights, bf16, SDPA, fused AdamW).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shapes import LLAMA_SHAPES  # noqa: E402

from lightning_zenft import EWC, L2SP, LoRA  # noqa: E402
from lightning_zenft.callbacks._weight_penalty import WeightPenalty  # noqa: E402

CPU_SHAPE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=4096,
    max_position_embeddings=512,
)


class Switch(L.Callback):
    """Forwards a penalty's hooks only in "on" blocks of ``block`` steps (the Fisher is estimated once at fit start)."""

    def __init__(self, penalty: WeightPenalty, block: int, warmup: int) -> None:
        self.penalty, self.block, self.warmup = penalty, block, warmup
        self.on = False
        self.hook_s: list[float] = []

    def setup(self, trainer, pl_module, stage) -> None:  # type: ignore[no-untyped-def]
        self.penalty.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        self.penalty.on_fit_start(trainer, pl_module)
        self.fit_start_s = time.perf_counter() - start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step
        self.on = step >= self.warmup and ((step - self.warmup) // self.block) % 2 == 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[no-untyped-def]
        if self.on:
            self.penalty.on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        if self.on:
            _sync()
            start = time.perf_counter()
            self.penalty.on_before_optimizer_step(trainer, pl_module, optimizer)
            _sync()
            if trainer.global_step >= self.warmup:
                self.hook_s.append(time.perf_counter() - start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer(L.Callback):
    def __init__(self, switch: Switch, warmup: int) -> None:
        self.switch, self.warmup = switch, warmup
        self.on: list[float] = []
        self.off: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        _sync()
        if trainer.global_step > self.warmup:  # global_step was incremented by this batch's optimizer step
            (self.on if self.switch.on else self.off).append(time.perf_counter() - self._start)


class RandomLM(L.LightningModule):
    def __init__(self, shape: dict[str, int], batch: int, seq: int, steps: int, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(dtype)
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, shape["vocab_size"], (steps * batch, seq), generator=g)
        self.batch = batch

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-5, fused=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch)


def measure(args: argparse.Namespace, mode: str, penalty_name: str) -> dict[str, float]:
    shape = CPU_SHAPE if args.size == "cpu" else LLAMA_SHAPES[args.size]
    dtype = torch.float32 if args.size == "cpu" else torch.bfloat16
    steps = args.warmup + 2 * args.block * args.blocks
    module = RandomLM(shape, args.batch, args.seq, steps, dtype)
    vocab = shape["vocab_size"]
    fisher_data = [{"input_ids": torch.randint(0, vocab, (2, args.seq)), "attention_mask": torch.ones(2, args.seq,
                    dtype=torch.long)} for _ in range(2)]  # fmt: skip
    penalty = EWC(fisher_data, strength=100.0) if penalty_name == "ewc" else L2SP(strength=0.1)
    switch = Switch(penalty, args.block, args.warmup)
    timer = Timer(switch, args.warmup)
    callbacks = ([LoRA(r=16, alpha=32)] if mode == "lora" else []) + [switch, timer]
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module)
    on, off, hook = statistics.median(timer.on), statistics.median(timer.off), statistics.median(switch.hook_s)
    return {
        "mode": mode,
        "penalty": penalty_name,
        "on_ms": 1000 * on,
        "off_ms": 1000 * off,
        "overhead": on / off - 1,
        "hook_ms": 1000 * hook,
        "hook_share": hook / off,
        "steps_each": len(timer.on),
        "fit_start_s": switch.fit_start_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="cpu", choices=["cpu", *LLAMA_SHAPES])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--penalties", default="ewc,l2sp")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for mode in args.modes.split(","):
        for penalty in args.penalties.split(","):
            row = measure(args, mode, penalty)
            rows.append(row)
            print(
                f"{args.size} {mode:<5} {penalty:<5} without {row['off_ms']:8.1f} ms  with {row['on_ms']:8.1f} ms  "
                f"overhead {100 * row['overhead']:+.1f}%; the penalty's hook {row['hook_ms']:.2f} ms = "
                f"{100 * row['hook_share']:.2f}% of a step ({row['steps_each']} steps each; fit start "
                f"{row['fit_start_s']:.1f} s)",
                flush=True,
            )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main()
