"""Sampler benchmarks (issue 5): one sampler step for a mixed batch.

The batch mixes greedy rows, top-k, top-p, top-k + top-p, min-p, penalties (repetition, frequency,
presence on half the rows, over 512 prompt + 64 generated tokens) and 16 seeded rows.

* CPU (reported; CI runs the small size, ``BENCH_SAMPLE_FULL=1`` adds batch 256 x vocab 128256):
  ``python3 -m pytest benchmarks/test_bench_sample.py --benchmark-only``.
* CUDA: the Triton step at batch 256 x vocab 128256 (target <= 150 us), the kernel alone, the
  torch backend on the same card (peer), and with ``BENCH_SAMPLE_SWEEP=1`` a few kernel
  configurations. ``extra_info`` has microseconds and the effective GB/s of reading the logits once;
  ``BENCH_SAMPLE_OUT=path`` appends JSON rows. A step's figure (``us``) is its GPU time, taken with the host
  ahead of the GPU (``gpu_us_host_ahead``: the GPU sleeps while the host queues the calls), the logits copy
  subtracted; beside it the host's own time a call (``host_us_per_call``) and ``do_bench``'s median
  (``do_bench_us``), which times whichever side is slower. Kernel figures are ``do_bench`` medians.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from blocks.sample.batch import SamplingBatch
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler

FULL = (256, 128256)
SMALL = (32, 32000)


KINDS = [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=50),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=100, top_p=0.95),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=0.6, top_k=20, top_p=0.8, min_p=0.02),
]


def mixed_batch(num_rows: int, vocab: int, device: str, kinds: list[dict] | None = None) -> SamplingBatch:
    """The benchmark batch (see the module docstring); ``kinds`` replaces the rotation of row kinds."""
    gen = torch.Generator().manual_seed(0)
    batch = SamplingBatch(max_num_rows=num_rows, vocab_size=vocab, max_len=640, device=device)
    kinds = kinds or KINDS
    for r in range(num_rows):
        kw = dict(kinds[r % len(kinds)])
        if r % 2:
            kw.update(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
        if r % 16 == 3:
            kw.update(seed=r)
        prompt = torch.randint(vocab, (512,), generator=gen).tolist()
        output = torch.randint(vocab, (64,), generator=gen).tolist()
        batch.add_request(f"r{r}", SamplingParams(**kw), prompt, output_token_ids=output)
    return batch


def _logits(num_rows: int, vocab: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(num_rows, vocab, generator=gen) * 2.5).to(device)


def _record(benchmark, name: str, seconds: float, num_rows: int, vocab: int, **extra) -> None:
    row = {
        "name": name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "batch": num_rows,
        "vocab": vocab,
        "us": seconds * 1e6,
        "logits_read_once_GBps": num_rows * vocab * 4 / seconds / 1e9,
        **extra,
    }
    benchmark.extra_info.update(row)
    path = os.environ.get("BENCH_SAMPLE_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize(
    "shape",
    [
        SMALL,
        pytest.param(
            FULL,
            marks=pytest.mark.skipif(os.environ.get("BENCH_SAMPLE_FULL") != "1", reason="set BENCH_SAMPLE_FULL=1"),
        ),
    ],
    ids=["32x32000", "256x128256"],
)
def test_bench_sampler_step_cpu(benchmark, shape):
    num_rows, vocab = shape
    batch = mixed_batch(num_rows, vocab, "cpu")
    logits = _logits(num_rows, vocab, "cpu")
    sampler = Sampler(backend="torch", seed=0)
    out = benchmark.pedantic(lambda: sampler(logits, batch, inplace=True), rounds=3, iterations=1, warmup_rounds=1)
    assert out.sampled_token_ids.shape == (num_rows,)
    _record(benchmark, f"sampler step torch cpu {num_rows}x{vocab}", benchmark.stats.stats.median, num_rows, vocab)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def _device_and_host_time(fn, calls: int = 6, reps: int = 15) -> tuple[float, float]:
    """``(GPU seconds, host seconds)`` per call of ``fn``, medians. The GPU first sleeps (~10 ms) while the host
    enqueues ``calls`` calls, so the events around them time the GPU work alone even when the host is the
    slower side (``do_bench`` then times the host); the host time is taken over the same calls."""
    gpu, host = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) / calls)
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e-3 / calls)
    return sorted(gpu)[reps // 2], sorted(host)[reps // 2]


@cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bench_sampler_step_cuda(benchmark, backend):
    num_rows, vocab = FULL
    batch = mixed_batch(num_rows, vocab, "cuda")
    logits = _logits(num_rows, vocab, "cuda")
    sampler = Sampler(backend=backend, seed=0)
    work = torch.empty_like(logits)

    def step():  # fresh logits every step, as the engine's LM head gives (in place on the same tensor,
        work.copy_(logits)  # the penalties would compound step after step and skew the rows)
        return sampler(work, batch, inplace=True)

    copy = _do_bench(lambda: work.copy_(logits))
    seconds = _do_bench(step) - copy
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    gpu_step, host_step = _device_and_host_time(step)
    gpu_copy, _ = _device_and_host_time(lambda: work.copy_(logits))
    # the step's figure is its GPU time (the target's measure); do_bench's is the slower of GPU and host
    _record(benchmark, f"sampler step {backend} cuda", gpu_step - gpu_copy, num_rows, vocab, target_us=150.0,
            logits_copy_us_subtracted=copy * 1e6, gpu_us_host_ahead=(gpu_step - gpu_copy) * 1e6,
            do_bench_us=seconds * 1e6, host_us_per_call=host_step * 1e6)
    if backend == "triton":
        bt = batch.prepare()
        processing = _do_bench(lambda: sampler.process_logits(work.copy_(logits), bt)) - copy
        _record(benchmark, "sampler logits processing (penalties, masks) cuda", processing, num_rows, vocab)


@cuda
def test_bench_triton_kernel_cuda(benchmark):
    from blocks.sample.triton_sample import triton_sample
    from blocks.sample.triton_topk_topp import triton_thresholds

    num_rows, vocab = FULL
    batch = mixed_batch(num_rows, vocab, "cuda")
    bt = batch.prepare()
    logits = _logits(num_rows, vocab, "cuda")
    keys = torch.arange(num_rows, device="cuda", dtype=torch.int64)
    args = (logits, bt.temperature, bt.top_k, bt.top_p, bt.min_p)
    configs = [{}]
    if os.environ.get("BENCH_SAMPLE_SWEEP") == "1":
        configs += [dict(block=b, num_warps=w, stages=st) for b, w, st in
                    [(2048, 8, 3), (2048, 8, 4), (4096, 16, 3), (4096, 16, 4), (1024, 8, 4)]]
        configs += [dict(maxnreg=None), dict(maxnreg=80), dict(stages=4), dict(candidates=256), dict(candidates=2048),
                    dict(num_warps=8, maxnreg=None)]
    best = None
    for cfg in configs:
        try:
            seconds = _do_bench(lambda cfg=cfg: triton_sample(*args, keys, **cfg))
        except Exception as e:  # a configuration this Triton cannot build: report, go on
            print(f"sweep {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        if best is None or seconds < best[0]:
            best = (seconds, cfg)
        if cfg:
            print(f"sweep {cfg}: {seconds * 1e6:.1f} us")
    for kind in KINDS:  # where the time goes: a batch of one row kind at a time (default configuration)
        bk = mixed_batch(num_rows, vocab, "cuda", kinds=[kind]).prepare()
        one = (logits, bk.temperature, bk.top_k, bk.top_p, bk.min_p)
        gpu, host = _device_and_host_time(lambda one=one: triton_sample(*one, keys))
        print(f"kind {kind}: GPU {gpu * 1e6:.1f} us (host ahead), do_bench "
              f"{_do_bench(lambda one=one: triton_sample(*one, keys)) * 1e6:.1f} us, host {host * 1e6:.1f} us")
    # random 62-bit keys (as the sampler draws them) instead of 0..255: other rejection draws
    rand_keys = torch.randint(0, 2**62, (num_rows,), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    print(f"random keys: {_do_bench(lambda: triton_sample(*args, rand_keys)) * 1e6:.1f} us")
    default_s = _do_bench(lambda: triton_sample(*args, keys))
    gpu_s, host_s = _device_and_host_time(lambda: triton_sample(*args, keys))
    spread = sorted(_device_and_host_time(lambda k=k: triton_sample(*args, k), calls=4, reps=5)[0] for k in (
        torch.randint(0, 2**62, (num_rows,), device="cuda", generator=torch.Generator("cuda").manual_seed(s))
        for s in range(20)))
    print(f"kernel GPU time over 20 random key sets (us): median {spread[10] * 1e6:.1f}, "
          f"min {spread[0] * 1e6:.1f}, max {spread[-1] * 1e6:.1f}")
    benchmark.pedantic(lambda: triton_sample(*args, keys), rounds=5, iterations=1)
    _record(
        benchmark,
        "triton sample kernel cuda",
        default_s,
        num_rows,
        vocab,
        sweep_best_us=best[0] * 1e6,
        sweep_best=str(best[1]),
        gpu_us_host_ahead=gpu_s * 1e6,
        host_us_per_call=host_s * 1e6,
        gpu_us_random_keys_median=spread[10] * 1e6,
    )
    _record(benchmark, "triton threshold kernel cuda (processed logprobs only)",
            _do_bench(lambda: triton_thresholds(*args)), num_rows, vocab)
    copy = _do_bench(lambda: logits.clone())
    _record(benchmark, "ceiling: clone of the logits (read+write)", copy, num_rows, vocab)
