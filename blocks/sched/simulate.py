"""Simulator: the real scheduler and KV cache manager driven by a synthetic trace and a cost model.

No model runs: each step, every scheduled request whose known tokens are all computed "samples" a
token, and the clock advances by :meth:`CostModel.step_time` of the step's shape. Requests stop at
their trace output length. Reports throughput, TTFT / TPOT / end-to-end percentiles, preemptions,
KV usage and prefix hit rate, so policies can be compared at scales no test machine can serve.

Python::

    from blocks.sched.simulate import SimConfig, simulate
    from blocks.sched.trace import CostModel, TraceConfig, make_trace
    trace = make_trace(TraceConfig(num_requests=10_000, request_rate=50, num_prefix_groups=8, prefix_len=512))
    result = simulate(trace, SimConfig(num_blocks=8192, policy="cache_aware"), CostModel.for_model("llama-3-8b"))

Command line (one table row per policy)::

    blocks simulate --num-requests 100000 --request-rate 100 --policies fcfs,priority,cache_aware \
        --prefix-groups 16 --prefix-len 512 --num-blocks 8192
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from blocks.sched.config import SchedulerConfig
from blocks.sched.errors import QueueFullError
from blocks.sched.policy import POLICIES, CacheAwarePolicy, SchedulingPolicy, make_policy
from blocks.sched.request import Request
from blocks.sched.scheduler import Scheduler
from blocks.sched.trace import MODEL_PRESETS, CostModel, Trace, TraceConfig, make_trace

__all__ = ["SimConfig", "SimResult", "simulate", "format_table", "add_parser"]

_TOKEN = 1  # every simulated sample; requests stop at max_tokens (ignore_eos)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """The serving setup being simulated.

    Attributes:
        num_blocks: KV blocks (including the reserved null block).
        block_size: tokens per block.
        enable_prefix_caching: prefix caching in the KV cache manager.
        policy: scheduling policy name or object.
        scheduler: scheduler limits (``max_model_len`` must cover the longest request).
    """

    num_blocks: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    policy: str | SchedulingPolicy = "fcfs"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class SimResult:
    """Summary of one simulation (times in simulated seconds unless named ``wall_*``).

    ``ttft_*`` / ``tpot_*`` / ``e2e_*`` are percentiles over finished requests (TPOT over those with
    more than one output token); ``ttft_p50_hi`` is the median TTFT of priority-0 requests.
    """

    policy: str
    num_requests: int
    num_finished: int
    num_rejected: int
    num_steps: int
    duration: float
    output_throughput: float
    total_throughput: float
    request_throughput: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    ttft_p50_hi: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    e2e_p50: float
    e2e_p99: float
    num_preemptions: int
    num_preempted_requests: int
    max_preemptions_per_request: int
    kv_usage_mean: float
    kv_usage_max: float
    prefix_hit_rate: float
    wall_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _kv_manager(cfg: SimConfig):
    from blocks.cache.manager import KVCacheManager

    return KVCacheManager(cfg.num_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching)


def simulate(trace: Trace, config: SimConfig, cost: CostModel, *, kv_factory: Callable | None = None,
             max_steps: int | None = None) -> SimResult:
    """Run ``trace`` through a fresh scheduler and KV cache manager; return the summary.

    Args:
        trace: requests to submit at their arrival times.
        config: KV size, policy and scheduler limits.
        cost: step-time model.
        kv_factory: ``f(config) -> KV cache manager`` (default: :class:`blocks.cache.manager.KVCacheManager`).
        max_steps: stop after this many steps (None = run until every request finished or was rejected).
    """
    wall0 = time.perf_counter()
    kv = (kv_factory or _kv_manager)(config)
    policy = make_policy(config.policy)
    sched = Scheduler(kv, config.scheduler, policy=policy)
    n = len(trace)
    arrivals = trace.arrival_time.tolist()
    out_lens = trace.output_len.tolist()
    priorities = trace.priority.tolist()
    max_len = config.scheduler.max_model_len
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    n_out = np.zeros(n, dtype=np.int64)
    preempt = np.zeros(n, dtype=np.int64)
    rejected = 0
    clock = 0.0
    idx = 0
    steps = 0
    usage_sum = usage_max = 0.0
    step_time = cost.step_time
    index_of: dict[str, int] = {}
    while idx < n or sched.has_unfinished_requests():
        if max_steps is not None and steps >= max_steps:
            break
        while idx < n and arrivals[idx] <= clock:
            prompt = trace.prompt(idx)
            req = Request(str(idx), prompt, max_tokens=max(1, min(out_lens[idx], max_len - len(prompt))),
                          arrival_time=arrivals[idx], priority=priorities[idx], ignore_eos=True)
            try:
                sched.add_request(req)
                index_of[req.request_id] = idx
            except QueueFullError:
                rejected += 1
            idx += 1
        if not sched.has_unfinished_requests():
            if idx < n:
                clock = max(clock, arrivals[idx])
            continue
        out = sched.schedule()
        steps += 1
        nst = out.num_scheduled_tokens
        cached = out.scheduled_cached_reqs
        ctx = sum(cached.num_computed_tokens)
        new_tokens = sum(nst[r.request_id] for r in out.scheduled_new_reqs)
        if out.total_num_scheduled_tokens - new_tokens == len(cached.req_ids):  # only decodes: q = 1 each
            pairs = ctx + len(cached.req_ids)
        else:
            pairs = 0
            for rid, c in zip(cached.req_ids, cached.num_computed_tokens):
                q = nst[rid]
                pairs += q * c + (q * (q + 1) >> 1)
        for new in out.scheduled_new_reqs:
            q, c = nst[new.request_id], new.num_computed_tokens
            ctx += c
            pairs += q * c + (q * (q + 1) >> 1)
        clock += step_time(out.total_num_scheduled_tokens, ctx, pairs)
        u = kv.usage
        usage_sum += u
        if u > usage_max:
            usage_max = u
        for req in sched.update_from_output(dict.fromkeys(nst, _TOKEN), now=clock):
            i = index_of.pop(req.request_id)
            first[i] = req.first_token_time
            finish[i] = req.finish_time
            n_out[i] = req.num_output_tokens
            preempt[i] = req.num_preemptions
    done = ~np.isnan(finish)
    arr = trace.arrival_time
    ttft = first[done] - arr[done]
    multi = done & (n_out > 1)
    tpot = (finish[multi] - first[multi]) / (n_out[multi] - 1)
    e2e = finish[done] - arr[done]
    hi = done & (trace.priority == 0)
    prompt_tokens = sum(trace.total_prompt_len(i) for i in np.flatnonzero(done)) if n <= 200_000 else 0
    duration = clock - float(arr[0]) if n else 0.0

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else math.nan

    out_tokens = int(n_out.sum())
    return SimResult(
        policy=getattr(policy, "name", str(config.policy)), num_requests=n, num_finished=int(done.sum()),
        num_rejected=rejected, num_steps=steps, duration=duration,
        output_throughput=out_tokens / duration if duration > 0 else math.nan,
        total_throughput=(out_tokens + prompt_tokens) / duration if duration > 0 else math.nan,
        request_throughput=int(done.sum()) / duration if duration > 0 else math.nan,
        ttft_p50=pct(ttft, 50), ttft_p90=pct(ttft, 90), ttft_p99=pct(ttft, 99),
        ttft_p50_hi=pct(first[hi] - arr[hi], 50),
        tpot_p50=pct(tpot, 50), tpot_p90=pct(tpot, 90), tpot_p99=pct(tpot, 99),
        e2e_p50=pct(e2e, 50), e2e_p99=pct(e2e, 99),
        num_preemptions=sched.stats.num_preemptions, num_preempted_requests=int((preempt > 0).sum()),
        max_preemptions_per_request=int(preempt.max()) if n else 0,
        kv_usage_mean=usage_sum / steps if steps else 0.0, kv_usage_max=usage_max,
        prefix_hit_rate=sched.stats.prefix_hit_rate, wall_seconds=time.perf_counter() - wall0,
    )


_COLUMNS = [
    ("policy", "policy", "{}"), ("finished", "num_finished", "{}"), ("rejected", "num_rejected", "{}"),
    ("out tok/s", "output_throughput", "{:.0f}"), ("req/s", "request_throughput", "{:.1f}"),
    ("TTFT p50 s", "ttft_p50", "{:.3f}"), ("TTFT p99 s", "ttft_p99", "{:.3f}"),
    ("TTFT p50 prio0", "ttft_p50_hi", "{:.3f}"),
    ("TPOT p50 ms", "tpot_p50", "{:.2f}"), ("TPOT p99 ms", "tpot_p99", "{:.2f}"),
    ("preempt", "num_preemptions", "{}"), ("KV use mean", "kv_usage_mean", "{:.2f}"),
    ("KV use max", "kv_usage_max", "{:.2f}"), ("prefix hit", "prefix_hit_rate", "{:.3f}"),
    ("steps", "num_steps", "{}"), ("wall s", "wall_seconds", "{:.1f}"),
]


def format_table(results: list[SimResult]) -> str:
    """A Markdown table, one row per result (TPOT in ms, other times in s)."""
    rows = []
    for r in results:
        d = r.as_dict()
        d["tpot_p50"] *= 1e3
        d["tpot_p99"] *= 1e3
        rows.append([fmt.format(d[key]) for _, key, fmt in _COLUMNS])
    head = [c for c, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``blocks simulate``."""
    a = parser.add_argument
    a("--num-requests", type=int, default=10_000)
    a("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at t=0)")
    a("--prompt-len", type=int, default=256, help="mean prompt length after the shared prefix")
    a("--output-len", type=int, default=128, help="mean output length")
    a("--distribution", choices=["fixed", "uniform", "exponential"], default="uniform")
    a("--prefix-groups", type=int, default=0, help="shared-prefix groups (0 = none)")
    a("--prefix-len", type=int, default=0, help="tokens of each group's shared prefix")
    a("--prefix-fraction", type=float, default=1.0, help="fraction of requests in a group")
    a("--num-priorities", type=int, default=1)
    a("--seed", type=int, default=0)
    a("--policies", default="fcfs", help=f"comma-separated, from {sorted(POLICIES)}")
    a("--cache-aware-window", type=int, default=32, help="waiting requests the cache-aware policy ranks")
    a("--cache-aware-max-skips", type=int, default=8, help="bypasses before a request goes first")
    a("--num-blocks", type=int, default=8192)
    a("--block-size", type=int, default=16)
    a("--no-prefix-caching", action="store_true")
    a("--max-num-seqs", type=int, default=256)
    a("--max-num-batched-tokens", type=int, default=8192)
    a("--max-model-len", type=int, default=8192)
    a("--long-prefill-token-threshold", type=int, default=0)
    a("--max-num-queued-requests", type=int, default=None)
    a("--model", choices=sorted(MODEL_PRESETS), default="llama-3-8b", help="cost-model preset (bf16)")
    a("--bandwidth-tbs", type=float, default=3.0, help="memory bandwidth, TB/s")
    a("--tflops", type=float, default=700.0, help="dense FLOP rate, TFLOP/s")
    a("--step-overhead-ms", type=float, default=0.0)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    trace_cfg = TraceConfig(
        num_requests=args.num_requests, request_rate=args.request_rate, prompt_len=args.prompt_len,
        output_len=args.output_len, distribution=args.distribution, num_prefix_groups=args.prefix_groups,
        prefix_len=args.prefix_len, prefix_fraction=args.prefix_fraction, num_priorities=args.num_priorities,
        seed=args.seed, max_prompt_len=max(1, args.max_model_len - args.prefix_len - 1),
    )
    sched_cfg = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, long_prefill_token_threshold=args.long_prefill_token_threshold,
        max_num_queued_requests=args.max_num_queued_requests,
    )
    cost = CostModel.for_model(args.model, bandwidth=args.bandwidth_tbs * 1e12, flop_rate=args.tflops * 1e12,
                               step_overhead=args.step_overhead_ms * 1e-3)
    trace = make_trace(trace_cfg)
    results = []
    for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
        policy = make_policy(name)
        if isinstance(policy, CacheAwarePolicy):
            policy = CacheAwarePolicy(window=args.cache_aware_window, max_skips=args.cache_aware_max_skips)
        cfg = SimConfig(num_blocks=args.num_blocks, block_size=args.block_size,
                        enable_prefix_caching=not args.no_prefix_caching, policy=policy, scheduler=sched_cfg)
        results.append(simulate(trace, cfg, cost))
    print(f"trace: {trace_cfg}")
    print(f"model: {args.model}, {args.bandwidth_tbs} TB/s, {args.tflops} TFLOP/s; KV {args.num_blocks} blocks "
          f"x {args.block_size} tokens; max_num_seqs={args.max_num_seqs}, "
          f"max_num_batched_tokens={args.max_num_batched_tokens}")
    print(format_table(results))
    return 0
