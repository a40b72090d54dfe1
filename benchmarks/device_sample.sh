#!/usr/bin/env bash
# Issue 5 device run (H100): sampler tests (GPU ones included), then the CUDA benchmarks, then a table.
# Usage (repo root, on the device machine): bash benchmarks/device_sample.sh
# Writes gpu.txt, tests.log, bench.log, bench.jsonl under $OUT (default /tmp/sample_out).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/sample_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests/sample --durations=6 ${TEST_ARGS:-} \
    2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error|s call" | tail -25
fi
rm -f "$OUT/bench.jsonl"
BENCH_SAMPLE_SWEEP=${BENCH_SAMPLE_SWEEP:-1} BENCH_SAMPLE_OUT="$OUT/bench.jsonl" timeout "${BENCH_TIMEOUT:-200}" \
  python3 -m pytest -q -p no:cacheprovider -s benchmarks/test_bench_sample.py --benchmark-only -k cuda \
  > "$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -E "sweep|kind|kernel GPU|random keys|failed|Error|passed" "$OUT/bench.log" | tail -40
python3 - "$OUT/bench.jsonl" <<'PY'
import json, os, sys
path = sys.argv[1]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
print(f"{'benchmark':44s} {'batch x vocab':>14s} {'us':>9s} {'GB/s (1 read)':>14s}  extra")
for r in rows:
    extra = {k: round(r[k], 1) if isinstance(r[k], float) else r[k] for k in ("target_us", "gpu_us_host_ahead", "do_bench_us", "gpu_us_random_keys_median",
             "host_us_per_call", "sweep_best_us", "sweep_best") if k in r}
    print(f"{r['name']:44s} {str(r['batch']) + 'x' + str(r['vocab']):>14s} {r['us']:9.1f} "
          f"{r['logits_read_once_GBps']:14.0f}  {extra}")
PY
