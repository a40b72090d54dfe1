#!/usr/bin/env bash
# Every block's GPU work in two device calls (each fits the 10-minute limit of one call):
#   bash benchmarks/device_all.sh tests-kernels   # all GPU tests, then attention + sampler + block-copy benchmarks
#   bash benchmarks/device_all.sh engine          # engine GPU tests and end-to-end latency/throughput
#   bash benchmarks/device_all.sh tests-profile   # all GPU tests, then benchmarks/engine_profile.py at batch 1
#   bash benchmarks/device_all.sh engine-tp       # issue 7 latency/throughput, then TP=2 tests and benchmarks
#   bash benchmarks/device_all.sh gemv            # the opt-in Triton skinny GEMM against cuBLAS, A/B profiles
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
  engine-tp)  # issue 7 engine figures on GPU 0, then issue 10's TP=2 vs TP=1 (needs two GPUs). PARTS picks
    # some of: tp-smoke tp-tests lat lat-llama lat-tp thr thr-qwen thr-llama-hf thr-llama thr-tp (default: lat thr
    # tp-tests lat-tp thr-tp; thr = thr-qwen + thr-llama-hf).
    # Results go straight to $OUT (results.jsonl, engine_tp.log), so a run stopped at its time limit still
    # returns what finished.
    PARTS=${PARTS:-"lat thr tp-tests lat-tp thr-tp"}
    LOG="$FINAL/engine_tp.log"
    nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"
    bench() {  # name, timeout, args...
      local name=$1 limit=$2; shift 2
      timeout "$limit" python3 -m blocks.cli bench "$@" --output-json "$W/$name.json" >> "$LOG" 2>&1
      local rc=$?
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r['name']=sys.argv[2]; print(json.dumps(r))" \
        "$W/$name.json" "$name" >> "$FINAL/results.jsonl" 2>/dev/null
      echo "$name exit $rc $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: round(v, 4) \
        for k, v in r.items() if isinstance(v, float)}, 'peer:', r.get('peer_hf'))" "$W/$name.json" 2>&1 | tail -1)"
    }
    L="--max-model-len 2048 --num-iters ${LAT_ITERS:-2} --input-len 128 --output-len ${LAT_OUT:-128}"
    T="--max-model-len 2048 --num-prompts ${THR_PROMPTS:-1000} --bandwidth-tbps 3.0"
    for part in $PARTS; do
      case $part in
        lat)
          bench lat_qwen_b1 90 latency --model qwen2.5-0.5b --batch-size 1 --max-num-seqs 8 $L
          bench lat_qwen_b256 90 latency --model qwen2.5-0.5b --batch-size 256 $L
          bench lat_llama_b1 120 latency --model llama-3-8b --batch-size 1 --max-num-seqs 8 $L ;;
        lat-llama) bench lat_llama_b1 60 latency --model llama-3-8b --batch-size 1 --max-num-seqs 8 $L ;;
        thr)
          bench thr_qwen 150 throughput --model qwen2.5-0.5b $T --peer hf --peer-num-prompts 32 \
            --gpu-memory-utilization 0.6
          bench thr_llama 200 throughput --model llama-3-8b $T --peer hf --peer-num-prompts 32 \
            --gpu-memory-utilization 0.6 ;;
        tp-smoke)  # 15 s when it works; on a hang every process prints its stacks after 60 s
          timeout 90 python3 benchmarks/tp_smoke.py graphs 60 >> "$LOG" 2>&1; echo "tp smoke exit $?"
          grep -E "^graphs:" "$LOG" | tail -3 ;;
        tp-tests)
          timeout "${TP_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/engine/test_engine_tp_gpu.py \
            >> "$LOG" 2>&1; echo "tp tests exit $?"; grep -E "passed|failed|Error" "$LOG" | tail -3 ;;
        lat-tp) bench lat_llama_b1_tp2 90 latency --model llama-3-8b --batch-size 1 --max-num-seqs 8 $L -tp 2 ;;
        thr-qwen) bench thr_qwen 150 throughput --model qwen2.5-0.5b $T --peer hf --peer-num-prompts 32 \
            --gpu-memory-utilization 0.6 ;;
        thr-llama-hf) bench thr_llama 200 throughput --model llama-3-8b $T --peer hf --peer-num-prompts 32 \
            --gpu-memory-utilization 0.6 ;;
        thr-llama) bench thr_llama 150 throughput --model llama-3-8b $T ;;  # TP=1, no peer: beside thr-tp
        thr-tp) bench thr_llama_tp2 150 throughput --model llama-3-8b $T -tp 2 ;;
      esac
    done
    ;;
  gemv)  # the opt-in Triton skinny GEMM: its GPU tests, cuBLAS vs Triton per shape, then A/B engine profiles
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_triton_gemv.py 2>&1 | tail -2
    timeout 150 python3 benchmarks/gemv_bench.py --json "$FINAL/gemv.json" 2>&1 | tee "$FINAL/gemv.log"
    for m in qwen2.5-0.5b llama-3-8b; do
      for flag in 0 1; do
        BLOCKS_SKINNY_GEMM=$flag timeout 120 python3 benchmarks/engine_profile.py --model "$m" --steps 40 \
          --json "$W/ab_${m}_$flag.json" > "$W/ab_${m}_$flag.log" 2>&1
        echo "$m BLOCKS_SKINNY_GEMM=$flag: $(grep -E "step wall|GPU alone" "$W/ab_${m}_$flag.log" | tr -s ' ')"
      done
    done
    ;;
  *) echo "usage: $0 tests-kernels|engine|tests-profile|engine-tp|gemv"; exit 2 ;;
esac
tar czf "$FINAL/all.tar.gz" -C "$W" .
