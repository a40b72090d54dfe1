"""Scenario tests: preemption under memory pressure, long prompts among decodes, aborts, admission control."""

from __future__ import annotations

import random

import pytest

from blocks.sched.config import SchedulerConfig
from blocks.sched.errors import QueueFullError
from blocks.sched.request import Request, RequestStatus
from blocks.sched.scheduler import Scheduler
from tests.sched.conftest import make_kv
from tests.sched.fake_runner import FakeRunner


def _rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 1000) for _ in range(n)]


def _run(sched, runner, *, max_steps=10_000, on_step=None):
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        out = sched.schedule()
        if on_step is not None:
            on_step(out)
        finished += sched.update_from_output(runner.execute(out))
    raise AssertionError("did not finish")


def test_small_kv_forces_preemption_and_every_request_finishes(kv_impl):
    rng = random.Random(3)
    bs = 5
    kv = make_kv(kv_impl, 1 + 37, bs)  # 185 token slots for 9 requests of up to 31 + 43 tokens
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=9, max_num_batched_tokens=97, max_model_len=180))
    runner = FakeRunner(bs, seed=1)
    lens = [(rng.randrange(3, 32), rng.randrange(20, 44)) for _ in range(9)]
    for i, (p, o) in enumerate(lens):
        sched.add_request(Request(f"r{i}", _rand_prompt(rng, p), max_tokens=o, arrival_time=i, ignore_eos=True))
    preempted_seen = set()
    finished = _run(sched, runner, on_step=lambda out: preempted_seen.update(out.preempted_req_ids))
    assert sched.stats.num_preemptions > 0
    assert sched.stats.preemptions_by_reason == {"out_of_blocks": sched.stats.num_preemptions}
    assert {r.request_id for r in finished} == {f"r{i}" for i in range(9)}
    by_id = {r.request_id: r for r in finished}
    for i, (p, o) in enumerate(lens):
        r = by_id[f"r{i}"]
        assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == o and r.num_prompt_tokens == p
        runner.assert_computed_once(r.request_id, r.all_token_ids)
        assert r.num_preemptions == len(r.preemptions) == (r.request_id in preempted_seen) * r.num_preemptions
    assert sum(r.num_preemptions for r in finished) == sched.stats.num_preemptions
    assert max(r.num_preemptions for r in finished) <= 3, "thrashing"
    assert kv.num_free_blocks == 37


def test_long_prompt_does_not_stop_decodes(kv_impl):
    rng = random.Random(5)
    bs = 16
    kv = make_kv(kv_impl, 1 + 1400, bs)
    budget = 2048
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=budget, max_model_len=12_000))
    runner = FakeRunner(bs, seed=2)
    for i in range(50):
        sched.add_request(Request(f"d{i}", _rand_prompt(rng, rng.randrange(1, 40)), max_tokens=300, ignore_eos=True))
    for _ in range(3):  # all 50 in decode
        sched.update_from_output(runner.execute(sched.schedule()))
    assert all(r.num_output_tokens >= 1 for r in sched.running)
    sched.add_request(Request("long", _rand_prompt(rng, 10_000), max_tokens=5, ignore_eos=True))
    long_req = sched.get_request("long")
    steps = 0
    while long_req.num_output_tokens == 0:
        before = {r.request_id: r.num_output_tokens for r in sched.running if r.request_id != "long"}
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= budget
        for rid in before:  # every decode advances by one token in every step of the long prefill
            assert out.num_scheduled_tokens[rid] == 1
        assert out.num_scheduled_tokens["long"] == min(budget - 50, 10_000 - long_req.num_computed_tokens
                                                       + out.num_scheduled_tokens["long"])
        sched.update_from_output(runner.execute(out))
        for r in sched.running:
            if r.request_id in before:
                assert r.num_output_tokens == before[r.request_id] + 1
        steps += 1
    assert steps == -(-10_000 // (budget - 50))


def test_long_prefill_threshold_lets_short_prompts_in(kv_impl):
    bs = 8
    rng = random.Random(7)

    def first_token_step(threshold):
        kv = make_kv(kv_impl, 1 + 1000, bs)
        sched = Scheduler(kv, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096,
                                              long_prefill_token_threshold=threshold))
        runner = FakeRunner(bs)
        sched.add_request(Request("long", _rand_prompt(rng, 3000), max_tokens=2))
        sched.update_from_output(runner.execute(sched.schedule()))
        sched.add_request(Request("short", _rand_prompt(rng, 20), max_tokens=2))
        step = 0
        while not sched.get_request("short").output_token_ids:
            sched.update_from_output(runner.execute(sched.schedule()))
            step += 1
        return step

    assert first_token_step(0) >= 5  # the long prompt holds the whole budget until its prefill ends
    assert first_token_step(256) == 1


@pytest.mark.parametrize("where", ["waiting", "prefill", "decode", "preempted"])
def test_abort_in_any_state_frees_everything(kv_impl, where):
    bs = 4
    kv = make_kv(kv_impl, 1 + 30, bs, enable_prefix_caching=True)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=100))
    runner = FakeRunner(bs)
    rng = random.Random(11)
    sched.add_request(Request("a", _rand_prompt(rng, 50), max_tokens=60, ignore_eos=True))
    sched.add_request(Request("b", _rand_prompt(rng, 17), max_tokens=60, ignore_eos=True))
    target = {"waiting": "b", "prefill": "a", "decode": "a", "preempted": "b"}[where]
    req = sched.get_request(target)

    def reached():
        if where == "waiting":
            return req.status is RequestStatus.WAITING
        if where == "prefill":
            return req.status is RequestStatus.RUNNING and 0 < req.num_computed_tokens < req.num_prompt_tokens
        if where == "decode":
            return req.status is RequestStatus.RUNNING and req.num_output_tokens > 2
        return req.status is RequestStatus.PREEMPTED

    for _ in range(200):
        if reached():
            break
        sched.update_from_output(runner.execute(sched.schedule()))
    assert reached()
    assert sched.abort_request(target)
    assert req.status is RequestStatus.FINISHED_ABORTED and req.finish_reason == "abort"
    assert target not in sched.requests and req not in sched.running
    out = sched.schedule()
    assert target in out.finished_req_ids and target not in out.num_scheduled_tokens
    sched.update_from_output(runner.execute(out))
    _run(sched, runner)
    assert kv.num_free_blocks == 30 and sched.num_waiting == 0
    assert sched.stats.num_finished == {"abort": 1, "length": 1}


def test_admission_control_raises_queue_full_then_recovers(kv_impl):
    kv = make_kv(kv_impl, 1 + 64, 4)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                                          max_num_queued_requests=3, max_num_queued_tokens=50))
    for i in range(3):
        sched.add_request(Request(f"r{i}", list(range(1, 11)), max_tokens=3))
    with pytest.raises(QueueFullError) as e:
        sched.add_request(Request("r3", [5], max_tokens=1))
    assert e.value.field == "max_num_queued_requests" and e.value.limit == 3 and e.value.http_status == 503
    assert "r3" not in sched.requests
    sched.schedule()  # admits two: the queue now holds one request of 10 tokens
    assert sched.num_waiting == 1 and sched.num_queued_tokens == 10
    with pytest.raises(QueueFullError) as e:
        sched.add_request(Request("big", list(range(1, 42)), max_tokens=1))
    assert e.value.field == "max_num_queued_tokens" and e.value.value == 51
    sched.add_request(Request("ok", list(range(1, 41)), max_tokens=1))
    assert sched.stats.num_rejected == 2


def test_invalid_arguments_name_the_field():
    kv = make_kv("fake", 1 + 8, 4)
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(kv, SchedulerConfig(max_model_len=33))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="watermark"):
        SchedulerConfig(watermark=1.5)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(enable_chunked_prefill=False, long_prefill_token_threshold=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=101)
    with pytest.raises(ValueError, match="max_num_queued_requests"):
        SchedulerConfig(max_num_queued_requests=0)
    with pytest.raises(ValueError, match="min_tokens"):
        Request("x", [1], max_tokens=3, min_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        Scheduler(kv, SchedulerConfig(max_model_len=32), policy="lifo")
    with pytest.raises(ValueError, match="max_tokens"):
        Request("x", [1], max_tokens=0)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("x", [])
    sched = Scheduler(kv, SchedulerConfig(max_model_len=32))
    with pytest.raises(ValueError, match="max_model_len=32"):
        sched.add_request(Request("x", list(range(33))))
    sched.add_request(Request("x", [1, 2]))
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request(Request("x", [1, 2]))


def test_stop_conditions_eos_min_tokens_stop_ids_and_checker(kv_impl):
    kv = make_kv(kv_impl, 1 + 40, 4)
    def checker(r):
        return RequestStatus.FINISHED_STOPPED if r.output_token_ids[-2:] == [8, 9] else None

    sched = Scheduler(kv, SchedulerConfig(max_model_len=40), stop_checker=checker)
    sched.add_request(Request("eos", [1, 2, 3], max_tokens=10, eos_token_id=2, min_tokens=2))
    sched.add_request(Request("stop", [1, 2, 3], max_tokens=10, stop_token_ids=[5, 6]))
    sched.add_request(Request("checker", [1, 2, 3], max_tokens=10))
    sched.add_request(Request("cap", [1] * 37, max_tokens=10))  # max_model_len stops it after 3 outputs
    script = {"eos": [2, 4, 2], "stop": [4, 6], "checker": [8, 9], "cap": [3, 3, 3]}
    done = {}
    for k in range(3):
        sched.schedule()
        sampled = {rid: [toks[k]] for rid, toks in script.items() if rid not in done and k < len(toks)}
        for r in sched.update_from_output(sampled, now=float(k)):
            done[r.request_id] = r
    assert done["eos"].output_token_ids == [2, 4, 2] and done["eos"].finish_reason == "stop"
    assert done["stop"].output_token_ids == [4, 6] and done["stop"].finish_reason == "stop"
    assert done["checker"].output_token_ids == [8, 9] and done["checker"].finish_reason == "stop"
    assert done["cap"].num_tokens == 40 and done["cap"].finish_reason == "length"
    assert done["eos"].first_token_time == 0.0 and done["eos"].finish_time == 2.0
    assert kv.num_free_blocks == 40


def test_metrics_and_preemption_records_are_visible(kv_impl):
    rng = random.Random(12)
    kv = make_kv(kv_impl, 1 + 12, 4, enable_prefix_caching=True)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=32, max_model_len=48, watermark=0))
    reqs = [Request(f"r{i}", _rand_prompt(rng, 9), max_tokens=30, ignore_eos=True, arrival_time=i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    m = sched.metrics()
    assert m["num_requests_waiting"] == 3 and m["num_requests_running"] == 0 and m["kv_cache_usage_perc"] == 0.0
    runner = FakeRunner(4)
    resumed = set()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        resumed |= {n.request_id for n in out.scheduled_new_reqs if n.resumed}
        sched.update_from_output(runner.execute(out))
        assert 0.0 <= sched.metrics()["kv_cache_usage_perc"] <= 1.0
    m = sched.metrics()
    assert m["num_preemptions_total"] == sum(r.num_preemptions for r in reqs) > 0
    assert resumed == {r.request_id for r in reqs if r.num_preemptions}
    for r in reqs:
        assert all(reason == "out_of_blocks" and 0 <= step < sched.step for step, reason in r.preemptions)


def test_prefix_hits_count_as_computed_and_respect_cache_salt(kv_impl):
    rng = random.Random(13)
    bs = 16
    kv = make_kv(kv_impl, 1 + 64, bs, enable_prefix_caching=True)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256))
    runner = FakeRunner(bs)
    prompt = _rand_prompt(rng, 45)
    sched.add_request(Request("a", prompt, max_tokens=3, cache_salt="u1"))
    _run(sched, runner)
    hits = {}
    for rid, salt in [("same", "u1"), ("other", "u2"), ("none", None)]:
        sched.add_request(Request(rid, prompt, max_tokens=3, cache_salt=salt))
        out = sched.schedule()
        (new,) = out.scheduled_new_reqs
        hits[rid] = (new.num_computed_tokens, out.num_scheduled_tokens[rid])
        sched.update_from_output(runner.execute(out))
        _run(sched, runner)
    assert hits == {"same": (32, 13), "other": (0, 45), "none": (0, 45)}  # 2 full blocks; the last token is recomputed
    assert sched.stats.prefix_hit_tokens == 32 and sched.stats.prefix_query_tokens == 4 * 45


def test_victim_already_scheduled_this_step_is_unscheduled(kv_impl):
    """Priority: the low-priority request was scheduled earlier in the step when a later one runs out of blocks."""
    rng = random.Random(14)
    kv = make_kv(kv_impl, 1 + 5, 4, enable_prefix_caching=True)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=20, watermark=0),
                      policy="priority")
    runner = FakeRunner(4)
    low = Request("L", _rand_prompt(rng, 5), max_tokens=6, priority=5, ignore_eos=True, arrival_time=0.0)
    high = Request("H", _rand_prompt(rng, 12), max_tokens=6, priority=0, ignore_eos=True, arrival_time=1.0)
    sched.add_request(low)
    sched.update_from_output(runner.execute(sched.schedule()))  # L: prefill (2 blocks)
    sched.add_request(high)
    out = sched.schedule()  # L decodes inside its block; H takes the last 3 blocks
    assert out.num_scheduled_tokens == {"L": 1, "H": 12} and kv.num_free_blocks == 0
    sched.update_from_output(runner.execute(out))
    out = sched.schedule()  # L (first in line) fits; H needs a 4th block: the victim is L, already scheduled
    assert out.preempted_req_ids == ["L"]
    assert out.num_scheduled_tokens == {"H": 1} and out.scheduled_cached_reqs.req_ids == ["H"]
    assert out.total_num_scheduled_tokens == 1 and low.num_computed_tokens == 0
    sched.update_from_output(runner.execute(out))
    _run(sched, runner)
    assert low.num_preemptions == 1 and high.num_preemptions == 0
    assert low.num_output_tokens == high.num_output_tokens == 6
    for r in (low, high):
        runner.assert_computed_once(r.request_id, r.all_token_ids)
    assert kv.num_free_blocks == 5


def test_many_running_finish_one_per_step(kv_impl):
    rng = random.Random(15)
    kv = make_kv(kv_impl, 1 + 400, 8)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=128))
    reqs = [Request(f"r{i}", _rand_prompt(rng, rng.randrange(1, 50)), max_tokens=i + 1, ignore_eos=True)
            for i in rng.sample(range(25), 25)]
    for r in reqs:
        sched.add_request(r)
    runner = FakeRunner(8)
    step = 0
    while sched.has_unfinished_requests():
        finished = sched.update_from_output(runner.execute(sched.schedule()))
        step += 1
        assert [r.num_output_tokens for r in finished] == [step]  # r{step-1} has max_tokens == step
        assert sched.num_running == 25 - step
    assert all(r.num_output_tokens == r.max_tokens for r in reqs) and kv.num_free_blocks == 400


def test_tokens_for_aborted_or_unknown_requests_are_ignored(kv_impl):
    kv = make_kv(kv_impl, 1 + 20, 4)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64))
    runner = FakeRunner(4)
    a, b = Request("a", [5, 6, 7], max_tokens=4), Request("b", [8, 9], max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    sampled = runner.execute(sched.schedule())
    assert sched.abort_request("a")  # between the forward and the update (an engine race)
    sampled["ghost"] = [3]
    assert sched.update_from_output(sampled) == []
    assert a.output_token_ids == [] and b.output_token_ids == sampled["b"]
    assert "ghost" not in sched.requests and kv.num_free_blocks == 20 - 1


def test_async_victim_skipped_with_its_last_token_in_flight():
    """Asynchronous reporting: the policy's victim sits before the current request in ``running`` but was
    not scheduled this step (its last token is in flight). Preempting it gives back nothing it did not take."""
    from blocks.cache.manager import KVCacheManager

    kv = KVCacheManager(4, 4)  # 3 usable blocks of 4 tokens
    sched = Scheduler(kv, SchedulerConfig(max_model_len=12, watermark=0.0), policy="priority")
    sched.add_request(Request("B", [1, 2, 3], max_tokens=2, priority=1))
    unread, finished = None, []
    for step in range(8):
        if step == 1:
            sched.add_request(Request("A", list(range(1, 9)), max_tokens=3, priority=0))
        out = sched.schedule()
        sampled = {r.request_id: 5 for r in sched.running if r.in_flight_step == out.step}
        sampled, unread = unread, sampled
        finished += [r.request_id for r in sched.update_from_output(sampled or {})]
        if not sched.has_unfinished_requests() and not unread:
            break
    assert sched.stats.num_preemptions >= 1 and sorted(finished) == ["A", "B"]
    assert kv.num_free_blocks == 3
