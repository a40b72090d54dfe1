#!/usr/bin/env bash
# Issue 9 device run (H100): `blocks bench serve` at saturation against `blocks serve`, then the offline engine
# (`blocks bench throughput`) on exactly the same workload (same seed, prompts and output lengths), and the ratio
# of their output tokens/s (target: serve >= 90% of offline). Dummy weights at a named shape: no files, no tokenizer.
#
# Usage, repo root on the device machine (fastapi, uvicorn, pydantic, ... travel as wheels in .whl, see
# /work/.library/device/README.md "Notes"; carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; bash benchmarks/device_serve.sh
# On a CPU with the embedded default model and small counts (checks the script, numbers mean nothing):
#   MODEL=default LOAD_FORMAT=auto DEVICE=cpu NUM_PROMPTS=12 INPUT_LEN_RANGE="8 32" OUTPUT_LEN_RANGE="4 16" \
#     MAX_MODEL_LEN=128 KV_CACHE_MEMORY_BYTES=33554432 bash benchmarks/device_serve.sh
#
# Settings (environment): MODEL (llama-3-8b; "default" = the embedded default model), LOAD_FORMAT (dummy),
# NUM_PROMPTS (400), INPUT_LEN_RANGE ("128 1024"), OUTPUT_LEN_RANGE ("128 512"), CONCURRENCY (256),
# MAX_MODEL_LEN (2048), MAX_NUM_SEQS (256), DEVICE (auto), DTYPE (auto), KV_CACHE_MEMORY_BYTES (unset),
# WARMUP_PROMPTS (32), PORT (8765), BUDGET_S (540: every step's timeout is cut to fit the time left).
# Writes under ${OUT:-/tmp/serve_out}: summary.json (the figures below) and serve_all.tar.gz (serve.json,
# offline.json, server.log, serve_metrics.txt = the server's /metrics after the run, the logs; the device tool
# returns at most 8 files). Prints one SUMMARY line at the end.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FINAL=${OUT:-/tmp/serve_out}
OUT=$(mktemp -d)
mkdir -p "$FINAL"
MODEL=${MODEL:-llama-3-8b}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
NUM_PROMPTS=${NUM_PROMPTS:-400}
INPUT_LEN_RANGE=${INPUT_LEN_RANGE:-128 1024}
OUTPUT_LEN_RANGE=${OUTPUT_LEN_RANGE:-128 512}
CONCURRENCY=${CONCURRENCY:-256}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}
WARMUP_PROMPTS=${WARMUP_PROMPTS:-32}
PORT=${PORT:-8765}
BUDGET_S=${BUDGET_S:-540}
START=$SECONDS

if [ "$MODEL" = default ]; then
  MODEL=$(python3 -c "from blocks.default_model_path import default_model_path; print(default_model_path())") || exit 1
fi
# the vocabulary the offline benchmark draws prompt ids from (its engine's vocab_size), so both send the same ids
VOCAB=$(python3 - "$MODEL" <<'PY'
import json, os, sys
from blocks.engine.shapes import MODEL_SHAPES
m = sys.argv[1]
print(MODEL_SHAPES[m.lower()]["vocab_size"] if m.lower() in MODEL_SHAPES
      else json.load(open(os.path.join(m, "config.json")))["vocab_size"])
PY
) || { echo "cannot find the vocabulary size of $MODEL"; exit 1; }

left() {  # seconds for the next step: min(wanted, what the budget has left minus a reserve for the rest)
  local want=$1 rest=$((BUDGET_S - (SECONDS - START) - ${2:-0}))
  [ "$rest" -lt 5 ] && rest=5
  [ "$want" -lt "$rest" ] && echo "$want" || echo "$rest"
}

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } \
  | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
echo "model $MODEL ($LOAD_FORMAT), $NUM_PROMPTS prompts, input U[$INPUT_LEN_RANGE], output U[$OUTPUT_LEN_RANGE]," \
  "vocab $VOCAB, concurrency $CONCURRENCY, max_num_seqs $MAX_NUM_SEQS, max_model_len $MAX_MODEL_LEN"

ENGINE_ARGS=(--load-format "$LOAD_FORMAT" --device "$DEVICE" --dtype "$DTYPE" --max-model-len "$MAX_MODEL_LEN"
             --max-num-seqs "$MAX_NUM_SEQS")
[ -n "${KV_CACHE_MEMORY_BYTES:-}" ] && ENGINE_ARGS+=(--kv-cache-memory-bytes "$KV_CACHE_MEMORY_BYTES")
# shellcheck disable=SC2206
WORKLOAD=(--input-len-range $INPUT_LEN_RANGE --output-len-range $OUTPUT_LEN_RANGE)

# ---- 1. the server (own session, so it and its engine process can be killed as a group) ----
# the offline benchmark runs without a tokenizer and without prefix caching: the server too
setsid python3 -m blocks.cli serve "$MODEL" "${ENGINE_ARGS[@]}" --host 127.0.0.1 --port "$PORT" \
  --served-model-name bench --skip-tokenizer-init --no-enable-prefix-caching --uvicorn-log-level warning \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
stop_server() {
  kill -0 "$SERVER" 2>/dev/null || return 0
  kill -TERM "$SERVER" 2>/dev/null
  for _ in $(seq 1 "${1:-30}"); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
  kill -KILL -- -"$SERVER" 2>/dev/null  # the group: whatever is left of the server and its engine process
  wait "$SERVER" 2>/dev/null
}
trap 'stop_server 5' EXIT
START_LIMIT=$(left 240 200)
python3 - "$PORT" "$SERVER" "$START_LIMIT" <<'PY'
import os, sys, time, urllib.request
port, pid, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
t0 = time.time()
while time.time() - t0 < limit:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("server exited during start-up (see server.log)")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            print(f"server ready after {time.time() - t0:.1f} s"); sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"server not ready after {limit:.0f} s")
PY
READY=$?
if [ "$READY" -ne 0 ]; then
  tail -30 "$OUT/server.log"
else
  BENCH=(python3 -m blocks.cli bench serve --base-url "http://127.0.0.1:$PORT/v1" --model bench --vocab-size "$VOCAB")
  # warm-up (first prefill and decode shapes, Triton compiles) on other prompts (seed 1), not timed
  timeout "$(left 90 200)" "${BENCH[@]}" --num-prompts "$WARMUP_PROMPTS" --max-concurrency "$WARMUP_PROMPTS" \
    --input-len-range $INPUT_LEN_RANGE --output-len-range 8 16 --seed 1 > "$OUT/serve_warmup.log" 2>&1
  echo "serve warm-up exit $?"
  timeout "$(left 200 150)" "${BENCH[@]}" --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" \
    "${WORKLOAD[@]}" --seed 0 --output-json "$OUT/serve.json" > "$OUT/serve.log" 2>&1
  echo "serve bench exit $?"
  tail -32 "$OUT/serve.log" | grep -E "completed|failed|duration|output_tokens|ttft|tpot|wrong|error" | tr -s ' '
  python3 -c "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen(
    'http://127.0.0.1:$PORT/metrics', timeout=5).read().decode())" > "$OUT/serve_metrics.txt" 2>&1
  grep -E "^blocks:num_preemptions|^blocks:num_requests_(running|waiting)" "$OUT/serve_metrics.txt"
fi
stop_server 30
echo "server stopped ($((SECONDS - START)) s so far)"
tail -3 "$OUT/server.log"
grep -E "^engine loop:" "$OUT/server.log"  # the engine process's own time split (printed at its shutdown)
# the GPU memory of the engine process must be free before the offline engine sizes its KV cache
if command -v nvidia-smi >/dev/null; then
  for _ in $(seq 1 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break; sleep 1
  done
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
fi

# ---- 2. the offline engine on the same workload (seed 0 in both) ----
OFF_ARGS=(--model "$MODEL" "${ENGINE_ARGS[@]}")
timeout "$(left 300 5)" python3 -m blocks.cli bench throughput "${OFF_ARGS[@]}" --num-prompts "$NUM_PROMPTS" \
  "${WORKLOAD[@]}" --output-json "$OUT/offline.json" > "$OUT/offline.log" 2>&1
echo "offline bench exit $?"

# ---- 3. the figures ----
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
serve, off = load("serve.json"), load("offline.json")
s = serve and serve.get("output_tokens_per_s")
o = off and off.get("output_tokens_per_s")
ratio = s / o if s and o else None
same = bool(serve and off and serve.get("output_tokens") == off.get("output_tokens")
            and serve.get("input_tokens") == off.get("input_tokens"))
summary = {"serve_output_tokens_per_s": s, "offline_output_tokens_per_s": o, "ratio": ratio, "target": 0.9,
           "met": None if ratio is None else ratio >= 0.9, "same_token_counts": same}
if serve:
    summary.update({f"serve_{k}": serve.get(k) for k in ("completed", "failed", "wrong_output_lengths", "duration_s",
                    "input_tokens", "output_tokens", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms",
                    "p50_itl_ms", "p99_itl_ms", "first_error") if k in serve})
if off:
    summary.update({f"offline_{k}": off.get(k) for k in ("elapsed_s", "input_tokens", "output_tokens", "steps",
                    "device") if k in off})
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
print(f"SUMMARY serve {fmt(s)} output tok/s | offline {fmt(o)} output tok/s | ratio "
      f"{'n/a' if ratio is None else f'{ratio:.3f}'} (target >= 0.90) | same workload token counts: {same} | "
      f"serve completed {serve and serve.get('completed')} failed {serve and serve.get('failed')}")
PY
echo "total $((SECONDS - START)) s"
cp "$OUT/summary.json" "$FINAL/" 2>/dev/null
tar czf "$FINAL/serve_all.tar.gz" -C "$OUT" .
