"""A random-init Llama of a benchmark shape, saved with the embedded tokenizer, for the FSDP examples on a GPU.

    python benchmarks/fsdp_example_model.py --size 1b --out /tmp/llama-1b

The vocabulary is the embedded tokenizer's (4,096 tokens), so ``examples/fsdp_full_finetune.py --model /tmp/llama-1b``
and ``zenft fit --config examples/fsdp_qlora.yaml --model.model /tmp/llama-1b`` run without a download; the decoder
keeps the shape of ``_shapes.py`` (the embeddings are smaller than the real model's).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import LLAMA_SHAPES  # noqa: E402

from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaConfig.from_pretrained(DEFAULT_BASE_MODEL_DIR)
    shape = {**LLAMA_SHAPES[args.size], "vocab_size": base.vocab_size}
    config = LlamaConfig(**shape, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                         pad_token_id=base.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = Path(args.out)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_BASE_MODEL_DIR / name, out / name)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters saved to {out}")


if __name__ == "__main__":
    main()
