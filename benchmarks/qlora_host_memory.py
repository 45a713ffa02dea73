"""Peak host memory of loading a model in 4 bits: NF4Precision's low-memory loader against the other ways, one run.

A random-weight Llama is saved once with ``save_pretrained`` (bf16, sharded safetensors); each mode then loads it in a
fresh process and reports the peak resident memory the load added (VmHWM after the load minus VmRSS before it, with
the kernel's high-water mark reset first) against the loaded model's own size (every parameter, buffer and 4-bit
quant-state tensor):

* ``ours``: ``NF4Precision(...).load_pretrained(dir)`` (meta skeleton, safetensors read and quantized tensor by tensor);
* ``transformers``: ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...),
  device_map="cpu")``;
* ``dense``: ``from_pretrained(dir, dtype=bfloat16)`` then ``NF4Precision.convert_module`` (what a module built
  outside ``module_init_context`` does: the bf16 model exists first).

    python benchmarks/qlora_host_memory.py --size 1b                     # TinyLlama shape, ~1.1B parameters
    python benchmarks/qlora_host_memory.py --size small --json out.json  # the test's shape

Target (issue 9): ``ours`` peaks at <= 1.5x the 4-bit model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import LLAMA_SHAPES  # noqa: E402

SHAPES = {
    "1b": LLAMA_SHAPES["1b"],
    "tiny": LLAMA_SHAPES["tiny"],
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=2048, max_position_embeddings=512),
}  # fmt: skip
MODES = ("ours", "transformers", "dense")


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def model_bytes(model) -> int:  # noqa: ANN001
    """Bytes of every tensor the loaded model holds: parameters, buffers, 4-bit quant states (shared ones once)."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:  # noqa: ANN001
        nonlocal total
        if t is None or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
    return total


def _load(mode: str, directory: str, quant: str):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_zenft import NF4Precision

    plugin = NF4Precision(quant, compute_dtype=torch.bfloat16)
    if mode == "ours":
        model = plugin.load_pretrained(directory)
    elif mode == "transformers":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant[:3],
            bnb_4bit_use_double_quant=quant.endswith("-dq"),
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        model.requires_grad_(False)
        plugin.convert_module(model)
    return model


def child(mode: str, directory: str, quant: str) -> dict:
    """Load once at a tiny size of the same architecture (imports, libraries, allocator pools), then measure."""
    import torch

    torch.set_num_threads(1)
    warm = tempfile.mkdtemp(prefix="zenft-qlora-warm-")
    save_random_llama("tiny", Path(warm))
    del_model = _load(mode, warm, quant)
    del del_model
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    model = _load(mode, directory, quant)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    size = model_bytes(model)
    n4 = sum(1 for m in model.modules() if "Linear4bit" in {c.__name__ for c in type(m).__mro__})
    return dict(mode=mode, peak_bytes=peak, model_bytes=size, ratio=round(peak / size, 3), seconds=round(seconds, 1),
                layers_4bit=n4)  # fmt: skip


def save_random_llama(size: str, directory: Path) -> int:
    """Save a random-init Llama of the shape in bf16 shards; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[size]), dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)  # random weights; the values do not matter for memory
    model.save_pretrained(directory, max_shard_size="500MB")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["1b", "small"], default="1b")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--quant", default="nf4-dq", choices=["nf4", "nf4-dq", "fp4", "fp4-dq"])
    parser.add_argument("--dir", help="reuse (or create) the saved model here instead of a temporary directory")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.dir, args.quant)), flush=True)
        return
    directory = Path(args.dir or tempfile.mkdtemp(prefix="zenft-qlora-mem-"))
    if not (directory / "config.json").is_file():
        n_params = save_random_llama(args.size, directory)
    else:
        n_params = None
    shard_bytes = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    results = []
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            mode,
            "--dir",
            str(directory),
            "--quant",
            args.quant,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            results.append(dict(mode=mode, error=(proc.stderr or proc.stdout).strip().splitlines()[-1:]))
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    gib = 2**30
    print(f"Loading a {args.size} Llama ({n_params or '?'} parameters, {shard_bytes / gib:.2f} GiB of bf16 shards) "
          f"in {args.quant}; peak RSS added by the load, against the loaded model's size")  # fmt: skip
    print("| mode | peak GiB | model GiB | peak / model | seconds | 4-bit layers |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | failed: {' '.join(r['error'])[:160]} |||||")
            continue
        print(f"| {r['mode']} | {r['peak_bytes'] / gib:.3f} | {r['model_bytes'] / gib:.3f} | {r['ratio']:.2f} | "
              f"{r['seconds']} | {r['layers_4bit']} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(dict(size=args.size, quant=args.quant, shard_bytes=shard_bytes,
                                                   n_params=n_params, results=results)))  # fmt: skip


if __name__ == "__main__":
    main()
