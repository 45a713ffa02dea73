"""Fisher estimates in safetensors files: written atomically, read back with the names they were saved under.

Keys: ``diagonal/<parameter name>`` for dense tensors, ``factor_row/<layer name>`` and ``factor_col/<layer name>`` for
factored layers. The metadata holds the estimator and the token count. Sharded (``DTensor``) values are gathered to
full tensors by the caller before saving; a file always holds full tensors.

Example:
    >>> import tempfile, torch
    >>> from lightning_zenft.regularizers import Fisher
    >>> path = tempfile.mkdtemp() + "/fisher.safetensors"
    >>> save_fisher(Fisher({"w": torch.ones(2, 3)}, tokens=7), path)
    >>> load_fisher(path).tokens
    7
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from lightning_zenft.regularizers.fisher import Fisher, check_finite

_DIAG, _ROW, _COL = "diagonal/", "factor_row/", "factor_col/"


def save_fisher(fisher: Fisher, path: str | os.PathLike[str]) -> None:
    """Write ``fisher`` to a safetensors file at ``path`` (a temporary file in the same folder, then a rename)."""
    from safetensors.torch import save_file

    tensors = {_DIAG + k: v.detach().float().cpu().contiguous() for k, v in fisher.diagonal.items()}
    for name, (row, col) in fisher.factors.items():
        tensors[_ROW + name] = row.detach().float().cpu().contiguous()
        tensors[_COL + name] = col.detach().float().cpu().contiguous()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"estimator": fisher.estimator, "tokens": str(fisher.tokens)})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_fisher(path: str | os.PathLike[str]) -> Fisher:
    """Read a file written by :func:`save_fisher` (CPU tensors); errors name the file and what is wrong."""
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"Fisher file {str(source)!r} does not exist; write one with EWC.save_fisher(path).")
    fisher = Fisher(estimator="loaded")
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            value = f.get_tensor(key).float()
            if key.startswith(_DIAG):
                fisher.diagonal[key[len(_DIAG) :]] = value
            elif key.startswith(_ROW):
                rows[key[len(_ROW) :]] = value
            elif key.startswith(_COL):
                cols[key[len(_COL) :]] = value
            else:
                raise ValueError(
                    f"{source}: key {key!r} is not a Fisher entry (diagonal/, factor_row/, factor_col/); was this file "
                    "written by save_fisher?"
                )
    if set(rows) != set(cols):
        raise ValueError(f"{source}: factored layers {sorted(set(rows) ^ set(cols))} lack a row or a column factor.")
    fisher.factors = {k: (rows[k], cols[k]) for k in rows}
    fisher.estimator = meta.get("estimator", "loaded")
    try:
        fisher.tokens = int(meta.get("tokens", "0"))
    except ValueError:
        raise ValueError(f"{source}: metadata tokens={meta.get('tokens')!r} is not an integer.") from None
    check_finite(fisher)
    return fisher


__all__ = ["load_fisher", "save_fisher"]
