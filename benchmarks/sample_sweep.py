"""Device sweep of the Triton sampler's split first pass (not a test): the mixed batch of
benchmarks/test_bench_sample.py at 256 x 128256, per configuration and per row kind.
Usage (repo root, CUDA): python3 benchmarks/sample_sweep.py"""
import torch
import triton.testing

from benchmarks.test_bench_sample import FULL, KINDS, _logits, mixed_batch
from blocks.sample.triton_sample import triton_sample


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def main():
    rows, vocab = FULL
    logits = _logits(rows, vocab, "cuda")
    keys = torch.arange(rows, device="cuda", dtype=torch.int64)
    bt = mixed_batch(rows, vocab, "cuda").prepare()
    args = (logits, bt.temperature, bt.top_k, bt.top_p, bt.min_p, keys)
    print(f"clone of the logits: {bench(lambda: logits.clone()):.1f} us")
    for cfg in [{}, dict(maxnreg=None), dict(stats_maxnreg=64), dict(stats_maxnreg=80),
                dict(stats_maxnreg=64, stats_warps=4), dict(stats_maxnreg=64, stats_block=1024),
                dict(stats_maxnreg=64, stats_block=4096, stats_warps=16), dict(stats_maxnreg=48),
                dict(stats_maxnreg=64, prefetch=False), dict(stats_maxnreg=64, maxnreg=None)]:
        try:
            print(f"mixed {cfg}: {bench(lambda cfg=cfg: triton_sample(*args, **cfg)):.1f} us")
        except Exception as e:  # noqa: BLE001
            print(f"mixed {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
    from torch.profiler import ProfilerActivity, profile

    for name, a in (("mixed", args),):
        for _ in range(3):
            triton_sample(*a, stats_maxnreg=64)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                triton_sample(*a, stats_maxnreg=64)
            torch.cuda.synchronize()
        print(name, "kernel times (us, per call):")
        for e in prof.key_averages():
            if e.device_time_total > 0:
                print(f"  {e.key[:60]:60s} {e.device_time_total / 20:8.1f}")
    for kind in KINDS:
        b = mixed_batch(rows, vocab, "cuda", kinds=[kind]).prepare()
        one = (logits, b.temperature, b.top_k, b.top_p, b.min_p, keys)
        print(f"kind {kind}: {bench(lambda one=one: triton_sample(*one)):.1f} us")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                triton_sample(*one)
            torch.cuda.synchronize()
        print("   ", {e.key[:24]: round(e.device_time_total / 10, 1) for e in prof.key_averages()
                     if e.device_time_total > 0})


if __name__ == "__main__":
    main()
