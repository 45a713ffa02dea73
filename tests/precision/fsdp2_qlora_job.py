"""QLoRA under FSDP2 (Lightning's ModelParallelStrategy, gloo): the job ``test_fsdp2.py`` launches with torchrun.

    torchrun --nproc_per_node=2 tests/precision/fsdp2_qlora_job.py OUT_DIR

On every rank, in one launch: an uninterrupted 4-step run, a 2-step run that writes an adapter-only checkpoint (full
state dict on rank 0), and a run resumed from it to step 4; plus the error for a model sharded before quantization.
Each rank writes ``rank<r>.json``. ``single_process_run`` is the one-process reference the test runs in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_zenft import LoRA, NF4Precision
from lightning_zenft.adapters import adapter_parameter_names

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64)  # fmt: skip


def tiny_llama() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))


class QLoRAModule(L.LightningModule):
    """8 sequences: one process takes batches of 4, each of two ranks batches of 2 of its half (rows r::2)."""

    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded
        self.model = tiny_llama()
        self.losses: list[float] = []
        self.strict_loading = not sharded  # Lightning's FSDP2 loader wants every key; the adapters are checked below

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        self.trainer.precision_plugin.convert_module(self)  # 4-bit and shardable before fully_shard
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
        if self.sharded:
            data = data[self.global_rank :: 2]
        return DataLoader(TensorDataset(data), batch_size=2 if self.sharded else 4, shuffle=False)


def fit(sharded: bool, root: Path, steps: int, ckpt_path: str | None = None, every: int = 0) -> tuple[Any, Any]:
    callbacks: list[Any] = [LoRA(r=4, alpha=8, target_modules="all-linear")]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
    if sharded:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                              save_distributed_checkpoint=False)  # fmt: skip
        devices = 2
    else:
        strategy, devices = "auto", 1
    torch.manual_seed(0)
    module = QLoRAModule(sharded)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(every),
                        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=root,
                        plugins=[NF4Precision(compute_dtype=torch.float32)], callbacks=callbacks)  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def adapter_weights(module: L.LightningModule) -> dict[str, list]:
    params = dict(module.named_parameters())
    out = {}
    for name in adapter_parameter_names(module):
        p = params[name]
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
    return out


def single_process_run(root: Path) -> dict[str, Any]:
    module, _ = fit(False, root, steps=4)
    return {"losses": module.losses, "weights": adapter_weights(module)}


def _sharded_before_quantized() -> str:
    """The message NF4Precision gives for a model that fully_shard reached first."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_zenft import LoRAConfig, inject_adapters

    model = tiny_llama()
    inject_adapters(model, LoRAConfig(r=2))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    try:
        NF4Precision().convert_module(model)
    except RuntimeError as err:
        return str(err)
    return ""


def main(out: Path) -> None:
    straight, trainer = fit(True, out / "straight", steps=4)
    rank = trainer.global_rank
    base = type(straight.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    result: dict[str, Any] = {"losses": straight.losses, "weights": adapter_weights(straight), "base": base}
    first, _ = fit(True, out / "first", steps=2, every=2)
    ckpt = sorted((out / "first" / "ckpt").glob("*.ckpt"))
    trainer.strategy.barrier()
    resumed, _ = fit(True, out / "resumed", steps=4, ckpt_path=str(ckpt[0]))
    result.update(first_losses=first.losses, resumed_losses=resumed.losses, resumed_weights=adapter_weights(resumed))
    result["checkpoint"] = str(ckpt[0])
    result["sharded_first_error"] = _sharded_before_quantized()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
