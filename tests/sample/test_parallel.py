"""Parallel sampling bookkeeping: child ids, derived seeds, KV forks and output collection."""

import pytest
import torch

from blocks.sample.batch import SamplingBatch
from blocks.sample.parallel import derive_seed, fork_parallel
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler


def test_children_ids_seeds_and_forks():
    group = fork_parallel("req", SamplingParams(n=4, seed=11, temperature=0.9))
    assert [c.request_id for c in group.children] == ["0_req", "1_req", "2_req", "3_req"]
    seeds = [c.params.seed for c in group.children]
    assert seeds == [derive_seed(11, i) for i in range(4)] and len(set(seeds)) == 4
    assert all(c.params.n == 1 and c.params.temperature == 0.9 for c in group.children)
    assert group.forks == [("0_req", "1_req"), ("0_req", "2_req"), ("0_req", "3_req")]
    assert [c.params.seed for c in fork_parallel("x", SamplingParams(n=2)).children] == [None, None]
    assert derive_seed(11, 2) == derive_seed(11, 2) != derive_seed(12, 2)
    with pytest.raises(ValueError, match="index"):
        derive_seed(1, -1)


def test_group_collects_outputs_in_order_and_finishes_when_all_did():
    group = fork_parallel("p", SamplingParams(n=3))
    group.record("2_p", "c", finished=True)
    group.record("0_p", "a", finished=False)
    assert not group.finished and group.ordered_outputs() == ["a", "c"]
    group.record("0_p", "a2", finished=True)
    group.record("1_p", "b", finished=True)
    assert group.finished and group.ordered_outputs() == ["a2", "b", "c"]
    with pytest.raises(ValueError, match="not a child"):
        group.record("9_p", "z", finished=True)


def test_children_sample_independent_reproducible_streams():
    def run():
        group = fork_parallel("p", SamplingParams(n=4, seed=5, temperature=1.0))
        batch = SamplingBatch(max_num_rows=4, vocab_size=97, max_len=32)
        for c in group.children:
            batch.add_request(c.request_id, c.params, [1, 2, 3])
        sampler = Sampler(backend="torch")  # unseeded sampler: only the derived seeds matter
        logits = torch.randn(1, 97, generator=torch.Generator().manual_seed(0)).repeat(4, 1)
        rows = []
        for _ in range(8):
            ids = sampler(logits, batch).sampled_token_ids
            batch.append_tokens(ids)
            rows.append(ids.tolist())
        return [tuple(r[i] for r in rows) for i in range(4)]

    first, second = run(), run()
    assert first == second
    assert len(set(first)) == 4, "children share a random stream"
