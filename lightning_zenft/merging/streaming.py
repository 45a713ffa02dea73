"""Shard-by-shard IO of ``save_pretrained`` directories, and output written atomically.

* :class:`PretrainedWeights` reads a model directory as ``transformers`` writes it: ``model.safetensors``, or
  ``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor. Tensors are read one at a
  time (:class:`~lightning_zenft.safetensors_io.SafetensorsReader`), so memory holds one tensor, not a shard.
* :func:`plan_shards` lays out output tensors in shards (the base's own layout, or a size limit), and
  :func:`write_sharded` writes them with an index as ``transformers`` does (``model-00001-of-00003.safetensors`` +
  ``model.safetensors.index.json``; a single ``model.safetensors`` without index when one shard holds everything).
* :func:`atomic_directory` gives a temporary directory next to the destination and renames it into place only when
  the block completes, so an interrupted merge never leaves a half-written output (a killed process leaves at most a
  ``.<name>.partial-*`` directory beside it, never the output itself).

Example::

    base = PretrainedWeights("llama-dir")
    with atomic_directory("merged", overwrite=False) as tmp:
        write_sharded(tmp, plan_shards(entries, base_layout=base.layout()), produce=lambda name: base.read(name))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_zenft.safetensors_io import SafetensorsReader, TensorEntry, write_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that hold weights in some format: never copied next to merged weights (they would describe the old model).
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|.*\.(safetensors|bin)\.index\.json$")
PrepareShard = Callable[[list[TensorEntry]], tuple[list[TensorEntry], Callable[[str], torch.Tensor]]]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10^9 bytes) or ``"500MiB"`` (2^20 bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"max_shard_size={size!r} is not a size; use bytes (an int) or e.g. '5GB', '500MiB'.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} must be at least one byte.")
    return value


class PretrainedWeights:
    """The safetensors weights of a ``save_pretrained`` directory, read tensor by tensor.

    Raises:
        FileNotFoundError: when the directory holds no safetensors weights (``.bin`` weights are named: re-save them
            with ``save_pretrained``, which writes safetensors).
        ValueError: when the index names a shard that is missing, or two shards hold the same tensor.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} is not a directory; give a model saved with save_pretrained.")
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            shards = [SINGLE_FILE]
            weight_map = {}
        else:
            found = sorted(p.name for p in self.directory.iterdir() if _WEIGHT_FILE.fullmatch(p.name))
            raise FileNotFoundError(
                f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (weight files found: {found or 'none'}). "
                "Load the model with transformers and re-save it with save_pretrained (safetensors), then merge."
            )
        for shard in shards:
            if not (self.directory / shard).is_file():
                raise ValueError(f"{index} names the shard {shard}, which is missing from {self.directory}.")
        self.readers = {shard: SafetensorsReader(self.directory / shard) for shard in shards}
        self.shard_of: dict[str, str] = {}
        for shard, reader in self.readers.items():
            for name in reader.keys():
                if name in self.shard_of:
                    raise ValueError(f"{self.directory}: tensor {name} is in both {self.shard_of[name]} and {shard}.")
                self.shard_of[name] = shard
        missing = sorted(set(weight_map) - set(self.shard_of))
        if missing:
            raise ValueError(f"{index} lists tensors no shard holds, e.g. {missing[:5]}; the directory is incomplete.")

    def keys(self) -> list[str]:
        """Every tensor name, shard by shard, in file order."""
        return [name for reader in self.readers.values() for name in reader.keys()]

    def entry(self, name: str) -> TensorEntry:
        return self.readers[self.shard_of[name]].entries[name]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.shard_of:
            raise KeyError(f"{self.directory} holds no tensor {name!r}.")
        return self.readers[self.shard_of[name]].read(name)

    def layout(self) -> dict[str, list[str]]:
        """Shard file name -> its tensor names, in order (the layout :func:`plan_shards` can keep)."""
        return {shard: reader.keys() for shard, reader in self.readers.items()}

    def config(self) -> dict:
        """The directory's ``config.json`` (empty when there is none)."""
        path = self.directory / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def plan_shards(
    entries: Sequence[TensorEntry],
    max_shard_size: int | str | None = None,
    base_layout: dict[str, list[str]] | None = None,
) -> dict[str, list[TensorEntry]]:
    """Output file name -> its entries.

    With ``max_shard_size``, entries fill shards in order, a new shard starting when the next tensor would pass the
    limit (a tensor larger than the limit gets a shard of its own). Without it, ``base_layout`` (from
    :meth:`PretrainedWeights.layout`) is kept: each tensor goes where the base had it, in a file of the same name.
    Otherwise one shard is named ``model.safetensors`` and several ``model-0000i-of-0000n.safetensors``.
    """
    if max_shard_size is not None or base_layout is None:
        limit = parse_size(max_shard_size if max_shard_size is not None else "5GB")
        groups: list[list[TensorEntry]] = [[]]
        size = 0
        for entry in entries:
            if groups[-1] and size + entry.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += entry.nbytes
    else:
        by_name = {entry.name: entry for entry in entries}
        kept = {shard: [by_name.pop(n) for n in names if n in by_name] for shard, names in base_layout.items()}
        if by_name:
            raise ValueError(f"tensors {sorted(by_name)[:5]} have no shard in the base layout.")
        return {shard: group for shard, group in kept.items() if group}
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    total = len(groups)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": group for i, group in enumerate(groups)}


def write_sharded(
    directory: Path,
    plan: dict[str, list[TensorEntry]],
    produce: Callable[[str], torch.Tensor],
    on_tensor: Callable[[TensorEntry], None] | None = None,
    prepare_shard: PrepareShard | None = None,
) -> int:
    """Write every shard of ``plan`` into ``directory`` (plus the index when there are several); returns total bytes.

    ``produce(name)`` is called once per tensor while its shard is written. ``prepare_shard(entries)``, when given,
    runs before each shard and returns its final entries and producer, for tensors whose exact size is known only
    once computed (they are then computed a shard at a time).
    """
    total = 0
    weight_map: dict[str, str] = {}
    for filename, planned in plan.items():
        entries, shard_produce = prepare_shard(planned) if prepare_shard is not None else (planned, produce)
        total += write_safetensors(directory / filename, entries, shard_produce, on_tensor=on_tensor)
        weight_map.update({entry.name: filename for entry in entries})
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def copy_non_weight_files(source: Path, destination: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy the top-level files of ``source`` that are not weights (config, tokenizer, generation config, README...).

    ``skip`` names files the caller writes itself (e.g. ``config.json`` when the dtype changes). Returns the names
    copied.
    """
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not _WEIGHT_FILE.fullmatch(path.name) and path.name not in skip:
            shutil.copy2(path, destination / path.name)
            copied.append(path.name)
    return copied


def check_destination(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that exists (without ``overwrite``), is a file, or is or contains one of the inputs."""
    out = Path(out)
    resolved = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise ValueError(f"the output {out} is, or overlaps, the input {source}; write the merge somewhere else.")
    if out.is_file():
        raise FileExistsError(f"{out} is a file; give a directory path for the merged output.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (zenft merge --overwrite) to replace it.")


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``, on any error it is removed.

    ``out`` is replaced only after the new one is complete (the old one is renamed aside, then deleted), so a crash at
    any point leaves either the old output or the new one, never a mix.

    Example::

        with atomic_directory("merged") as tmp:
            (tmp / "config.json").write_text("{}")
    """
    out = Path(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            check_destination(out, overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)  # put the previous output back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "B") -> Any:
    """A tqdm bar over ``total`` (bytes by default), or an object that ignores updates when not ``enabled``."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, dynamic_ncols=True)
