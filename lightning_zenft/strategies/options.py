"""The options both sharding strategies share, and their checks (every problem collected, one error).

Example::

    check_options("FSDP2Strategy", block_classes="auto", mixed_precision="bf16", state_dict="sharded", flags={})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

MixedPrecisionName = Literal["bf16"] | None
"""``"bf16"``: parameters gathered and computed in bf16, gradients reduced in fp32; ``None``: no casting."""
StateDictName = Literal["sharded", "full"]
"""``"sharded"``: a checkpoint directory of per-rank shards; ``"full"``: one file of whole tensors from rank 0."""


def check_options(
    owner: str,
    *,
    block_classes: object,
    mixed_precision: object,
    state_dict: object,
    flags: Mapping[str, object],
) -> None:
    """Raise one ``ValueError`` listing every bad option of ``owner`` (the strategy's name), with the allowed values."""
    problems = []
    if block_classes != "auto" and (
        isinstance(block_classes, str)
        or not isinstance(block_classes, Sequence)
        or not block_classes
        or not all(isinstance(n, str) and n for n in block_classes)
    ):
        problems.append(f"block_classes={block_classes!r} (use 'auto' or a non-empty list of class names)")
    if mixed_precision not in ("bf16", None):
        problems.append(f"mixed_precision={mixed_precision!r} (use 'bf16' or None)")
    if state_dict not in get_args(StateDictName):
        problems.append(f"state_dict={state_dict!r} (use 'sharded' or 'full')")
    for name, value in flags.items():
        if not isinstance(value, bool):
            problems.append(f"{name}={value!r} (use True or False)")
    if problems:
        raise ValueError(f"{owner}: invalid options: " + "; ".join(problems) + ".")


__all__ = ["MixedPrecisionName", "StateDictName", "check_options"]
