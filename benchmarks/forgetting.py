"""Forgetting benchmark: how much general ability each method keeps while a narrow fine-tune goes its way.

    python benchmarks/forgetting.py [--json out/forgetting.json] [--quick]

1. A small Llama (character-level, 128-symbol vocabulary, 0.12M parameters) is pretrained here on general text: the
   Python standard library's source read from the local installation (``lightning_zenft.data.general_text``).
2. It is fine-tuned with AdamW on a narrow task, the package's embedded instruction task (identifier case
   conversion, hyphen joins, word reversal; loss on the answers only), long enough and fast enough that its general
   ability collapses without protection.
3. Each method runs the same fine-tune through ``L.Trainer`` with the package's callbacks, as users run them:
   none, ``L2SP``, ``EWC`` with each Fisher estimator, ``Replay`` at 10%, ``DistillToBase``, ``LoRA`` and
   ``LoRA`` + ``EWC``.

Reported per method: the rise of the held-out general loss (nats per character; the forgetting), the fall of the
task validation loss (the gain), the share of the unprotected run's forgetting it prevents (``1 - rise / rise_none``),
the share of its gain it keeps (``gain / gain_none``), and the step-time overhead: the median step time of one setting
per method over the unprotected run's, from short runs interleaved round-robin after the quality runs (the step of
EWC does not depend on the estimator; ``regularizer_overhead.py`` measures EWC and L2SP more closely).
A diagnostic of the trade-off is printed too: the share of the task gradient's energy (at the pretrained weights) on
the 10% of weights with the largest (exact) Fisher: 10% if the task and general text used unrelated weights.
Targets (issue 10): EWC prevents >= 80% while keeping >= 90%; replay with <= 10% general data prevents >= 95% while
keeping >= 99%. Strengths are swept and the frontier (prevented vs kept) is printed, so a missed target shows how far
off it is and where the trade-off lies.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_zenft import EWC, L2SP, DistillToBase, LoRA, Replay  # noqa: E402
from lightning_zenft.data import DEFAULT_TASK_FILE, DEFAULT_TASK_VAL_FILE, general_text, read_records  # noqa: E402
from lightning_zenft.data.text import CausalLMCollator  # noqa: E402
from lightning_zenft.regularizers import Fisher, fisher_diagonal  # noqa: E402

VOCAB, PAD, BOS, EOS, UNK = 128, 0, 1, 2, 127
SEQ = 64


# ------------------------------------------------------------------------------------------------------- data
def encode(text: str) -> list[int]:
    """Characters to ids: printable ASCII, tab and newline keep their code; anything else is UNK."""
    return [ord(c) if (32 <= ord(c) < 127 or c in "\t\n") else UNK for c in text]


def general_windows(split: str, n: int, seed: int, max_chars: int) -> torch.Tensor:
    stream = torch.tensor(encode("\n".join(general_text(split, max_chars=max_chars))), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - SEQ, (n,), generator=g)
    return torch.stack([stream[s : s + SEQ] for s in starts.tolist()])  # (n, SEQ)


def window_batches(rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows.split(batch_size)]


def window_examples(rows: torch.Tensor) -> list[dict[str, list[int]]]:
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]


def task_examples(path: Path, limit: int | None = None) -> list[dict[str, list[int]]]:
    out = []
    for record in read_records(path)[:limit]:
        prompt, answer = [BOS, *encode(record["prompt"])], [*encode(record["completion"]), EOS]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


# ------------------------------------------------------------------------------------------------------ model
def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).float()


def pretrain(model: torch.nn.Module, steps: int, batch_size: int, max_chars: int) -> None:
    rows = general_windows("train", steps * batch_size, seed=1, max_chars=max_chars)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for batch in window_batches(rows, batch_size):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total = tokens = 0.0
    for b in batches:
        n = (b["labels"][:, 1:] != -100).sum().item()
        total += model(**b).loss.item() * n
        tokens += n
    model.train()
    return total / tokens


# -------------------------------------------------------------------------------------------------- training
class TaskModule(L.LightningModule):
    """The fine-tune as a user writes it: ``model(**batch).loss``, AdamW over the trainable parameters."""

    def __init__(self, model: torch.nn.Module, train: list[dict[str, list[int]]], lr: float, batch_size: int) -> None:
        super().__init__()
        self.model, self.train_examples, self.lr, self.batch_size = model, train, lr, batch_size

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        collate = CausalLMCollator(PAD)
        return DataLoader(self.train_examples, self.batch_size, shuffle=True, generator=g, collate_fn=collate)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self._start)


@dataclass
class Result:
    method: str
    setting: str
    general_rise: float
    task_gain: float
    step_ms: float
    fit_start_s: float
    prevented: float = math.nan
    kept: float = math.nan
    overhead: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    base_state: dict[str, torch.Tensor]
    train: list[dict[str, list[int]]]
    task_val: list[dict[str, torch.Tensor]]
    probe: list[dict[str, torch.Tensor]]
    fisher_data: list[dict[str, torch.Tensor]]
    replay_data: list[dict[str, list[int]]]
    steps: int
    lr: float
    lora_lr: float
    batch_size: int
    base_general: float = 0.0
    base_task: float = 0.0

    def model(self) -> torch.nn.Module:
        model = build_model(0)
        model.load_state_dict(self.base_state)
        return model

    def time_steps(self, callbacks: list[L.Callback], lr: float | None) -> list[float]:
        """Step times (seconds) of a short run, the first 5 steps left out."""
        module = TaskModule(self.model(), self.train, lr or self.lr, self.batch_size)
        timer = StepTimer()
        self.trainer([*callbacks, timer]).fit(module)
        return timer.times[5:]

    def trainer(self, callbacks: list[L.Callback]) -> L.Trainer:
        """The Trainer of every run here: CPU, ``self.steps`` steps, nothing written."""
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=self.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )

    def run(self, method: str, setting: str, callbacks: list[L.Callback], lr: float | None = None) -> Result:
        model = self.model()
        module = TaskModule(model, self.train, lr or self.lr, self.batch_size)
        timer = StepTimer()
        trainer = self.trainer([*callbacks, timer])
        start = time.perf_counter()
        trainer.fit(module)
        total = time.perf_counter() - start
        steady = timer.times[5:] or timer.times
        step = statistics.median(steady)
        fit_start = total - sum(timer.times)
        general, task = mean_loss(model, self.probe), mean_loss(model, self.task_val)
        result = Result(method, setting, general - self.base_general, self.base_task - task, 1000 * step, fit_start)
        print(
            f"  {method:<16} {setting:<22} general {self.base_general:.3f} -> {general:.3f}  task {self.base_task:.3f} "
            f"-> {task:.3f}  {1000 * step:6.1f} ms/step  fit start {fit_start:5.1f} s",
            flush=True,
        )
        return result


def relative(results: list[Result], none: Result) -> None:
    for r in results:
        r.prevented = 1 - r.general_rise / none.general_rise
        r.kept = r.task_gain / none.task_gain
        r.overhead = r.step_ms / none.step_ms - 1


# ------------------------------------------------------------------------------------------------------ main
def fisher_for(estimator: str, base: torch.nn.Module, data: list[dict[str, torch.Tensor]], samples: int) -> Fisher:
    """The Fisher of the pretrained model, once per estimator (every EWC strength reuses it); prints its time."""
    start = time.perf_counter()
    fisher = fisher_diagonal(base, data, estimator, samples=samples if estimator == "sampled" else 1)  # type: ignore[arg-type]
    named = Fisher({"model." + k: v for k, v in fisher.diagonal.items()}, tokens=fisher.tokens, estimator=estimator)
    print(f"Fisher ({estimator}) over {fisher.tokens} tokens: {time.perf_counter() - start:.1f} s", flush=True)
    return named


def overlap(base: torch.nn.Module, bench: Bench, fisher: Fisher) -> float:
    """Share (%) of the task gradient's squared norm on the 10% of weights with the largest Fisher entries."""
    model = bench.model()
    collate = CausalLMCollator(PAD)
    model.zero_grad()
    for i in range(0, 256, 32):
        (model(**collate(bench.train[i : i + 32])).loss / 8).backward()
    grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters()]).square()
    weights = torch.cat([fisher.diagonal["model." + n].flatten() for n, _ in model.named_parameters()])
    top = weights >= weights.sort().values[int(0.9 * weights.numel())]  # the top 10%
    return 100 * (grads[top].sum() / grads.sum()).item()


def time_side_by_side(bench: Bench, fisher: Fisher, rounds: int, steps: int, samples: int) -> dict[str, float]:
    """Median step time (s) of one setting per method, short runs interleaved round-robin over ``rounds``."""
    configs = {
        "none": (lambda: [], None),
        "L2SP": (lambda: [L2SP(strength=0.1)], None),
        "EWC sampled": (lambda: [EWC(fisher, strength=100.0)], None),
        "EWC empirical": (lambda: [EWC(fisher, strength=100.0)], None),
        "EWC exact": (lambda: [EWC(fisher, strength=100.0)], None),
        "Replay": (lambda: [Replay(bench.replay_data, ratio=0.1)], None),
        "DistillToBase": (lambda: [DistillToBase(weight=3.0)], None),
        "LoRA": (lambda: [LoRA(r=8, alpha=16)], bench.lora_lr),
        "LoRA + EWC": (lambda: [LoRA(r=8, alpha=16), EWC(bench.fisher_data, strength=300.0, samples=samples)],
                       bench.lora_lr),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in configs}
    saved = bench.steps
    bench.steps = steps
    try:
        for _ in range(rounds):
            for name, (make, lr) in configs.items():
                if name in ("EWC empirical", "EWC exact"):
                    continue  # the same penalty step as EWC sampled: only the Fisher (at fit start) differs
                times[name].extend(bench.time_steps(make(), lr))
    finally:
        bench.steps = saved
    times["EWC empirical"] = times["EWC exact"] = times["EWC sampled"]
    return {k: statistics.median(v) for k, v in times.items()}


def load_or_pretrain(args: argparse.Namespace, max_chars: int) -> torch.nn.Module:
    base = build_model(0)
    cache = Path(args.cache) if args.cache else None
    key = f"steps={args.pretrain_steps}"
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            base.load_state_dict(saved["state"])
            print(f"pretrained base read from {cache}")
            return base
    start = time.perf_counter()
    pretrain(base, args.pretrain_steps, 32, max_chars)
    print(f"pretrained {sum(p.numel() for p in base.parameters()):,} parameters in {time.perf_counter() - start:.0f} s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state": base.state_dict()}, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--fisher-seqs", type=int, default=8, help="general sequences of 32 characters for the Fisher")
    parser.add_argument("--samples", type=int, default=4, help="label draws per token for the sampled Fisher")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sweeps: a smoke run")
    parser.add_argument("--cache", default="out/forgetting_base.pt", help="pretrained base (reused if present)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=3, help="interleaved rounds of the step-time phase")
    parser.add_argument("--timing-steps", type=int, default=15, help="steps per method and round (5 of warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.pretrain_steps, args.fisher_seqs, args.timing_rounds, args.timing_steps = 30, 40, 2, 1, 7
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()

    max_chars = 3_000_000
    base = load_or_pretrain(args, max_chars)
    probe = window_batches(general_windows("probe", 64, seed=2, max_chars=max_chars), 16)
    collate = CausalLMCollator(PAD)
    val = task_examples(DEFAULT_TASK_VAL_FILE, 96)
    fisher_rows = general_windows("train", args.fisher_seqs, seed=3, max_chars=max_chars)[:, :32]
    bench = Bench(
        base_state={k: v.clone() for k, v in base.state_dict().items()},
        train=task_examples(DEFAULT_TASK_FILE),
        task_val=[collate(val[i : i + 16]) for i in range(0, len(val), 16)],
        probe=probe,
        fisher_data=window_batches(fisher_rows, 8),
        replay_data=window_examples(general_windows("train", 2000, seed=4, max_chars=max_chars)),
        steps=args.steps,
        lr=args.lr,
        lora_lr=args.lora_lr,
        batch_size=args.batch,
    )
    bench.base_general, bench.base_task = mean_loss(base, probe), mean_loss(base, bench.task_val)
    print(f"base: general probe loss {bench.base_general:.3f}, task val loss {bench.base_task:.3f} (nats/char)")
    fishers = {e: fisher_for(e, base, bench.fisher_data, args.samples) for e in ("sampled", "empirical", "exact")}

    sweep = {
        "l2sp": [0.03, 0.1, 0.3, 1.0],
        "ewc sampled": [10.0, 30.0, 100.0, 300.0, 1000.0],
        "ewc": [30.0, 100.0, 300.0],
        "ewc big": [30.0, 100.0, 300.0],
        "replay": [0.05, 0.1, 0.2],
        "distill": [1.0, 3.0, 10.0],
        "lora ewc": [100.0, 300.0, 1000.0],
    }
    if args.quick:
        sweep = {k: v[:1] for k, v in sweep.items()}
    big_rows = general_windows("train", 8 * args.fisher_seqs, seed=5, max_chars=max_chars)
    big = fisher_for("sampled", base, window_batches(big_rows, 8), args.samples)
    print(
        f"task gradient vs Fisher: {overlap(base, bench, fishers['exact']):.0f}% of the task gradient's energy lies "
        "in the 10% of weights with the largest Fisher (10% if unrelated)"
    )

    results: list[Result] = []
    none = bench.run("none", "full fine-tuning", [])
    results.append(none)
    for s in sweep["l2sp"]:
        results.append(bench.run("L2SP", f"strength={s:g}", [L2SP(strength=s)]))
    for estimator, fisher in fishers.items():
        for s in sweep["ewc sampled" if estimator == "sampled" else "ewc"]:
            results.append(bench.run(f"EWC {estimator}", f"strength={s:g}", [EWC(fisher, strength=s)]))
    for s in sweep["ewc big"]:
        results.append(bench.run(f"EWC sampled, {big.tokens} tok", f"strength={s:g}", [EWC(big, strength=s)]))
    for ratio in sweep["replay"]:
        results.append(bench.run("Replay", f"ratio={ratio:g}", [Replay(bench.replay_data, ratio=ratio)]))
    for w in sweep["distill"]:
        results.append(bench.run("DistillToBase", f"weight={w:g}", [DistillToBase(weight=w)]))
    results.append(bench.run("LoRA", "r=8, all-linear", [LoRA(r=8, alpha=16)], lr=bench.lora_lr))
    for s in sweep["lora ewc"]:
        callbacks = [LoRA(r=8, alpha=16), EWC(bench.fisher_data, strength=s, samples=args.samples)]
        results.append(bench.run("LoRA + EWC", f"strength={s:g}", callbacks, lr=bench.lora_lr))
    relative(results, none)
    timing = time_side_by_side(bench, fishers["sampled"], args.timing_rounds, args.timing_steps, args.samples)
    for r in results:
        key = r.method.split(",")[0]
        r.step_ms = 1000 * timing[key]
        r.overhead = timing[key] / timing["none"] - 1

    print()
    print("| method | setting | general loss rise | task loss fall | prevented | kept | step ms | step overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.method} | {r.setting} | {r.general_rise:+.3f} | {r.task_gain:.3f} | {100 * r.prevented:.0f}% | "
            f"{100 * r.kept:.0f}% | {r.step_ms:.1f} | {100 * r.overhead:+.0f}% |"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": vars(args),
            "base_general": bench.base_general,
            "base_task": bench.base_task,
            "results": [r.__dict__ for r in results],
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main()
