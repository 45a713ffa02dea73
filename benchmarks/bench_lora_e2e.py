"""End-to-end LoRA training throughput and peak memory: ours (as users run it) against HF PEFT and the ceiling.

Every mode runs in its own subprocess (Liger patches classes process-wide), one after the other in one invocation,
on the same random-init Llama shape, batch, sequence length and random token batches; warm-up steps are not timed.

Modes (``--modes``, comma separated):

* ``ours``: ``L.Trainer`` with the ``LoRA`` and ``FusedKernels`` callbacks (fused LoRA, q/k/v and MLP groups,
  Liger RMSNorm, RoPE and fused linear cross-entropy).
* ``ours_nokernels``: the same Trainer without ``FusedKernels``.
* ``ours_dora``, ``ours_dora_nokernels``, ``peft_dora``: the same with DoRA (``DoRA`` callback; PEFT ``use_dora``).
* ``peft``, ``peft_liger``: HF PEFT ``get_peft_model`` (plain loop), without / with Liger's Llama patch.
* ``full``: full fine-tuning (AdamW on every weight).
* ``ceiling``, ``ceiling_liger``: every weight frozen, no adapters, gradients flowing to the inputs; the fastest a
  LoRA step could be.

``--quant nf4`` loads the base in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute) for every mode but
``full``. LoRA: r=16, alpha=32, dropout 0, on q, k, v, o, gate, up, down. bf16 weights, SDPA attention, no gradient
checkpointing, fused AdamW.

    python benchmarks/bench_lora_e2e.py --size 1b --batch 4 --seq 2048
    python benchmarks/bench_lora_e2e.py --size 8b --batch 2 --seq 2048 --quant nf4 --modes ours,peft,ceiling_liger
    python benchmarks/bench_lora_e2e.py --size 1b --modes ours,ceiling_liger --profile 2 --json e2e.json
    python benchmarks/bench_lora_e2e.py --tiny          # CPU smoke test (numbers mean nothing)

``--profile N`` profiles N more steps after the timed ones and prints each mode's device time by kind of kernel
(big GEMMs, our Triton low-rank GEMM, attention, other Triton kernels, element-wise...): where ``ours`` misses the
ceiling, the rows say which kernels hold the gap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _profile import KernelProfile, by_kind, format_profile  # noqa: E402
from _shapes import LLAMA_SHAPES  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_MODES = "ours,ours_nokernels,peft,peft_liger,full,ceiling,ceiling_liger"


def llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    shapes = LLAMA_SHAPES
    if size not in shapes:
        raise SystemExit(f"--size {size!r}: choose one of {sorted(shapes)}.")
    return LlamaConfig(**shapes[size])


def build_model(args: argparse.Namespace, device: torch.device, quantized: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = llama_config(args.size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantized:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            args.checkpoint, quantization_config=quant, dtype=dtype, device_map={"": 0}, attn_implementation="sdpa"
        )
    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def batches(args: argparse.Namespace, vocab: int, device: torch.device, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_plain(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """PEFT / full / ceiling: a plain PyTorch loop, as the reference figures were measured."""
    if "liger" in mode:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    quantized = args.quant == "nf4" and mode != "full"
    model = build_model(args, device, quantized)
    if mode == "full":
        params = list(model.parameters())
    elif mode.startswith("ceiling"):
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        params = [torch.nn.Parameter(torch.zeros(1, device=device))]
    else:
        from peft import LoraConfig, get_peft_model

        dora = mode.startswith("peft_dora")
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, use_dora=dora)
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    model.train()
    data = batches(args, model.config.vocab_size, device, args.warmup + args.steps + args.profile)
    times = []
    loss = torch.zeros(())
    prof = KernelProfile() if args.profile else None
    for i, ids in enumerate(data):
        if prof is not None and i == args.warmup + args.steps:
            prof.start()  # the profiled steps come after the timed ones
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + (params[0].sum() * 0 if mode.startswith("ceiling") else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if args.warmup <= i < args.warmup + args.steps:
            times.append(time.perf_counter() - t0)
    n_train = sum(p.numel() for p in params) if not mode.startswith("ceiling") else 0
    result = dict(step_s=sum(times) / len(times), n_train=n_train, loss=float(out.loss.detach()))
    if prof is not None:
        result["profile"] = prof.stop(args.profile)
    return result


def run_ours(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Ours as users run it: a Lightning Trainer with the LoRA (and FusedKernels) callbacks."""
    import lightning as L

    from lightning_zenft.callbacks.kernels import FusedKernels
    from lightning_zenft.callbacks.lora import DoRA, LoRA

    quantized = args.quant == "nf4"
    times: list[float] = []
    timed_steps = args.warmup + args.steps
    prof = KernelProfile() if args.profile else None
    profile_rows: list[dict] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            if prof is not None and trainer.global_step == timed_steps:
                prof.start()  # the profiled steps come after the timed ones
            sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            sync(device)
            if args.warmup < trainer.global_step <= timed_steps:
                times.append(time.perf_counter() - self.t0)
            if prof is not None and trainer.global_step == timed_steps + args.profile:
                profile_rows.extend(prof.stop(args.profile))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(args, device, quantized)
            self.last_loss = 0.0

        def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = self.model(input_ids=ids, labels=ids).loss
            self.last_loss = loss.detach()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    module = Module()
    data = batches(args, module.model.config.vocab_size, torch.device("cpu"), timed_steps + args.profile)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    adapter = DoRA if mode.startswith("ours_dora") else LoRA
    callbacks: list[L.Callback] = [adapter(r=16, alpha=32, dropout=0.0, target_modules=TARGETS), StepTimer()]
    if mode in ("ours", "ours_dora"):
        callbacks.insert(1, FusedKernels())
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=timed_steps + args.profile,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=loader)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    result = dict(step_s=sum(times) / max(len(times), 1), n_train=n_train, loss=float(module.last_loss))
    if prof is not None:
        result["profile"] = profile_rows
    fused = [c for c in callbacks if isinstance(c, FusedKernels)]
    if fused:  # which back end won for each product in this run (the callback owns its choices)
        result["matmul_choices"] = fused[0].runtime.choices_report()
    return result


def child(mode: str, args: argparse.Namespace) -> None:
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = run_ours(mode, args, device) if mode.startswith("ours") else run_plain(mode, args, device)
    tokens = args.batch * args.seq
    result.update(
        mode=mode,
        size=args.size,
        quant=args.quant,
        batch=args.batch,
        seq=args.seq,
        tok_s=round(tokens / result["step_s"]),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    )
    print("RESULT " + json.dumps(result), flush=True)
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", help="1b (TinyLlama shape) or 8b (Llama-3-8B shape)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--quant", choices=["none", "nf4"], default="none")
    parser.add_argument("--modes", default=ALL_MODES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps after the timed ones")
    parser.add_argument("--json", help="also write every mode's result (and profile) to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 2 steps, no Liger/4-bit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.size, args.batch, args.seq, args.warmup, args.steps, args.quant = "tiny", 2, 32, 1, 2, "none"
        if args.modes == ALL_MODES:
            args.modes = "ours,ours_nokernels,peft,full,ceiling"
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; run with --tiny for a CPU smoke test.")
    if args.child:
        child(args.child, args)
        return
    if args.quant == "nf4" and args.checkpoint is None:
        from transformers import AutoModelForCausalLM

        args.checkpoint = tempfile.mkdtemp(prefix="zenft-bench-")
        torch.manual_seed(0)
        with torch.device("cuda"):  # random init on the GPU: minutes faster than on the CPU at the 8B shape
            model = AutoModelForCausalLM.from_config(llama_config(args.size), dtype=torch.bfloat16)
        model.save_pretrained(args.checkpoint)
        del model
        torch.cuda.empty_cache()
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", args.size, "--batch",
               str(args.batch), "--seq", str(args.seq), "--quant", args.quant, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--profile", str(args.profile)]  # fmt: skip
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append(dict(mode=mode, error=(proc.stderr or proc.stdout).strip().splitlines()[-1:]))
        else:
            results.append(json.loads(lines[-1][len("RESULT ") :]))
        if args.json:  # after every mode: a run stopped by a time limit keeps the modes it finished
            write_json(args, results)
    ceiling = next((r for r in results if r.get("mode") == "ceiling_liger" and "tok_s" in r), None)
    ceiling = ceiling or next((r for r in results if r.get("mode") == "ceiling" and "tok_s" in r), None)
    device_name = "cpu (numbers mean nothing)" if args.tiny else torch.cuda.get_device_name()
    print(f"LoRA end to end on {device_name}: {args.size} Llama shape, {args.quant}, {args.batch} x {args.seq} tokens")
    print(f"| {'mode':<15} | {'tokens/s':>9} | {'% of ceiling':>12} | {'peak GiB':>8} | {'trainable':>11} | loss |")
    print(f"|{'-' * 17}|{'-' * 11}|{'-' * 14}|{'-' * 10}|{'-' * 13}|------|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']:<15} | failed: {' '.join(r['error'])[:200]}")
            continue
        pct = f"{100 * r['tok_s'] / ceiling['tok_s']:.0f}%" if ceiling else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"| {r['mode']:<15} | {r['tok_s']:>9,} | {pct:>12} | {peak:>8} | {r['n_train']:>11,} | {r['loss']:.3f} |")
    if ceiling:
        print(f"ceiling = {ceiling['mode']}")
    for r in results:
        if r.get("profile"):
            print(format_profile(r["mode"], r["profile"]))
            r["profile_by_kind"] = by_kind(r["profile"])
    if args.json:
        write_json(args, results)


def write_json(args: argparse.Namespace, results: list[dict]) -> None:
    """The run's results so far, with what was run where, written atomically to ``args.json``."""
    device_name = "cpu (numbers mean nothing)" if args.tiny else torch.cuda.get_device_name()
    meta = dict(device=device_name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    run = dict(meta, size=args.size, quant=args.quant, batch=args.batch, seq=args.seq, results=results)
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump(run, f)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
