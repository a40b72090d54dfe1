#!/usr/bin/env bash
# Issue 4 device run (H100): attention GPU tests, then the benchmark suite, then a short table.
# Usage (repo root, on the device machine): bash benchmarks/device_attention.sh [sweep]
# Writes tests.log, bench.log, bench.json(l) under $OUT (default /tmp/attn_out).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/attn_out}
mkdir -p "$OUT"
if [ "${1:-}" = "sweep" ]; then export BENCH_ATTN_SWEEP=1; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider tests/attention ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" \
    | grep -E "passed|failed|FAILED|Error" | tail -25
fi
rm -f "$OUT/bench.jsonl"
BENCH_ATTN_OUT="$OUT/bench.jsonl" timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -s \
  benchmarks/test_bench_attention.py --benchmark-only --benchmark-json="$OUT/bench.json" ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -E "sweep|failed|Error|passed" "$OUT/bench.log" | tail -60
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if sys.argv[1:] else []
print(f"{'benchmark':34s} {'ours us':>9s} {'TB/s':>6s} {'TFLOP/s':>8s} {'%ceil':>6s} {'SDPA us':>9s} {'TB/s':>6s} {'TFLOP/s':>8s} {'x SDPA':>7s}  extra")
for r in rows:
    if r["name"] == "stream-read ceiling":
        print(f"{r['name']:34s} {'':>9s} {r['ours_TBps']:6.2f}")
        continue
    extra = {k: r[k] for k in ("num_splits", "block_n", "sweep_best_us", "sweep_best") if k in r}
    peer = (f"{r['peer_us']:9.1f} {r['peer_TBps']:6.2f} {r['peer_TFLOPs']:8.1f} {r['speedup_vs_peer']:7.2f}"
            if "peer_us" in r else f"{'-':>9s} {'-':>6s} {'-':>8s} {'-':>7s}")
    print(f"{r['name']:34s} {r['ours_us']:9.1f} {r['ours_TBps']:6.2f} {r['ours_TFLOPs']:8.1f} {r['pct_of_ceiling']:6.1f} {peer}  {extra}")
PY
