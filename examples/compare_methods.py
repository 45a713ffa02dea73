"""Choose a method by measuring: every method of the library (and full fine-tuning) trained on the embedded base model
and task, same data, steps and seed, in one table.

    python examples/compare_methods.py [--steps 100] [--methods lora,ia3,...] [--json out.json]

Columns: trainable parameters (count and share of the model), the peak extra memory of training (the process's peak
resident memory during `fit` above what it held before, measured in a separate process per method), tokens/s (real,
non-padding tokens per second of training, first step excluded), the task validation loss after training, and the
change of the loss on held-out general text (what the fine-tune cost the base model: forgetting). Learning rates are
one common choice per family of methods, not tuned per method; they are printed with the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (callback expression, learning rate): prompt-like methods want a higher rate than weight adapters
METHODS: dict[str, tuple[str, float]] = {
    "full": ("None", 3e-4),
    "lora": ("LoRA(r=8, alpha=16)", 3e-3),
    "dora": ("DoRA(r=8, alpha=16)", 3e-3),
    "ia3": ("IA3()", 1e-2),
    "bitfit": ("BitFit(bias='none', trainable_norms=True)", 1e-2),
    "bottleneck": ("BottleneckAdapter()", 3e-3),
    "parallel": ("ParallelAdapter()", 3e-3),
    "loreft": ("LoReFT()", 3e-3),
    "prompt": ("PromptTuning(num_virtual_tokens=20)", 3e-2),
    "prefix": ("PrefixTuning(num_virtual_tokens=20)", 3e-2),
    "p_tuning": ("PTuning(num_virtual_tokens=20)", 3e-3),
    "mam": ("MAMAdapter(num_virtual_tokens=20)", 3e-3),
}


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_one(name: str, steps: int) -> dict[str, float | int | str]:
    """Train one method in this process and measure it (see the module docstring)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    import lightning_zenft as zf
    from lightning_zenft.data import TextDataModule, general_probe_batches

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    L.seed_everything(0, verbose=False)
    expression, lr = METHODS[name]
    callback = eval(expression, vars(zf))  # noqa: S307 - the fixed expressions above
    module = zf.CausalLMModule(learning_rate=lr)
    data = TextDataModule(max_length=96, batch_size=16)
    data.setup("fit")
    task_val = list(itertools.islice(data.val_dataloader(), 8))
    general = general_probe_batches(data.tokenizer, n_batches=4, batch_size=8, seq_len=128)

    class Throughput(Callback):
        def __init__(self) -> None:
            self.tokens, self.seconds, self.start = 0, 0.0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if batch_idx > 0:  # the first step pays one-time costs
                self.seconds += time.perf_counter() - self.start
                self.tokens += int(batch["attention_mask"].sum())

    @torch.no_grad()
    def mean_loss(batches: list) -> float:
        module.model.eval()
        return sum(module.model(**b).loss.item() for b in batches) / len(batches)

    general_before = mean_loss(general)
    throughput = Throughput()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[c for c in (callback, throughput) if c is not None],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    before_kib = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current resident size
    trainer.fit(module, datamodule=data)
    peak_kib = _memory_kib("VmHWM") - before_kib
    trainable, total = zf.count_parameters(module)
    return {
        "method": name,
        "callback": expression,
        "learning_rate": lr,
        "trainable": trainable,
        "share_pct": 100.0 * trainable / total,
        "peak_extra_mib": peak_kib / 1024,
        "tokens_per_s": throughput.tokens / max(throughput.seconds, 1e-9),
        "task_val_loss": mean_loss(task_val),
        "general_loss_change": mean_loss(general) - general_before,
        "steps": steps,
    }


def table(rows: list[dict]) -> str:
    columns = ["method", "callback", "lr", "trainable", "share", "peak extra memory", "tokens/s", "task val loss"]
    lines = ["| " + " | ".join([*columns, "general loss change"]) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | `{r['callback']}` | {r['learning_rate']:g} | {r['trainable']:,} "
            f"| {r['share_pct']:.2f}% | {r['peak_extra_mib']:.0f} MiB | {r['tokens_per_s']:,.0f} "
            f"| {r['task_val_loss']:.3f} | {r['general_loss_change']:+.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method, JSON to stdout
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.steps)), flush=True)
        return
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step is left out of tokens/s)")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        parser.error(f"unknown methods {unknown or args.methods!r}; choose from {list(METHODS)}")
    rows = []
    for name in names:
        print(f"training {name} ({METHODS[name][0]}) for {args.steps} steps ...", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        row = next((line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")), None)
        if out.returncode != 0 or row is None:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"{name} failed (exit code {out.returncode}); its error is above.")
        rows.append(json.loads(row))
    print()
    print(table(rows))
    if args.json:
        out_path = Path(args.json)
        partial = out_path.with_name(out_path.name + ".partial")
        partial.write_text(json.dumps(rows, indent=2) + "\n")
        partial.replace(out_path)  # a reader never sees half a file


if __name__ == "__main__":
    main()
