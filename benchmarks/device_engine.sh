#!/usr/bin/env bash
# Issue 7 device run (H100): engine GPU tests, then end-to-end latency/throughput at real shapes
# with dummy weights. Usage (repo root, on the device machine): bash benchmarks/device_engine.sh
# Writes *.json and logs under $OUT (default /tmp/engine_out).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/engine_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider -x tests/engine/test_engine_gpu.py \
  2>&1 | tee "$OUT/engine_tests.log" | tail -8
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m blocks.cli bench "$@" --output-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"; python3 - "$OUT/$name.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("  no result:", e); sys.exit()
keys = ("decode_ms_per_step", "host_ms_per_step", "prefill_s", "output_tokens_per_s", "total_tokens_per_s",
        "fraction_of_floor", "ratio_vs_hf", "steps", "elapsed_s")
print("  ", {k: round(r[k], 3) for k in keys if k in r}, "peer:", r.get("peer_hf"))
PY
}
run lat_llama8b 110 latency --model llama-3-8b --batch-size 1 --input-len 128 --output-len 128 --num-iters 2 \
  --max-num-seqs 8 --max-model-len 2048
run lat_qwen05b 60 latency --model qwen2.5-0.5b --batch-size 1 --input-len 128 --output-len 128 --num-iters 2 \
  --max-num-seqs 8 --max-model-len 2048
run thr_llama8b ${THR_TIMEOUT:-130} throughput --model llama-3-8b --num-prompts ${THR_PROMPTS:-300} \
  --max-model-len 2048 --peer hf --peer-num-prompts 32 --peer-batch-size 32 --bandwidth-tbps 3.0
tail -5 "$OUT/thr_llama8b.log"
