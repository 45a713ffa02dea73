#!/usr/bin/env bash
# The sharded-training checks that need a GPU, in stages of a few minutes each on one H100/H200. Results and logs go to
# $OUT (default: benchmarks/out).
#
#   bash benchmarks/run_gpu_fsdp.sh fsdp-tests         # tests/strategies on the GPU: FSDP1, FSDP2's CUDA paths
#   bash benchmarks/run_gpu_fsdp.sh fsdp-example       # examples/fsdp_full_finetune.py, 1.1B shape, one GPU: memory
#   bash benchmarks/run_gpu_fsdp.sh fsdp-yaml          # zenft fit --config examples/fsdp_qlora.yaml, one GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODEL=/tmp/zenft-llama-1b
model() { [ -d "$MODEL" ] || python3 benchmarks/fsdp_example_model.py --size 1b --out "$MODEL"; }

status=0
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case "$stage" in
    fsdp-tests)
      python3 -m pytest -q -p no:cacheprovider tests/strategies 2>&1 | tee "$OUT_DIR/fsdp-tests.log" | tail -5 ;;
    fsdp-example)
      model && python3 examples/fsdp_full_finetune.py --model "$MODEL" --devices 1 --max-steps 20 --batch-size 4 \
        --max-length 1024 --activation-checkpointing --out /tmp/zenft-fsdp-example | tail -1 >"$OUT_DIR/fsdp-example.json" \
        && python3 -m lightning_zenft.cli estimate --model "$MODEL" --method full --batch 4 --seq 1024 \
          --checkpointing --json >"$OUT_DIR/fsdp-example-estimate.json" \
        && cat "$OUT_DIR/fsdp-example.json" "$OUT_DIR/fsdp-example-estimate.json" ;;
    fsdp-yaml)
      model && python3 -m lightning_zenft.cli fit --config examples/fsdp_qlora.yaml --model.model "$MODEL" \
        --trainer.devices=1 --trainer.max_steps=20 --data.max_length=1024 \
        --trainer.default_root_dir=/tmp/zenft-fsdp-yaml 2>&1 | tee "$OUT_DIR/fsdp-yaml.log" | tail -5 ;;
    *)
      echo "unknown stage $stage: fsdp-tests, fsdp-example, fsdp-yaml"; status=2; continue ;;
  esac
  rc=$?
  [ $rc -ne 0 ] && status=$rc && echo "stage $stage failed with exit code $rc"
done
exit $status
