"""Policy tests: priority order and victims, cache-aware preference and its starvation bound, thrash guard."""

from __future__ import annotations

import random

import pytest

from blocks.sched.config import SchedulerConfig
from blocks.sched.policy import CacheAwarePolicy, FCFSPolicy, PriorityPolicy, make_policy
from blocks.sched.request import Request
from blocks.sched.scheduler import Scheduler
from tests.sched.conftest import make_kv
from tests.sched.fake_runner import FakeRunner


def _prompt(rng, n):
    return [rng.randrange(10, 1000) for _ in range(n)]


def test_priority_admits_lower_value_first_fcfs_within(kv_impl):
    rng = random.Random(1)
    kv = make_kv(kv_impl, 1 + 100, 4)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64),
                      policy="priority")
    specs = [(rng.randrange(3), float(rng.randrange(5))) for _ in range(11)]
    for i, (prio, t) in enumerate(specs):
        sched.add_request(Request(f"r{i}", _prompt(rng, 5), max_tokens=1, priority=prio, arrival_time=t))
    order = []
    runner = FakeRunner(4)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        order += [n.request_id for n in out.scheduled_new_reqs]
        sched.update_from_output(runner.execute(out))
    expected = [f"r{i}" for i in sorted(range(11), key=lambda i: (specs[i][0], specs[i][1], i))]
    assert order == expected


def test_victims_follow_the_policy():
    specs = [(0, 5.0), (2, 1.0), (1, 9.0)]
    reqs = [Request(f"r{i}", [1], priority=p, arrival_time=t) for i, (p, t) in enumerate(specs)]
    for i, r in enumerate(reqs):
        r.seq = i
    assert FCFSPolicy().select_victim(reqs).request_id == "r2"  # latest arrival
    assert PriorityPolicy().select_victim(reqs).request_id == "r1"  # lowest priority (largest value)
    assert isinstance(make_policy("cache_aware"), CacheAwarePolicy)
    with pytest.raises(ValueError, match="window"):
        CacheAwarePolicy(window=0)


def test_priority_preempts_the_low_priority_request(kv_impl):
    rng = random.Random(2)
    kv = make_kv(kv_impl, 1 + 16, 4)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, watermark=0),
                      policy="priority")
    low = Request("low", _prompt(rng, 20), max_tokens=40, priority=5, ignore_eos=True, arrival_time=0)
    high = Request("high", _prompt(rng, 20), max_tokens=40, priority=0, ignore_eos=True, arrival_time=1)
    sched.add_request(low)
    sched.add_request(high)
    runner = FakeRunner(4)
    preempted = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        preempted += out.preempted_req_ids
        sched.update_from_output(runner.execute(out))
    # FCFS would preempt "high" (the later arrival); priority preempts "low"
    assert preempted and set(preempted) == {"low"} and high.num_preemptions == 0
    assert low.num_preemptions == len(preempted) and low.num_output_tokens == high.num_output_tokens == 40


def _group_trace(rng, n_groups, per_group, prefix_len, suffix_len):
    prefixes = [_prompt(rng, prefix_len) for _ in range(n_groups)]
    items = [(g, prefixes[g] + _prompt(rng, suffix_len)) for g in range(n_groups) for _ in range(per_group)]
    rng.shuffle(items)
    return items


def test_cache_aware_raises_prefix_hits(kv_impl):
    def run(policy_obj):
        rng = random.Random(9)
        bs = 8
        kv = make_kv(kv_impl, 1 + 17, bs, enable_prefix_caching=True)  # room for 2 prefixes of 64 tokens
        sched = Scheduler(kv, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256, max_model_len=128),
                          policy=policy_obj)
        for i, (_, prompt) in enumerate(_group_trace(rng, 6, 8, 64, 5)):
            sched.add_request(Request(f"r{i}", prompt, max_tokens=2, ignore_eos=True, arrival_time=float(i)))
        runner = FakeRunner(bs)
        while sched.has_unfinished_requests():
            sched.update_from_output(runner.execute(sched.schedule()))
        for rid in runner.retired:
            toks, _, _ = runner.retired[rid]
            runner.assert_computed_once(rid, toks)
        return sched.stats.prefix_hit_rate

    fcfs, aware = run(FCFSPolicy()), run(make_policy("cache_aware"))
    assert fcfs < 0.5 and aware > fcfs + 0.2  # shuffled groups: FCFS keeps evicting the prefix it needs next


def test_cache_aware_never_skips_a_request_more_than_max_skips(kv_impl):
    rng = random.Random(3)
    bs = 4
    kv = make_kv(kv_impl, 1 + 200, bs, enable_prefix_caching=True)
    policy = CacheAwarePolicy(window=16, max_skips=3)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=256, max_model_len=128),
                      policy=policy)
    hot = _prompt(rng, 40)
    runner = FakeRunner(bs)
    sched.add_request(Request("warm", hot + [1], max_tokens=1, arrival_time=0.0))
    sched.update_from_output(runner.execute(sched.schedule()))
    sched.add_request(Request("cold", _prompt(rng, 41), max_tokens=1, arrival_time=1.0))  # no cached prefix
    for i in range(12):  # later arrivals that all hit the cached prefix
        sched.add_request(Request(f"hot{i}", hot + [2 + i], max_tokens=1, arrival_time=2.0 + i))
    order = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        order += [n.request_id for n in out.scheduled_new_reqs]
        sched.update_from_output(runner.execute(out))
    assert order.index("cold") == 3  # bypassed exactly max_skips times, then first
    assert order[:3] == ["hot0", "hot1", "hot2"]


def test_thrash_guard_stops_resume_preempt_cycles(kv_impl):
    def run(guard):
        rng = random.Random(0)
        kv = make_kv(kv_impl, 1 + 40, 4)
        sched = Scheduler(kv, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=160,
                                              thrash_guard=guard, watermark=0.0))
        reqs = [Request(f"d{i}", _prompt(rng, 8), max_tokens=30, ignore_eos=True) for i in range(3)]
        reqs.append(Request("long", _prompt(rng, 100), max_tokens=4, ignore_eos=True))
        for r in reqs:
            sched.add_request(r)
        runner = FakeRunner(4)
        while sched.has_unfinished_requests():
            sched.update_from_output(runner.execute(sched.schedule()))
        for r in reqs:
            runner.assert_computed_once(r.request_id, r.all_token_ids)
            assert r.num_output_tokens == r.max_tokens
        return reqs[-1], sched.stats

    long_on, stats_on = run(True)
    long_off, _ = run(False)
    assert long_off.num_preemptions >= 3  # resumed with one chunk's blocks, preempted again (issue 25538)
    assert long_on.num_preemptions <= 1 and stats_on.num_thrash_guard_deferrals > 0
    assert [reason for _, reason in long_off.preemptions] == ["out_of_blocks"] * long_off.num_preemptions
