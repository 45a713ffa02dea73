"""Activation memory of one LoRA training step, measured as the bytes autograd saves for backward.

What a training step keeps between forward and backward does not depend on the device (the same tensors are saved
on CPU and GPU, SDPA included), so this script measures the activation part of the memory target exactly, on any
machine: every storage that autograd saves is counted once (by its address), parameters excluded.

Modes, on a random-init Llama (bf16, SDPA, no gradient checkpointing, loss on all tokens):

* ``ceiling``: every weight frozen, no adapters, gradients flow to the inputs (what no adapter method can beat);
* ``peft``: HF PEFT LoRA;
* ``ours``: ``lightning_zenft`` LoRA layers;
* ``ours_fused``: the same with the fused kernels (per-layer function, shared q/k/v and gate/up input, fused MLP).
* ``ours_fused_recompute``: the same, the fused MLP recomputing ``act(gate) * up`` in backward (``mlp_recompute``).

The budget of the memory target is the ceiling plus one bf16 copy of each adapted layer's input, one per distinct
input (q/k/v share one, gate/up share one): per decoder layer ``b*s*(3*h + i)`` values.

    python benchmarks/saved_activations.py                       # 1.1B layer shape, 2 layers, 1 x 1024 tokens
    python benchmarks/saved_activations.py --layers 1 --seq 256 --hidden 256 --inter 704 --heads 8 --kv-heads 2
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zenft import LoRAConfig, inject_adapters
from lightning_zenft.fusion import finalize_shared_inputs, fuse_lora_layers
from lightning_zenft.planning.measure import saved_activation_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "ceiling":
        model.enable_input_require_grads()
    elif mode == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    else:
        inject_adapters(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
        if mode.startswith("ours_fused"):
            fuse_lora_layers(model, warn=True, mlp_recompute=mode.endswith("recompute"))
    return model


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    loss, saved = saved_activation_bytes(model, ids)
    loss.backward()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    results = {}
    for mode in ("ceiling", "peft", "ours", "ours_fused", "ours_fused_recompute"):
        model = build(args, mode)
        if mode.startswith("ours_fused"):  # one step lets the kernels see which siblings read the same input
            saved_bytes(model, ids)
            finalize_shared_inputs(model)
            model.zero_grad(set_to_none=True)
        results[mode] = saved_bytes(model, ids)
        del model
    tokens = args.batch * args.seq
    budget = results["ceiling"] + args.layers * tokens * (3 * args.hidden + args.inter) * 2
    mib = 2**20
    print(
        f"saved activations, Llama h={args.hidden} i={args.inter} L={args.layers} heads={args.heads}/{args.kv_heads} "
        f"V={args.vocab}, {args.batch} x {args.seq} tokens, bf16, LoRA r=16 on q,k,v,o,gate,up,down"
    )
    print("| mode | saved MiB | over ceiling MiB | per layer over ceiling MiB |")
    print("|---|---|---|---|")
    for mode, value in results.items():
        over = (value - results["ceiling"]) / mib
        print(f"| {mode} | {value / mib:.1f} | {over:.1f} | {over / args.layers:.1f} |")
    over_budget = (budget - results["ceiling"]) / mib
    print(f"| budget (ceiling + one bf16 copy per distinct adapted input) | {budget / mib:.1f} | {over_budget:.1f} "
          f"| {over_budget / args.layers:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
