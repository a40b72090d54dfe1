"""Simulator tests: small traces against hand-computed times, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blocks.sched.config import SchedulerConfig
from blocks.sched.simulate import SimConfig, simulate
from blocks.sched.trace import CostModel, Trace, TraceConfig, make_trace
from tests.sched.conftest import make_kv

MS = 1e-3
FLAT = CostModel(weight_bytes=1e6, bandwidth=1e9)  # every non-empty step takes exactly 1 ms


def _trace(prompts, outputs, arrivals=None, groups=None, prefixes=(), priorities=None):
    n = len(prompts)
    return Trace(
        arrival_time=np.asarray(arrivals if arrivals is not None else [0.0] * n, dtype=float),
        prompt_len=np.asarray(prompts), output_len=np.asarray(outputs),
        priority=np.asarray(priorities if priorities is not None else [0] * n),
        group=np.asarray(groups if groups is not None else [-1] * n), prefixes=[list(p) for p in prefixes],
    )


def _sim(trace, cost=FLAT, *, kv_impl="real", num_blocks=257, block_size=16, policy="fcfs", **sched):
    sched.setdefault("max_model_len", 1024)
    cfg = SimConfig(num_blocks=num_blocks, block_size=block_size, policy=policy, scheduler=SchedulerConfig(**sched))
    return simulate(trace, cfg, cost, kv_factory=lambda c: make_kv(kv_impl, c.num_blocks, c.block_size,
                                                                    enable_prefix_caching=c.enable_prefix_caching))


@pytest.mark.parametrize("prompt,output", [(10, 5), (1, 1), (97, 17)])
def test_one_request_flat_cost(kv_impl, prompt, output):
    r = _sim(_trace([prompt], [output]), kv_impl=kv_impl)
    # one prefill step yields the first token, then one step per further token
    assert r.num_steps == output
    assert r.ttft_p50 == pytest.approx(1 * MS)
    assert r.e2e_p50 == pytest.approx(output * MS)
    assert r.duration == pytest.approx(output * MS)
    assert r.output_throughput == pytest.approx(output / (output * MS))
    if output > 1:
        assert r.tpot_p50 == pytest.approx(1 * MS)
    else:
        assert math.isnan(r.tpot_p50)


def test_max_num_seqs_one_serializes(kv_impl):
    r = _sim(_trace([10, 7], [5, 3]), kv_impl=kv_impl, max_num_seqs=1)
    # request 0: steps 1..5; request 1: prefill at step 6 (first token at 6 ms), done at 8 ms
    assert r.num_steps == 8
    assert r.ttft_p50 == pytest.approx(np.percentile([1 * MS, 6 * MS], 50))
    assert r.ttft_p99 == pytest.approx(np.percentile([1 * MS, 6 * MS], 99))
    assert r.e2e_p99 == pytest.approx(np.percentile([5 * MS, 8 * MS], 99))
    assert r.request_throughput == pytest.approx(2 / (8 * MS))


def test_chunked_prefill_and_late_arrival(kv_impl):
    # budget 4: a 10-token prompt needs 3 steps; the second request arrives at t = 1 s to an idle server
    r = _sim(_trace([10, 3], [2, 2], arrivals=[0.0, 1.0]), kv_impl=kv_impl, max_num_batched_tokens=4)
    assert r.num_steps == 3 + 1 + 1 + 1
    assert r.ttft_p50 == pytest.approx(np.percentile([3 * MS, 1 * MS], 50))
    assert r.duration == pytest.approx(1.0 + 2 * MS)


def test_kv_read_cost_per_decode_step(kv_impl):
    cost = CostModel(weight_bytes=1e6, kv_bytes_per_token=1000.0, bandwidth=1e9)
    r = _sim(_trace([10], [3]), cost, kv_impl=kv_impl)
    prefill = (1e6 + 10 * 1000) / 1e9  # writes 10 tokens of KV
    dec1 = (1e6 + (10 + 1) * 1000) / 1e9  # reads 10, writes 1
    dec2 = (1e6 + (11 + 1) * 1000) / 1e9
    assert r.ttft_p50 == pytest.approx(prefill)
    assert r.e2e_p50 == pytest.approx(prefill + dec1 + dec2)
    assert r.tpot_p50 == pytest.approx((dec1 + dec2) / 2)


def test_compute_bound_roofline():
    cost = CostModel(weight_bytes=0.0, flops_per_token=1e9, attn_flops_per_pair=1e6, flop_rate=1e12,
                     bandwidth=1e9, step_overhead=2e-6)
    assert cost.step_time(10, 0, 55) == pytest.approx(2e-6 + (10 * 1e9 + 55 * 1e6) / 1e12)
    assert cost.step_time(0, 5, 5) == 0.0
    r = _sim(_trace([10], [1]), cost)
    assert r.ttft_p50 == pytest.approx(2e-6 + (10e9 + 55e6) / 1e12)  # 10 causal queries: 55 pairs


def test_prefix_hits_and_rate(kv_impl):
    rng = np.random.default_rng(4)
    prefix = rng.integers(1, 1000, 32).tolist()
    trace = _trace([8, 8, 5], [2, 2, 2], arrivals=[0.0, 1.0, 2.0], groups=[0, 0, -1], prefixes=[prefix])
    r = _sim(trace, kv_impl=kv_impl)
    # the second request finds the 2 full prefix blocks (32 tokens); the third shares nothing
    assert r.prefix_hit_rate == pytest.approx(32 / (40 + 40 + 5))
    assert r.ttft_p50 == pytest.approx(1 * MS)


def test_queue_cap_rejects_and_small_kv_preempts(kv_impl):
    r = _sim(_trace([10, 10, 10], [4, 4, 4]), kv_impl=kv_impl, max_num_queued_requests=1)
    assert r.num_rejected == 2 and r.num_finished == 1
    r = _sim(_trace([30] * 6, [40] * 6), kv_impl=kv_impl, num_blocks=1 + 12, block_size=8, max_model_len=96)
    assert r.num_finished == 6 and r.num_preemptions > 0 and r.num_preempted_requests > 0
    assert r.kv_usage_max == pytest.approx(1.0, abs=0.1)


def test_trace_is_deterministic_and_respects_config():
    cfg = TraceConfig(num_requests=500, request_rate=20.0, prompt_len=40, output_len=9, distribution="exponential",
                      max_prompt_len=100, num_prefix_groups=3, prefix_len=17, prefix_fraction=0.5, num_priorities=4,
                      seed=7)
    a, b = make_trace(cfg), make_trace(cfg)
    assert np.array_equal(a.arrival_time, b.arrival_time) and a.prompt(13) == b.prompt(13)
    assert np.all(np.diff(a.arrival_time) >= 0) and a.prompt_len.max() <= 100 and a.prompt_len.min() >= 1
    assert abs(len(a) / a.arrival_time[-1] - 20.0) < 4.0
    assert set(a.priority.tolist()) == {0, 1, 2, 3}
    member = np.flatnonzero(a.group >= 0)
    assert 150 < len(member) < 350
    i = int(member[0])
    assert a.prompt(i)[:17] == a.prefixes[int(a.group[i])] and len(a.prompt(i)) == a.total_prompt_len(i)
    with pytest.raises(ValueError, match="distribution"):
        TraceConfig(distribution="zipf")
    with pytest.raises(ValueError, match="request_rate"):
        TraceConfig(request_rate=0)


def test_cli_prints_one_row_per_policy(capsys):
    from blocks.cli import main

    rc = main(["simulate", "--num-requests", "60", "--prompt-len", "20", "--output-len", "6", "--num-blocks", "600",
               "--max-model-len", "256", "--prefix-groups", "2", "--prefix-len", "32", "--num-priorities", "2",
               "--policies", "fcfs,priority,cache_aware"])
    text = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in text.splitlines() if line.startswith("| ") and "policy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["fcfs", "priority", "cache_aware"]
    assert all(r.split("|")[2].strip() == "60" for r in rows)  # all finished
