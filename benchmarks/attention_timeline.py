"""Where a decode launch's time goes (H100): each program's start and end on the GPU clock, and kernel durations.

Runs a traced copy of ``paged_attn_kernel`` (its source with ``%globaltimer`` read at a program's start and after
its last tile, and ``%smid`` stored; everything else unchanged) on the suite's decode inputs, then reports:
program durations, programs an SM, how long fewer programs than SMs were running (the launch's tail), and
per-SM finish times. A torch-profiler pass over the untraced launch and SDPA's peer gives each kernel's duration
(with PDL the merge kernel starts early and waits, so its duration overlaps the attention kernel's)::

    PYTHONPATH=. python3 benchmarks/attention_timeline.py [--shapes 8x32768,1x4096] [--splits 4,16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile

import numpy as np
import torch

import benchmarks.attention_common as common
import blocks.attention.triton_paged as triton_paged
from benchmarks.cuda_timing import time_cuda
from blocks.attention.triton_backend import TritonAttentionBackend

_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "blocks" / "attention" / "triton_attention.py"
_EDITS = [  # (anchor, text added after it); each anchor must occur once
    ("stride_bt, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,", " trace_ptr,"),
    ("    split = tl.program_id(2)\n", "    _t0 = tl.extra.cuda.globaltimer()\n"),
]
_TRACE_STORE = """    _t1 = tl.extra.cuda.globaltimer()
    _fid = (tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
            + tl.program_id(2) * tl.num_programs(0) * tl.num_programs(1)).to(tl.int64)
    tl.store(trace_ptr + _fid * 3, _t0)
    tl.store(trace_ptr + _fid * 3 + 1, _t1)
    tl.store(trace_ptr + _fid * 3 + 2, tl.extra.cuda.smid().to(tl.int64))
"""


def _traced_kernel():
    src = _SOURCE.read_text()
    for anchor, extra in _EDITS:
        if src.count(anchor) != 1:
            raise RuntimeError(f"triton_attention.py changed: anchor {anchor!r} not found once")
        src = src.replace(anchor, anchor + extra)
    anchor = "    if KV_FP8:\n        acc = acc * tl.load(v_scale_ptr)\n"
    if src.count(anchor) != 1:
        raise RuntimeError("triton_attention.py changed: the epilogue anchor is not found once")
    src = src.replace(anchor, _TRACE_STORE + anchor)
    path = pathlib.Path(tempfile.mkdtemp()) / "traced_attention.py"  # Triton reads a kernel's source from its file
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("traced_attention", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["traced_attention"] = mod
    spec.loader.exec_module(mod)
    return mod.paged_attn_kernel


class _Traced:
    """Stands in for ``paged_attn_kernel`` in ``triton_paged``: launches the traced copy with the trace buffer."""

    def __init__(self, kernel, trace: torch.Tensor):
        self.kernel, self.trace, self.grid = kernel, trace, None

    def __getitem__(self, grid):
        self.grid = grid
        launch = self.kernel[grid]
        return lambda *args, **kw: launch(*args, self.trace, **kw)


def analyse(trace: np.ndarray, num_sms: int) -> dict:
    """``trace``: ``[programs, 3]`` int64 (start ns, end ns, SM id) -> summary in microseconds."""
    t0 = (trace[:, 0] - trace[:, 0].min()) / 1e3
    t1 = (trace[:, 1] - trace[:, 0].min()) / 1e3
    sm = trace[:, 2]
    dur = t1 - t0
    events = sorted([(x, 1) for x in t0] + [(x, -1) for x in t1])
    below = {k: 0.0 for k in (num_sms, num_sms // 2)}
    active, last = 0, 0.0
    for x, step in events:
        for k in below:
            if active < k and active > 0:
                below[k] += x - last
        active += step
        last = x
    per_sm = {int(s): (t1[sm == s].max(), int((sm == s).sum())) for s in np.unique(sm)}
    finish = np.sort([f for f, _ in per_sm.values()])
    counts = [n for _, n in per_sm.values()]
    return {
        "programs": int(len(trace)), "span_us": round(float(t1.max()), 1),
        "program_us_min_median_max": [round(float(v), 1) for v in (dur.min(), np.median(dur), dur.max())],
        "sms_used": len(per_sm), "programs_an_sm_min_max": [min(counts), max(counts)],
        **{f"us_with_fewer_than_{k}_running": round(v, 1) for k, v in below.items()},
        "sm_finish_us_p10_p50_p90": [round(float(finish[int(q * (len(finish) - 1))]), 1) for q in (0.1, 0.5, 0.9)],
    }


def _kernel_durations(attend, sdpa) -> dict:
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            for fn in (attend, sdpa):
                flush.fill_(1)
                torch.cuda._sleep(1_000_000)
                fn()
        torch.cuda.synchronize()
    found: dict[str, list[float]] = {}
    for e in prof.events():
        name = e.name.lower()
        if e.device_type.name == "CUDA" and any(k in name for k in ("attn", "merge", "flash", "splitkv", "combine")):
            found.setdefault(e.name[:60], []).append(e.device_time_total)
    return {k: round(statistics.median(v), 1) for k, v in found.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8x32768,1x4096,64x4096", help="comma-separated BATCHxCTX")
    p.add_argument("--splits", default="", help="extra split counts to trace at the first shape (e.g. 4,16)")
    args = p.parse_args()
    kernel = _traced_kernel()
    trace = torch.zeros(3 << 16, dtype=torch.int64, device="cuda")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    real = triton_paged.paged_attn_kernel
    for i, shape in enumerate(args.shapes.split(",")):
        batch, ctx = (int(x) for x in shape.split("x"))
        inputs = common.decode_inputs(batch, ctx)
        settings = [{}] + ([{"num_splits": int(s)} for s in args.splits.split(",") if s] if i == 0 else [])
        for overrides in settings:
            backend = TritonAttentionBackend(**overrides)
            md = backend.plan(inputs.metadata)
            out = torch.empty_like(inputs.query)
            traced = _Traced(kernel, trace)

            def attend(use_trace=False, backend=backend, md=md, out=out, inputs=inputs, traced=traced):
                triton_paged.paged_attn_kernel = traced if use_trace else real
                try:
                    backend.attend(inputs.query, inputs.key_cache, inputs.value_cache, md,
                                   scale=common.HEAD_DIM ** -0.5, out=out)
                finally:
                    triton_paged.paged_attn_kernel = real

            attend()
            row = {"shape": shape, **overrides, "us": round(time_cuda(attend) * 1e6, 1),
                   "traced_us": round(time_cuda(lambda attend=attend: attend(True)) * 1e6, 1),
                   "sdpa_us": round(time_cuda(inputs.sdpa) * 1e6, 1), "grid": list(traced.grid)}
            n = traced.grid[0] * traced.grid[1] * traced.grid[2]
            if 3 * n > trace.numel():
                raise ValueError(f"{n} programs: enlarge the trace buffer")
            row.update(analyse(trace[: 3 * n].view(n, 3).cpu().numpy(), num_sms))
            row["kernel_us"] = _kernel_durations(attend, inputs.sdpa)
            print(json.dumps(row), flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
