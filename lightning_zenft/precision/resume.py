"""What a checkpoint records about the 4-bit base, and the checks that refuse to resume onto a different one.

Adapter-only checkpoints hold the adapters, not the base they were trained on. ``NF4Precision`` stores its settings
and a checksum of every 4-bit weight (position-weighted sums of the packed codes and scales, computed once when the
model is converted) in the checkpoint, so that resuming

* onto a full-precision base (a 4-bit run's checkpoint, a Trainer without the plugin): :func:`check_resume_precision`,
  called by :class:`~lightning_zenft.CausalLMModule` (and from any LightningModule's ``on_load_checkpoint``);
* onto a 4-bit base from a full-precision run, or onto other 4-bit settings or another base (a different model, a LoftQ
  base computed differently): ``NF4Precision.on_load_checkpoint`` / ``load_state_dict``

is an error instead of a silently different model.

Example::

    def on_load_checkpoint(self, checkpoint):          # in a LightningModule
        check_resume_precision(self.trainer, checkpoint)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_zenft.precision.select import is_4bit_layer

STATE_KEY = "NF4Precision"  # the key Lightning stores the Trainer plugin's state under (its class name)
_CHUNK = 1 << 22
_MODULUS = 65521


def _weighted_sum(tensor: torch.Tensor) -> int:
    """``sum_j byte_j * (j mod 65521 + 1)`` over the tensor's bytes: changes with any byte, computed in chunks."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    total = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.int64)  # (chunk,)
        weights = torch.arange(start, start + part.numel(), device=part.device) % _MODULUS + 1  # (chunk,)
        total += int((part * weights).sum())
    return total


def layer_storage(layer: nn.Module) -> list[torch.Tensor]:
    """The tensors that define a 4-bit layer's weight: packed codes, scales, second-level scales."""
    weight = layer.weight
    if hasattr(weight, "packed"):  # Packed4bitTensor (full, before sharding)
        rep = weight.replicated
        return [weight.packed, weight.absmax] + ([rep.absmax2] if rep.absmax2 is not None else [])
    state = weight.quant_state
    tensors = [weight.data, state.absmax]
    if state.nested:
        tensors.append(state.state2.absmax)
    return tensors


def base_checksums(model: nn.Module) -> dict[str, int]:
    """``{layer name: checksum}`` for every 4-bit layer of ``model`` (see the module docstring)."""
    sums = {}
    for name, module in model.named_modules():
        if is_4bit_layer(module):
            sums[name] = sum(_weighted_sum(t) for t in layer_storage(module)) % (1 << 61)
    return sums


def compare_checksums(saved: dict[str, int], current: dict[str, int]) -> str | None:
    """A description of how two checksum maps differ, or None when they agree."""
    if set(saved) != set(current):
        missing = sorted(set(saved) - set(current))[:4]
        extra = sorted(set(current) - set(saved))[:4]
        return f"the 4-bit layers differ (in the checkpoint only: {missing}; in this model only: {extra})"
    differ = [name for name in saved if saved[name] != current[name]]
    if differ:
        return f"{len(differ)} of {len(saved)} 4-bit weights differ, e.g. {differ[:4]}"
    return None


def check_resume_precision(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Refuse to load a checkpoint of a 4-bit run into a Trainer without ``NF4Precision``.

    Raises:
        RuntimeError: naming the checkpoint's 4-bit settings and the plugin to add.
    """
    saved = checkpoint.get(STATE_KEY)
    if saved is None:
        return
    plugin = getattr(trainer, "precision_plugin", None)
    if type(plugin).__qualname__ == STATE_KEY:
        return  # the plugin compares the details itself
    settings = saved.get("quantization", {})
    raise RuntimeError(
        f"this checkpoint was trained on a 4-bit base ({settings}), but the Trainer runs "
        f"{type(plugin).__name__}: its adapters would be resumed onto full-precision weights they were not trained "
        f"with. Resume with plugins=[NF4Precision(mode={settings.get('mode', 'nf4')!r}, "
        f"blocksize={settings.get('blocksize', 64)})], or start a new run without ckpt_path."
    )
