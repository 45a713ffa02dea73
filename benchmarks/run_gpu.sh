#!/usr/bin/env bash
# Every GPU measurement of the fused kernels, the memory estimator and their parity tests, in stages that each fit
# a 10-minute run on one H100. Results (JSON) and logs go to $OUT (default: benchmarks/out); then
#   python benchmarks/record_results.py benchmarks/out      # prints the tables for RESULTS.md
#
#   bash benchmarks/run_gpu.sh quick                          # the headline table in one command of <= 8 minutes
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

# `quick`: every part under one deadline (QUICK_SECONDS, default 450 s from here; the wheels and the probe above take
# about 20 s more): each part gets at most its cap and what is left, and a part that would get under 20 s is skipped
# and marked "not run" in the table.
quick_deadline=$((SECONDS + ${QUICK_SECONDS:-450}))
quick_part() {  # quick_part CAP_SECONDS OUTFILE command...: min(CAP, time left); stdout appended to OUTFILE
  local cap=$1 out=$2 left=$((quick_deadline - SECONDS))
  shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then echo "  skipped (time): $*" | tee -a "$OUT_DIR/quick.log"; return 124; fi
  echo "  $(date -u +%H:%M:%S) (${cap}s max) $*" | tee -a "$OUT_DIR/quick.log"
  timeout -k 10 "$cap" "$@" >>"$out" 2>>"$OUT_DIR/quick.log"
  local rc=$?
  [ $rc -ne 0 ] && echo "  exit $rc (124: stopped at its time limit)" | tee -a "$OUT_DIR/quick.log"
  return $rc
}

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
    quick)
      # Seven files: env.txt, quick.log (every part's output), quick-tests.xml, micro.jsonl, e2e-1b.json,
      # e2e-8b.json, headline.json. Liger's ceiling when its wheel is there (the targets' reference), else the plain
      # frozen model.
      rm -f "$OUT_DIR/micro.jsonl" "$OUT_DIR/quick-tests.xml" "$OUT_DIR/e2e-1b.json" "$OUT_DIR/e2e-8b.json"
      ceiling=ceiling_liger
      python3 -c "import liger_kernel" 2>/dev/null || ceiling=ceiling
      quick_part 100 "$OUT_DIR/quick.log" python3 -m pytest -q -p no:cacheprovider \
        tests/kernels/test_fused_kernels_gpu.py -k "fused_lora_real_shapes or dual_lowrank or mlp_and_nf4" \
        --junitxml "$OUT_DIR/quick-tests.xml"
      quick_part 70 "$OUT_DIR/micro.jsonl" python3 benchmarks/bench_fused_lora.py --shapes 4096x4096,4096x14336 \
        --cases eager,fused --warmup 3 --reps 10 --json
      quick_part 120 "$OUT_DIR/quick.log" python3 benchmarks/bench_lora_e2e.py --size 1b --batch 4 --seq 2048 \
        --modes "ours,$ceiling,peft" --warmup 2 --steps 4 --json "$OUT_DIR/e2e-1b.json"
      quick_part 160 "$OUT_DIR/quick.log" python3 benchmarks/bench_lora_e2e.py --size 8b --batch 2 --seq 2048 \
        --modes "ours,$ceiling,peft" --warmup 2 --steps 3 --json "$OUT_DIR/e2e-8b.json"
      python3 benchmarks/record_results.py "$OUT_DIR" --headline ;;  # exit 1 when a row was not run
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
      echo "unknown stage $stage: quick, tests, micro, estimate, e2e-1b, e2e-1b-dora, e2e-8b, e2e-8b-nf4, qlora-8b," \
        "qlora-8b-ceiling"; status=2; continue ;;
  esac
  rc=$?
  [ $rc -ne 0 ] && status=$rc && echo "stage $stage failed with exit code $rc"
done
exit $status
