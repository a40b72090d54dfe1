"""``Scheduler.fork_request``: a child shares the parent's KV blocks; the partly filled block is copied
on the first write, so neither sequence ever reads the other's tokens (checked by the fake runner)."""

import pytest

from blocks.cache.manager import KVCacheManager
from blocks.sched.config import SchedulerConfig
from blocks.sched.request import Request
from blocks.sched.scheduler import Scheduler
from tests.sched.fake_runner import FakeRunner


def _setup(prompt_len: int):
    kv = KVCacheManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64))
    runner = FakeRunner(4, seed=prompt_len)
    sched.add_request(Request("p", list(range(1, prompt_len + 1)), max_tokens=30))
    return kv, sched, runner


@pytest.mark.parametrize("prompt_len", [4, 6, 7])
def test_fork_shares_full_blocks_and_copies_the_partial_one(prompt_len):
    kv, sched, runner = _setup(prompt_len)
    sampled = runner.execute(sched.schedule())  # prefill; the runner samples p's first token
    children = [sched.fork_request("p", f"c{i}") for i in range(2)]
    shared = kv.get_block_table("p")
    assert all(kv.get_block_table(c.request_id) == shared for c in children)
    assert all(c.all_token_ids == list(range(1, prompt_len + 1)) for c in children)
    for i, c in enumerate(children):  # each child continues with its own token
        sampled[c.request_id] = [40 + i]
    sched.update_from_output(sampled)
    for _ in range(12):  # the fake runner checks every sequence's whole context every step
        sched.update_from_output(runner.execute(sched.schedule()))
        kv.check_invariants()
    tables = [kv.get_block_table(r) for r in ("p", "c0", "c1")]
    full = prompt_len // 4
    assert all(t[:full] == shared[:full] for t in tables)  # full prompt blocks held once
    if prompt_len % 4:
        assert len({t[full] for t in tables}) == 3  # the shared partial block was copied on write
    assert runner.tokens["c0"][prompt_len] == 40 and runner.tokens["c1"][prompt_len] == 41


def test_fork_errors_and_abort_frees_everything():
    kv, sched, runner = _setup(5)
    with pytest.raises(ValueError, match="not a running request"):
        sched.fork_request("p", "c")  # still waiting
    sched.update_from_output(runner.execute(sched.schedule()))
    sched.fork_request("p", "c")
    with pytest.raises(ValueError, match="already in use"):
        sched.fork_request("p", "c")
    sched.abort_request("c")  # aborted before the runner ever saw it
    sched.update_from_output(runner.execute(sched.schedule()))
    sched.abort_request("p")
    sched.schedule()
    assert kv.num_free_blocks == kv.num_blocks - 1
    kv.check_invariants()
