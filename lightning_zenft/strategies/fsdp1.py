"""``FSDP1Strategy``: Lightning's ``FSDPStrategy`` (FSDP1, ``FullyShardedDataParallel``) with units for frozen bases.

FSDP1 flattens each unit's parameters into one ``FlatParameter`` that is trained or frozen as a whole. Wrapping only
the transformer blocks puts LoRA's small trained matrices in the same flat parameter as the frozen base weights: FSDP1
then refuses ("FlatParameter requires uniform requires_grad"), or, with ``use_orig_params=True``, allocates a gradient
for the whole flat parameter, frozen weights included. :func:`plan_units` avoids both: inside every block (and at the
root) that holds frozen and trained parameters, each module whose own parameters all train (``lora_A``, ``lora_B``, a
trained head) becomes a unit of its own, so every unit is uniform and frozen units get no gradient. Units that still
mix (a module with a frozen weight and a trained bias, DoRA's magnitude vector beside its frozen base) are named in an
info line: their frozen parameters keep gradient memory under FSDP1 (not under :class:`FSDP2Strategy`).

Everything else follows :class:`~lightning_zenft.strategies.FSDP2Strategy`'s options. FSDP1 needs a CUDA device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_zenft.strategies import checkpoints
from lightning_zenft.strategies.blocks import (
    BlockClasses,
    checkpoint_blocks,
    refuse_4bit,
    resolve_block_classes,
    trained_leaf,
)
from lightning_zenft.strategies.options import MixedPrecisionName, StateDictName, check_options


@dataclass
class UnitPlan:
    """Which modules become FSDP1 units, and which units mix frozen and trained parameters.

    Example::

        plan = plan_units(pl_module, {LlamaDecoderLayer})
        plan.mixed          # [] for LoRA on linear layers
    """

    wrap: set[int] = field(default_factory=set)
    """``id`` of every module wrapped as its own unit (blocks and trained leaves; the root is wrapped by Lightning)."""
    names: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    """Units (``""`` for the root) whose flat parameter holds frozen and trained parameters."""
    frozen_units: set[str] = field(default_factory=set)
    """Units whose parameters are all frozen (safe to store in another dtype)."""
    unit_of: dict[int, str] = field(default_factory=dict)
    """``id`` of each parameter -> the name of its unit."""


def plan_units(pl_module: nn.Module, classes: set[type[nn.Module]]) -> UnitPlan:
    """The FSDP1 units of ``pl_module`` for blocks of ``classes`` (see the module docstring)."""
    block_types = tuple(classes)
    plan = UnitPlan()
    blocks = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, block_types)]
    scopes: list[tuple[str, nn.Module]] = [*blocks, ("", pl_module)]
    for scope_name, scope in scopes:
        if scope_name:
            plan.wrap.add(id(scope))
            plan.names.append(scope_name)
        flags = {p.requires_grad for p in _own_scope_params(scope, block_types)}
        if flags == {True, False}:
            for name, module in scope.named_modules():
                full = f"{scope_name}.{name}" if scope_name and name else scope_name or name
                if module is not scope and trained_leaf(module) and _nearest_block(pl_module, full, blocks) == scope:
                    plan.wrap.add(id(module))
                    plan.names.append(full)
    _assign(pl_module, "", plan)
    params: dict[str, list[bool]] = {}
    for p in pl_module.parameters():
        params.setdefault(plan.unit_of[id(p)], []).append(p.requires_grad)
    plan.mixed = sorted(u for u, flags in params.items() if len(set(flags)) > 1)
    plan.frozen_units = {u for u, flags in params.items() if not any(flags)}
    return plan


def _own_scope_params(scope: nn.Module, block_types: tuple[type[nn.Module], ...]) -> list[nn.Parameter]:
    """Parameters of ``scope`` outside the blocks nested in it."""
    found: list[nn.Parameter] = list(scope.parameters(recurse=False))
    for child in scope.children():
        if not isinstance(child, block_types):
            found.extend(_own_scope_params(child, block_types))
    return found


def _nearest_block(pl_module: nn.Module, name: str, blocks: list[tuple[str, nn.Module]]) -> nn.Module:
    best: tuple[str, nn.Module] = ("", pl_module)
    for block_name, block in blocks:
        if name.startswith(block_name + ".") and len(block_name) > len(best[0]):
            best = (block_name, block)
    return best[1]


def _assign(module: nn.Module, unit: str, plan: UnitPlan, prefix: str = "") -> None:
    """Record the unit of every parameter: the nearest wrapped ancestor (or the root)."""
    for p in module.parameters(recurse=False):
        plan.unit_of.setdefault(id(p), unit)
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        _assign(child, full if id(child) in plan.wrap else unit, plan, full + ".")


class FSDP1Strategy(checkpoints.TrainedOnlyCheckpointHooks, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) configured as :class:`FSDP2Strategy` is, with uniform units (see the module
    docstring). Needs CUDA.

    Args:
        block_classes: the sharding units: ``"auto"`` (the model's ``_no_split_modules``) or class names.
        mixed_precision: ``"bf16"`` (parameters gathered and computed in bf16, gradients reduced in fp32) or ``None``
            (the Trainer's ``precision=`` decides, as with Lightning's ``FSDPStrategy``).
        activation_checkpointing: recompute each block's activations in backward (Hugging Face layers through their
            own checkpointing, other blocks through Lightning's checkpoint wrapper).
        cpu_offload: keep parameter shards on the CPU.
        state_dict: ``"sharded"`` (a checkpoint directory of shards) or ``"full"`` (one file from rank 0).
        cast_frozen: with mixed precision, store the parameters of all-frozen units in bf16.
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"HYBRID_SHARD"`` or ``"NO_SHARD"`` (FSDP1's).
        process_group_backend: by default the one for the device.

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=8, strategy=FSDP1Strategy(), callbacks=[LoRA(r=16)])
    """

    def __init__(
        self,
        block_classes: BlockClasses = "auto",
        mixed_precision: MixedPrecisionName = "bf16",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        state_dict: StateDictName = "sharded",
        cast_frozen: bool = True,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        process_group_backend: str | None = None,
    ) -> None:
        check_options(
            "FSDP1Strategy",
            block_classes=block_classes,
            mixed_precision=mixed_precision,
            state_dict=state_dict,
            flags={"activation_checkpointing": activation_checkpointing, "cpu_offload": cpu_offload,
                   "cast_frozen": cast_frozen},
        )  # fmt: skip
        precision = None
        if mixed_precision == "bf16":
            from torch.distributed.fsdp import MixedPrecision

            precision = MixedPrecision(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16
            )
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        self.plan: UnitPlan | None = None
        super().__init__(
            process_group_backend=process_group_backend,
            cpu_offload=cpu_offload,
            mixed_precision=precision,
            auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=self._wraps),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict,
            use_orig_params=True,
        )
        self.block_classes = block_classes
        self.mixed_precision_name = mixed_precision
        self.activation_checkpointing = activation_checkpointing
        self.state_dict_kind: Literal["sharded", "full"] = state_dict
        self.cast_frozen = cast_frozen

    def _wraps(self, module: nn.Module) -> bool:
        """The wrap policy: the units of :attr:`plan`, made at setup from the model."""
        if self.plan is None:
            raise RuntimeError("FSDP1Strategy: the model was wrapped before its units were planned.")
        return id(module) in self.plan.wrap

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        pl_module = self.lightning_module
        assert pl_module is not None
        refuse_4bit(pl_module, "FSDP1Strategy")
        classes = resolve_block_classes(pl_module, self.block_classes)
        plan = plan_units(pl_module, classes)
        self.plan = plan
        if self.mixed_precision_name == "bf16" and self.cast_frozen:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if (
                        plan.unit_of[id(p)] in plan.frozen_units
                        and p.is_floating_point()
                        and type(p.data) is torch.Tensor
                    ):
                        p.data = p.data.to(torch.bfloat16)
        if self.activation_checkpointing:  # Hugging Face layers checkpoint themselves; others get Lightning's wrapper
            block_types = tuple(classes)
            blocks = [m for m in pl_module.modules() if isinstance(m, block_types)]
            checkpoint_blocks(pl_module, blocks, torch_fallback=False)
            rest = {id(b) for b in blocks if getattr(b, "gradient_checkpointing", False) is not True}
            if rest:
                self._activation_checkpointing_kwargs = {"check_fn": lambda m: id(m) in rest}
        if plan.mixed:
            rank_zero_info(
                f"FSDP1Strategy: units {plan.mixed[:3]} hold frozen and trained parameters in one flat parameter, so "
                "their frozen parameters keep gradient memory under FSDP1 (FSDP2Strategy has no such cost)."
            )
        rank_zero_info(f"FSDP1Strategy: {len(plan.names)} units besides the root ({len(classes)} block classes).")
        return super()._setup_model(model)


__all__ = ["FSDP1Strategy", "UnitPlan", "plan_units"]
