"""Tensor-by-tensor safetensors IO, shard plans and indexes like transformers', and atomic output directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_zenft.merging.streaming import (
    INDEX_FILE,
    PretrainedWeights,
    atomic_directory,
    copy_non_weight_files,
    parse_size,
    plan_shards,
    write_sharded,
)
from lightning_zenft.safetensors_io import SafetensorsReader, TensorEntry, write_safetensors

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).bfloat16(),
    "c": torch.tensor([True, False, True]),
    "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e": torch.zeros(0),
    "f": torch.randn(4, 4).half(),
    "g": torch.tensor(2.5),
}


def _entries(tensors):
    return [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_written_files_load_with_safetensors_and_read_back(tmp_path):
    path = tmp_path / "x.safetensors"
    seen = []
    nbytes = write_safetensors(path, _entries(TENSORS), TENSORS.__getitem__, on_tensor=lambda e: seen.append(e.name))
    assert seen == list(TENSORS) and nbytes == sum(v.numel() * v.element_size() for v in TENSORS.values())
    loaded = load_file(str(path))
    reader = SafetensorsReader(path)
    assert reader.metadata == {"format": "pt"}
    for name, value in TENSORS.items():
        assert torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype
        assert torch.equal(reader.read(name), value) and reader.read(name).dtype == value.dtype
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # the header is padded as safetensors pads it


def test_reader_reads_files_written_by_safetensors(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt", "note": "x"})
    reader = SafetensorsReader(path)
    assert reader.metadata == {"format": "pt", "note": "x"} and set(reader.keys()) == set(TENSORS)
    for name, value in TENSORS.items():
        assert torch.equal(reader.read(name), value)


def test_writer_refuses_a_tensor_that_is_not_the_planned_one(tmp_path):
    entries = [TensorEntry("a", torch.float32, (3, 5))]
    with pytest.raises(ValueError, match=r"tensor a was planned as torch.float32 \(3, 5\) but produced as"):
        write_safetensors(tmp_path / "z.safetensors", entries, lambda name: torch.zeros(5, 3))


def test_reader_refuses_files_that_are_not_safetensors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsReader(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="shorter than"):
        SafetensorsReader(tmp_path / "short")


def test_shard_plans_and_index_match_what_transformers_loads(tmp_path):
    entries = _entries({f"w{i}": torch.zeros(10) for i in range(5)})  # 40 bytes each
    plan = plan_shards(entries, max_shard_size=100)
    assert [len(v) for v in plan.values()] == [2, 2, 1]
    assert list(plan) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert list(plan_shards(entries, max_shard_size="1KB")) == ["model.safetensors"]
    assert [len(v) for v in plan_shards(entries, max_shard_size=10).values()] == [1] * 5  # too big: one each
    kept = plan_shards(entries, base_layout={"s1": ["w3", "w0"], "s2": ["w4", "w1", "w2"]})
    assert [[e.name for e in v] for v in kept.values()] == [["w3", "w0"], ["w4", "w1", "w2"]]
    assert list(kept) == ["s1", "s2"]  # the base's own file names

    values = {e.name: torch.full((10,), float(i)) for i, e in enumerate(entries)}
    total = write_sharded(tmp_path, plan, values.__getitem__)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == total == 200
    assert index["weight_map"] == {e.name: f for f, es in plan.items() for e in es}
    weights = PretrainedWeights(tmp_path)
    assert weights.keys() == [e.name for e in entries]
    assert all(torch.equal(weights.read(k), v) for k, v in values.items())


@pytest.mark.parametrize(("text", "value"), [(123, 123), ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("2kb", 2000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "0", "-3MB", True])
def test_parse_size_refuses_non_sizes(text):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(text)


def test_pretrained_weights_explain_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        PretrainedWeights(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.*re-save it with save_pretrained"):
        PretrainedWeights(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="names the shard model-00001-of-00002.safetensors, which is missing"):
        PretrainedWeights(tmp_path)


def test_copy_non_weight_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    for name in ["config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin", INDEX_FILE, "README.md"]:
        (src / name).write_text(name)
    (src / "sub").mkdir()
    assert copy_non_weight_files(src, dst, skip=("config.json",)) == ["README.md", "tokenizer.json"]


def test_atomic_directory_renames_on_success_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        with atomic_directory(out):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "b").write_text("2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a").exists()  # old output intact
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
