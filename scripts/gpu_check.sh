#!/usr/bin/env bash
# GPU check (issue 19, item 5): a few minutes on one CUDA GPU.
#
#   scripts/gpu_check.sh OUT_DIR            # on a GPU machine
#   scripts/gpu_check.sh OUT_DIR --dry-run  # anywhere: every step at tiny sizes on the CPU (checks the
#                                           # commands and the JSON they write; no figure is meaningful)
#
# Steps (each writes JSON under OUT_DIR; a failing step is recorded and the others still run):
#   1. the CUDA tests (pytest -m gpu)                          -> gpu_tests.xml (junit) + gpu_tests.log
#   2. AttnRes overhead, bf16, hidden 4096 / 32 layers / S=8 / seq 4096, prefill + decode -> overhead.json
#   3. real-kernel variants (bitsandbytes, torchao int4/int8/float8, FP8 W8A8)   -> kernels.json
#   4. K-quant packing on the GPU vs the numpy packer (same bytes)               -> kquant.json
#   5. the default study (configs/int4_hybrid.yaml) on --device cuda             -> study/int4_hybrid/results.json
# summary.json lists each step's exit status, seconds and output file.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-}"
MODE="${2:-}"
if [[ -z "$OUT" || "$OUT" == -* ]]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run]" >&2
  exit 2
fi
if [[ -n "$MODE" && "$MODE" != "--dry-run" ]]; then
  echo "gpu_check: unknown option '$MODE' (only --dry-run)" >&2
  exit 2
fi
mkdir -p "$OUT" || { echo "gpu_check: cannot create output folder '$OUT'" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

if [[ "$MODE" == "--dry-run" ]]; then
  DEV=cpu
  OVERHEAD=(--dtype float32 --hidden-size 128 --layers 4 --block-size 2 --seq-len 16 --batch-size 1
            --vocab-size 512 --decode-tokens 2 --warmup 0 --repeats 1 --variants block)
  KERNELS=(--dtype bfloat16 --hidden-size 128 --layers 2 --seq-len 8 --vocab-size 512 --decode-tokens 2
           --warmup 0 --repeats 1 --variants bf16,torchao_int8_wo,torchao_float8_wo,bnb_nf4)
  KQUANT=(--weights 65536 --repeats 1)
  STUDY=(--limit 2 --set bench.enabled=false)
  TESTS=(--collect-only)
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False). Run this on a GPU" \
         "machine with a CUDA build of torch, or pass --dry-run to check the steps on the CPU." >&2
    exit 3
  fi
  DEV=cuda
  # The paper's setting (Block AttnRes S=8 < 2 % overhead): standard vs block, bf16, batch 1.
  OVERHEAD=(--dtype bfloat16 --hidden-size 4096 --layers 32 --block-size 8 --seq-len 4096 --batch-size 1
            --decode-tokens 32 --warmup 1 --repeats 5 --variants block)
  KERNELS=(--dtype bfloat16 --hidden-size 4096 --layers 8 --seq-len 1024 --decode-tokens 32 --warmup 1 --repeats 5
           --variants bf16,torchao_int8_wo,torchao_int8_dyn,torchao_int4_wo,torchao_float8_wo,torchao_float8_dyn,bnb_int8,bnb_nf4)
  KQUANT=(--weights 16777216 --repeats 3)
  STUDY=()
  TESTS=()
fi

declare -a SUMMARY=()
step() {  # step NAME OUTPUT_FILE TIMEOUT_S COMMAND...
  local name="$1" file="$2" limit="$3"; shift 3
  echo "== gpu_check: $name" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"output\": \"$file\"}")
  echo "   rc=$rc ($((SECONDS - t0)) s; log $OUT/$name.log)" >&2
}

step gpu_tests gpu_tests.xml 900 "$PY" -m pytest -q -m gpu tests "${TESTS[@]}" --junitxml "$OUT/gpu_tests.xml"
step overhead overhead.json 900 "$PY" -m attnres_quant bench overhead --device "$DEV" "${OVERHEAD[@]}" \
  --json --output "$OUT/overhead.json"
step kernels kernels.json 900 "$PY" -m attnres_quant bench kernels --device "$DEV" "${KERNELS[@]}" \
  --json --output "$OUT/kernels.json"
step kquant kquant.json 600 "$PY" -m attnres_quant bench kquant --device "$DEV" "${KQUANT[@]}" \
  --json --output "$OUT/kquant.json"
step study study/int4_hybrid/results.json 1800 "$PY" -m attnres_quant run configs/int4_hybrid.yaml \
  --device "$DEV" --out "$OUT/study" "${STUDY[@]}"

{
  echo "{\"device\": \"$DEV\", \"dry_run\": $([[ "$MODE" == "--dry-run" ]] && echo true || echo false),"
  echo " \"date_utc\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"steps\": ["
  (IFS=,; echo "  ${SUMMARY[*]}")
  echo "]}"
} > "$OUT/summary.json"
echo "gpu_check: wrote $OUT/summary.json" >&2
failed=0
for s in "${SUMMARY[@]}"; do [[ "$s" == *'"rc": 0,'* ]] || failed=1; done
exit $failed
