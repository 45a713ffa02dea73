"""The 4-bit precision logic at the Fabric level; :class:`lightning_zenft.NF4Precision` is the thin Trainer plugin.

``convert_module`` quantizes the frozen base, once, after adapters are injected (see
:mod:`lightning_zenft.precision.select` for which layers): each target ``nn.Linear`` becomes a bitsandbytes
``Linear4bit`` holding a ``Params4bit`` weight, quantized on ``device`` (default: where the weight is). Layers that are
4-bit already (LoftQ's base, the low-memory loader's layers) are kept and checked against the plugin's settings. With
``fsdp2=True`` the 4-bit layers become :class:`~lightning_zenft.precision.ShardedLinear4bit`, which FSDP2 shards; apply
``fully_shard`` after the conversion. Nothing is patched globally: ``torch.nn.Linear`` stays what it is.

Example::

    fabric = L.Fabric(plugins=[FabricNF4Precision(mode="nf4-dq", compute_dtype=torch.bfloat16)])
    with fabric.init_module():
        model = CausalLMModule(model="path/to/llama").model       # loaded tensor by tensor, 4-bit
    inject_adapters(model, LoRAConfig(r=16))
    model = fabric.setup(model)
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.precision import Precision
from torch import nn
from typing_extensions import override

from lightning_zenft.precision._bnb import import_bitsandbytes
from lightning_zenft.precision.loader import load_pretrained_4bit, quantized_loading
from lightning_zenft.precision.loftq import pending_loftq
from lightning_zenft.precision.quantize import QuantSpec, quantize_weight, spec_of, to_linear4bit
from lightning_zenft.precision.resume import base_checksums, compare_checksums
from lightning_zenft.precision.select import ModuleSpec, is_4bit_layer, plan_quantization
from lightning_zenft.precision.sharded_linear import make_shardable

log = logging.getLogger(__name__)

Mode = Literal["nf4", "nf4-dq", "fp4", "fp4-dq"]


class FabricNF4Precision(Precision):
    """QLoRA's 4-bit frozen base for Fabric: quantizes frozen linear weights only, adapters stay as they are.

    Args:
        mode: ``"nf4"`` (default), ``"nf4-dq"``, ``"fp4"`` or ``"fp4-dq"`` (``-dq``: double quantization).
        double_quant: the same as the ``-dq`` suffix (``NF4Precision(double_quant=True)`` means ``"nf4-dq"``).
        compute_dtype: the dtype 4-bit layers dequantize into and compute in: ``torch.bfloat16`` (default),
            ``torch.float16``, ``torch.float32``, or their names.
        blocksize: weights per scale (64; 64 to 4096, powers of two).
        modules: which linear layers to quantize (names/suffixes, or a regex); default every frozen one but the head.
        skip_modules: linear layers to keep in full precision (same syntax).
        fsdp2: make the 4-bit layers shardable by FSDP2's ``fully_shard`` (the Trainer plugin sets this itself under
            ``ModelParallelStrategy``).
        device: where to quantize (default: the device each weight is on).

    Example::

        model = FabricNF4Precision(skip_modules=["down_proj"]).convert_module(model)
    """

    def __init__(
        self,
        mode: Mode = "nf4",
        double_quant: bool | None = None,
        compute_dtype: str | torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        modules: ModuleSpec | None = None,
        skip_modules: ModuleSpec | None = None,
        fsdp2: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        import_bitsandbytes()  # fail at construction, with the install command, rather than at setup
        self.spec = QuantSpec.from_mode(mode, double_quant, blocksize, compute_dtype)
        self.modules = modules
        self.skip_modules = skip_modules
        self.fsdp2 = fsdp2
        self.device = None if device is None else torch.device(device)
        self.quantized: list[str] = []
        self.checksums: dict[str, int] = {}

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.spec.compute_dtype

    # ------------------------------------------------------------------ conversion
    def quantize(self, module: nn.Module, device: torch.device | None = None) -> list[str]:
        """Quantize ``module``'s frozen base in place (idempotent); returns the names of its 4-bit layers."""
        pending = pending_loftq(module)
        if pending:
            raise RuntimeError(
                f"{len(pending)} LoRA layers ask for init='loftq' but LoftQ has not run on them (e.g. {pending[:3]}). "
                "The LoRA callback runs it at setup; with inject_adapters, call "
                "lightning_zenft.precision.apply_loftq(model, plugin, iters) before training."
            )
        plan = plan_quantization(module, self.modules, self.skip_modules)
        for name in plan.quantized:
            self._adopt(module, name)
        device = device or self.device
        for name in plan.targets:
            linear = module.get_submodule(name)
            weight = linear.weight if device is None else linear.weight.to(device)
            layer = to_linear4bit(linear, self.spec, weight=quantize_weight(weight, self.spec))
            if device is not None and layer.bias is not None:
                layer.bias.data = layer.bias.data.to(device)
            _replace(module, name, layer)
            del weight, linear
        layers = [name for name, m in module.named_modules() if is_4bit_layer(m)]
        if not layers:
            raise ValueError(
                f"NF4Precision found no frozen linear layer to quantize in {type(module).__name__} (linear layers "
                f"left alone: {dict(list(plan.kept.items())[:6])}). Add an adapter callback (LoRA, DoRA) so the base "
                "is frozen, or remove the plugin for full fine-tuning."
            )
        if plan.targets:
            kept = {}
            for reason in plan.kept.values():
                kept[reason] = kept.get(reason, 0) + 1
            log.info(f"NF4Precision ({self.mode}): {len(plan.targets)} linear layers quantized; kept: {kept or 'none'}")
        return layers

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        self.quantized = self.quantize(module)
        if self.fsdp2:
            make_shardable(module)
        self.checksums = base_checksums(module)
        return module

    def _adopt(self, module: nn.Module, name: str) -> None:
        """Keep a layer that is 4-bit already if it has the plugin's settings (as a FrozenLinear4bit)."""
        layer = module.get_submodule(name)
        if type(layer).__name__ == "ShardedLinear4bit":
            return
        have, want = spec_of(layer), self.spec
        if (have.quant_type, have.double_quant, have.blocksize) != (want.quant_type, want.double_quant, want.blocksize):
            raise ValueError(
                f"layer {name!r} is 4-bit already as {have.mode} with blocksize {have.blocksize}, but the plugin "
                f"quantizes as {want.mode} with blocksize {want.blocksize}. Load or quantize the model with the "
                "plugin's own settings (or give the plugin the model's)."
            )
        layer.weight.quant_state.dtype = want.compute_dtype
        if type(layer).__name__ != "FrozenLinear4bit":  # e.g. loaded by transformers' BitsAndBytesConfig
            shell = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            shell.bias = layer.bias
            shell.train(layer.training)
            _replace(module, name, to_linear4bit(shell, want, weight=layer.weight))
        else:
            layer.compute_dtype = want.compute_dtype

    # ------------------------------------------------------------------ low-memory loading
    @override
    def module_init_context(self) -> AbstractContextManager:
        """Inside, ``CausalLMModule(model=dir)`` loads through :meth:`load_pretrained` (tensor by tensor)."""
        return quantized_loading(self)

    def load_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        """:func:`~lightning_zenft.precision.load_pretrained_4bit` with this plugin's settings."""
        return load_pretrained_4bit(directory, self.spec, self.modules, self.skip_modules, self.device, dtype)

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"quantization": self.spec.to_dict(), "checksums": dict(self.checksums)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("quantization", {})
        if saved and saved != self.spec.to_dict():
            raise RuntimeError(
                f"the checkpoint's 4-bit base was quantized as {saved}, this run as {self.spec.to_dict()}; the "
                "adapters were trained on other base weights. Resume with the checkpoint's NF4Precision settings."
            )
        difference = compare_checksums(state_dict.get("checksums", {}), self.checksums) if self.checksums else None
        if difference:
            raise RuntimeError(
                f"the 4-bit base differs from the one the checkpoint was trained on: {difference}. Was the base "
                "model, skip_modules/modules, or (for a LoftQ start) the LoRA rank or loftq_iters changed? Resume "
                "with the same base and settings."
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
