"""One safetensors file, read and written one tensor at a time.

The format (``safetensors``' own specification): an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data section that
follows, contiguous, no gaps) plus an optional ``"__metadata__"`` dict of strings, padded with spaces to a multiple
of 8 bytes; then the raw little-endian tensor bytes.

``safetensors.torch.load_file``/``save_file`` hold a whole file in memory (``save_file`` even twice: the tensors and
their serialized bytes). Merging a model larger than memory needs less: :class:`SafetensorsReader` reads one tensor
with a ``seek`` and a ``readinto`` (no memory map, so no page of the file stays counted against the process), and
:func:`write_safetensors` writes the header first, then each tensor as soon as it is produced, straight from the
tensor's memory. Files written here load with ``safetensors`` and ``transformers`` as any other.

Example::

    reader = SafetensorsReader("model.safetensors")
    w = reader.read("model.layers.0.mlp.up_proj.weight")
    write_safetensors("out.safetensors", [TensorEntry("w", w.dtype, tuple(w.shape))], lambda name: w)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers too


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's name, dtype and shape: what a header needs before the data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """The header of one ``.safetensors`` file, and its tensors read one at a time.

    Raises:
        ValueError: when the file is not a safetensors file (the message names it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than its 8-byte header length).")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                raise ValueError(f"{self.path} is not a safetensors file (header length {length}).")
            try:
                header = json.loads(f.read(length))
            except ValueError as err:
                raise ValueError(f"{self.path} is not a safetensors file (its header is not JSON: {err}).") from None
        self.data_start = 8 + length
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which cannot be read here.")
            entry = TensorEntry(name, _DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"]))
            begin, end = (int(o) for o in info["data_offsets"])
            if end - begin != entry.nbytes:
                raise ValueError(f"{self.path}: tensor {name} spans {end - begin} bytes, its dtype and shape need "
                                 f"{entry.nbytes}; the file is damaged.")  # fmt: skip
            self.entries[name] = entry
            self._offsets[name] = (begin, end)

    def keys(self) -> list[str]:
        """Tensor names in the order of their data in the file."""
        return sorted(self.entries, key=lambda name: self._offsets[name][0])

    def read_chunks(self, name: str, chunk: int) -> Iterator[torch.Tensor]:
        """The tensor ``name`` as flat pieces of at most ``chunk`` values, read through one reused buffer (a piece is
        valid until the next one is read)."""
        entry = self.entries[name]
        begin, end = self._offsets[name]
        size = torch.empty((), dtype=entry.dtype).element_size()
        buffer = bytearray(max(1, min(end - begin, chunk * size)))
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            for offset in range(begin, end, len(buffer)):
                view = memoryview(buffer)[: min(len(buffer), end - offset)]
                if f.readinto(view) != len(view):
                    raise ValueError(f"{self.path}: tensor {name} is truncated at byte {offset}; the file is damaged.")
                yield torch.frombuffer(view, dtype=torch.uint8).view(entry.dtype)  # (<= chunk,)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from disk into a new CPU tensor."""
        entry = self.entries[name]
        begin, end = self._offsets[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)  # (nbytes,)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(buffer.numpy())) if end > begin else 0
        if got != end - begin:
            raise ValueError(f"{self.path}: tensor {name} is truncated ({got} of {end - begin} bytes); file damaged.")
        return buffer.view(entry.dtype).reshape(entry.shape)


def write_safetensors(
    path: str | Path,
    entries: Sequence[TensorEntry],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> int:
    """Write a safetensors file whose tensors are ``entries``, calling ``produce(name)`` for each one in order.

    The header is written first, so only one produced tensor need exist at a time. Each produced tensor must have
    its entry's dtype and shape (an error names it otherwise); ``on_tensor(entry)`` runs after each is written.
    Returns the number of data bytes written.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for entry in entries:
        if entry.dtype not in _NAMES:
            raise ValueError(f"tensor {entry.name} has dtype {entry.dtype}, which safetensors files cannot hold.")
        header[entry.name] = {"dtype": _NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}  # fmt: skip
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for entry in entries:
            tensor = produce(entry.name)
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(
                    f"tensor {entry.name} was planned as {entry.dtype} {entry.shape} but produced as {tensor.dtype} "
                    f"{tuple(tensor.shape)}."
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
            if data.numel():
                f.write(memoryview(data.numpy()))
            del tensor, data
            if on_tensor is not None:
                on_tensor(entry)
    return offset
