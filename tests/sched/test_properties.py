"""Hypothesis property tests: the scheduler driven by a checking fake model (tests/sched/fake_runner.py)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blocks.sched.config import SchedulerConfig
from blocks.sched.request import Request, RequestStatus
from blocks.sched.scheduler import Scheduler
from tests.sched.conftest import make_kv, real_kv_cls
from tests.sched.fake_runner import FakeRunner

MAX_MODEL_LEN = 96
KV = ["fake"] + (["real"] if real_kv_cls() is not None else [])

request_st = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 60),
    "max_tokens": st.integers(1, 24),
    "arrival": st.integers(0, 12),
    "priority": st.integers(0, 2),
    "group": st.sampled_from([None, 0, 1]),
})
setup_st = st.fixed_dictionaries({
    "kv": st.sampled_from(KV),
    "block_size": st.sampled_from([1, 2, 3, 4, 16]),
    "extra_blocks": st.integers(0, 40),
    "max_num_seqs": st.integers(1, 7),
    "budget": st.integers(1, 70),
    "threshold": st.sampled_from([0, 0, 1, 5, 17]),
    "policy": st.sampled_from(["fcfs", "priority", "cache_aware"]),
    "prefix": st.booleans(),
    "eos": st.sampled_from([None, 7]),
    "chunked": st.sampled_from([True, True, False]),
    "async": st.booleans(),  # each step's tokens reported after the next step is scheduled
})


def _build(setup):
    bs = setup["block_size"]
    need = -(-MAX_MODEL_LEN // bs)
    kv = make_kv(setup["kv"], need + 1 + setup["extra_blocks"], bs, enable_prefix_caching=setup["prefix"])
    if not setup["chunked"]:  # whole prompts only: the budget must hold the longest one
        setup.update(budget=max(setup["budget"], MAX_MODEL_LEN), threshold=0)
    cfg = SchedulerConfig(
        max_num_seqs=setup["max_num_seqs"], max_num_batched_tokens=setup["budget"], max_model_len=MAX_MODEL_LEN,
        long_prefill_token_threshold=setup["threshold"], enable_chunked_prefill=setup["chunked"],
    )
    return kv, Scheduler(kv, cfg, policy=setup["policy"])


def _prompt(rng_seed: int, spec) -> list[int]:
    import random

    rng = random.Random(rng_seed)
    prefix = [100 + spec["group"]] * 20 if spec["group"] is not None else []
    body = [rng.randrange(8, 50) for _ in range(spec["prompt_len"])]
    return (prefix + body)[: spec["prompt_len"]]


def _check_step(sched: Scheduler, out, setup) -> None:
    if not setup["chunked"]:  # a prompt is computed in one step
        for new in out.scheduled_new_reqs:
            assert new.num_computed_tokens + out.num_scheduled_tokens[new.request_id] == len(new.token_ids)
    assert out.total_num_scheduled_tokens <= setup["budget"]
    assert len(out.num_scheduled_tokens) <= setup["max_num_seqs"]
    assert sched.num_running <= setup["max_num_seqs"]
    if setup["threshold"]:
        assert max(out.num_scheduled_tokens.values(), default=0) <= setup["threshold"]
    for req in sched.running:
        assert req.status is RequestStatus.RUNNING
        assert req.num_computed_tokens <= req.num_tokens + req.num_in_flight
        assert req.num_in_flight <= (2 if setup["async"] else 1)
        if req.num_in_flight and not setup["async"]:
            assert req.in_flight_step == sched.step - 1  # a synchronous engine reports before scheduling


def _check_finished(req: Request, runner: FakeRunner, eos, late_stop: bool = False) -> None:
    runner.assert_computed_once(req.request_id, req.all_token_ids, late_stop=late_stop)
    out = req.output_token_ids
    assert 1 <= len(out) <= req.max_tokens
    if req.status is RequestStatus.FINISHED_STOPPED:
        assert out[-1] == eos and eos not in out[:-1]
    else:
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert len(out) == req.max_tokens or req.num_tokens >= MAX_MODEL_LEN
        assert eos is None or eos not in out[:-1]  # max_tokens is checked before EOS (as vLLM)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setup_st, specs=st.lists(request_st, min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_every_trace_finishes_with_each_token_computed_once(setup, specs, seed):
    kv, sched = _build(setup)
    free0 = kv.num_free_blocks
    runner = FakeRunner(sched.block_size, seed=seed)
    reqs = [
        Request(f"r{i}", _prompt(seed + i, s), max_tokens=s["max_tokens"], arrival_time=float(s["arrival"]),
                priority=s["priority"], eos_token_id=setup["eos"])
        for i, s in enumerate(specs)
    ]
    pending = sorted(reqs, key=lambda r: r.arrival_time)
    done: list[Request] = []
    step = idle = 0
    unread = None  # async: the last step's samples, reported after the next step is scheduled
    while pending or sched.has_unfinished_requests():
        while pending and pending[0].arrival_time <= step:
            sched.add_request(pending.pop(0))
        out = sched.schedule()
        _check_step(sched, out, setup)
        idle = idle + 1 if out.is_empty and sched.has_unfinished_requests() and unread is None else 0
        assert idle <= 2, "scheduler made no progress"
        sampled = runner.execute(out)
        if setup["async"]:
            sampled, unread = unread, sampled
        finished = sched.update_from_output(sampled or {})
        for req in finished:
            _check_finished(req, runner, setup["eos"], late_stop=setup["async"])
        done += finished
        step += 1
        assert step < 5000, "livelock"
    assert len(done) == len(reqs)
    event(f"preempted: {sched.stats.num_preemptions > 0}")
    event(f"prefix hits: {sched.stats.prefix_hit_tokens > 0}")
    assert kv.num_free_blocks == free0, "blocks leaked"
    assert not sched.running and sched.num_waiting == 0 and sched.num_queued_tokens == 0
    if setup["policy"] == "fcfs":  # no request is admitted after a later arrival
        order = sorted(reqs, key=lambda r: (r.arrival_time, r.seq))
        firsts = [r.first_scheduled_step for r in order]
        assert firsts == sorted(firsts)


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, aborts (in any state) and steps; blocks are conserved and all free at the end."""

    @initialize(setup=setup_st)
    def setup(self, setup):
        self.cfg = setup
        self.kv, self.sched = _build(setup)
        self.free0 = self.kv.num_free_blocks
        self.runner = FakeRunner(self.sched.block_size)
        self.n = 0
        self.live: list[str] = []
        self.unread = None  # async: the last step's samples

    @rule(spec=request_st)
    def add(self, spec):
        rid = f"q{self.n}"
        self.n += 1
        self.sched.add_request(Request(rid, _prompt(self.n, spec), max_tokens=spec["max_tokens"],
                                       priority=spec["priority"], eos_token_id=self.cfg["eos"]))
        self.live.append(rid)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(self.live))
        req = self.sched.get_request(rid)
        assert self.sched.abort_request(rid)
        assert req.status is RequestStatus.FINISHED_ABORTED
        assert not self.sched.abort_request(rid)
        self.live.remove(rid)

    @rule()
    def step(self):
        out = self.sched.schedule()
        _check_step(self.sched, out, self.cfg)
        sampled = self.runner.execute(out)
        if self.cfg["async"]:
            sampled, self.unread = self.unread, sampled
        for req in self.sched.update_from_output(sampled or {}):
            _check_finished(req, self.runner, self.cfg["eos"], late_stop=self.cfg["async"])
            self.live.remove(req.request_id)

    @invariant()
    def blocks_conserved(self):
        if not hasattr(self, "sched"):
            return
        held = set()
        for req in self.sched.running:
            table = self.kv.get_block_table(req.request_id)
            assert len(table) == req.num_blocks
            held.update(table)
        assert len(held) + self.kv.num_free_blocks == self.free0
        assert sorted(self.live) == sorted(self.sched.requests)
        for rid in self.live:  # in flight: at most the unread step's token and the one scheduled after it
            assert self.sched.get_request(rid).num_in_flight <= (2 if self.cfg["async"] else 0)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for rid in list(self.live):
            assert self.sched.abort_request(rid)
        assert self.kv.num_free_blocks == self.free0
        assert not self.sched.running and self.sched.num_waiting == 0


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
