"""Pretrain the small general base model that ships inside the package.

What it does:
    1. trains a byte-level BPE tokenizer (``tokenizers``) on the train split of the Python standard library text
       (:func:`lightning_zenft.data.general_text`), with the special tokens ``<s>``, ``</s>``, ``<pad>``,
       ``<unk>``, and saves it as a ``transformers`` ``PreTrainedTokenizerFast`` that adds ``<s>`` in front of
       each encoded text;
    2. packs the same text (``<s> module </s>`` one after another) into fixed-length blocks;
    3. pretrains a tiny Llama (tied embeddings, grouped-query attention) with :class:`CausalLMModule` and a CPU
       ``L.Trainer`` for a fixed wall-clock budget (``--minutes``, or ``--max-steps`` if reached first); the cosine
       learning-rate decay follows elapsed time, so it ends on time however busy the CPU is;
    4. reports the loss on the held-out probe split (:func:`lightning_zenft.data.general_probe_batches`) before
       and after, and saves model, tokenizer and a ``README.md`` to ``lightning_zenft/data/base_model/``.

The base is general on purpose: nothing of the embedded fine-tuning task is mixed in.

Run:
    python examples/pretrain_base.py --minutes 12
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_zenft.data.corpus import general_probe_batches, general_text
from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
from lightning_zenft.lm import CausalLMModule

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget (wall clock)")
    p.add_argument("--max-steps", type=int, default=20_000, help="upper bound on optimizer steps")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128, help="tokens per packed training block")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=344)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=None, help="cap on training characters (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_BASE_MODEL_DIR)
    return p.parse_args(argv)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def pack_blocks(tokenizer: Any, texts: list[str], block_size: int) -> torch.Tensor:
    """``<s> text </s>`` for every text, concatenated and cut into ``(N, block_size)`` blocks (tail dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)  # (N, T)


class BlockDataset(Dataset):
    """Rows of a ``(N, T)`` token tensor as ``input_ids`` / ``attention_mask`` / ``labels`` dicts."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.blocks[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


class PretrainModule(CausalLMModule):
    """:class:`CausalLMModule` with linear warmup, then cosine decay to 10 % over a wall-clock budget.

    The decay follows elapsed training time rather than the step count, so the schedule ends on time however
    fast the (shared) CPU turns out to be; training stops at the budget through ``Trainer(max_time=...)``.
    """

    def __init__(self, budget_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget_s = budget_s
        self._t0: float | None = None

    @override
    def on_train_start(self) -> None:
        self._t0 = time.monotonic()

    def _factor(self, step: int) -> float:
        warmup = max(1, self.hparams.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        elapsed = 0.0 if self._t0 is None else time.monotonic() - self._t0
        progress = min(1.0, elapsed / self.budget_s)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.learning_rate, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def probe_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss over the probe batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = batch["labels"][:, 1:].numel()
        total += model(**batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    t_start = time.time()

    texts = general_text("train", max_chars=args.max_chars)
    print(f"train text: {len(texts)} modules, {sum(map(len, texts)):,} chars", flush=True)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t_start:.0f}s)", flush=True)

    blocks = pack_blocks(tokenizer, texts, args.block_size)
    blocks = blocks[torch.randperm(blocks.size(0), generator=torch.Generator().manual_seed(args.seed))]
    print(f"data: {blocks.size(0)} blocks of {args.block_size} tokens = {blocks.numel():,} tokens", flush=True)

    model_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    probe = general_probe_batches(tokenizer, n_batches=8, batch_size=8, seq_len=args.block_size)
    module = PretrainModule(
        budget_s=args.minutes * 60,
        model_config=model_config,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
    )
    n_params = sum(p.numel() for p in module.model.parameters())
    start_probe = probe_loss(module.model, probe)
    print(
        f"model: {n_params:,} parameters; training for {args.minutes} minutes or {args.max_steps} steps; "
        f"probe loss at init {start_probe:.3f} (ln(vocab) = {math.log(len(tokenizer)):.3f})",
        flush=True,
    )

    loader = DataLoader(
        BlockDataset(blocks),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        max_epochs=-1,
        max_time={"seconds": args.minutes * 60},
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )

    class PrintLoss(L.Callback):
        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step
            if step % 50 == 0:
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                elapsed = time.time() - train_start
                print(f"step {step} ({elapsed:.0f}s) lr {lr:.2e} train_loss {float(outputs['loss']):.3f}", flush=True)

    trainer.callbacks.append(PrintLoss())
    train_start = time.time()
    trainer.fit(module, train_dataloaders=loader)
    train_minutes = (time.time() - train_start) / 60
    end_probe = probe_loss(module.model, probe)
    end_train = float(trainer.callback_metrics.get("train_loss", torch.tensor(float("nan"))))
    print(f"probe loss: {start_probe:.3f} -> {end_probe:.3f}; last train loss {end_train:.3f}", flush=True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = module.model.to(torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    write_readme(
        out,
        args=args,
        n_params=n_params,
        vocab=len(tokenizer),
        steps=trainer.global_step,
        tokens=trainer.global_step * args.batch_size * args.block_size,
        train_minutes=train_minutes,
        start_probe=start_probe,
        end_probe=end_probe,
        end_train=end_train,
        n_modules=len(texts),
        model_config=model_config,
    )
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({size / 2**20:.2f} MiB)", flush=True)


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class in ``tokenizer_config.json`` so every ``transformers`` version loads it."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for file in out.iterdir():
        if file.is_file():
            file.chmod(0o644)


def write_readme(out: Path, *, args: argparse.Namespace, **info: Any) -> None:
    """Describe how the saved model was made, next to its weights."""
    shown = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    text = f"""# Embedded base model

A tiny general-purpose Llama used as the default base model of `lightning_zenft`
(`CausalLMModule()` with no arguments loads it). It is written by `examples/pretrain_base.py`.

- Architecture: `LlamaForCausalLM`, {info["n_params"]:,} parameters, float32, tied input/output embeddings.
- Tokenizer: byte-level BPE with {info["vocab"]} tokens, trained on the same text; special tokens
  `<s>` (prepended to every encoded text), `</s>`, `<pad>`, `<unk>`.
- Data: the train split of `lightning_zenft.data.general_text`, i.e. {info["n_modules"]} modules of the Python
  {platform.python_version()} standard library read from the local installation, packed as `<s> module </s>` into
  {args.block_size}-token blocks. The held-out probe split (about 5 % of modules, chosen by a hash of the module
  name) was never trained on.
- Training: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak learning rate {args.lr},
  {args.warmup_steps} warmup steps then cosine decay to 10 % over the wall-clock budget, gradient clipping
  at 1.0, batch {args.batch_size}, {info["steps"]} steps ({info["tokens"]:,} tokens) in
  {info["train_minutes"]:.1f} minutes on CPU (torch threads: {args.threads}).
- Loss on the probe split (8 batches of 8 x {args.block_size} tokens): {info["start_probe"]:.3f} at
  initialisation (ln(vocab) = {math.log(info["vocab"]):.3f}), {info["end_probe"]:.3f} after training.
  Last logged train loss: {info["end_train"]:.3f}.

Command-line arguments:

```json
{json.dumps(shown, indent=2)}
```

Model config given to `CausalLMModule(model_config=...)`:

```json
{json.dumps(info["model_config"], indent=2)}
```

Made with torch {torch.__version__}, lightning {L.__version__}, Python {sys.version.split()[0]}.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
