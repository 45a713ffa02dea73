"""Test helpers for the forgetting monitor: a tiny LM with a general ability that fine-tuning can destroy.

The "general ability" is counting: in every sequence each token is the previous one plus 1 (mod ``V``). A one-layer
Llama learns it to ~100% next-token accuracy in a few dozen steps (pretrained once per test session, cached). The
"task" is the same with a stride of ``TASK_STRIDE``: fine-tuning on it with a high learning rate overwrites counting.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

V = 32
SEQ = 12
TASK_STRIDE = 5


def stride_rows(n: int, stride: int, seed: int, seq: int = SEQ) -> torch.Tensor:
    """``(n, seq)`` rows ``x_{t+1} = x_t + stride (mod V)`` from random starts."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    return (start + stride * torch.arange(seq)) % V  # (n, seq)


def counter_config():
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


@functools.lru_cache(maxsize=1)
def _pretrained_state() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(counter_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    data = stride_rows(320, 1, seed=100)
    for i in range(20):
        ids = data[i * 16 : (i + 1) * 16]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def counter_model() -> torch.nn.Module:
    """A fresh copy of the pretrained counting model (train mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(counter_config())
    model.load_state_dict(_pretrained_state())
    return model.float().train()


def counting_accuracy(model: torch.nn.Module, rows: torch.Tensor) -> float:
    """Reference next-token accuracy in points, straight from the logits (eval mode, no grad)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=rows).logits  # (N, T, V)
    model.train(was)
    return 100.0 * (logits[:, :-1].argmax(-1) == rows[:, 1:]).double().mean().item()


class CounterLM(L.LightningModule):
    """Fine-tunes the counting model on the stride-``TASK_STRIDE`` task, AdamW (or SGD) over ``self.parameters()``."""

    def __init__(self, lr: float = 0.05, n_train: int = 64, batch_size: int = 8, optimizer: str = "adamw") -> None:
        super().__init__()
        self.model = counter_model()
        self.lr, self.n_train, self.batch_size, self.optimizer = lr, n_train, batch_size, optimizer
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        data = TensorDataset(stride_rows(self.n_train, TASK_STRIDE, seed=7))
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


# ------------------------------------------------------------------------------------------- W&B run files
def wandb_records(run_dir: Path) -> list:
    """The protobuf records of a W&B run's ``.wandb`` transaction log (LevelDB-style log blocks of 32 KiB)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


# ------------------------------------------------------------------------------------------- multi-process runs
def distributed_probes() -> dict:
    """A 7-row LM probe and a 5-question choice probe: uneven shards (4 + 3, 3 + 2) on 2 ranks."""
    from lightning_zenft.data.probes import ChoiceItem, ChoiceProbe, LMProbe

    g = torch.Generator().manual_seed(3)
    items = []
    for q in range(5):
        context = stride_rows(1, 1, seed=20 + q, seq=4)[0].tolist()
        right = [(context[-1] + 1) % V]
        wrong = [[int(t)] for t in torch.randint(0, V, (2,), generator=g) if int(t) != right[0]]
        items.append(ChoiceItem(context, [right, *wrong], answer=0))
    return {
        "general": LMProbe.from_rows(list(stride_rows(7, 1, seed=5)), batch_size=2),
        "counting_choice": ChoiceProbe(items, batch_size=2),
    }


def distributed_monitor():
    from lightning_zenft import ForgettingMonitor
    from lightning_zenft.data.probes import LMProbe

    return ForgettingMonitor(
        probes=distributed_probes(),
        task_probes={"task": LMProbe.from_rows(list(stride_rows(6, TASK_STRIDE, seed=6)), batch_size=4)},
        every_n_steps=1,
        max_drop=30.0,
        on_exceed="stop",
    )


class InOrderCounter(CounterLM):
    """Rank r takes rows r, r + w, ... in order (Lightning's own sampler would shuffle), so two ranks' batches of 4
    are one process's batch of 8. SGD: Adam's first steps (g / |g|) would turn float rounding in near-zero gradients
    into +-lr updates."""

    def __init__(self, devices: int) -> None:
        super().__init__(lr=1.0, n_train=64, batch_size=8 // devices, optimizer="sgd")

    def train_dataloader(self):
        from torch.utils.data import DistributedSampler

        loader = super().train_dataloader()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)


class DumpHistory(L.Callback):
    """Each rank writes ``rank<r>.json``: the monitor's history, the final step, the stop checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def on_fit_end(self, trainer, pl_module) -> None:
        from lightning_zenft import ForgettingMonitor

        (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, ForgettingMonitor)]
        out = {"history": monitor.history, "global_step": trainer.global_step, "stop": str(monitor.stop_checkpoint)}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
