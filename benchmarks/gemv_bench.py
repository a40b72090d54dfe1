"""Skinny GEMM on the GPU: ``F.linear`` (cuBLAS) against :func:`blocks.layers.triton_gemv.skinny_linear` at the
decode shapes of Llama-3-8B and Qwen2.5-0.5B, bf16. Median of CUDA-event timings with a 256 MiB write (L2
flush) before each; TB/s counts the weight bytes once. Usage: ``python3 benchmarks/gemv_bench.py [--json F]``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.cuda_timing import time_cuda

SHAPES = {  # name: (N, K)
    "llama8b qkv": (6144, 4096), "llama8b o_proj": (4096, 4096), "llama8b gate_up": (28672, 4096),
    "llama8b down": (4096, 14336), "qwen0.5b qkv": (1152, 896), "qwen0.5b o_proj": (896, 896),
    "qwen0.5b gate_up": (9728, 896), "qwen0.5b down": (896, 4864),
}


def _time(fn, iters=30):
    """Microseconds of ``fn()``, cold L2 (:func:`benchmarks.cuda_timing.time_cuda`)."""
    return time_cuda(fn, iters=iters) * 1e6


def main() -> None:
    from blocks.layers.triton_gemv import skinny_linear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    print(f"{'shape':18s} {'M':>3s} {'cuBLAS us':>10s} {'TB/s':>6s} {'triton us':>10s} {'TB/s':>6s} {'speedup':>8s}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        for m in (1, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(skinny_linear(x, w).float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
            t_cublas = _time(lambda x=x, w=w: F.linear(x, w))
            t_triton = _time(lambda x=x, w=w: skinny_linear(x, w))
            gb = n * k * 2 / 1e12
            row = {"shape": name, "m": m, "n": n, "k": k, "cublas_us": t_cublas, "triton_us": t_triton,
                   "cublas_tbps": gb / (t_cublas * 1e-6), "triton_tbps": gb / (t_triton * 1e-6)}
            rows.append(row)
            print(f"{name:18s} {m:3d} {t_cublas:10.1f} {row['cublas_tbps']:6.2f} {t_triton:10.1f} "
                  f"{row['triton_tbps']:6.2f} {t_cublas / t_triton:8.2f}")
    # a small sweep of the tile at the shape cuBLAS handles worst (Llama-3-8B o_proj, batch 1)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    sweep = []
    for block_n in (16, 32, 64):
        for block_k in (64, 128, 256):
            for split_k in (1, 2, 4):
                us = _time(lambda bn=block_n, bk=block_k, sk=split_k: skinny_linear(x, w, block_n=bn, block_k=bk,
                                                                                    split_k=sk), iters=20)
                sweep.append({"block_n": block_n, "block_k": block_k, "split_k": split_k, "us": us})
    best = sorted(sweep, key=lambda r: r["us"])[:5]
    print("o_proj sweep, best 5:", [(r["block_n"], r["block_k"], r["split_k"], round(r["us"], 1)) for r in best])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "o_proj_sweep": sweep}, f, indent=2)


if __name__ == "__main__":
    main()
