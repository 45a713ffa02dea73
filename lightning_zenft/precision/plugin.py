"""``NF4Precision``: the Trainer plugin, a thin layer over :class:`~lightning_zenft.precision.FabricNF4Precision`.

What the Trainer adds to the Fabric-level logic:

* quantization happens on the strategy's device (a GPU run quantizes on the GPU, one layer at a time);
* under ``ModelParallelStrategy`` (FSDP2) the 4-bit layers are made shardable. Lightning calls ``configure_model``
  (where ``fully_shard`` is applied) *before* the precision plugin's ``convert_module``, and ``fully_shard`` over a
  bitsandbytes layer loses its quant state, so a module trained with FSDP2 quantizes first, in ``configure_model``::

      def configure_model(self):
          self.trainer.precision_plugin.convert_module(self)      # 4-bit, shardable
          for block in self.model.model.layers:
              fully_shard(block, mesh=self.device_mesh["data_parallel"])
          fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

  (``convert_module`` refuses a model sharded before it was quantized, with this recipe in the message);
* checkpoints record the 4-bit settings and a checksum of the 4-bit base; resuming a checkpoint of a full-precision
  run under the plugin, or with other settings, or onto another base, is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from typing_extensions import override

from lightning_zenft.precision.fabric import FabricNF4Precision, Mode
from lightning_zenft.precision.resume import base_checksums
from lightning_zenft.precision.select import ModuleSpec, plan_quantization
from lightning_zenft.precision.sharded_linear import make_shardable


def _sharded_by_fsdp2(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


class NF4Precision(Precision, FabricNF4Precision):
    """QLoRA: the frozen base in 4-bit NF4 (or FP4), adapters untouched. Same arguments as ``FabricNF4Precision``.

    Only frozen linear weights are quantized (adapter layers' base layers, and linear layers the adapter callback
    froze); adapter weights, the output head, embeddings and norms are not. Quantized layers are bitsandbytes
    ``Linear4bit`` modules holding ``Params4bit`` weights.

    Example::

        trainer = L.Trainer(
            plugins=[NF4Precision(double_quant=True, compute_dtype=torch.bfloat16)],
            callbacks=[LoRA(r=64, target_modules="all-linear", init="loftq")],
        )
    """

    def __init__(
        self,
        mode: Mode = "nf4",
        double_quant: bool | None = None,
        compute_dtype: str | torch.dtype = "bfloat16",
        blocksize: int = 64,
        modules: ModuleSpec | None = None,
        skip_modules: ModuleSpec | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        FabricNF4Precision.__init__(
            self, mode, double_quant, compute_dtype, blocksize, modules, skip_modules, fsdp2=False, device=device
        )

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        trainer = getattr(module, "_trainer", None)
        strategy = getattr(trainer, "strategy", None)
        if _sharded_by_fsdp2(module):
            leftover = plan_quantization(module, self.modules, self.skip_modules).targets
            if leftover:
                raise RuntimeError(
                    f"the model was sharded by FSDP2 before NF4Precision quantized it ({len(leftover)} frozen linear "
                    f"layers are still in full precision, e.g. {leftover[:3]}). Quantize first, in configure_model: "
                    "call `self.trainer.precision_plugin.convert_module(self)` before `fully_shard`."
                )
            return module  # quantized in configure_model, then sharded
        from lightning.pytorch.strategies import ModelParallelStrategy

        self.fsdp2 = isinstance(strategy, ModelParallelStrategy)
        device = self.device or getattr(strategy, "root_device", None)
        self.quantized = self.quantize(module, device)
        if self.fsdp2:
            make_shardable(module)
        self.checksums = base_checksums(module)
        return module

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        full_checkpoint = "optimizer_states" in checkpoint  # a weights-only checkpoint records no precision state
        if full_checkpoint and type(self).__qualname__ not in checkpoint:
            raise RuntimeError(
                "this checkpoint was written by a run without NF4Precision: its adapters were trained on a "
                "full-precision base, and resuming them onto a 4-bit base changes the model under them. Resume "
                "without the plugin (in the checkpoint's precision), or start a new 4-bit run without ckpt_path."
            )
