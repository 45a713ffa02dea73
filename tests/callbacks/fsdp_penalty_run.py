"""Run EWC (full fine-tuning, then LoRA) on a tiny model on 1 CPU process or 2 under FSDP2; rank 0 saves the results.

    python tests/callbacks/fsdp_penalty_run.py DEVICES OUT.pt

With 2 devices, ``ModelParallelStrategy`` shards every parameter over a 2-process gloo group (``fully_shard`` in
``configure_model``); each rank trains on half of every 4-example batch (Lightning's distributed sampler), so the
averaged gradient is the 1-process gradient. With 2 devices it also resumes from a distributed checkpoint, and runs
DDP with a different Fisher batch per rank. Used by ``test_ewc_fsdp.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

import lightning as L  # noqa: E402
import torch  # noqa: E402
from prevention_testing import general_batches, markov_rows, pretrained_model  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_zenft import EWC, LoRA  # noqa: E402


class ShardedLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = pretrained_model()
        rows = markov_rows(8, 16, seed=1, narrow=True)  # 2 steps an epoch: resume at its end
        self.examples = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.examples, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(self.examples, batch_size=4 // world, sampler=sampler)  # rank r: examples r, r + 2, ...


class Record(L.Callback):
    def __init__(self) -> None:
        self.penalties: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.penalties.append(float(trainer.callback_metrics["ewc/penalty"]))


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def run(devices: int, lora: bool, steps: int = 3, ckpt_dir: Path | None = None, resume: Path | None = None) -> dict:
    torch.manual_seed(0)
    ewc = EWC(general_batches(n=4, seed=3), strength=500.0)
    record = Record()
    callbacks = ([LoRA(r=2, alpha=4)] if lora else []) + [ewc, record]
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=steps, save_top_k=-1))
    kwargs: dict[str, object] = {}
    if devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=steps,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=callbacks,
        **kwargs,
    )
    module = ShardedLM()
    trainer.fit(module, ckpt_path=resume)
    params = {n: whole(p) for n, p in module.named_parameters() if p.requires_grad}
    fisher = {n: whole(ewc.fisher.diagonal[n] if devices == 1 else _gather(ewc, n)) for n in ewc.fisher.diagonal}
    factors = {n: (r.cpu(), c.cpu()) for n, (r, c) in ewc.fisher.factors.items()}
    return {"params": params, "fisher": fisher, "factors": factors, "penalties": record.penalties}


def run_ddp(devices: int) -> dict[str, torch.Tensor]:
    """DDP with a different Fisher batch on each rank: EWC averages the ranks' Fishers (token-weighted)."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    ewc = EWC(general_batches(n=4, seed=3 + rank), strength=500.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[ewc],
    )
    trainer.fit(ShardedLM())
    return {n: v.detach().cpu() for n, v in ewc.fisher.diagonal.items()}


def _gather(ewc: EWC, name: str) -> torch.Tensor:
    from lightning_zenft.callbacks._weight_penalty import gather_like

    return gather_like(ewc.fisher.diagonal[name], ewc.targets.dense[name])


def main() -> None:
    devices, out = int(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    results = {"full": run(devices, lora=False), "lora": run(devices, lora=True)}
    if devices > 1:  # 2 steps, a (distributed) checkpoint, then the third step from it
        ckpt_dir = out.parent / "fsdp_ckpt"
        run(devices, lora=False, steps=2, ckpt_dir=ckpt_dir)
        (ckpt,) = sorted(ckpt_dir.glob("*.ckpt"))
        results["resumed"] = run(devices, lora=False, steps=3, resume=ckpt)
        results["ddp"] = run_ddp(devices)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
