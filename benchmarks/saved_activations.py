"""Activation memory of one LoRA training step, measured as the bytes the autograd graph holds for backward.

What a training step keeps between forward and backward does not depend on the device (the same tensors are saved
on CPU and GPU, SDPA included), so this script measures the activation part of the memory target exactly, on any
machine, with ``lightning_zenft.planning.measure.saved_activation_bytes``: the storages the graph still holds when
forward ends, each once, parameters excluded.

Modes, on a Llama (bf16, SDPA, no gradient checkpointing, loss on all tokens), LoRA r=16 on every linear layer:

* ``ceiling``: every weight frozen, no adapters, gradients flow to the inputs (what no adapter method can beat);
* ``peft``: HF PEFT LoRA with its defaults (``autocast_adapter_dtype=True``: the adapters are fp32, so each keeps an
  fp32 copy of its input);
* ``peft_bf16``: HF PEFT LoRA with ``autocast_adapter_dtype=False`` (bf16 adapters, like ours);
* ``ours``: ``lightning_zenft`` LoRA layers;
* ``ours_fused``: the same with the fused kernels (per-layer function, shared q/k/v and gate/up input, fused MLP);
* ``ours_fused_recompute``: the same, the fused MLP recomputing ``act(gate) * up`` in backward (``mlp_recompute``).

The ceiling's input gradient makes its first layer keep tensors that an adapter model's first layer does not (its
input comes from the frozen embedding), so the figure over the ceiling divided by the layers is skewed for one or two
layers. ``--layers 2,4,8`` runs several depths and prints, besides each depth's average, the marginal bytes of one
more layer (the difference between the last two depths over their layer difference): the per-layer figure of a deep
model. The budget of the memory target is the ceiling plus one bf16 copy of each adapted layer's input, one per
distinct input (q/k/v share one, gate/up share one): per decoder layer ``b*s*(3*h + i)`` values.

    python benchmarks/saved_activations.py                        # 1.1B layer shape, 2,4,8 layers, 1 x 256 tokens
    python benchmarks/saved_activations.py --layers 1 --hidden 256 --inter 704 --heads 8 --kv-heads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lightning_zenft import LoRAConfig, inject_adapters
from lightning_zenft.fusion import finalize_shared_inputs, fuse_lora_layers
from lightning_zenft.planning.measure import saved_activation_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("ceiling", "peft", "peft_bf16", "ours", "ours_fused", "ours_fused_recompute")
MIB = 2**20


def build(args: argparse.Namespace, layers: int, mode: str) -> torch.nn.Module:
    """A bf16 Llama; weights drawn as N(0, 0.02) in place (the values do not change what is saved)."""
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):  # no full-size random init in fp32: allocate bf16 and fill it once
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu").train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers, which to_empty left unset
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "ceiling":
        model.enable_input_require_grads()
    elif mode.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, config, autocast_adapter_dtype=mode == "peft")
    else:
        inject_adapters(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
        if mode.startswith("ours_fused"):
            fuse_lora_layers(model, warn=True, mlp_recompute=mode.endswith("recompute"))
    return model


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    loss, saved = saved_activation_bytes(model, ids)
    loss.backward()
    return saved


def measure_depth(args: argparse.Namespace, layers: int, ids: torch.Tensor) -> dict[str, int]:
    results = {}
    for mode in MODES:
        model = build(args, layers, mode)
        if mode.startswith("ours_fused"):  # one step lets the kernels see which siblings read the same input
            saved_bytes(model, ids)
            finalize_shared_inputs(model)
            model.zero_grad(set_to_none=True)
        results[mode] = saved_bytes(model, ids)
        del model
    results["budget"] = results["ceiling"] + layers * ids.numel() * (3 * args.hidden + args.inter) * 2
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--layers", default="2,4,8", help="comma-separated depths, e.g. 1,2,4,8")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary (the logits term is equal in every mode)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the bytes per depth and mode to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    depths = [int(x) for x in args.layers.split(",")]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    by_depth = {layers: measure_depth(args, layers, ids) for layers in depths}
    print(
        f"saved activations, Llama h={args.hidden} i={args.inter} heads={args.heads}/{args.kv_heads} V={args.vocab}, "
        f"{args.batch} x {args.seq} tokens, bf16, LoRA r=16 on q,k,v,o,gate,up,down; MiB over the ceiling per layer"
    )
    marginal = len(depths) > 1
    header = " | ".join(f"L={d}: saved, over/layer" for d in depths)
    print(f"| mode | {header} |" + (f" one more layer (L={depths[-2]}->{depths[-1]}) |" if marginal else ""))
    print("|---|" + "---|" * (len(depths) + marginal))
    for mode in (*MODES, "budget"):
        cells = []
        for d in depths:
            r = by_depth[d]
            cells.append(f"{r[mode] / MIB:.1f}, {(r[mode] - r['ceiling']) / MIB / d:+.2f}")
        row = f"| {mode} | " + " | ".join(cells) + " |"
        if marginal:
            (d0, r0), (d1, r1) = list(by_depth.items())[-2:]
            extra = ((r1[mode] - r1["ceiling"]) - (r0[mode] - r0["ceiling"])) / (d1 - d0) / MIB
            row += f" {extra:+.2f} |"
        print(row)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "bytes": by_depth}, f, indent=1)


if __name__ == "__main__":
    main()
