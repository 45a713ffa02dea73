"""`zenft recommend` writes a config that `zenft fit` runs exactly as printed (the embedded model, a few steps)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from lightning_zenft.cli import main
from lightning_zenft.data import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE, read_records
from lightning_zenft.planning.recipe_memory import nf4_precision_available


def recommend_and_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> dict:
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_records(DEFAULT_TASK_FILE)[:40]), encoding="utf-8"
    )
    argv = ["recommend", "--model", str(DEFAULT_BASE_MODEL_DIR), "--task", "instruction-simple", "--samples", "2000",
            "--train-file", "train.jsonl", "--max-steps", "3", "--batch", "4", "--seq", "64", *extra]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "Train with: " in line]
    assert lines, printed  # the config runs as written: nothing to set first
    command = shlex.split(lines[0].split("Train with: ", 1)[1])
    assert command == ["zenft", "fit", "--config", "recommended.yaml"]
    assert main(command[1:]) == 0
    return yaml.safe_load((tmp_path / "recommended.yaml").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_the_recommended_lora_config_runs_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = recommend_and_fit(tmp_path, capsys, [])
    lora = next(cb["init_args"] for cb in config["trainer"]["callbacks"] if cb["class_path"] == "lightning_zenft.LoRA")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (lora["r"], lora["alpha"]) == (16, 32)
    assert adapter_config["lora_dropout"] == lora["dropout"] == 0.05
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())  # model.torch_dtype: bfloat16
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())  # B starts at zero: it trained


@pytest.mark.slow
@pytest.mark.skipif(not nf4_precision_available(), reason="this lightning_zenft exports no NF4Precision plugin")
def test_the_recommended_qlora_config_runs_as_printed(tmp_path, monkeypatch, capsys):
    """With the 4-bit plugin, a GPU memory between QLoRA's and LoRA's figure makes recommend pick QLoRA."""
    from lightning_zenft.planning.recommend import recommend

    monkeypatch.chdir(tmp_path)
    rec = recommend(str(DEFAULT_BASE_MODEL_DIR), "instruction-simple", 2000, batch=4, seq=64)
    between = (rec.memory_bytes["lora"] + rec.memory_bytes["qlora"]) / 2 / 0.9 / 1024**3
    config = recommend_and_fit(tmp_path, capsys, ["--gpu-mem", f"{between!r}"])
    assert config["trainer"]["plugins"] == [{"class_path": "lightning_zenft.NF4Precision"}]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
