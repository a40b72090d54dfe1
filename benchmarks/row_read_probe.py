"""How fast can one kernel read a sampler's logits, row by row? (issue 5 investigation, GPU only)

The sampling kernel reads greedy rows of ``[256, 128256]`` float32 logits at ~1.8 TB/s on an H100 while a
copy of the same tensor moves ~2.9 TB/s. This probe times plain row reductions (max and first argmax, the
greedy pass) in several launch shapes against torch's own reductions and a flat streaming read, all with
the L2 flushed before each call, to find what limits a row-wise read. ``--ncu KERNEL`` runs one
configuration a few times for Nsight Compute instead.

Usage: ``python3 benchmarks/row_read_probe.py [--json F]`` or ``... --ncu sample-greedy|sample-mixed|rowmax``.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from benchmarks.cuda_timing import time_cuda

ROWS, VOCAB = 256, 128256


@triton.jit
def _rowmax_kernel(x_ptr, out_ptr, stride, vocab, num_rows, PARTS: tl.constexpr, BLOCK: tl.constexpr,
                   STAGES: tl.constexpr):
    """Max and first argmax of a ``1 / PARTS`` share of each row; persistent over (row, part) items."""
    offs = tl.arange(0, BLOCK)
    per_part = tl.cdiv(tl.cdiv(vocab, PARTS), BLOCK) * BLOCK
    for item in range(tl.program_id(0), num_rows * PARTS, tl.num_programs(0)):
        row = item // PARTS
        part = item % PARTS
        row_ptr = x_ptr + (tl.zeros([], tl.int64) + row) * stride
        lo = part * per_part
        hi = tl.minimum(lo + per_part, vocab)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        idx = tl.zeros([BLOCK], tl.int32)
        for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < hi, other=float("-inf"))
            upd = x > m
            m = tl.where(upd, x, m)
            idx = tl.where(upd, cols, idx)
        best = tl.max(m, 0)
        tl.store(out_ptr + item, tl.min(tl.where(m == best, idx, vocab), 0))


@triton.jit
def _flat_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """A streaming read of the whole tensor (grid-stride over BLOCK tiles): the read ceiling."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    step = tl.num_programs(0) * BLOCK
    for start in tl.range(tl.program_id(0) * BLOCK, n, step, num_stages=STAGES):
        acc += tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def _time(fn, iters=30):
    """Microseconds of ``fn()``, cold L2 (:func:`benchmarks.cuda_timing.time_cuda`)."""
    return time_cuda(fn, iters=iters) * 1e6


def _rowmax(x, out, programs, parts, block, warps, stages, maxnreg=None):
    kw = {"maxnreg": maxnreg} if maxnreg else {}
    _rowmax_kernel[(programs,)](x, out, x.stride(0), x.shape[1], x.shape[0], PARTS=parts, BLOCK=block,
                                STAGES=stages, num_warps=warps, **kw)


def _sample_args(kind: str):
    from benchmarks.test_bench_sample import KINDS, _logits, mixed_batch

    if kind.startswith("kind"):
        kinds = [KINDS[int(kind[4:])]]
    else:
        kinds = [dict(temperature=0.0)] if kind == "greedy" else KINDS
    bt = mixed_batch(ROWS, VOCAB, "cuda", kinds=kinds).prepare()
    logits = _logits(ROWS, VOCAB, "cuda")
    keys = torch.randint(0, 2**62, (ROWS,), device="cuda")
    return logits, bt.temperature, bt.top_k, bt.top_p, bt.min_p, keys


def main() -> None:
    from blocks.sample.triton_sample import triton_sample

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--ncu", default=None, help="sample-greedy, sample-mixed, sample-kind<i> (KINDS[i]) or rowmax")
    p.add_argument("--cubin", default=None, help="with --ncu sample-*: write the sampling kernel's cubin here")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.ncu:
        if args.ncu.startswith("sample"):
            a = _sample_args(args.ncu.split("-")[1])
            for _ in range(3):
                triton_sample(*a)
            if args.cubin:
                from blocks.sample.triton_sample import _sample_kernel

                for cache in _sample_kernel.device_caches.values():
                    for k in (cache[0] if isinstance(cache, tuple) else cache).values():
                        with open(args.cubin, "wb") as f:
                            f.write(k.asm["cubin"])
        else:
            x = torch.randn(ROWS, VOCAB, device="cuda")
            out = torch.empty(ROWS * 8, dtype=torch.int32, device="cuda")
            for _ in range(3):
                _rowmax(x, out, ROWS, 1, 2048, 16, 3)
        torch.cuda.synchronize()
        return

    x = torch.randn(ROWS, VOCAB, device="cuda") * 2.5
    gbytes = x.numel() * 4 / 1e9
    out = torch.empty(ROWS * 16, dtype=torch.int32, device="cuda")
    ref = x.argmax(1).to(torch.int32)
    rows = []

    def rec(name, us, **extra):
        rows.append({"name": name, "us": us, "TBps": gbytes / us * 1e3, **extra})
        print(f"{name:58s} {us:8.1f} us {gbytes / us * 1e3:6.2f} TB/s", flush=True)

    rec("torch x.amax(1)", _time(lambda: x.amax(1)))
    rec("torch x.argmax(1)", _time(lambda: x.argmax(1)))
    rec("torch x.sum()", _time(lambda: x.sum()))
    rec("torch x.clone() (read + write, TB/s of the read)", _time(lambda: x.clone()))
    flat_out = torch.empty(4 * sms * 8, device="cuda")
    for progs, block, warps, stages in [(2 * sms, 4096, 8, 3), (4 * sms, 2048, 8, 3), (8 * sms, 1024, 4, 3),
                                        (4 * sms, 4096, 16, 2)]:
        us = _time(lambda progs=progs, block=block, stages=stages, warps=warps: _flat_sum_kernel[(progs,)](
            x, flat_out, x.numel(), BLOCK=block, STAGES=stages, num_warps=warps))
        rec(f"flat streaming read progs={progs} block={block} warps={warps} stages={stages}", us)
    configs = []
    for parts in (1, 4):
        for block, warps in ((1024, 4), (2048, 8), (2048, 16), (4096, 16)):
            for stages in (3, 4):
                configs.append((parts, block, warps, stages))
    for parts, block, warps, stages in configs:
        programs = min(ROWS * parts, 4 * sms * max(1, 16 // warps) // 4)
        try:
            _rowmax(x, out, programs, parts, block, warps, stages)
        except Exception as e:  # out of shared memory or registers: skip that shape
            print(f"skip parts={parts} block={block} warps={warps} stages={stages}: {type(e).__name__}")
            continue
        if parts == 1:
            assert torch.equal(out[:ROWS], ref), "rowmax kernel disagrees with torch.argmax"
        us = _time(lambda a=(x, out, programs, parts, block, warps, stages): _rowmax(*a))
        rec(f"rowmax parts={parts} block={block} warps={warps} stages={stages} progs={programs}", us,
            parts=parts, block=block, warps=warps, stages=stages, programs=programs)
    for kind in ("greedy", "mixed"):
        a = _sample_args(kind)
        rec(f"triton_sample {kind} (default launch)", _time(lambda a=a: triton_sample(*a)))
        for kw in ({"maxnreg": None}, {"num_warps": 8, "maxnreg": None}, {"stages": 4, "block": 4096,
                                                                          "maxnreg": None}):
            rec(f"triton_sample {kind} {kw}", _time(lambda a=a, kw=kw: triton_sample(*a, **kw)), **kw)
    from blocks.sample.triton_sample import _sample_kernel

    for cache in getattr(_sample_kernel, "device_caches", {}).values():  # registers and spills as compiled
        for k in (cache[0] if isinstance(cache, tuple) else cache).values():
            print("sample kernel variant: regs", getattr(k, "n_regs", "?"), "spills", getattr(k, "n_spills", "?"),
                  "shared", k.metadata.shared, "warps", k.metadata.num_warps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
