#!/usr/bin/env bash
# Every block's GPU work in two device calls (each fits the 10-minute limit of one call):
#   bash benchmarks/device_all.sh tests-kernels   # all GPU tests, then attention + sampler + block-copy benchmarks
#   bash benchmarks/device_all.sh engine          # engine GPU tests and end-to-end latency/throughput
#   bash benchmarks/device_all.sh tests-profile   # all GPU tests, then benchmarks/engine_profile.py at batch 1
# Logs go to a work folder and come back as one archive, $OUT/all.tar.gz (the device tool returns at most
# 8 files), plus the summary printed here.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FINAL=${OUT:-/tmp/all_out}
W=$(mktemp -d)
mkdir -p "$FINAL"
case "${1:-tests-kernels}" in
  tests-kernels)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu --ignore=tests/serve tests 2>&1 | tee "$W/gpu_tests.log" \
      | grep -E "passed|failed|FAILED|Error" | tail -20
    timeout 90 python3 -m pytest -q -p no:cacheprovider -s benchmarks/test_bench_cache.py --benchmark-only -k gpu \
      > "$W/cache_bench.log" 2>&1; echo "cache bench exit $?"; grep -E "GB/s|passed|failed" "$W/cache_bench.log" | tail -5
    OUT="$W/sample" SKIP_TESTS=1 BENCH_TIMEOUT=120 bash benchmarks/device_sample.sh
    OUT="$W/attn" SKIP_TESTS=1 BENCH_TIMEOUT=160 bash benchmarks/device_attention.sh
    ;;
  engine)
    OUT="$W/engine" bash benchmarks/device_engine.sh
    ;;
  tests-profile)  # all GPU tests, then where a batch-1 decode step spends its time (host phases, GPU, ops)
    timeout 220 python3 -m pytest -q -p no:cacheprovider -m gpu --ignore=tests/serve tests 2>&1 | tee "$W/gpu_tests.log" \
      | grep -E "passed|failed|FAILED|Error" | tail -25
    for m in qwen2.5-0.5b llama-3-8b; do
      timeout 150 python3 benchmarks/engine_profile.py --model "$m" --batch-size 1 --steps 40 \
        --trace "$W/trace_$m.json" --json "$W/profile_$m.json" > "$W/profile_$m.log" 2>&1
      echo "profile $m exit $?"; grep -B2 -A45 "decode steps" "$W/profile_$m.log" | cut -c1-150
    done
    ;;
  *) echo "usage: $0 tests-kernels|engine|tests-profile"; exit 2 ;;
esac
tar czf "$FINAL/all.tar.gz" -C "$W" .
