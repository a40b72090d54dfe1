"""The two-launch Triton row argmax against ``torch.argmax`` (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from blocks.sample.triton_argmax import argmax_rows
from tests.sample.helpers import TRITON_DEVICE as DEV


@pytest.mark.parametrize("rows,vocab,block", [(1, 1, 16), (3, 17, 16), (5, 1000, 64), (2, 4099, 256), (1, 70000, 16)])
def test_matches_torch_argmax_with_ties_and_banned_rows(rows, vocab, block):
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    x = torch.randn(rows, vocab, generator=gen)
    if vocab > 3:
        top = x.max() + 1.0
        x[0, [vocab - 1, 2, vocab // 2]] = top  # a three-way tie: the first index wins
    if rows > 2:
        x[1] = float("-inf")  # every token banned: index 0, as torch
        x[2, : vocab // 2] = float("-inf")
    got = argmax_rows(x.to(DEV), block=block).cpu()
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=1))


def test_strided_rows_and_bad_inputs():
    x = torch.randn(4, 300)
    wide = torch.zeros(4, 512)
    wide[:, :300] = x
    assert torch.equal(argmax_rows(wide.to(DEV)[:, :300], block=64).cpu(), x.argmax(dim=1))
    assert argmax_rows(torch.empty(0, 5, device=DEV)).shape == (0,)
    with pytest.raises(ValueError, match="float32"):
        argmax_rows(x.to(DEV).half())
    with pytest.raises(ValueError, match="unit stride"):
        argmax_rows(x.to(DEV).t())


@pytest.mark.parametrize("num_sinks", [1, 2])
def test_ids_also_written_to_sinks(num_sinks):
    """The engine's sinks: its host id buffer (pinned memory on CUDA, read after an event) and the in-flight
    id buffer on the device; a slice of a longer buffer, as the engine passes them."""
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(5))
    pin = torch.cuda.is_available() and DEV != "cpu"
    host = torch.full((8,), -7, dtype=torch.int64, pin_memory=pin)
    dev_buf = torch.full((8,), -7, dtype=torch.int64, device=DEV)
    sinks = (host[:3], dev_buf[:3])[:num_sinks]
    got = argmax_rows(x.to(DEV), block=256, sinks=sinks)
    if DEV != "cpu":
        torch.cuda.synchronize()
    want = x.argmax(dim=1)
    assert torch.equal(got.cpu(), want) and torch.equal(host[:3], want) and (host[3:] == -7).all()
    assert torch.equal(dev_buf[:3].cpu(), want if num_sinks == 2 else torch.full((3,), -7))
    with pytest.raises(ValueError, match="sinks"):
        argmax_rows(x.to(DEV), sinks=(dev_buf[:2],))


@pytest.mark.parametrize("greedy", [True, False])
def test_sampler_writes_sinks_only_from_its_greedy_argmax(greedy):
    """The Triton sampler honours ``id_sinks`` on an all-greedy batch (its argmax kernel writes them) and says
    so; a batch with random rows (or the torch backend) leaves them to the caller."""
    from blocks.sample.sampler import Sampler
    from tests.sample.helpers import mixed_batch

    fixed = dict(temperature=0.0) if greedy else dict(temperature=1.0, top_k=5)
    batch, _, _ = mixed_batch(4, 300, seed=11, device=DEV, repetition_penalty=1.0, **fixed)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)).to(DEV)
    for backend in ("triton", "torch"):
        sink = torch.full((4,), -1, dtype=torch.int64, device=DEV)
        out = Sampler(backend=backend, seed=0)(logits.clone(), batch, id_sinks=(sink,))
        wrote = greedy and backend == "triton"
        assert out.sinks_written == wrote
        assert torch.equal(sink, out.sampled_token_ids) == wrote
        if greedy:
            assert torch.equal(out.sampled_token_ids.cpu(), logits.cpu().argmax(dim=1))
