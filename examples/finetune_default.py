"""The main job: LoRA fine-tuning of the embedded base model on the embedded task, on CPU, in about two minutes.

    python examples/finetune_default.py [--max-steps 150] [--out out/default]

It prints the task loss going down, the change of the loss on held-out general text (what the fine-tune cost the
base model), a sample answer before and after, and where the PEFT-format adapter was saved. A ForgettingMonitor
measures the built-in probes (held-out general text, Python questions) every 25 steps and draws the curves into
<out>/forgetting_curves.png.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_zenft import CausalLMModule, LoRA, SaveAdapter, TextDataModule, disable_adapters, general_probe_batches
from lightning_zenft.callbacks.forgetting_monitor import ForgettingMonitor
from lightning_zenft.data.paths import DEFAULT_TASK_VAL_FILE
from lightning_zenft.data.text import read_records


class PrintLoss(Callback):
    """Print the mean train loss every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.window: list[float] = []

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.window.append(float(outputs["loss"]))
        if trainer.global_step % self.every == 0:
            print(f"  step {trainer.global_step:4d}  task train loss {sum(self.window) / len(self.window):.3f}")
            self.window.clear()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches) -> float:
    was_training = model.training
    model.eval()
    losses = [model(**b).loss.item() for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--out", default="out/default")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    L.seed_everything(0, verbose=False)

    module = CausalLMModule(learning_rate=3e-3)
    data = TextDataModule(max_length=96, batch_size=16)
    data.setup("fit")
    tokenizer = data.tokenizer
    task_val = list(itertools.islice(data.val_dataloader(), 8))
    general = general_probe_batches(tokenizer, n_batches=4, batch_size=8, seq_len=128)
    sample = read_records(DEFAULT_TASK_VAL_FILE)[0]

    print(f"base model: {module.model_name_or_path}")
    print(
        f"before: task val loss {mean_loss(module.model, task_val):.3f}, general probe loss "
        f"{mean_loss(module.model, general):.3f}"
    )
    print(
        f"  sample: {sample['prompt']!r} -> {answer(module.model, tokenizer, sample['prompt'])!r} "
        f"(expected {sample['completion']!r})"
    )

    out = Path(args.out)
    saver = SaveAdapter("adapter")
    monitor = ForgettingMonitor(  # built-in probes; the task's val batches as the task probe
        every_n_steps=25, max_drop=5.0, task_probes={"task": task_val}, plot_path="forgetting_curves.png"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        callbacks=[LoRA(r=8, alpha=16, target_modules="all-linear"), saver, PrintLoss(every=25), monitor],
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    minutes = (time.perf_counter() - start) / 60

    task_after, general_after = mean_loss(module.model, task_val), mean_loss(module.model, general)
    with disable_adapters(module.model):
        task_before, general_before = mean_loss(module.model, task_val), mean_loss(module.model, general)
    print(f"after {args.max_steps} steps ({minutes:.1f} min):")
    print(f"  task val loss      {task_before:.3f} -> {task_after:.3f}")
    print(f"  general probe loss {general_before:.3f} -> {general_after:.3f} ({general_after - general_before:+.3f})")
    print(f"  sample: {sample['prompt']!r} -> {answer(module.model, tokenizer, sample['prompt'])!r}")
    print(f"adapter (PEFT format) saved to {saver.saved_to}")
    first, last = monitor.history[0], monitor.history[-1]
    for probe in last["drops"]:
        print(
            f"  forgetting monitor, {probe}: accuracy {first['metrics'][probe]['accuracy']:.1f} -> "
            f"{last['metrics'][probe]['accuracy']:.1f} points (limit: a drop of {monitor.max_drop:g})"
        )
    print(f"  task probe accuracy {first['task']:.1f} -> {last['task']:.1f}; curves: {monitor.plot_written}")


if __name__ == "__main__":
    main()
