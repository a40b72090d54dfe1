"""Scheduler host-side benchmarks (issue 6): one decode step of ``schedule()`` with 256 and 1024 running requests.

Run: ``python3 -m pytest benchmarks/test_bench_sched.py --benchmark-only``. Each round times one
``Scheduler.schedule()`` call in steady-state decode (every running request computes one token; about
1/16 of them cross a block boundary and call the KV cache manager); the previous step's sampled tokens
are applied in the untimed setup. Targets on the CPU: <= 300 us (256) and <= 1.2 ms (1024) per step;
``extra_info`` holds the median in microseconds and the target. ``update_from_output`` (appending the
step's tokens) is timed the same way.
"""

from __future__ import annotations

import random

import pytest

from blocks.cache.manager import KVCacheManager
from blocks.sched.config import SchedulerConfig
from blocks.sched.request import Request
from blocks.sched.scheduler import Scheduler

TARGET_US = {256: 300.0, 1024: 1200.0}
BLOCK_SIZE = 16


def _decoding_scheduler(num_reqs: int) -> Scheduler:
    rng = random.Random(0)
    kv = KVCacheManager(1 + num_reqs * 48, BLOCK_SIZE, enable_prefix_caching=True)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=num_reqs, max_num_batched_tokens=max(8192, num_reqs),
                                          max_model_len=BLOCK_SIZE * 48))
    for i in range(num_reqs):
        prompt = [rng.randrange(1, 32000) for _ in range(rng.randrange(17, 200))]
        sched.add_request(Request(f"r{i}", prompt, max_tokens=400, ignore_eos=True))
    while sched.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        out = sched.schedule()
        sched.update_from_output(dict.fromkeys(out.num_scheduled_tokens, 7))
    assert sched.num_running == num_reqs
    return sched


def _median_us(benchmark) -> float:
    return benchmark.stats.stats.median * 1e6


@pytest.mark.parametrize("num_reqs", [256, 1024])
def test_schedule_decode_step(benchmark, num_reqs):
    sched = _decoding_scheduler(num_reqs)
    last = {}

    def setup():
        if last:
            sched.update_from_output(dict.fromkeys(last.pop("out").num_scheduled_tokens, 7))

    def step():
        last["out"] = sched.schedule()

    benchmark.pedantic(step, setup=setup, rounds=200, iterations=1, warmup_rounds=5)
    out = last.get("out") or sched.schedule()
    assert out.total_num_scheduled_tokens == num_reqs and not out.preempted_req_ids
    benchmark.extra_info.update(num_running=num_reqs, median_us=round(_median_us(benchmark), 1),
                                target_us=TARGET_US[num_reqs])


@pytest.mark.parametrize("num_reqs", [256, 1024])
def test_update_from_output_decode_step(benchmark, num_reqs):
    sched = _decoding_scheduler(num_reqs)
    pending = {}

    def setup():
        pending["sampled"] = dict.fromkeys(sched.schedule().num_scheduled_tokens, 7)

    def update():
        return sched.update_from_output(pending["sampled"])

    benchmark.pedantic(update, setup=setup, rounds=200, iterations=1, warmup_rounds=5)
    assert sched.num_running == num_reqs
    benchmark.extra_info.update(num_running=num_reqs, median_us=round(_median_us(benchmark), 1))
