"""The main job: LoRA fine-tuning of the embedded base model on the embedded task, on CPU.

    python examples/finetune_default.py [--max-steps 1000] [--out out/default] [--eval-prompts 40]

It prints the task loss going down and, before and after the fine-tune, the exact-match accuracy of greedy answers on
held-out prompts (per kind of record), sample answers, and the loss on held-out general text (what the fine-tune cost
the base model). ``SaveAdapter`` writes the PEFT-format adapter when fitting ends and says where.

The recipe: LoRA r=16 on every linear layer of the 1.25M-parameter base; AdamW at 4e-3 with 50 warm-up steps and a
cosine decay to 10% of the rate, gradients clipped at norm 1.0; batch 16. In 1200-step trials (48 held-out prompts,
12 of each kind) this schedule answered 39 exactly; a constant 3e-3 without clipping 15; a constant 5e-3 without
clipping collapsed every answer to "-"; the schedule at 8e-3 answered none.
A ForgettingMonitor measures the built-in probes (held-out general text, Python questions) every 200 steps and
draws the curves into <out>/forgetting_curves.png.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_zenft import CausalLMModule, LoRA, SaveAdapter, TextDataModule, disable_adapters, general_probe_batches
from lightning_zenft.callbacks.forgetting_monitor import ForgettingMonitor
from lightning_zenft.data.paths import DEFAULT_TASK_VAL_FILE
from lightning_zenft.data.text import read_records

WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.1


class CosineCausalLM(CausalLMModule):
    """``CausalLMModule`` with a linear warm-up and then a cosine decay to ``FINAL_LR_FRACTION`` of the rate."""

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.learning_rate)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / WARMUP_STEPS)
            cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
            return warm * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PrintLoss(Callback):
    """Print the mean train loss every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.window: list[float] = []

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.window.append(float(outputs["loss"]))
        if trainer.global_step % self.every == 0:
            print(f"  step {trainer.global_step:5d}  task train loss {sum(self.window) / len(self.window):.3f}")
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
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def kind(record: dict[str, str]) -> str:
    return record["prompt"].split(":")[0]


def balanced(records: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The first ``n`` records taken round-robin over the kinds (an equal share of each)."""
    by_kind: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_kind.setdefault(kind(record), []).append(record)
    rounds = itertools.zip_longest(*by_kind.values())
    return [r for r in itertools.chain.from_iterable(rounds) if r is not None][:n]


def exact_match(model: torch.nn.Module, tokenizer, records: list[dict[str, str]]) -> tuple[int, dict[str, str]]:
    """Greedy answers equal to the completion (whitespace-stripped): the total and a per-kind ``hits/count``."""
    hits: dict[str, list[int]] = {}
    for record in records:
        ok = answer(model, tokenizer, record["prompt"]).strip() == record["completion"].strip()
        hits.setdefault(kind(record), []).append(int(ok))
    total = sum(sum(h) for h in hits.values())
    return total, {k: f"{sum(h)}/{len(h)}" for k, h in hits.items()}


def show_samples(model: torch.nn.Module, tokenizer, samples: list[dict[str, str]]) -> None:
    for record in samples:
        got = answer(model, tokenizer, record["prompt"])
        mark = "ok" if got.strip() == record["completion"].strip() else "wrong"
        print(f"    {record['prompt'].splitlines()[0]!r} -> {got!r} ({mark}; expected {record['completion']!r})")


def with_regularizer(args, data, task_val, general, general_before, plain_rise, plain_task) -> None:  # type: ignore[no-untyped-def]
    """The same LoRA fine-tune with EWC (or Replay) added; prints its general-probe change beside the plain run's."""
    from lightning_zenft import EWC, Replay
    from lightning_zenft.data.replay import general_examples
    from lightning_zenft.data.text import CausalLMCollator

    L.seed_everything(0, verbose=False)
    module = CosineCausalLM(learning_rate=4e-3)  # the main run's recipe, with the regularizer added
    items = general_examples(data.tokenizer, n=400 if args.regularizer == "replay" else 32, seq_len=96)
    if args.regularizer == "ewc":
        collate = CausalLMCollator.for_tokenizer(data.tokenizer)
        fisher_data = [collate(items[i : i + 8]) for i in range(0, len(items), 8)]
        regularizer = EWC(fisher_data=fisher_data, strength=100.0)
    else:
        regularizer = Replay(items, ratio=0.1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        gradient_clip_val=1.0,
        callbacks=[LoRA(r=16, alpha=32, target_modules="all-linear"), regularizer],
        default_root_dir=Path(args.out) / args.regularizer,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    rise = mean_loss(module.model, general) - general_before
    task = mean_loss(module.model, task_val)
    print(f"with {type(regularizer).__name__} ({args.regularizer}), the same {args.max_steps} steps:")
    print(f"  general probe loss change {rise:+.3f} (without: {plain_rise:+.3f})")
    print(f"  task val loss             {task:.3f} (without: {plain_task:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--out", default="out/default")
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts for exact-match accuracy")
    parser.add_argument(
        "--regularizer",
        choices=["none", "ewc", "replay"],
        default="none",
        help="then run the same fine-tune with EWC (or 10%% replay) and print both general-probe changes",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 1.25M-parameter model gains nothing from a second thread, and a shared CPU loses by it
    L.seed_everything(0, verbose=False)

    module = CosineCausalLM(learning_rate=4e-3)
    data = TextDataModule(max_length=96, batch_size=16)
    data.setup("fit")
    tokenizer = data.tokenizer
    task_val = list(itertools.islice(data.val_dataloader(), 8))
    general = general_probe_batches(tokenizer, n_batches=4, batch_size=8, seq_len=128)
    prompts = balanced(read_records(DEFAULT_TASK_VAL_FILE), args.eval_prompts)
    samples = balanced(prompts, 4)  # one of each kind

    print(f"base model: {module.model_name_or_path}")
    hits_before, _ = exact_match(module.model, tokenizer, prompts)
    print(
        f"before: task val loss {mean_loss(module.model, task_val):.3f}, general probe loss "
        f"{mean_loss(module.model, general):.3f}, exact match {hits_before}/{len(prompts)} held-out prompts"
    )
    show_samples(module.model, tokenizer, samples)

    monitor = ForgettingMonitor(  # built-in probes; the task's val batches as the task probe
        every_n_steps=200, max_drop=5.0, task_probes={"task": task_val}, plot_path="forgetting_curves.png"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        gradient_clip_val=1.0,
        callbacks=[
            LoRA(r=16, alpha=32, target_modules="all-linear"),
            SaveAdapter("adapter"),
            PrintLoss(every=100),
            monitor,
        ],
        default_root_dir=Path(args.out),
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
    hits, per_kind = exact_match(module.model, tokenizer, prompts)
    print(f"after {args.max_steps} steps ({minutes:.1f} min of training):")
    print(f"  task val loss      {task_before:.3f} -> {task_after:.3f}")
    print(f"  general probe loss {general_before:.3f} -> {general_after:.3f} ({general_after - general_before:+.3f})")
    kinds = ", ".join(f"{k} {v}" for k, v in per_kind.items())
    print(f"  exact match        {hits_before}/{len(prompts)} -> {hits}/{len(prompts)} held-out prompts ({kinds})")
    show_samples(module.model, tokenizer, samples)
    first, last = monitor.history[0], monitor.history[-1]
    for probe in last["drops"]:
        print(
            f"  forgetting monitor, {probe}: accuracy {first['metrics'][probe]['accuracy']:.1f} -> "
            f"{last['metrics'][probe]['accuracy']:.1f} points (limit: a drop of {monitor.max_drop:g})"
        )
    print(f"  task probe accuracy {first['task']:.1f} -> {last['task']:.1f}; curves: {monitor.plot_written}")
    if args.regularizer != "none":
        with_regularizer(args, data, task_val, general, general_before, general_after - general_before, task_after)


if __name__ == "__main__":
    main()
