"""The host side of a decode-graph step (``fill_decode_inputs``) against its definition: ids, positions,
slots from the block tables, logits rows, padding rows that write nothing and attend to nothing."""

import numpy as np
import pytest

from blocks.engine.cuda_graphs import fill_decode_inputs, graph_buckets


@pytest.mark.parametrize("n,bs", [(1, 1), (3, 4), (13, 16), (16, 16)])
def test_fill_decode_inputs_matches_the_definition(n, bs):
    rng = np.random.default_rng(n)
    block_size, width = 16, 8
    seq_lens = rng.integers(1, width * block_size, size=n).tolist()
    positions = [s - 1 for s in seq_lens]
    used = max(-(-s // block_size) for s in seq_lens)
    tables = rng.permutation(200)[: n * used].reshape(n, used).astype(np.int32) + 1
    ids = rng.integers(0, 1000, size=n).tolist()
    rows = rng.permutation(n).tolist()
    h64 = np.full(4 * bs, 777, dtype=np.int64)  # stale values from an earlier step
    h32 = np.full(bs * (width + 1), 555, dtype=np.int32)
    fill_decode_inputs(h64, h32, bs, width, block_size, ids, positions, seq_lens, tables, rows)
    assert h64[:n].tolist() == ids and not h64[n:bs].any()
    assert h64[bs : bs + n].tolist() == positions and not h64[bs + n : 2 * bs].any()
    want_slots = [int(tables[i, p // block_size]) * block_size + p % block_size for i, p in enumerate(positions)]
    assert h64[2 * bs : 2 * bs + n].tolist() == want_slots
    assert (h64[2 * bs + n : 3 * bs] == -1).all()  # padding rows write no KV
    assert h64[3 * bs : 3 * bs + n].tolist() == rows and not h64[3 * bs + n :].any()
    assert h32[:n].tolist() == seq_lens and not h32[n:bs].any()  # padding rows attend to nothing
    table = h32[bs:].reshape(bs, width)
    assert (table[:n, :used] == tables).all()


def test_graph_buckets():
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(1) == [1]
