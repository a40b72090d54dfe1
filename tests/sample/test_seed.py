"""A seeded request yields the same tokens alone, in a batch of 1 and in a batch of 64 (both backends)."""

import pytest
import torch

from blocks.sample.batch import SamplingBatch
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler
from tests.sample.helpers import TRITON_DEVICE

VOCAB, STEPS = 211, 6
TARGET = SamplingParams(temperature=1.1, top_p=0.95, top_k=150, seed=4242, repetition_penalty=1.1)


def _logits_for(req_id: str, step: int) -> torch.Tensor:
    seed = (sum(map(ord, req_id)) * 1000 + step) % (2**31)
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0


def _run(backend: str, *, others: int, sampler_seed: int, target_position: int, drop_every: int = 0, steps=STEPS):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    batch = SamplingBatch(max_num_rows=others + 1, vocab_size=VOCAB, max_len=64, device=device)
    gen = torch.Generator().manual_seed(sampler_seed)
    ids = [f"o{i}" for i in range(others)]
    ids.insert(target_position, "target")
    for rid in ids:
        if rid == "target":
            batch.add_request(rid, TARGET, [5, 6, 7])
        else:
            seeded = int(torch.randint(2, (1,), generator=gen))
            seed = int(torch.randint(10_000, (1,), generator=gen)) if seeded else None
            temp = [0.0, 0.7, 1.0][int(torch.randint(3, (1,), generator=gen))]
            batch.add_request(rid, SamplingParams(temperature=temp, top_k=20, seed=seed), [1, 2])
    sampler = Sampler(backend=backend, seed=sampler_seed)
    tokens = []
    for step in range(steps):
        if drop_every and step % drop_every == 1 and batch.num_rows > 2:
            victim = next(r for r in batch.req_ids if r != "target")  # moves the last row around
            batch.remove_request(victim)
        logits = torch.stack([_logits_for(r, step) for r in batch.req_ids]).to(device)
        out = sampler(logits, batch)
        tokens.append(int(out.sampled_token_ids[batch.row_of("target")]))
        batch.append_tokens(out.sampled_token_ids)
    return tokens


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seeded_request_is_reproducible_whatever_the_batch(backend):
    steps = STEPS if backend == "torch" or TRITON_DEVICE == "cuda" else 4  # the interpreter is slow
    alone = _run(backend, others=0, sampler_seed=1, target_position=0, steps=steps)
    batch_of_1 = _run(backend, others=0, sampler_seed=99, target_position=0, steps=steps)
    batch_of_64 = _run(backend, others=63, sampler_seed=7, target_position=37, drop_every=2, steps=steps)
    assert alone == batch_of_1 == batch_of_64
    assert len(set(alone)) > 1, "the stream is constant: the test proves nothing"


def test_different_seeds_and_unseeded_rows_give_different_streams():
    def run(params, sampler_seed):
        batch = SamplingBatch(max_num_rows=1, vocab_size=VOCAB, max_len=64)
        batch.add_request("a", params, [1])
        sampler = Sampler(backend="torch", seed=sampler_seed)
        out = []
        for step in range(12):
            ids = sampler(_logits_for("a", step)[None] * 0.1, batch).sampled_token_ids
            batch.append_tokens(ids)
            out.append(int(ids[0]))
        return out

    assert run(SamplingParams(seed=1), 0) != run(SamplingParams(seed=2), 0)
    assert run(SamplingParams(seed=1), 0) == run(SamplingParams(seed=1), 5)
    assert run(SamplingParams(), 0) != run(SamplingParams(), 1)
    assert run(SamplingParams(), 3) == run(SamplingParams(), 3)
