"""`zenft recommend` / `zenft estimate` front-ends against the Python API."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zenft.planning.commands import estimate_main, recommend_main
from lightning_zenft.planning.fit_config import run_blockers
from lightning_zenft.planning.memory import estimate_memory
from lightning_zenft.planning.recipe_memory import nf4_precision_available
from lightning_zenft.planning.recommend import TASKS, recommend


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def test_recommend_json_matches_api_and_writes_yaml(tmp_path, capsys):
    out = tmp_path / "run.yaml"
    argv = ["--model", "7B", "--task", "instruction-simple", "--samples", "20000", "--gpu-mem", "24"]
    assert recommend_main([*argv, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rec = recommend("7B", "instruction-simple", 20_000, 24.0)
    blockers = run_blockers(rec, "train.jsonl")
    assert printed == {**rec.to_dict(), "config_path": str(out), "fit_command": f"zenft fit --config {out}",
                       "blockers": blockers}  # fmt: skip
    for key in ("method", "rank", "learning_rate", "epochs", "data_verdict", "reasons"):
        assert key in printed
    assert printed["method"] == ("qlora" if nf4_precision_available() else "lora")
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(rec.to_yaml())
    assert len(blockers) == 2  # '7B' is no directory, and there is no train.jsonl here


def test_recommend_text_output_and_default_path(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", model_dir, "--task", "ner", "--samples", "20", "--divergent"]
    assert recommend_main(argv) == 0
    text = capsys.readouterr().out
    rec = recommend(model_dir, "ner", 20, divergent=True)
    assert rec.method == "full"
    assert "method:" in text and "full" in text and rec.reasons["method"] in text
    assert rec.data_verdict == "below minimum" and "below minimum" in text
    config = yaml.safe_load((tmp_path / "recommended.yaml").read_text())
    assert config["model"] == {"model": model_dir, "learning_rate": rec.learning_rate}
    assert all(cb["class_path"] != "lightning_zenft.LoRA" for cb in config["trainer"]["callbacks"])
    assert "Before `zenft fit --config recommended.yaml` runs:\n  - write the training data to 'train.jsonl'" in text


@pytest.mark.parametrize(
    "argv",
    [["--model", "70B", "--samples", "600000", "--gpu-mem", "80", "--gpus", "8", "--nodes", "2"],
     ["--model", "7B", "--samples", "20000", "--gpu-mem", "24", "--batch", "2", "--seq", "4096"],
     ["--model", "13B", "--samples", "3000", "--gpu-mem", "40", "--gpus", "4", "--checkpointing"],
     ["--model", "tiny", "--samples", "3000"]],
    ids=["70b-16-gpus", "7b-24gib", "13b-4-gpus-checkpointing", "directory"],
)  # fmt: skip
def test_recommend_figures_are_estimates_figures(model_dir, tmp_path, capsys, argv):
    """One memory model: each method's figure in the recommendation is what the printed `zenft estimate` prints."""
    argv = [model_dir if a == "tiny" else a for a in argv]
    assert recommend_main([*argv, "--task", "instruction-simple", "--out", str(tmp_path / "r.yaml"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["memory_bytes"][rec["method"]] > 0
    for method, command in rec["estimate_commands"].items():
        words = shlex.split(command)
        assert words[:2] == ["zenft", "estimate"]
        assert estimate_main([*words[2:], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total_bytes"] == rec["memory_bytes"][method], method


def test_recommend_bad_task_lists_valid_tasks(capsys):
    assert recommend_main(["--model", "7B", "--task", "poetry", "--samples", "10"]) == 2
    err = capsys.readouterr().err
    assert "poetry" in err and all(task in err for task in TASKS)


def test_bad_model_says_what_is_accepted(tmp_path, capsys):
    argv = ["--model", "not-a-model", "--task", "ner", "--samples", "10", "--out", str(tmp_path / "x.yaml")]
    assert recommend_main(argv) == 2
    assert "neither a directory with a config.json nor a size like '7B'" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()
    assert estimate_main(["--model", "not-a-model", "--method", "lora"]) == 2
    assert "neither a directory with a config.json nor a size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "kwargs"),
    [
        (["--method", "full", "--batch", "4", "--seq", "2048"], dict(method="full", batch=4, seq=2048)),
        (["--method", "qlora", "--rank", "8", "--gpus", "2", "--checkpointing", "--optimizer", "sgd"],
         dict(method="qlora", rank=8, gpus=2, checkpointing=True, optimizer="sgd")),
        (["--method", "lora", "--target-modules", "attention", "--lora-dropout", "0.1", "--precision", "fp32"],
         dict(method="lora", target_modules="attention", lora_dropout=0.1, precision="fp32")),
        (["--method", "lora", "--lora-dropout", "0.1", "--fused-kernels", "--mlp-recompute"],
         dict(method="lora", lora_dropout=0.1, fused_kernels=True, mlp_recompute=True)),
    ],
)  # fmt: skip
def test_estimate_json_matches_api(model_dir, capsys, argv, kwargs):
    for model in ("7B", model_dir):
        assert estimate_main(["--model", model, *argv, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        est = estimate_memory(model, **kwargs)
        assert printed == est.to_dict()
        parts = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "gathered_bytes")
        assert printed["total_bytes"] == sum(printed[key] for key in parts)


def test_estimate_text_and_unused_flag_note(capsys):
    assert estimate_main(["--model", "7B", "--method", "full", "--rank", "8"]) == 0
    captured = capsys.readouterr()
    assert "--rank not used by full fine-tuning" in captured.err
    est = estimate_memory("7B", "full")
    assert f"{est.total_bytes / 1024**3:9.2f} GiB" in captured.out
    # One unit, said: every figure in GiB, and what a GiB is.
    header, *rows = captured.out.strip().splitlines()
    assert header.endswith("GiB = 2^30 bytes") and all(row.endswith(" GiB") for row in rows)
    weights = float(rows[0].split()[-2])
    assert weights == round(2 * 7e9 / 2**30, 2)  # bf16 weights of 7e9 parameters, in GiB
    assert estimate_main(["--model", "7B", "--method", "dora"]) == 2
    assert "invalid choice: 'dora'" in capsys.readouterr().err
    assert estimate_main(["--model", "7B", "--method", "lora", "--mlp-recompute"]) == 2
    assert "--mlp-recompute needs --fused-kernels" in capsys.readouterr().err
