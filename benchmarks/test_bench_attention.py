"""PagedAttention GPU benchmarks (issue 4): our kernels beside torch SDPA on a contiguous cache.

Run on a CUDA machine: ``python3 -m pytest benchmarks/test_bench_attention.py --benchmark-only``.
Each test puts its figures in ``benchmark.extra_info``: median seconds (CUDA events, L2 flushed
before each iteration) of our kernel and of the peer, KV-read TB/s, TFLOP/s, ratio to the peer,
and the fraction of the streaming-read ceiling measured in the same process. With
``BENCH_ATTN_OUT=path`` every row is also appended to that JSON-lines file (the device script
prints a table from it); ``BENCH_ATTN_SWEEP=1`` also times a few tile/split configurations.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.attention_common import (
    DECODE_SHAPES,
    HEAD_DIM,
    decode_inputs,
    mixed_inputs,
    prefill_inputs,
    stream_read_ceiling,
    time_cuda,
)
from blocks.attention.triton_backend import TritonAttentionBackend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_CEILING: dict[str, float] = {}
SCALE = 128**-0.5


def _ceiling() -> float:
    if "read" not in _CEILING:
        _CEILING["read"] = stream_read_ceiling()
    return _CEILING["read"]


def _record(benchmark, name: str, t_ours: float, t_peer: float | None, inputs, **extra) -> None:
    row = {
        "name": name,
        "card": torch.cuda.get_device_name(),
        "ours_us": t_ours * 1e6,
        "ours_TBps": inputs.kv_bytes / t_ours / 1e12,
        "ours_TFLOPs": inputs.flops / t_ours / 1e12,
        "read_ceiling_TBps": _ceiling() / 1e12,
        "pct_of_ceiling": 100 * inputs.kv_bytes / t_ours / _ceiling(),
        **extra,
    }
    if t_peer is not None:
        row.update(
            peer_us=t_peer * 1e6,
            peer_TBps=inputs.kv_bytes / t_peer / 1e12,
            peer_TFLOPs=inputs.flops / t_peer / 1e12,
            speedup_vs_peer=t_peer / t_ours,
        )
    benchmark.extra_info.update(row)
    path = os.environ.get("BENCH_ATTN_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _attend_fn(backend, inputs, **kw):
    md = backend.plan(inputs.metadata)
    out = torch.empty_like(inputs.query)

    def fn():
        backend.attend(inputs.query, inputs.key_cache, inputs.value_cache, md, scale=SCALE, out=out, **kw)

    fn()
    return fn


def _sweep(inputs, configs):
    """Best (time, config) over override dicts (each a fresh backend and plan)."""
    best = None
    for over in configs:
        try:
            t = time_cuda(_attend_fn(TritonAttentionBackend(**over), inputs), iters=15)
        except Exception as exc:  # a config that does not compile (shared memory) is skipped
            print(f"config {over} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        print(f"  sweep {over}: {t * 1e6:.1f} us")
        if best is None or t < best[0]:
            best = (t, over)
    return best


def test_stream_read_ceiling(benchmark):
    bw = _ceiling()
    benchmark.extra_info.update(read_ceiling_TBps=bw / 1e12, card=torch.cuda.get_device_name())
    path = os.environ.get("BENCH_ATTN_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": "stream-read ceiling", "ours_TBps": bw / 1e12}) + "\n")
    benchmark.pedantic(torch.cuda.synchronize, rounds=3)


@pytest.mark.parametrize("batch,ctx", DECODE_SHAPES, ids=[f"decode-{b}x{c}" for b, c in DECODE_SHAPES])
def test_decode(benchmark, batch, ctx):
    inputs = decode_inputs(batch, ctx)
    backend = TritonAttentionBackend()
    fn = _attend_fn(backend, inputs)
    t_ours = time_cuda(fn)
    cfg = next(iter(inputs.metadata.plan.launches.values()))[0].config
    extra = {"num_splits": cfg.num_splits, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
             "num_stages": cfg.num_stages}
    if os.environ.get("BENCH_ATTN_SWEEP"):
        splits = os.environ.get("BENCH_ATTN_SPLITS", "1,2,4,8,16,32,48")  # comma-separated split counts
        grid = [{"num_splits": int(n)} for n in splits.split(",") if ctx // int(n) >= 256]
        tiles = os.environ.get("BENCH_ATTN_TILES", "64:4:2,128:4:2")  # block_n:num_warps:num_stages, comma-separated
        grid += [dict(zip(("block_n", "num_warps", "num_stages"), map(int, t.split(":")))) for t in tiles.split(",")]
        grid += json.loads(os.environ.get("BENCH_ATTN_EXTRA", "[]"))  # more override dicts, as JSON
        best = _sweep(inputs, grid)
        if best:
            extra.update(sweep_best_us=best[0] * 1e6, sweep_best=str(best[1]))
    t_peer = time_cuda(inputs.sdpa)
    _record(benchmark, f"decode {batch}x{ctx}", t_ours, t_peer, inputs, **extra)
    benchmark.pedantic(fn, rounds=5)


@pytest.mark.parametrize("kernel", ["scalar", "tiled"])
@pytest.mark.parametrize("batch,ctx", DECODE_SHAPES, ids=[f"cupy-decode-{b}x{c}" for b, c in DECODE_SHAPES])
def test_decode_cupy(benchmark, batch, ctx, kernel):
    pytest.importorskip("cupy")
    from blocks.attention.cupy_backend import CupyAttentionBackend

    inputs = decode_inputs(batch, ctx)
    fn = _attend_fn(CupyAttentionBackend(kernel=kernel), inputs)
    t_ours = time_cuda(fn)
    t_peer = time_cuda(inputs.sdpa)
    _record(benchmark, f"cupy-{kernel} decode {batch}x{ctx}", t_ours, t_peer, inputs)
    benchmark.pedantic(fn, rounds=5)


@pytest.mark.parametrize("batch,ctx", [(64, 4096), (1, 32768)], ids=["fp8-decode-64x4096", "fp8-decode-1x32768"])
def test_decode_fp8_kv(benchmark, batch, ctx):
    inputs = decode_inputs(batch, ctx, cache_dtype=torch.float8_e4m3fn)
    one = torch.ones(1, device="cuda")
    fn = _attend_fn(TritonAttentionBackend(), inputs, k_scale=one, v_scale=one)
    t_ours = time_cuda(fn)
    _record(benchmark, f"fp8-kv decode {batch}x{ctx}", t_ours, None, inputs)
    benchmark.pedantic(fn, rounds=5)


def test_prefill(benchmark):
    inputs = prefill_inputs()
    fn = _attend_fn(TritonAttentionBackend(), inputs)
    t_ours = time_cuda(fn, iters=20)
    extra = {}
    if os.environ.get("BENCH_ATTN_SWEEP"):
        grid = [{"block_m": 128, "block_q": 32, "block_n": n, "num_warps": 8, "num_stages": st}
                for n, st in ((64, 3), (128, 3), (128, 4))]
        best = _sweep(inputs, grid)
        if best:
            extra.update(sweep_best_us=best[0] * 1e6, sweep_best=str(best[1]))
    t_peer = time_cuda(inputs.sdpa, iters=20)
    _record(benchmark, f"prefill 1x{inputs.query.shape[0]} causal", t_ours, t_peer, inputs, **extra)
    benchmark.pedantic(fn, rounds=5)


def test_mixed_batch(benchmark):
    inputs = mixed_inputs()
    fn = _attend_fn(TritonAttentionBackend(), inputs)
    t_ours = time_cuda(fn, iters=20)
    t_peer = time_cuda(inputs.sdpa, iters=20)
    _record(benchmark, "mixed 4x512 prefill + 60 decode", t_ours, t_peer, inputs, head_dim=HEAD_DIM)
    benchmark.pedantic(fn, rounds=5)
