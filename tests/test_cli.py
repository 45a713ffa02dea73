"""The `zenft` CLI: the example config runs, LoRA comes from YAML, and the saved adapter reproduces the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lightning_zenft import find_adapters, load_adapter
from lightning_zenft.cli import cli_main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora_tiny.yaml"


def test_example_config_fits_and_saves_a_loadable_adapter(tmp_path):
    cli = cli_main(
        [
            "fit",
            "--config",
            str(EXAMPLE),
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    module = cli.model
    layers = dict(find_adapters(module.model))
    assert len(layers) > 0 and all(layer.r == 8 for layer in layers.values())
    assert cli.trainer.global_step == 3
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(layers)
    # the embedded tokenizer came from the model directory through the linked argument
    assert cli.datamodule.hparams.tokenizer == module.model_name_or_path or cli.datamodule.hparams.tokenizer is None

    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(module.model_name_or_path).eval()
    load_adapter(fresh, adapter)
    ids = torch.randint(0, fresh.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, module.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    # the checkpoint Lightning wrote holds the adapter only
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all(".lora_" in k for k in state)


def test_helper_commands_are_dispatched():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_zenft.cli", "estimate", "--model", "7B", "--method", "full", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["total_bytes"] > 100e9
