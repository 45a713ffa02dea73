"""Memory estimate against measured memory for one training step of a random-init Llama.

On a GPU (default shape: the 1.1B Llama shape, hidden 2048, MLP 5632, 22 layers, 32 heads, 4 kv heads, vocab
32000, bf16, batch 4 x seq 2048) the measured figure is ``torch.cuda.max_memory_allocated`` over the second
training step (the first one allocates the optimizer states; gradients are zeroed in place, not freed, so
they are held as the estimate assumes). Activations are also measured on their own, as the unique storages the
autograd graph holds for backward when forward ends (``lightning_zenft.planning.measure.saved_activation_bytes``).

With ``--tiny`` the script runs a tiny shape, on CPU when there is no GPU; there the total is measured as the
bytes of parameters, gradients and AdamW states after a step plus the storages the graph holds for backward.

Variants: ``full`` (every weight trained, AdamW) and ``lora`` (frozen base plus trainable low-rank adapters on
all linear layers of the blocks, AdamW on the adapters).

Usage::

    python benchmarks/estimate_vs_measured.py               # GPU, 1.1B shape
    python benchmarks/estimate_vs_measured.py --tiny        # CPU or GPU, tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch
from torch import nn

from lightning_zenft import LoRAConfig, inject_adapters
from lightning_zenft.planning.measure import saved_activation_bytes
from lightning_zenft.planning.memory import estimate_memory
from lightning_zenft.planning.model_info import LINEAR_NAMES, resolve_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import LLAMA_SHAPES  # noqa: E402

SHAPE_1B = LLAMA_SHAPES["1b"]
SHAPE_TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512)  # fmt: skip


def add_adapters(model: nn.Module, rank: int) -> None:
    """The library's own LoRA layers on every linear layer of the blocks, base frozen."""
    inject_adapters(model, LoRAConfig(r=rank, target_modules=list(LINEAR_NAMES)))


def run_variant(config_kwargs: dict, variant: str, batch: int, seq: int, rank: int, device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**config_kwargs)
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)  # the estimate reads the same config.json a user would pass
        info = resolve_model(directory)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if variant in ("lora", "lora_fused"):
        add_adapters(model, rank)
    if variant == "lora_fused":  # as FusedKernels runs it (groups form after one forward)
        from lightning_zenft.fusion import finalize_shared_inputs, fuse_lora_layers

        fuse_lora_layers(model, warn=False)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))
        finalize_shared_inputs(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, **fused)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    # Step 1 allocates gradients and optimizer states.
    loss, _ = saved_activation_bytes(model, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    del loss
    gc.collect()

    static = sum(p.nbytes for p in model.parameters()) + sum(p.grad.nbytes for p in trainable)
    static += sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loss, activations = saved_activation_bytes(model, ids)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        measured_total = torch.cuda.max_memory_allocated()
    else:
        measured_total = static + activations
    est = estimate_memory(
        info,
        "full" if variant == "full" else "lora",
        batch=batch,
        seq=seq,
        rank=rank,
        precision="bf16",
        device="cuda" if device.type == "cuda" else "cpu",
        fused_kernels=variant == "lora_fused",
    )
    del model, optimizer, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "variant": variant,
        "device": str(device),
        "estimate_static": est.static_bytes,
        "measured_static": static,
        "estimate_activations": est.activations_bytes,
        "measured_activations": activations,
        "estimate_total": est.total_bytes,
        "measured_total": measured_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape; runs on CPU when there is no GPU")
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 with --tiny)")
    parser.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --tiny)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variants", default="full,lora,lora_fused")
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    args = parser.parse_args()
    has_cuda = torch.cuda.is_available()
    if not args.tiny and not has_cuda:
        parser.error("the 1.1B shape needs a CUDA GPU; pass --tiny to run a tiny shape on CPU")
    device = torch.device("cuda" if has_cuda else "cpu")
    shape = SHAPE_TINY if args.tiny else SHAPE_1B
    batch = args.batch or (2 if args.tiny else 4)
    seq = args.seq or (64 if args.tiny else 2048)
    gib = 1024**3
    for variant in args.variants.split(","):
        row = run_variant(shape, variant.strip(), batch, seq, args.rank, device)
        if args.json:
            print(json.dumps(row))
            continue
        print(f"{variant} on {device}, batch {batch} x seq {seq}, bf16, AdamW")
        for part in ("static", "activations", "total"):
            est, meas = row[f"estimate_{part}"], row[f"measured_{part}"]
            print(f"  {part:<12} estimate {est / gib:9.4f} GiB  measured {meas / gib:9.4f} GiB  ratio {est / meas:.3f}")


if __name__ == "__main__":
    main()
