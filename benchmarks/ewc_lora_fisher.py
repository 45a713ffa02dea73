"""EWC with LoRA: the rank-1 factored Fisher of each adapted base weight against the dense one, error and memory.

    python benchmarks/ewc_lora_fisher.py [--seqs 32] [--steps 40]

On the package's embedded base model (a pretrained 1.25M-parameter Llama) with LoRA r=8 on every linear layer:

1. the dense diagonal Fisher ``F`` (``out x in``) of each adapted layer's base weight, estimated on general text with
   the base weights as parameters (no adapters), and the factored one ``u v^T`` the ``EWC`` callback keeps (row and
   column sums of the per-example squared gradients), from the same label draws (same seed), so the two differ only
   by the factorization;
2. the error of the factorization: the relative Frobenius error of ``u v^T`` against ``F``, and, what EWC uses, the
   relative error of the penalty ``sum F D^2`` for the change ``D = s B A`` of a LoRA trained ``--steps`` steps on the
   embedded task, and for random rank-8 changes;
3. memory: bytes of the dense Fisher of the adapted weights against the factors, and the callback's whole state
   against the trainable parameters (the issue allows two fp32 copies of them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_zenft import CausalLMModule, LoRALinear, TextDataModule  # noqa: E402
from lightning_zenft.data.replay import general_examples  # noqa: E402
from lightning_zenft.data.text import CausalLMCollator  # noqa: E402
from lightning_zenft.regularizers import find_targets, fisher_bytes, fisher_diagonal  # noqa: E402


def adapt(model: torch.nn.Module, r: int) -> dict[str, LoRALinear]:
    layers = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            parent_name, child = name.rsplit(".", 1)
            layer = LoRALinear(module, r=r, alpha=2 * r)
            setattr(model.get_submodule(parent_name), child, layer)
            layers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return layers


def train_lora(model: torch.nn.Module, layers: dict[str, LoRALinear], steps: int) -> None:
    data = TextDataModule(max_length=96, batch_size=16)
    data.setup("fit")
    params = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    opt = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    for step, batch in enumerate(data.train_dataloader()):
        if step == steps:
            break
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=32, help="general sequences of 96 tokens for the Fisher")
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps on the embedded task for a real change")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = CausalLMModule().model.eval()
    tokenizer = TextDataModule().tokenizer
    items = general_examples(tokenizer, n=args.seqs, seq_len=96)
    collate = CausalLMCollator.for_tokenizer(tokenizer)
    batches = [collate(items[i : i + 8]) for i in range(0, len(items), 8)]

    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    weights = {n: base.get_submodule(n).weight for n in names}
    dense = fisher_diagonal(base, batches, "sampled", params=weights, seed=0)
    adapted = CausalLMModule().model.eval()
    torch.manual_seed(0)
    layers = adapt(adapted, args.rank)
    factored = fisher_diagonal(adapted, batches, "sampled", factored=layers, seed=0)

    print(f"embedded base model, LoRA r={args.rank} on {len(layers)} layers, Fisher over {dense.tokens} tokens")
    print("| layer | shape | factorization error (Frobenius) | penalty error, trained LoRA | random rank-r |")
    print("|---|---|---|---|---|")
    train_lora(adapted, layers, args.steps)
    g = torch.Generator().manual_seed(0)
    totals = {"dense": 0.0, "factored": 0.0, "dense_rand": 0.0, "factored_rand": 0.0}
    frob_num = frob_den = 0.0
    ranges: dict[str, list[float]] = {"entries": [], "trained": [], "random": []}
    for name in names:
        f = dense.diagonal[name]  # (out, in)
        uv = factored.factor_matrix(name)  # (out, in)
        layer = layers[name]
        delta = layer.delta_weight().detach()  # (out, in): s B A after training
        rand = layer.scaling * torch.randn(f.shape[0], args.rank, generator=g) @ torch.randn(args.rank, f.shape[1],
                                                                                           generator=g)  # fmt: skip
        pen = [(f * delta**2).sum().item(), (uv * delta**2).sum().item()]
        pen_r = [(f * rand**2).sum().item(), (uv * rand**2).sum().item()]
        err = ((uv - f).norm() / f.norm()).item()
        frob_num += (uv - f).norm().item() ** 2
        frob_den += f.norm().item() ** 2
        totals["dense"] += pen[0]
        totals["factored"] += pen[1]
        totals["dense_rand"] += pen_r[0]
        totals["factored_rand"] += pen_r[1]
        ranges["entries"].append(100 * err)
        ranges["trained"].append(100 * (pen[1] / pen[0] - 1))
        ranges["random"].append(100 * (pen_r[1] / pen_r[0] - 1))
        print(
            f"| {name} | {tuple(f.shape)} | {100 * err:.0f}% | {100 * (pen[1] / pen[0] - 1):+.1f}% | "
            f"{100 * (pen_r[1] / pen_r[0] - 1):+.1f}% |"
        )
    print(
        f"| all adapted layers | | {100 * (frob_num / frob_den) ** 0.5:.0f}% | "
        f"{100 * (totals['factored'] / totals['dense'] - 1):+.1f}% | "
        f"{100 * (totals['factored_rand'] / totals['dense_rand'] - 1):+.1f}% |"
    )
    print("| range over layers | | " + " | ".join(f"{min(v):+.1f}% .. {max(v):+.1f}%" for v in ranges.values()) + " |")
    dense_bytes = sum(v.numel() * 4 for v in dense.diagonal.values())
    factor_bytes = fisher_bytes(factored)
    targets = find_targets(adapted)
    trainable = sum(p.numel() * 4 for p in adapted.parameters() if p.requires_grad)
    print(
        f"\nmemory: dense Fisher of the adapted weights {dense_bytes / 2**10:.1f} KiB, factors "
        f"{factor_bytes / 2**10:.1f} KiB ({dense_bytes / factor_bytes:.0f}x less); EWC state with LoRA (factors; "
        "no anchor while B0 = 0) "
        f"{factor_bytes / 2**10:.1f} KiB = {factor_bytes / trainable:.2f}x the fp32 trainable parameters "
        f"({trainable / 2**10:.1f} KiB, {len(targets.lowrank)} low-rank layers)"
    )


if __name__ == "__main__":
    main()
