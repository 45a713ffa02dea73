#!/usr/bin/env bash
# Every GPU measurement of the fused kernels, the memory estimator and their parity tests, in stages that each fit
# a 10-minute run on one H100. Results (JSON) and logs go to $OUT (default: benchmarks/out); then
#   python benchmarks/record_results.py benchmarks/out      # prints the tables for RESULTS.md
#
#   bash benchmarks/run_gpu.sh tests micro estimate          # GPU parity tests, fused_lora microbenchmark, estimator
#   bash benchmarks/run_gpu.sh e2e-1b                         # 1.1B shape, bf16, every mode, profiled
#   bash benchmarks/run_gpu.sh e2e-1b-dora                    # 1.1B shape, DoRA: ours fused, ours eager, PEFT
#   bash benchmarks/run_gpu.sh e2e-8b                         # 8B shape, bf16 (full fine-tuning does not fit)
#   bash benchmarks/run_gpu.sh e2e-8b-nf4                     # 8B shape, NF4 base
#   bash benchmarks/run_gpu.sh qlora-8b qlora-8b-ceiling      # NF4Precision against PEFT QLoRA and the 4-bit ceiling
#
# Wheels of packages the machine lacks (bitsandbytes, liger-kernel) are installed from .whl/ when that folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'EOF' | tee "$OUT_DIR/env.txt"
from importlib.metadata import PackageNotFoundError, version
import torch
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("torch", "triton", "transformers", "peft", "lightning", "bitsandbytes", "liger-kernel"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "missing")
EOF

status=0
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case "$stage" in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT_DIR/tests.log" | tail -5 ;;
    micro)
      python3 benchmarks/bench_fused_lora.py --nf4 --profile --json >"$OUT_DIR/micro.jsonl" \
        && python3 benchmarks/record_results.py "$OUT_DIR" --only micro ;;
    estimate)
      python3 benchmarks/estimate_vs_measured.py --json >"$OUT_DIR/estimate.jsonl" \
        && python3 benchmarks/record_results.py "$OUT_DIR" --only estimate ;;
    e2e-1b)
      python3 benchmarks/bench_lora_e2e.py --size 1b --batch 4 --seq 2048 --profile 2 --json "$OUT_DIR/e2e-1b.json" ;;
    e2e-1b-dora)
      python3 benchmarks/bench_lora_e2e.py --size 1b --batch 4 --seq 2048 --profile 2 \
        --modes ours_dora,ours_dora_nokernels,peft_dora,ceiling_liger --json "$OUT_DIR/e2e-1b-dora.json" ;;
    e2e-8b)
      python3 benchmarks/bench_lora_e2e.py --size 8b --batch 2 --seq 2048 --profile 2 \
        --modes ours,ours_nokernels,peft,peft_liger,ceiling,ceiling_liger --json "$OUT_DIR/e2e-8b.json" ;;
    e2e-8b-nf4)
      python3 benchmarks/bench_lora_e2e.py --size 8b --batch 2 --seq 2048 --quant nf4 --profile 2 \
        --modes ours,peft,peft_liger,ceiling,ceiling_liger --json "$OUT_DIR/e2e-8b-nf4.json" ;;
    qlora-8b)
      python3 benchmarks/bench_qlora_e2e.py --size 8b --batch 2 --seq 2048 --modes ours,ours_nokernels,peft \
        --checkpoint "${TMPDIR:-/tmp}/zenft-llama8b-bf16" --json "$OUT_DIR/qlora-8b.json" ;;
    qlora-8b-ceiling)
      python3 benchmarks/bench_qlora_e2e.py --size 8b --batch 2 --seq 2048 --modes peft_liger,ceiling,ceiling_liger \
        --checkpoint "${TMPDIR:-/tmp}/zenft-llama8b-bf16" --json "$OUT_DIR/qlora-8b-ceiling.json" \
        && python3 benchmarks/bench_qlora_e2e.py --verdicts "$OUT_DIR/qlora-8b.json" "$OUT_DIR/qlora-8b-ceiling.json" ;;
    *)
      echo "unknown stage $stage: tests, micro, estimate, e2e-1b, e2e-1b-dora, e2e-8b, e2e-8b-nf4, qlora-8b," \
        "qlora-8b-ceiling"; status=2; continue ;;
  esac
  rc=$?
  [ $rc -ne 0 ] && status=$rc && echo "stage $stage failed with exit code $rc"
done
exit $status
