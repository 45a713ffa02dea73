"""Command-line front-ends: ``zenft recommend`` and ``zenft estimate``.

Example::

    zenft recommend --model ./my-llama --task instruction-simple --samples 20000 --gpu-mem 24 --out run.yaml
    zenft estimate --model 7B --method qlora --batch 4 --seq 2048 --rank 16 --checkpointing --json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import get_args

from lightning_zenft.planning.fit_config import run_blockers
from lightning_zenft.planning.memory import Device, Method, Optimizer, Precision, estimate_memory
from lightning_zenft.planning.recommend import TASKS, Recommendation, recommend

__all__ = ["estimate_main", "recommend_main"]

_MODEL_HELP = "a Hugging Face model directory (with config.json) or a size such as 7B, 0.6B, 500M"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2


def _recommend_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zenft recommend",
        description="Recommend a fine-tuning recipe (method, rank, learning rate, epochs) and write a fit config.",
    )
    parser.add_argument("--model", required=True, help=_MODEL_HELP)
    parser.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK",
                        help="one of: " + ", ".join(TASKS))  # fmt: skip
    parser.add_argument("--samples", required=True, type=_positive_int, help="number of training samples")
    parser.add_argument("--gpu-mem", type=_positive_float, default=None, help="memory of one GPU, GiB")
    parser.add_argument("--out", default="recommended.yaml", help="where to write the config (recommended.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--divergent", action="store_true", help="task diverges strongly from the base model")
    parser.add_argument("--max-performance", action="store_true", help="maximum task performance is required")
    parser.add_argument("--nodes", type=_positive_int, default=1, help="nodes available (default 1)")
    parser.add_argument("--gpus", type=_positive_int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--batch", type=_positive_int, default=1,
                        help="micro-batch per GPU (memory check and data.batch_size)")  # fmt: skip
    parser.add_argument("--seq", type=_positive_int, default=2048,
                        help="sequence length (memory check and data.max_length)")  # fmt: skip
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (memory and config)")
    parser.add_argument("--train-file", default="train.jsonl", help="data.train_file in the config")
    parser.add_argument("--max-steps", type=_positive_int, default=None,
                        help="trainer.max_steps in the config (default: none, the epochs decide)")  # fmt: skip
    return parser


def recommend_main(argv: list[str]) -> int:
    """``zenft recommend``: print the recipe with reasons and write a ``zenft fit`` YAML config.

    Example::

        >>> recommend_main(["--model", "7B", "--task", "ner", "--samples", "20000", "--json"])  # doctest: +SKIP
        0
    """
    args = _parse(_recommend_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        rec = recommend(
            args.model,
            args.task,
            args.samples,
            args.gpu_mem,
            divergent=args.divergent,
            max_performance=args.max_performance,
            nodes=args.nodes,
            gpus=args.gpus,
            batch=args.batch,
            seq=args.seq,
            checkpointing=args.checkpointing,
        )
    except ValueError as err:
        print(f"zenft recommend: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(rec.to_yaml(train_file=args.train_file, max_steps=args.max_steps), encoding="utf-8")
    tmp.replace(out)
    blockers = run_blockers(rec, args.train_file)
    command = f"zenft fit --config {shlex.quote(str(out))}"
    if args.json:
        print(json.dumps({**rec.to_dict(), "config_path": str(out), "fit_command": command, "blockers": blockers}))
        return 0
    print(_format_recommendation(rec))
    if not blockers:
        print(f"\nWrote {out}. Train with: {command}")
    else:
        print(f"\nWrote {out}. Before `{command}` runs:")
        print("".join(f"  - {blocker}\n" for blocker in blockers), end="")
    if rec.nodes * rec.gpus > 1:
        print(
            f"  The config runs Lightning's FSDP strategy on {rec.gpus} GPU(s) x {rec.nodes} node(s): start it on "
            "each node as Lightning documents for multi-node runs. This lightning_zenft's tests do not run FSDP "
            "with adapters yet."
        )
    return 0


def _format_recommendation(rec: Recommendation) -> str:
    thresholds = rec.data_thresholds
    adapter = (
        f"rank {rec.rank}, alpha {rec.alpha}, target_modules {rec.target_modules}, dropout {rec.dropout}"
        if rec.rank is not None
        else "none (full fine-tuning)"
    )
    rows = [
        ("method", rec.method, "method"),
        ("adapter", adapter, "rank"),
        ("learning rate", f"{rec.learning_rate:g}", "learning_rate"),
        ("epochs", f"{rec.epochs} (early stopping on val_loss)", "epochs"),
        (
            "data",
            f"{rec.data_verdict} (minimum {thresholds['minimum']:,} / recommended {thresholds['recommended']:,} / "
            f"saturation {thresholds['saturation']:,})",
            "data",
        ),
        (
            "memory",
            f"{rec.memory_bytes[rec.method] / 1024**3:.1f} GiB per GPU for {rec.method} "
            f"(the figure of: {rec.estimate_commands[rec.method]})",
            "memory",
        ),
    ]
    lines = [f"Recommendation for {rec.model} ({rec.n_params / 1e9:.2f}B params), {rec.task}, {rec.samples:,} samples"]
    for label, value, key in rows:
        lines.append(f"  {label + ':':<15}{value}")
        lines.append(f"  {'':<15}why: {rec.reasons[key]}")
    return "\n".join(lines)


def _estimate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zenft estimate",
        description="Estimate per-GPU training memory: weights, gradients, optimizer states, activations.",
    )
    parser.add_argument("--model", required=True, help=_MODEL_HELP)
    parser.add_argument("--method", required=True, choices=list(get_args(Method)))
    parser.add_argument("--batch", type=_positive_int, default=1, help="micro-batch per GPU (default 1)")
    parser.add_argument("--seq", type=_positive_int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--rank", type=_positive_int, default=None, help="LoRA rank (default 16; lora/qlora only)")
    parser.add_argument("--gpus", type=_positive_int, default=1, help="GPUs sharding the model under FSDP")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per decoder layer")
    parser.add_argument("--optimizer", choices=list(get_args(Optimizer)), default="adamw")
    parser.add_argument("--precision", choices=list(get_args(Precision)), default="mixed",
                        help="mixed: bf16 compute with fp32 master weights and states (default)")  # fmt: skip
    parser.add_argument("--target-modules", default=None,
                        help="adapted layers: all-linear (default), attention, mlp, or q_proj,v_proj,...")  # fmt: skip
    parser.add_argument("--lora-dropout", type=float, default=None, help="adapter dropout (default 0.0)")
    parser.add_argument("--device", choices=list(get_args(Device)), default="cuda",
                        help="where training runs (sets the dropout mask size; default cuda)")  # fmt: skip
    parser.add_argument("--fused-kernels", action="store_true",
                        help="the adapters run FusedKernels: no dropout copies, a leaner fused MLP")  # fmt: skip
    parser.add_argument("--mlp-recompute", action="store_true",
                        help="with --fused-kernels: the fused MLP recomputes act(gate)*up")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the breakdown in bytes as one JSON object")
    return parser


def estimate_main(argv: list[str]) -> int:
    """``zenft estimate``: print the per-GPU memory breakdown (GiB, or bytes with ``--json``).

    Example::

        >>> estimate_main(["--model", "7B", "--method", "full", "--json"])  # doctest: +SKIP
        0
    """
    args = _parse(_estimate_parser(), argv)
    if isinstance(args, int):
        return args
    adapter_flags = {"--rank": args.rank, "--target-modules": args.target_modules, "--lora-dropout": args.lora_dropout}
    adapter_flags |= {"--fused-kernels": args.fused_kernels or None, "--mlp-recompute": args.mlp_recompute or None}
    if args.mlp_recompute and not args.fused_kernels:
        print("zenft estimate: error: --mlp-recompute needs --fused-kernels", file=sys.stderr)
        return 2
    if args.method == "full":
        given = [flag for flag, value in adapter_flags.items() if value is not None]
        if given:
            print(f"zenft estimate: note: {', '.join(given)} not used by full fine-tuning", file=sys.stderr)
    try:
        est = estimate_memory(
            args.model,
            args.method,
            batch=args.batch,
            seq=args.seq,
            rank=16 if args.rank is None else args.rank,
            gpus=args.gpus,
            checkpointing=args.checkpointing,
            optimizer=args.optimizer,
            precision=args.precision,
            target_modules="all-linear" if args.target_modules is None else args.target_modules,
            lora_dropout=0.0 if args.lora_dropout is None else args.lora_dropout,
            device=args.device,
            fused_kernels=args.fused_kernels and args.method != "full",
            mlp_recompute=args.mlp_recompute,
        )
    except ValueError as err:
        print(f"zenft estimate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict()) if args.json else est.format())
    return 0
