"""A streaming merge of a sharded model holds far less than two shards: measured as the process's peak RSS.

The merge runs in a subprocess that imports everything, resets its peak resident set (``/proc/self/clear_refs``,
value 5: VmHWM := VmRSS), merges, and reports ``VmHWM - VmRSS`` before the merge: every byte the merge made
resident (tensors, allocator growth, page-cache pages mapped into the process), not only tensor bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from zenft_testing import child_env

from lightning_zenft.merging.streaming import INDEX_FILE

SHARDS, PER_SHARD, SIDE, RANK = 3, 8, 1024, 8  # 3 shards x 8 tensors x 4 MiB = 32 MiB a shard

_MEASURE = """
import json, sys
from pathlib import Path
from lightning_zenft.merging import merge_pretrained

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

base, adapter, out, small_base, small_adapter = map(Path, sys.argv[1:6])
merge_pretrained(small_base, out.with_name("warm-up"), adapters=[small_adapter])  # imports, first-call buffers
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
merge_pretrained(base, out, adapters=[adapter])
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def _write_model(base: Path, adapter: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, side: int = SIDE) -> None:
    base.mkdir(), adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{s * per_shard + i}.proj.weight": torch.randn(side, side, generator=g)
                   for i in range(per_shard)}  # fmt: skip
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (base / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    factors = {}
    for layer in range(shards * per_shard):
        factors[f"base_model.model.layers.{layer}.proj.lora_A.weight"] = torch.randn(RANK, side, generator=g)
        factors[f"base_model.model.layers.{layer}.proj.lora_B.weight"] = torch.randn(side, RANK, generator=g)
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["proj"],
              "base_model_name_or_path": str(base)}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_streaming_merge_peak_memory_stays_under_two_shards(tmp_path):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    _write_model(base, adapter)
    _write_model(tmp_path / "small-base", tmp_path / "small-adapter", shards=1, per_shard=2)  # the warm-up
    env = child_env(PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    paths = [base, adapter, out, tmp_path / "small-base", tmp_path / "small-adapter"]
    result = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, paths)],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    shard = PER_SHARD * SIDE * SIDE * 4
    grown = measured["peak"] - measured["before"]
    print(f"streaming merge: peak RSS growth {grown / 2**20:.1f} MiB = {grown / shard:.2f} shards of {shard >> 20} MiB")
    assert grown < 2 * shard
    # and the merge is right: W + (alpha / r) B A on a tensor of the last shard
    from safetensors import safe_open

    key = f"layers.{SHARDS * PER_SHARD - 1}.proj.weight"
    with safe_open(str(base / f"model-{SHARDS:05d}-of-{SHARDS:05d}.safetensors"), "pt") as f:
        weight = f.get_tensor(key)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        a = f.get_tensor(f"base_model.model.{key[:-7]}.lora_A.weight")
        b = f.get_tensor(f"base_model.model.{key[:-7]}.lora_B.weight")
    with safe_open(str(out / f"model-{SHARDS:05d}-of-{SHARDS:05d}.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor(key), weight + (16 / RANK) * (b @ a))
