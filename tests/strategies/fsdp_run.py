"""Runs on 1 CPU process (no strategy) or 2 under FSDP2Strategy (gloo); rank 0 saves every scenario's results.

    python tests/strategies/fsdp_run.py DEVICES OUT_DIR [SINGLE_PROCESS_CKPT]

Each rank trains on half of every 4-example batch (Lightning's distributed sampler: rank r takes examples r, r + 2...),
so the mean of the two ranks' losses is the one-process loss and the averaged gradient the one-process gradient.
Used by ``test_fsdp2_strategy.py``; ``scenario_reference`` is also imported there to run the one-process references.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402
from zenft_testing import tiny_model, token_batch  # noqa: E402

from lightning_zenft import FusedKernels, LoRA, SaveAdapter  # noqa: E402
from lightning_zenft.strategies import FSDP2Strategy  # noqa: E402


class ShardLM(L.LightningModule):
    """A tiny Llama trained as users write it: the optimizer over ``self.parameters()``."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2) -> None:
        super().__init__()
        self.model = tiny_model("llama", seed=0).train()  # tiny_model returns eval mode; the Trainer keeps it
        self.optimizer, self.lr = optimizer, lr
        self.losses: list[float] = []
        self.saved_bytes: list[int] = []  # bytes autograd saved for backward at each step (outside checkpointing)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(input_ids=ids, labels=ids).loss
        self.saved_bytes.append(sum(saved.values()))
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss, sync_dist=True)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        # 8 examples in batches of 4: an epoch every 2 steps, so a checkpoint at step 2 resumes at an epoch boundary
        data = TensorDataset(token_batch(8, 12, seed=3))
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(data, batch_size=4 // world, sampler=sampler)  # rank r: examples r, r + 2, ...


def trainer(
    devices: int,
    steps: int,
    callbacks: list[L.Callback],
    root: Path,
    accelerator: str = "cpu",
    strategy: type[L.pytorch.strategies.Strategy] | None = None,
    **options: Any,
) -> L.Trainer:
    """A Trainer on ``devices`` processes: ``strategy`` (FSDP2Strategy on more than one device) with ``options``
    (``mixed_precision=None`` unless given), or Lightning's default strategy on one device."""
    kwargs: dict[str, Any] = {}
    if strategy is None and devices > 1:
        strategy = FSDP2Strategy
    if strategy is not None:
        kwargs["strategy"] = strategy(**{"mixed_precision": None, **options})
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        max_steps=steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the module's own sampler, without shuffling
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()


def global_losses(module: ShardLM) -> list[float]:
    """The mean over ranks of each step's loss (the one-process loss of the whole batch)."""
    if not torch.distributed.is_initialized():
        return list(module.losses)
    every: list[list[float]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(every, module.losses)
    return [sum(step) / len(step) for step in zip(*every, strict=True)]


def trained(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: whole(p) for n, p in module.named_parameters() if p.requires_grad}


def fit(devices: int, root: Path, steps: int, callbacks: list[L.Callback], ckpt: Path | None = None, **kw: Any) -> Any:
    torch.manual_seed(0)
    module = ShardLM(optimizer=kw.pop("optimizer", "adamw"))
    t = trainer(devices, steps, callbacks, root, **kw)
    t.fit(module, ckpt_path=ckpt)
    return module, t


# --------------------------------------------------------------------------------------------------- scenarios
def scenario_reference(devices: int, root: Path) -> dict[str, Any]:
    """A full fine-tune (SGD with momentum) for 3 steps: losses and weights, to compare with one process."""
    module, _ = fit(devices, root / "full", 3, [], optimizer="sgd")
    return {"losses": global_losses(module), "params": trained(module)}


def lora(**kw: Any) -> LoRA:
    return LoRA(r=4, alpha=8, target_modules="all-linear", **kw)


def scenario_lora_checkpoints(devices: int, root: Path, single_ckpt: Path | None) -> dict[str, Any]:
    """LoRA (dropout 0.1): 4 straight steps; 2 steps + checkpoint + 2 resumed steps, sharded and whole."""
    out: dict[str, Any] = {}
    straight, _ = fit(devices, root / "straight", 4, [lora(dropout=0.1), SaveAdapter(str(root / "adapter"))])
    out["straight"] = global_losses(straight)
    out["adapter_params"] = trained(straight)
    for kind in ("sharded", "full"):
        saver = ModelCheckpoint(dirpath=root / f"ckpt-{kind}", every_n_train_steps=2, save_top_k=-1)
        first, _ = fit(devices, root / kind, 2, [lora(dropout=0.1), saver], state_dict=kind)
        (ckpt,) = sorted((root / f"ckpt-{kind}").glob("*.ckpt"))
        resumed, _ = fit(devices, root / kind, 4, [lora(dropout=0.1)], ckpt=ckpt, state_dict=kind)
        out[kind] = {"first": global_losses(first), "resumed": global_losses(resumed), "path": str(ckpt)}
    # the same run writing its whole state (frozen base included): the size an adapter-only checkpoint avoids
    saver = ModelCheckpoint(dirpath=root / "ckpt-with-base", every_n_train_steps=2, save_top_k=-1)
    fit(devices, root / "with-base", 2, [lora(dropout=0.1, save_full_state_dict=True), saver])
    (ckpt,) = sorted((root / "ckpt-with-base").glob("*.ckpt"))
    out["with_base_path"] = str(ckpt)
    if single_ckpt is not None:  # a one-process (no strategy, no dropout) checkpoint at step 2, resumed under FSDP2
        resumed, _ = fit(devices, root / "from-single", 3, [lora()], ckpt=single_ckpt)
        out["from_single"] = global_losses(resumed)
    return out


def scenario_fused(devices: int, root: Path) -> dict[str, Any]:
    """LoRA (no dropout) with and without FusedKernels, and with activation checkpointing."""
    plain, _ = fit(devices, root / "plain", 3, [lora()])
    kernels = FusedKernels()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, _ = fit(devices, root / "fused", 3, [lora(), kernels])
    checkpointed, t = fit(devices, root / "ac", 3, [lora()], activation_checkpointing=True)
    return {
        "saved_bytes": {"plain": plain.saved_bytes[0], "checkpointed": checkpointed.saved_bytes[0]},
        "plain": global_losses(plain),
        "fused": global_losses(fused),
        "applied": {k: list(v) for k, v in kernels.applied.items()},
        "warnings": [str(w.message) for w in caught if "fused" in str(w.message).lower()],
        "checkpointed": global_losses(checkpointed),
        "plain_params": trained(plain),
        "fused_params": trained(fused),
        "checkpointed_params": trained(checkpointed),
        "units": list(t.strategy.units),
    }


def scenario_bf16(devices: int, root: Path) -> dict[str, Any]:
    """bf16 mixed precision with frozen weights stored in bf16 and kept in fp32: the same losses."""
    cast, t = fit(devices, root / "cast", 2, [lora()], mixed_precision="bf16")
    dtypes = {n: str(p.dtype) for n, p in cast.named_parameters()}
    kept, _ = fit(devices, root / "kept", 2, [lora()], mixed_precision="bf16", cast_frozen=False)
    return {"cast": global_losses(cast), "kept": global_losses(kept), "dtypes": dtypes}


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (this rank's shards of DTensors), padding included."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        seen[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(seen.values())


def _gathered_now(model: torch.nn.Module) -> int:
    """Bytes of the parameters FSDP2 holds whole at this moment (registered as ordinary tensors, not DTensors)."""
    return _storage_bytes([p for p in model.parameters() if not hasattr(p, "to_local")])


def scenario_memory(devices: int, root: Path) -> dict[str, Any]:
    """Per-rank bytes after one bf16-mixed AdamW step: parameter shards, gradient shards, optimizer states; and the
    most parameter bytes held whole at a block's forward or backward during one more step."""
    out: dict[str, Any] = {}
    for method, callbacks in (("full", []), ("lora", [lora()])):
        module, t = fit(devices, root / f"mem-{method}", 1, callbacks, mixed_precision="bf16")
        params = list(module.parameters())
        (optimizer,) = t.optimizers
        states = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
        steps = [v for state in optimizer.state.values() for k, v in state.items() if k == "step"]
        peak = [0]

        def record(*_: Any, peak: list[int] = peak, module: ShardLM = module) -> None:
            peak[0] = max(peak[0], _gathered_now(module))

        blocks = [module.model.model.layers[i] for i in range(len(module.model.model.layers))]
        handles = [b.register_forward_pre_hook(record) for b in blocks]
        handles += [b.register_full_backward_pre_hook(record) for b in blocks]
        ids = token_batch(4 // t.world_size, 12, seed=5)
        module.model(input_ids=ids, labels=ids).loss.backward()
        for h in handles:
            h.remove()
        mine = {
            "params": _storage_bytes(params),
            "grads": _storage_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer": _storage_bytes(states),
            "steps": _storage_bytes(steps),
            "gathered_peak": peak[0],
        }
        every: list[Any] = [mine]
        if torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
        out[method] = every
    return out


def scenario_yaml(devices: int, root: Path) -> dict[str, Any]:
    """``zenft fit --config examples/fsdp_qlora.yaml`` on CPU (overrides: 2 CPU processes, 2 steps, small batches, a
    checkpoint at step 2; the embedded model's down projections kept in full precision, as the example says)."""
    import yaml

    from lightning_zenft.cli import cli_main

    example = Path(__file__).resolve().parents[2] / "examples" / "fsdp_qlora.yaml"
    config = yaml.safe_load(example.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2  # a checkpoint within the 2 steps
    # what the example's comment says for the embedded model (its 344-wide down projections)
    config["trainer"]["plugins"][0]["init_args"] = {"skip_modules": ["down_proj"]}
    example = root / "fsdp_example.yaml"
    example.write_text(yaml.safe_dump(config))
    args = [
        "fit",
        "--config",
        str(example),
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root / 'yaml'}",
        "--data.max_length=32",
        "--data.batch_size=2",
    ]
    torch.manual_seed(0)
    cli = cli_main(args)
    strategy = cli.trainer.strategy
    return {
        "strategy": type(strategy).__name__,
        "options": {k: getattr(strategy, k) for k in ("mixed_precision", "activation_checkpointing", "cpu_offload")},
        "units": list(strategy.units),
        "global_step": cli.trainer.global_step,
        "plugin": type(cli.trainer.precision_plugin).__name__,
        "model_dir": cli.model.model_name_or_path,
    }


class ShardsItself(ShardLM):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.model.model.layers[0], mesh=self.device_mesh["data_parallel"])


class OwnParameter(ShardLM):
    def __init__(self) -> None:
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.ones(()))


def _error_of(module: ShardLM, root: Path, callbacks: list[L.Callback], ckpt: Path | None = None, **kw: Any) -> str:
    try:
        trainer(2, 1, callbacks, root, **kw).fit(module, ckpt_path=ckpt)
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def scenario_refusals(devices: int, root: Path, sharded_ckpt: str) -> dict[str, Any]:
    """What the strategy refuses, each raised on every rank before any collective; and a fused layer whose DTensor
    parameters no FSDP2 unit gathers."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    from lightning_zenft import LoRALinear
    from lightning_zenft.fusion import fuse_lora_layers

    out = {
        "manual": _error_of(ShardsItself(), root / "manual", []),
        "own_parameter": _error_of(OwnParameter(), root / "own", []),
        "other_rank": _error_of(ShardLM(), root / "rank", [LoRA(r=2, alpha=8)], ckpt=Path(sharded_ckpt)),
        "offload_on_cpu": _error_of(ShardLM(), root / "offload", [], cpu_offload=True),
    }
    try:
        trainer(2, 1, [LoRA(r="auto")], root / "auto").validate(ShardLM(), ckpt_path=Path(sharded_ckpt), verbose=False)
        out["auto_rank"] = "no error"
    except RuntimeError as err:
        out["auto_rank"] = str(err)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (devices,))
    layer = LoRALinear(torch.nn.Linear(8, 8), r=2, alpha=4)
    for module in (layer.base_layer, layer.lora_A, layer.lora_B):
        for name, param in list(module.named_parameters(recurse=False)):
            whole_param = distribute_tensor(param.detach(), mesh, [Replicate()])
            module.register_parameter(name, torch.nn.Parameter(whole_param, requires_grad=param.requires_grad))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fuse_lora_layers(layer)
    out["dtensor_layer"] = {"skipped": report.skipped, "warnings": [str(w.message) for w in caught]}
    return out


def scenario_example(devices: int, root: Path) -> dict[str, Any]:
    """``examples/fsdp_full_finetune.py`` on CPU processes for 2 steps; the gathered weights it saved, and the
    sharded model's weights gathered here, for comparison."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "fsdp_full_finetune.py"
    spec = importlib.util.spec_from_file_location("fsdp_full_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    captured: dict[str, Any] = {}
    original = example.save_gathered

    def save_and_keep(trainer: L.Trainer, module: L.LightningModule, out: Path) -> Path | None:
        captured["params"] = {n: whole(p) for n, p in module.model.named_parameters()}
        return original(trainer, module, out)

    example.save_gathered = save_and_keep
    argv = ["--accelerator", "cpu", "--devices", str(devices), "--max-steps", "2", "--max-length", "32"]
    argv += ["--batch-size", "2", "--mixed-precision", "none", "--learning-rate", "1e-3", "--out", str(root / "ex")]
    report = example.main(argv)
    return {"report": report, "params": captured["params"]}


def scenario_monitor(devices: int, root: Path) -> None:
    """``tests/callbacks/test_forgetting_ddp.py``'s FSDP2 run with the sharding done by FSDP2Strategy: each rank
    writes its monitor history to ``root / "monitor"`` (compared with one process by ``test_fsdp2_strategy.py``)."""
    from forgetting_testing import DumpHistory, InOrderCounter, distributed_monitor
    from forgetting_testing import trainer as monitor_trainer

    out = root / "monitor"
    module = InOrderCounter(devices)  # no configure_model: the strategy shards it
    torch.manual_seed(0)  # after building the module: the same LoRA init as the one-process run
    callbacks = [LoRA(r=4, alpha=8), distributed_monitor(), DumpHistory(out)]
    strategy = FSDP2Strategy(mixed_precision=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_ = monitor_trainer(
            out, callbacks, max_steps=6, devices=devices, strategy=strategy, use_distributed_sampler=False
        )
        fit_.fit(module)


def main() -> None:
    devices, out = int(sys.argv[1]), Path(sys.argv[2])
    single_ckpt = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    results = {
        "reference": scenario_reference(devices, out),
        "lora": scenario_lora_checkpoints(devices, out, single_ckpt),
        "fused": scenario_fused(devices, out),
        "bf16": scenario_bf16(devices, out),
        "memory": scenario_memory(devices, out),
        "yaml": scenario_yaml(devices, out),
        "example": scenario_example(devices, out),
    }
    scenario_monitor(devices, out)
    results["refusals"] = scenario_refusals(devices, out, results["lora"]["sharded"]["path"])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main()
