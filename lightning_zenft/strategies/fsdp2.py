"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` with the sharding applied for you (FSDP2, ``fully_shard``).

Lightning's ``ModelParallelStrategy`` asks every LightningModule to write ``configure_model`` with its own
``fully_shard`` calls. This subclass does that part, the same way for every model:

1. After the callbacks' ``setup`` (adapters injected, base frozen) and ``configure_model``, the precision plugin
   converts the module first (e.g. a 4-bit base), so sharding sees the final parameters; bitsandbytes 4-bit layers
   become layers whose 4-bit weights FSDP2 can shard (:func:`~lightning_zenft.strategies.blocks.shardable_4bit`).
2. Under ``mixed_precision="bf16"``, frozen floating-point parameters are stored in bf16 (``cast_frozen``): FSDP2
   would cast them to bf16 at every all-gather anyway, so this is the same computation with half the memory.
   Trained parameters stay in their dtype (fp32: the optimizer's master copy); gradients are reduced in fp32.
3. Every transformer block (:func:`~lightning_zenft.strategies.blocks.resolve_block_classes`) becomes a sharding unit,
   with activation checkpointing first when asked (:func:`~lightning_zenft.strategies.blocks.checkpoint_blocks`: the
   model's own for Hugging Face layers, torch's composable ``checkpoint`` otherwise; names unchanged); then each
   child of the LightningModule that holds parameters outside the blocks (the Hugging Face model:
   embeddings, final norm, head) becomes the root unit.
4. The mesh is one data-parallel dimension over every process of every node.

Frozen parameters get no gradient and, once adapter callbacks drop them from the optimizer, no optimizer state:
memory per rank is the frozen shard plus the trained shard with its gradient and states. Checkpoints hold only the
trained tensors when an adapter callback asks for it (see :mod:`~lightning_zenft.strategies.checkpoints`).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_zenft.strategies import checkpoints
from lightning_zenft.strategies.blocks import (
    BlockClasses,
    cast_frozen,
    cast_trained,
    checkpoint_blocks,
    resolve_block_classes,
    shardable_4bit,
    trained_dtypes,
)
from lightning_zenft.strategies.options import MixedPrecisionName, StateDictName, check_options


class FSDP2Strategy(checkpoints.TrainedOnlyCheckpointHooks, ModelParallelStrategy):
    """Fully sharded data parallel training (FSDP2) configured from a few options; no ``configure_model`` needed.

    Args:
        block_classes: the sharding units: ``"auto"`` (the model's ``_no_split_modules``) or class names.
        mixed_precision: ``"bf16"`` (parameters gathered and computed in bf16, gradients reduced in fp32, frozen
            weights stored in bf16) or ``None`` (every parameter in its own dtype; the Trainer's ``precision=``, e.g.
            ``"bf16-mixed"`` autocast, still applies).
        activation_checkpointing: recompute each block's activations in backward instead of keeping them.
        cpu_offload: keep parameter shards, gradients and optimizer states in CPU memory (the optimizer steps on CPU).
        state_dict: ``"sharded"`` (each rank writes its shards into a checkpoint directory) or ``"full"`` (rank 0
            writes one file of whole tensors).
        reshard_after_forward: free gathered parameters after each block's forward (gather again in backward);
            ``False`` keeps them until backward, trading memory for communication.
        cast_frozen: with mixed precision, store frozen parameters in its dtype (see the module docstring).
        process_group_backend: ``"nccl"``, ``"gloo"``...; by default the one for the device.

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=8, num_nodes=2, strategy=FSDP2Strategy(),
                            callbacks=[LoRA(r=16)])
    """

    def __init__(
        self,
        block_classes: BlockClasses = "auto",
        mixed_precision: MixedPrecisionName = "bf16",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        state_dict: StateDictName = "sharded",
        reshard_after_forward: bool = True,
        cast_frozen: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        check_options(
            "FSDP2Strategy",
            block_classes=block_classes,
            mixed_precision=mixed_precision,
            state_dict=state_dict,
            flags={
                "activation_checkpointing": activation_checkpointing,
                "cpu_offload": cpu_offload,
                "reshard_after_forward": reshard_after_forward,
                "cast_frozen": cast_frozen,
            },
        )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict == "sharded",
            process_group_backend=process_group_backend,
        )
        self.block_classes = block_classes
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.state_dict_kind: Literal["sharded", "full"] = state_dict
        self.reshard_after_forward = reshard_after_forward
        self.cast_frozen = cast_frozen
        self.units: list[str] = []
        """Names of the modules that became sharding units (blocks first, then the root units)."""

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # one data-parallel dimension over all ranks
        self._tensor_parallel_size = 1
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        if self.cpu_offload and self.root_device.type == "cpu":
            raise ValueError(
                "FSDP2Strategy(cpu_offload=True) moves shards from an accelerator to the CPU, but the Trainer runs on "
                "the CPU already: set cpu_offload=False, or train on GPUs (accelerator='gpu')."
            )
        self.accelerator.setup(trainer)
        _refuse_manual_sharding(self.model)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        shardable_4bit(self.model, "FSDP2Strategy")
        self.units = self._shard(self.model)
        if not self.cpu_offload:
            self.model_to_device()  # buffers; offloaded shards stay on the CPU
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.cpu_offload:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, pl_module: nn.Module) -> list[str]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        own = [n for n, _ in pl_module.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"{type(pl_module).__name__} holds parameters directly ({own[:3]}): FSDP2 shards submodules, and "
                "parameters outside them would not be synchronized across ranks. Move them into a submodule "
                "(e.g. an nn.Module held by the LightningModule)."
            )
        classes = tuple(resolve_block_classes(pl_module, self.block_classes))
        mp = MixedPrecisionPolicy()
        if self.mixed_precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.cast_frozen:
                cast_frozen(pl_module, torch.bfloat16)
            cast = cast_trained(pl_module, torch.float32)
            if cast:
                rank_zero_info(
                    f"FSDP2Strategy: {len(cast)} trained parameters (e.g. {cast[:2]}) stored in fp32, the optimizer's "
                    "master copy under bf16 mixed precision (FSDP2 needs one dtype for a unit's trained parameters)."
                )
        else:
            dtypes = trained_dtypes(pl_module)
            if len(dtypes) > 1:
                examples = {str(d): names[:2] for d, names in dtypes.items()}
                raise ValueError(
                    f"FSDP2Strategy(mixed_precision=None): the trained parameters have several dtypes ({examples}), "
                    "and FSDP2 needs one dtype for a unit's trained parameters. Use mixed_precision='bf16' (trained "
                    "parameters are then kept in fp32), or load the model in one dtype."
                )
        kwargs: dict[str, Any] = {
            "mesh": self.device_mesh["data_parallel"],
            "mp_policy": mp,
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }
        blocks = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, classes)]
        inner = {id(sub) for _, b in blocks for sub in b.modules() if sub is not b}  # blocks nested in blocks
        if self.activation_checkpointing:
            checkpoint_blocks(pl_module, [b for _, b in blocks if id(b) not in inner])
        units: list[str] = []
        for name, block in reversed(blocks):  # inner blocks first
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **kwargs)
            units.append(name)
        units.reverse()
        in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
        for name, child in pl_module.named_children():
            if any(id(p) not in in_blocks for p in child.parameters()):
                fully_shard(child, **kwargs)  # root unit: kept gathered from forward to backward by FSDP
                units.append(name)
        rank_zero_info(
            f"FSDP2Strategy: {len(blocks)} {'/'.join(sorted({c.__name__ for c in classes}))} blocks and "
            f"{len(units) - len(blocks)} root units sharded over {self.device_mesh['data_parallel'].size()} ranks"
            f"{', activation checkpointing on' if self.activation_checkpointing else ''}"
            f"{', bf16 mixed precision' if self.mixed_precision else ''}{', CPU offload' if self.cpu_offload else ''}."
        )
        return units


def _refuse_manual_sharding(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    done = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    if done:
        raise RuntimeError(
            f"FSDP2Strategy shards the model itself, but {type(model).__name__} already applied fully_shard to "
            f"{done[:3]} (in configure_model?). Remove those calls, or use Lightning's ModelParallelStrategy for "
            "sharding written by hand."
        )


__all__ = ["FSDP2Strategy"]
