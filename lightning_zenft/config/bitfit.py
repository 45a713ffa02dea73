"""BitFit's config: :class:`BitFitConfig` (biases, norms, head, selected blocks)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lightning_zenft.config.base import (
    AdapterConfig,
)


@dataclass(kw_only=True)
class BitFitConfig(AdapterConfig):
    """BitFit (Ben Zaken et al. 2022): only the model's biases train, and, as options, its norms, the output head, or
    chosen blocks in full ("selected layers" fine-tuning: by depth with ``blocks``, by type with ``block_parts``).
    Nothing is injected: the method only chooses which of the model's own parameters train.

    Example::

        cfg = BitFitConfig()                                          # every bias
        cfg = BitFitConfig(blocks="last:2", block_parts="mlp")        # and the MLPs of the last two blocks
        cfg = BitFitConfig(bias="none", blocks=[0, -1], trainable_norms=True)  # selected layers, no biases
    """

    bias: Literal["none", "all", "lora_only"] = "all"
    """``"all"``: every bias of the model trains (BitFit); ``"none"``: only what the other options select."""
    train_head: bool = False
    """Also train the output head (a head tied to the input embedding trains the embedding too, with a warning)."""
    blocks: str | list[int] | None = None
    """Transformer blocks that also train in full: ``"all"``, ``"first:K"``, ``"last:K"`` or a list of block indices
    (negative ones count from the end); None: none."""
    block_parts: Literal["all", "attention", "mlp"] = "all"
    """What of each chosen block trains: all of it, its attention module, or its feed-forward module."""

    method: ClassVar[str] = "bitfit"

    def method_problems(self) -> list[str]:
        problems: list[str] = []
        if self.target_modules != "all-linear" or self.exclude_modules is not None:
            problems.append(
                f"target_modules={self.target_modules!r}, exclude_modules={self.exclude_modules!r}: BitFit adds no "
                "modules, so it has no targets; choose what trains with bias, trainable_norms, train_head, blocks, "
                "block_parts and modules_to_save"
            )
        if self.bias == "lora_only":
            problems.append("bias='lora_only' means the biases of adapter layers, and BitFit has none; use 'all'")
        if not isinstance(self.train_head, bool):
            problems.append(f"train_head={self.train_head!r} must be True or False")
        if isinstance(self.blocks, tuple):
            self.blocks = list(self.blocks)
        blocks = self.blocks
        if isinstance(blocks, str):
            if blocks != "all" and not re.fullmatch(r"(first|last):[1-9]\d*", blocks):
                problems.append(f"blocks={blocks!r} must be 'all', 'first:K', 'last:K' (K >= 1) or a list of indices")
        elif isinstance(blocks, list):
            if not blocks or not all(isinstance(i, int) and not isinstance(i, bool) for i in blocks):
                problems.append(f"blocks={blocks!r} must be a non-empty list of block indices (integers)")
            elif len(set(blocks)) != len(blocks):
                problems.append(f"blocks={blocks!r} lists a block twice")
        elif blocks is not None:
            problems.append(f"blocks={blocks!r} must be 'all', 'first:K', 'last:K', a list of indices or None")
        if self.block_parts not in ("all", "attention", "mlp"):
            problems.append(f"block_parts={self.block_parts!r} must be 'all', 'attention' or 'mlp'")
        elif self.block_parts != "all" and blocks is None:
            problems.append(f"block_parts={self.block_parts!r} needs blocks= (which blocks' {self.block_parts} trains)")
        others = self.train_head or blocks is not None or self.trainable_norms or self.modules_to_save
        if self.bias == "none" and not others:
            problems.append(
                "bias='none' with no other option trains nothing; keep bias='all' or add trainable_norms, train_head, "
                "blocks or modules_to_save"
            )
        return problems

    def layer_kwargs(self, name: str, *, initialize: bool = True) -> dict[str, Any]:
        return {}  # BitFit builds no modules

    def block_indices(self, n_blocks: int) -> list[int]:
        """The indices (``0 <= i < n_blocks``, in order) of the blocks ``blocks`` selects in a model of ``n_blocks``."""
        blocks = self.blocks
        if blocks is None:
            return []
        if blocks == "all":
            return list(range(n_blocks))
        if isinstance(blocks, str):
            where, k = blocks.split(":")
            if int(k) > n_blocks:
                raise ValueError(f"BitFit(blocks={blocks!r}): the model has only {n_blocks} blocks.")
            return list(range(int(k))) if where == "first" else list(range(n_blocks - int(k), n_blocks))
        bad = [i for i in blocks if not -n_blocks <= i < n_blocks]
        if bad:
            raise ValueError(
                f"BitFit(blocks={blocks!r}): {bad} out of range; the model has {n_blocks} blocks (indices "
                f"0..{n_blocks - 1}, or -{n_blocks}..-1 from the end)."
            )
        return sorted({i % n_blocks for i in blocks})

    def trainable_names(self, model: Any) -> list[str]:
        # targets.py finds blocks and heads; it imports this module, so it is imported here, when a model is adapted.
        from lightning_zenft.targets import module_candidates, output_head_names

        canonical = {id(p): n for n, p in model.named_parameters()}  # a tied parameter under its first name
        chosen: dict[str, None] = {}
        kind = type(model).__name__
        if self.train_head:
            heads = sorted(output_head_names(model))
            if not heads:
                raise ValueError(
                    f"BitFit(train_head=True): {kind} has no output head (get_output_embeddings() or a module named "
                    "lm_head); name the module in modules_to_save instead."
                )
            for head in heads:
                for pname, p in model.get_submodule(head).named_parameters():
                    if canonical[id(p)] != f"{head}.{pname}":
                        warnings.warn(
                            f"BitFit(train_head=True): {head}.{pname} is tied to {canonical[id(p)]}, which trains too.",
                            stacklevel=2,
                        )
                    chosen[canonical[id(p)]] = None
        if self.blocks is not None:
            names = module_candidates(model, "block")
            if not names:
                raise ValueError(
                    f"BitFit(blocks={self.blocks!r}): {kind} has no transformer blocks (modules holding an attention "
                    "module); name what should train in modules_to_save instead."
                )
            for index in self.block_indices(len(names)):
                block = model.get_submodule(names[index])
                parts = [""] if self.block_parts == "all" else module_candidates(block, self.block_parts)
                if not parts:
                    raise ValueError(
                        f"BitFit(block_parts={self.block_parts!r}): block {names[index]} has no {self.block_parts} "
                        "module; use block_parts='all'."
                    )
                for part in parts:
                    for p in block.get_submodule(part).parameters():
                        chosen[canonical[id(p)]] = None
        if self.bias == "all" and not any(n.rsplit(".", 1)[-1] == "bias" for n in canonical.values()):
            if not (chosen or self.trainable_norms or self.modules_to_save):
                raise ValueError(
                    f"BitFit: {kind} has no bias parameters (Llama-style models use bias-free layers), so BitFit would "
                    "train nothing. Train other parts instead: bias='none' with trainable_norms=True, train_head=True, "
                    "blocks='last:2' (selected layers) or modules_to_save; or use LoRA/IA3."
                )
            warnings.warn(
                f"BitFit: {kind} has no bias parameters; only the norms, head, blocks or modules asked for train. "
                "Pass bias='none' to say so.",
                stacklevel=2,
            )
        return list(chosen)
