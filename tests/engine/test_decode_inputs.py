"""The host side of a decode-graph step (``fill_decode_inputs``) against its definition: ids, positions,
slots from the block tables, logits rows, in-flight source rows, padding rows that write nothing and attend
to nothing; and ``gather_inflight``, which puts the in-flight ids in place on the device."""

import numpy as np
import pytest
import torch

from blocks.engine.cuda_graphs import fill_decode_inputs, graph_buckets
from blocks.engine.inflight import gather_inflight


@pytest.mark.parametrize("n,bs,inflight", [(1, 1, False), (3, 4, True), (13, 16, True), (16, 16, False)])
def test_fill_decode_inputs_matches_the_definition(n, bs, inflight):
    rng = np.random.default_rng(n)
    block_size, width = 16, 8
    seq_lens = rng.integers(1, width * block_size, size=n).tolist()
    positions = [s - 1 for s in seq_lens]
    used = max(-(-s // block_size) for s in seq_lens)
    tables = rng.permutation(200)[: n * used].reshape(n, used).astype(np.int32) + 1
    ids = rng.integers(0, 1000, size=n).tolist()
    rows = rng.permutation(n).tolist()
    src = [int(r) if r % 3 else -1 for r in rng.permutation(n)] if inflight else None
    h64 = np.full(5 * bs, 777, dtype=np.int64)  # stale values from an earlier step
    h32 = np.full(bs * (width + 1), 555, dtype=np.int32)
    fill_decode_inputs(h64, h32, bs, width, block_size, ids, positions, seq_lens, tables, rows, src)
    assert h64[:n].tolist() == ids and not h64[n:bs].any()
    assert h64[bs : bs + n].tolist() == positions and not h64[bs + n : 2 * bs].any()
    want_slots = [int(tables[i, p // block_size]) * block_size + p % block_size for i, p in enumerate(positions)]
    assert h64[2 * bs : 2 * bs + n].tolist() == want_slots
    assert (h64[2 * bs + n : 3 * bs] == -1).all()  # padding rows write no KV
    assert h64[3 * bs : 3 * bs + n].tolist() == rows and not h64[3 * bs + n : 4 * bs].any()
    assert h64[4 * bs : 4 * bs + n].tolist() == (src or [-1] * n) and (h64[4 * bs + n :] == -1).all()
    assert h32[:n].tolist() == seq_lens and not h32[n:bs].any()  # padding rows attend to nothing
    table = h32[bs:].reshape(bs, width)
    assert (table[:n, :used] == tables).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gather_inflight_takes_only_rows_with_a_source(device):
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 300, 1500):
        ids = torch.randint(0, 1000, (n,), generator=g)
        src = torch.randint(-1, 50, (n,), generator=g)
        prev = torch.randint(1000, 2000, (50,), generator=g)
        want = torch.where(src >= 0, prev[src.clamp(min=0)], ids)
        got = ids.to(device)
        gather_inflight(got, src.to(device), prev.to(device))
        assert torch.equal(got.cpu(), want)


def test_graph_buckets():
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(1) == [1]
