"""Where an engine decode step spends its time: host phases, the GPU's share, and a torch.profiler table.

Usage (repo root; on the H100 with a named shape and dummy weights, or on the CPU with any model)::

    python3 benchmarks/engine_profile.py --model qwen2.5-0.5b --batch-size 1 --steps 50
    python3 benchmarks/engine_profile.py --model llama-3-8b --batch-size 1 --steps 30 --trace $OUT/trace.json

Prints, per decode step: the wall time of ``EngineCore.step``, the host time of each phase (scheduler,
runner state update, input building, forward launch, logits, sampler launch, the sampled-id read, which
waits for the GPU, and the engine's request update), the GPU time of the same forward replayed alone
(graph + LM head + argmax, CUDA events), and the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from collections import defaultdict

import torch


def _wrap(obj, name: str, label: str, acc: dict) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[label] += time.perf_counter() - t

    setattr(obj, name, timed)


class _TimedCall:
    """Times calls of a callable object (``__call__`` is looked up on the type, so wrap the object)."""

    def __init__(self, inner, label: str, acc: dict) -> None:
        self.inner, self.label, self.acc = inner, label, acc

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.inner(*a, **k)
        finally:
            self.acc[self.label] += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _graph_launch_host_us(graphs, bs: int, graph) -> dict[str, float]:
    """Host microseconds (median of 30, the GPU idle) of the pieces of a decode graph launch: filling the
    pinned input buffer, its host-to-device copy, and ``graph.replay()``."""
    import numpy as np

    from blocks.engine.cuda_graphs import fill_decode_inputs

    w = graphs.width
    tables = np.zeros((bs, 1), dtype=np.int32)
    pieces: dict[str, list[float]] = defaultdict(list)
    h64, h32 = graphs._host_views[bs]
    dev = graphs._dev[bs]
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fill_decode_inputs(h64, h32, bs, w, graphs.block_size, [0] * bs, [1] * bs, [2] * bs, tables, list(range(bs)),
                           list(range(bs)))
        t1 = time.perf_counter()
        dev.copy_(graphs._host[: dev.numel()], non_blocking=True)
        t2 = time.perf_counter()
        graph.replay()
        t3 = time.perf_counter()
        for k, v in (("fill inputs", t1 - t0), ("H2D copy", t2 - t1), ("graph.replay()", t3 - t2)):
            pieces[k].append(v * 1e6)
    torch.cuda.synchronize()
    return {k: sorted(v)[len(v) // 2] for k, v in pieces.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="profile rank 0 of a TP engine (no GPU-alone replay: its graph waits on the workers)")
    p.add_argument("--trace", default=None, help="write a Chrome trace of 5 steps here")
    p.add_argument("--json", default=None, help="write the phase table here")
    args = p.parse_args()

    from blocks.engine.llm import LLM
    from blocks.sample.params import SamplingParams

    model = None if args.model == "default" else args.model
    llm = LLM(model, load_format=args.load_format, skip_tokenizer_init=True, max_model_len=args.max_model_len,
              max_num_seqs=max(8, args.batch_size), enable_prefix_caching=False, enforce_eager=args.enforce_eager,
              seed=0, tensor_parallel_size=args.tensor_parallel_size)
    eng = llm.engine
    runner = eng.runner
    cuda = runner.device.type == "cuda"
    rng = random.Random(0)
    total_steps = args.steps + 12

    def add_batch(tag: str) -> None:
        for i in range(args.batch_size):
            ids = [rng.randrange(eng.vocab_size) for _ in range(args.input_len)]
            eng.add_request(f"{tag}-{i}", ids, SamplingParams(temperature=0.0, max_tokens=total_steps,
                                                               ignore_eos=True))

    add_batch("warm")
    while eng.has_unfinished_requests():
        eng.step()

    acc: dict[str, float] = defaultdict(float)
    _wrap(eng.scheduler, "schedule", "schedule", acc)
    _wrap(runner.requests, "apply", "runner.requests.apply", acc)
    _wrap(runner, "run_model", "runner.run_model (launch)", acc)
    if runner.graphs is not None:
        _wrap(runner.graphs, "run", "  graphs.run (stage + replay)", acc)
    _wrap(runner.model, "compute_logits", "  compute_logits", acc)
    _wrap(runner, "_sync_sampling_rows", "runner.sync_sampling_rows", acc)
    runner.sampler = _TimedCall(runner.sampler, "sampler (launch)", acc)
    _wrap(runner.batch, "prepare", "  batch.prepare", acc)
    _wrap(runner.batch, "record_tokens_on_device", "batch.record_tokens_on_device", acc)
    _wrap(runner.batch, "record_tokens_on_host", "batch.record_tokens_on_host (after the sync)", acc)
    _wrap(eng.scheduler, "update_from_output", "scheduler.update_from_output", acc)
    _wrap(eng, "_update_requests", "engine.update_requests", acc)

    add_batch("run")
    eng.step()  # prefill (eager): not part of the decode-step phases below
    while eng.scheduler.num_waiting or any(not r.output_token_ids for r in eng.scheduler.running):
        eng.step()  # a large batch's prefill takes several chunked steps
    acc.clear()
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    phases = {k: v / args.steps * 1e3 for k, v in acc.items()}
    walls.sort()
    wall_ms = walls[len(walls) // 2] * 1e3

    gpu_ms = None
    solo = args.tensor_parallel_size == 1
    if cuda and solo and runner.graphs is not None and args.batch_size <= runner.graphs.buckets[-1]:
        bs = runner.graphs.bucket_for(args.batch_size)
        graph, out = runner.graphs.graphs[bs]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        argmax = getattr(runner.sampler, "inner", runner.sampler)._argmax  # the greedy sampler's argmax
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000)  # keep the GPU busy while the host enqueues
        start.record()
        for _ in range(20):
            graph.replay()  # the forward and the LM head
            argmax(out[: args.batch_size])
        end.record()
        torch.cuda.synchronize()
        gpu_ms = start.elapsed_time(end) / 20
        launch_us = _graph_launch_host_us(runner.graphs, bs, graph)

    print(f"\n{args.model} batch {args.batch_size}, {args.steps} decode steps, device {runner.device}, "
          f"graphs {'on' if runner.graphs is not None else 'off'}")
    print(f"{'phase':40s} {'ms/step':>9s}")
    for k, v in phases.items():
        print(f"{k:40s} {v:9.3f}")
    print(f"{'engine.step wall (median)':40s} {wall_ms:9.3f}")
    if gpu_ms is not None:
        print(f"{'GPU alone: replay + logits + argmax':40s} {gpu_ms:9.3f}")
        for k, v in launch_us.items():
            print(f"{'  host, GPU idle: ' + k:40s} {v / 1e3:9.3f}")

    while eng.has_unfinished_requests():
        eng.step()
    add_batch("prof")
    eng.step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            eng.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    if cuda:  # the GPU side (under TP the all-reduce kernels include waiting for the other ranks)
        for key in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
                break
            except (AttributeError, KeyError, ValueError):
                continue
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch_size": args.batch_size, "phases_ms": phases,
                       "wall_ms": wall_ms, "gpu_ms": gpu_ms}, f, indent=2)
    llm.shutdown()


if __name__ == "__main__":
    main()
