"""QLoRA end to end: NF4Precision (as users run it) against HF PEFT QLoRA and the 4-bit frozen ceiling, one run.

Every mode runs in its own subprocess, one after the other, on the same random-init Llama checkpoint (saved once in
bf16), batch, sequence length and token batches; warm-up steps are not timed. The base is NF4 with double
quantization and bf16 compute in every mode; LoRA r=16, alpha=32, dropout 0 on q, k, v, o, gate, up, down.

* ``ours``: ``L.Trainer(plugins=[NF4Precision("nf4-dq")], callbacks=[LoRA(...), FusedKernels()])``, the model loaded
  inside ``plugin.module_init_context()`` (meta skeleton, weights read and quantized tensor by tensor on the GPU);
* ``ours_nokernels``: the same without ``FusedKernels``;
* ``peft``, ``peft_liger``: ``from_pretrained(..., BitsAndBytesConfig(nf4, double quant, bf16))`` + PEFT
  ``get_peft_model``, a plain loop (without / with Liger's Llama patch), as ``shared/bench/PEFT_BASELINE.md`` measured;
* ``ceiling``, ``ceiling_liger``: the same 4-bit model, every weight frozen, no adapters: the fastest a QLoRA step
  could be.

Targets (issue 9, 8B shape, 2 x 2048): ``ours`` peak memory <= 0.6x ``peft``'s; ``ours_nokernels`` tokens/s >=
``peft``'s; ``ours`` tokens/s >= 90% of ``ceiling_liger``'s. The table prints each with met/MISSED.

    python benchmarks/bench_qlora_e2e.py --size 8b --batch 2 --seq 2048 --json qlora-8b.json
    python benchmarks/bench_qlora_e2e.py --modes ours,peft --checkpoint /tmp/llama8b --json a.json   # in two runs,
    python benchmarks/bench_qlora_e2e.py --modes ceiling_liger --checkpoint /tmp/llama8b --json b.json  # then
    python benchmarks/bench_qlora_e2e.py --verdicts a.json b.json
    python benchmarks/bench_qlora_e2e.py --tiny          # CPU smoke test (numbers mean nothing; PEFT and the
                                                         # ceiling then run on the dense base: their loader needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lora_e2e as lora_e2e  # noqa: E402

MODES = "ours,ours_nokernels,peft,peft_liger,ceiling,ceiling_liger"


def run_ours(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """A Lightning Trainer with NF4Precision and the LoRA (and FusedKernels) callbacks."""
    import lightning as L

    from lightning_zenft import FusedKernels, LoRA, NF4Precision

    plugin = NF4Precision("nf4-dq", compute_dtype=torch.bfloat16)
    times: list[float] = []
    timed = args.warmup + args.steps

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            lora_e2e.sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            lora_e2e.sync(device)
            if args.warmup < trainer.global_step <= timed:
                times.append(time.perf_counter() - self.t0)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            with device, plugin.module_init_context():  # 4-bit on the GPU, tensor by tensor
                self.model = plugin.load_pretrained(args.checkpoint)
            self.model.train()
            self.last_loss = torch.zeros(())

        def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = self.model(input_ids=ids, labels=ids).loss
            self.last_loss = loss.detach()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    module = Module()
    data = lora_e2e.batches(args, module.model.config.vocab_size, torch.device("cpu"), timed)
    callbacks: list[L.Callback] = [LoRA(r=16, alpha=32, dropout=0.0, target_modules=lora_e2e.TARGETS), StepTimer()]
    if mode == "ours":
        callbacks.insert(1, FusedKernels())
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=timed, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        plugins=[plugin], callbacks=callbacks)  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return dict(step_s=sum(times) / max(len(times), 1), n_train=n_train, loss=float(module.last_loss))


def child(mode: str, args: argparse.Namespace) -> None:
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if mode.startswith("ours"):
        result = run_ours(mode, args, device)
    else:
        # bench_lora_e2e's plain loop: BitsAndBytesConfig(nf4, double quant, bf16 compute) on cuda:0; the CPU smoke
        # test runs it on the dense base
        args.quant = "none" if args.tiny else "nf4"
        result = lora_e2e.run_plain(mode, args, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    tokens = args.batch * args.seq
    result.update(mode=mode, size=args.size, batch=args.batch, seq=args.seq, tok_s=round(tokens / result["step_s"]),
                  peak_gib=None if peak is None else round(peak, 2))  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def verdicts(results: dict[str, dict]) -> list[str]:
    """The three targets, each with its figures and met/MISSED (or why it cannot be judged)."""

    def ok(flag: bool) -> str:
        return "met" if flag else "MISSED"

    lines = []
    ours, plain, peft, ceiling = (results.get(k) for k in ("ours", "ours_nokernels", "peft", "ceiling_liger"))
    if ours and peft and ours.get("peak_gib") and peft.get("peak_gib"):
        ratio = ours["peak_gib"] / peft["peak_gib"]
        lines.append(f"peak memory ours / peft = {ratio:.2f} (target <= 0.60): {ok(ratio <= 0.6)}")
    if plain and peft:
        ratio = plain["tok_s"] / peft["tok_s"]
        lines.append(f"tokens/s ours_nokernels / peft = {ratio:.2f} (target >= 1.00): {ok(ratio >= 1.0)}")
    if ours and ceiling:
        ratio = ours["tok_s"] / ceiling["tok_s"]
        lines.append(f"tokens/s ours / ceiling_liger = {ratio:.2f} (target >= 0.90): {ok(ratio >= 0.9)}")
    return lines or ["no target could be judged (a mode failed or was not run)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8b", help="8b (Llama-3-8B shape) or 1b (TinyLlama shape)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--modes", default=MODES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", help="also write every mode's result to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 2 steps, no Liger")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help="the saved bf16 model to load (default: a fresh random one, saved here)")
    parser.add_argument("--verdicts", nargs="+", metavar="JSON", help="print the targets' verdicts over these results")
    args = parser.parse_args()
    if args.verdicts:  # runs split over several invocations (each mode set within the 10-minute stage limit)
        merged = {r["mode"]: r for path in args.verdicts for r in json.load(open(path))["results"] if "error" not in r}
        print("\n".join(verdicts(merged)))
        return
    args.profile, args.quant = 0, "nf4"
    if args.tiny:
        args.size, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 32, 1, 2
        if args.modes == MODES:
            args.modes = "ours,ours_nokernels,peft,ceiling"
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; run with --tiny for a CPU smoke test.")
    if args.child:
        child(args.child, args)
        return
    if args.checkpoint is None or not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        from transformers import AutoModelForCausalLM

        args.checkpoint = args.checkpoint or tempfile.mkdtemp(prefix="zenft-qlora-bench-")
        torch.manual_seed(0)
        with torch.device("cpu" if args.tiny else "cuda"):  # random init on the GPU: minutes faster at the 8B shape
            model = AutoModelForCausalLM.from_config(lora_e2e.llama_config(args.size), dtype=torch.bfloat16)
        model.save_pretrained(args.checkpoint)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", args.size, "--batch",
               str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--checkpoint", args.checkpoint] + (["--tiny"] if args.tiny else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            results[mode] = dict(mode=mode, error=(proc.stderr or proc.stdout).strip().splitlines()[-1:])
        else:
            results[mode] = json.loads(lines[-1][len("RESULT ") :])
    device = "cpu (numbers mean nothing)" if args.tiny else torch.cuda.get_device_name()
    print(f"QLoRA end to end on {device}: {args.size} Llama shape, NF4 + double quant, {args.batch} x {args.seq}")
    print("| mode | tokens/s | peak GiB | trainable | loss |")
    print("|---|---|---|---|---|")
    for r in results.values():
        if "error" in r:
            print(f"| {r['mode']} | failed: {' '.join(r['error'])[:200]} ||||")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"| {r['mode']} | {r['tok_s']:,} | {peak} | {r['n_train']:,} | {r['loss']:.3f} |")
    ok = {k: v for k, v in results.items() if "error" not in v}
    for line in verdicts(ok) if not args.tiny else ["(CPU smoke test: no verdicts)"]:
        print(line)
    if args.json:
        meta = dict(device=device, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        with open(args.json, "w") as f:
            json.dump(dict(meta, size=args.size, batch=args.batch, seq=args.seq, results=list(results.values())), f)


if __name__ == "__main__":
    main()
