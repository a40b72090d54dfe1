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
