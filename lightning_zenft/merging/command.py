"""``zenft merge``: adapters (or fine-tuned checkpoints) merged into their base, or combined into one adapter.

Example::

    zenft merge --base ./llama --adapters ./ad-math ./ad-code --method ties --density 0.2 --out ./merged
    zenft merge --base ./llama --models ./ft-a ./ft-b --method dare_linear --density 0.3 --seed 1 --out ./merged
    zenft merge --adapters ./ad-math ./ad-code --save-adapter --rank 16 --out ./ad-both
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from lightning_zenft.merging.lora_combine import combine_adapters
from lightning_zenft.merging.pretrained import merge_pretrained
from lightning_zenft.merging.task_vectors import METHODS

__all__ = ["merge_main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zenft merge",
        description="Merge LoRA/DoRA adapters or fine-tuned checkpoints of one base into a plain transformers model "
        "(streamed tensor by tensor), or combine LoRA adapters into one adapter (--save-adapter).",
    )
    parser.add_argument(
        "--base", type=Path, help="the base model directory (save_pretrained, safetensors; 4-bit ones are dequantized)"
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--adapters", nargs="+", type=Path, metavar="DIR", help="PEFT-format adapter directories")
    inputs.add_argument("--models", nargs="+", type=Path, metavar="DIR", help="fine-tuned checkpoints of the base")
    parser.add_argument("--out", required=True, type=Path, help="the output directory (written atomically)")
    parser.add_argument("--method", choices=METHODS, default="task_arithmetic", help="merge method (task_arithmetic)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per input (default 1.0)")
    parser.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare, prune)")
    parser.add_argument("--majority-sign", choices=("total", "frequency"), default="total", help="TIES sign election")
    parser.add_argument("--trim", choices=("tensor", "global"), default="tensor",
                        help="trim per tensor (PEFT) or over each input's whole task vector (TIES paper)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="DARE's seed (default 0)")
    parser.add_argument("--combine", choices=("products", "factors"), default="products",
                        help="LoRA adapters: merge the products s*B@A (exact) or A and B apart (PEFT)")  # fmt: skip
    parser.add_argument("--save-adapter", action="store_true",
                        help="write one combined LoRA adapter, not a merged model (no --base needed)")  # fmt: skip
    parser.add_argument("--rank", type=int, help="rank of the combined adapter (--save-adapter --combine products)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="floating dtype of the output (default: the base's)")
    parser.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB (default: the base's layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="merge adapters recorded for another base_model_name_or_path (warns)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _usage_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.save_adapter:
        if args.models:
            problems.append("--save-adapter combines LoRA adapters; it does not take --models")
        if args.dtype or args.max_shard_size:
            problems.append("--dtype and --max-shard-size apply to merged models, not to --save-adapter")
    elif args.base is None:
        problems.append("--base is required (except with --save-adapter)")
    if args.rank is not None and not (args.save_adapter and args.combine == "products"):
        problems.append("--rank applies to --save-adapter with --combine products")
    if args.combine == "factors" and args.models:
        problems.append("--combine factors applies to LoRA adapters, not --models")
    if args.trim == "global" and (args.save_adapter or args.combine == "factors"):
        problems.append("--trim global applies to merges of task vectors into the base, not to combined factors")
    return problems


def merge_main(argv: list[str]) -> int:
    """``zenft merge``: returns the exit status (0 done, 1 refused or failed, 2 usage error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    problems = _usage_problems(args)
    if problems:
        parser.print_usage(sys.stderr)
        print(f"zenft merge: error: {'; '.join(problems)}.", file=sys.stderr)
        return 2
    options = dict(weights=args.weights, method=args.method, density=args.density,
                   majority_sign_method=args.majority_sign, seed=args.seed, overwrite=args.overwrite)  # fmt: skip
    merge_options = dict(trim=args.trim, dtype=_DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                         base_mismatch="warn" if args.allow_base_mismatch else "error",
                         progress=not args.no_progress)  # fmt: skip
    try:
        if args.save_adapter:
            report = combine_adapters(args.adapters, args.out, combine=args.combine, rank=args.rank, **options)
            worst = max(report.errors, key=report.errors.get) if report.errors else None
            print(f"combined {len(args.adapters)} adapters into {args.out}: {len(report.ranks)} layers, ranks "
                  f"{sorted(set(report.ranks.values()))}, largest SVD truncation error {report.max_error:.3g}"
                  + (f" ({worst})" if worst else ""))  # fmt: skip
            return 0
        if args.combine == "factors":
            args.out.resolve().parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
                combined = Path(tmp) / "combined-adapter"
                combine_adapters(args.adapters, combined, combine="factors", **options)
                report = merge_pretrained(args.base, args.out, adapters=[combined], overwrite=args.overwrite,
                                          **merge_options)  # fmt: skip
        else:
            inputs = {"adapters": args.adapters} if args.adapters else {"models": args.models}
            report = merge_pretrained(args.base, args.out, **inputs, **options, **merge_options)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"zenft merge: error: {err}", file=sys.stderr)
        return 1
    inputs_count = len(args.adapters or args.models)
    print(f"merged {inputs_count} {'adapters' if args.adapters else 'models'} into {args.out} ({args.method}): "
          f"{report.tensors} tensors, {report.changed} changed, {report.bytes / 1e6:.1f} MB")  # fmt: skip
    if report.thresholds is not None:
        print("trim thresholds over each task vector: " + ", ".join(f"{t:.4g}" for t in report.thresholds))
    return 0
