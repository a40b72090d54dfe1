"""TP-aware linear layers: tp_size=2 shards loaded from full tensors recombine to the unsharded layer."""

import pytest
import torch

from blocks.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from blocks.layers.tp import TPInfo


def _load(layer, weight, bias=None, shard_id=None):
    layer.weight.weight_loader(layer.weight, weight, *(() if shard_id is None else (shard_id,)))
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias, *(() if shard_id is None else (shard_id,)))


@pytest.mark.parametrize("bias", [False, True])
def test_column_parallel_shards_concatenate_to_full(bias):
    x = torch.randn(5, 13)
    w, b = torch.randn(22, 13), torch.randn(22) if bias else None
    full = ColumnParallelLinear(13, 22, bias=bias)
    _load(full, w, b)
    ref = x @ w.T + (b if bias else 0)
    torch.testing.assert_close(full(x), ref)
    parts = []
    for rank in range(2):
        layer = ColumnParallelLinear(13, 22, bias=bias, tp=TPInfo(rank, 2))
        _load(layer, w, b)
        assert layer.weight.shape == (11, 13)
        parts.append(layer(x))
    torch.testing.assert_close(torch.cat(parts, -1), ref)


def test_column_parallel_gather_output_uses_the_group_gather():
    x, w = torch.randn(3, 7), torch.randn(8, 7)
    shards = [ColumnParallelLinear(7, 8, tp=TPInfo(r, 2)) for r in range(2)]
    for s in shards:
        _load(s, w)
    other = shards[1](x)
    gathered = ColumnParallelLinear(7, 8, gather_output=True,
                                    tp=TPInfo(0, 2, all_gather_fn=lambda y, dim: torch.cat([y, other], dim)))
    _load(gathered, w)
    torch.testing.assert_close(gathered(x), x @ w.T)


@pytest.mark.parametrize("bias", [False, True])
def test_row_parallel_partial_sums_add_up(bias):
    x = torch.randn(4, 18)
    w, b = torch.randn(9, 18), torch.randn(9) if bias else None
    ref = x @ w.T + (b if bias else 0)
    partial = []
    for rank in range(2):
        layer = RowParallelLinear(18, 9, bias=bias, reduce_results=False, tp=TPInfo(rank, 2))
        _load(layer, w, b)
        assert layer.weight.shape == (9, 9)
        partial.append(layer(x[:, rank * 9 : (rank + 1) * 9]))
    torch.testing.assert_close(partial[0] + partial[1], ref)  # bias added once (rank 0)
    # reduce_results=True: the all-reduce hook receives the partial product and the bias comes after
    other = partial[1]  # rank 1 holds no bias when not reducing: its partial is x_1 @ w_1^T
    layer = RowParallelLinear(18, 9, bias=bias, input_is_parallel=False,
                              tp=TPInfo(0, 2, all_reduce_fn=lambda y: y + other))
    _load(layer, w, b)
    torch.testing.assert_close(layer(x), ref)


def test_merged_column_parallel_loads_each_projection_into_its_slice():
    x = torch.randn(6, 10)
    gate, up = torch.randn(14, 10), torch.randn(14, 10)
    full = MergedColumnParallelLinear(10, [14, 14])
    _load(full, gate, shard_id=0)
    _load(full, up, shard_id=1)
    torch.testing.assert_close(full(x), torch.cat([x @ gate.T, x @ up.T], -1))
    gate_parts, up_parts = [], []
    for rank in range(2):
        layer = MergedColumnParallelLinear(10, [14, 14], tp=TPInfo(rank, 2))
        _load(layer, gate, shard_id=0)
        _load(layer, up, shard_id=1)
        g, u = layer(x).split(7, -1)  # per rank: [gate slice | up slice]
        gate_parts.append(g)
        up_parts.append(u)
    torch.testing.assert_close(torch.cat(gate_parts, -1), x @ gate.T)
    torch.testing.assert_close(torch.cat(up_parts, -1), x @ up.T)
    # an already fused checkpoint tensor loads too
    fused = MergedColumnParallelLinear(10, [14, 14])
    fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))
    torch.testing.assert_close(fused.weight, full.weight)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 6), (6, 2), (4, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_parallel_shards_by_head(num_heads, num_kv_heads, bias):
    hd, hidden = 5, 11
    x = torch.randn(3, hidden)
    wq, wk, wv = torch.randn(num_heads * hd, hidden), torch.randn(num_kv_heads * hd, hidden), torch.randn(
        num_kv_heads * hd, hidden)
    bq, bk, bv = torch.randn(num_heads * hd), torch.randn(num_kv_heads * hd), torch.randn(num_kv_heads * hd)
    q_ref = x @ wq.T + (bq if bias else 0)
    k_ref = (x @ wk.T + (bk if bias else 0)).view(3, num_kv_heads, hd)
    v_ref = (x @ wv.T + (bv if bias else 0)).view(3, num_kv_heads, hd)
    qs, ks, vs = [], [], []
    for rank in range(2):
        layer = QKVParallelLinear(hidden, hd, num_heads, num_kv_heads, bias=bias, tp=TPInfo(rank, 2))
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            _load(layer, w, b if bias else None, shard_id=sid)
        q, k, v = layer.split(layer(x))
        qs.append(q)
        ks.append(k.view(3, -1, hd))
        vs.append(v.view(3, -1, hd))
    torch.testing.assert_close(torch.cat(qs, -1), q_ref)
    if num_kv_heads >= 2:
        torch.testing.assert_close(torch.cat(ks, 1), k_ref)
        torch.testing.assert_close(torch.cat(vs, 1), v_ref)
    else:  # one KV head replicated on both ranks
        for k, v in zip(ks, vs):
            torch.testing.assert_close(k, k_ref)
            torch.testing.assert_close(v, v_ref)


def test_loaders_name_both_shapes_on_mismatch():
    layer = QKVParallelLinear(8, 4, 2, 1)
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(4, 8\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(3, 8), "k")
    with pytest.raises(ValueError, match="shard_id"):
        layer.weight.weight_loader(layer.weight, torch.randn(8, 8), "x")
    row = RowParallelLinear(6, 4, tp=TPInfo(1, 2))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        row.weight.weight_loader(row.weight, torch.randn(4, 5))
    rep = ReplicatedLinear(3, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        rep.weight.weight_loader(rep.weight, torch.randn(3, 2))


def test_sizes_that_do_not_divide_are_rejected():
    with pytest.raises(ValueError, match="output_size=7"):
        ColumnParallelLinear(4, 7, tp=TPInfo(0, 2))
    with pytest.raises(ValueError, match="input_size=5"):
        RowParallelLinear(5, 4, tp=TPInfo(0, 2))
    with pytest.raises(ValueError, match="num_heads=3"):
        QKVParallelLinear(8, 4, 3, 3, tp=TPInfo(0, 2))
    with pytest.raises(ValueError, match=r"output_sizes\[1\]=5"):
        MergedColumnParallelLinear(4, [4, 5], tp=TPInfo(0, 2))
    with pytest.raises(ValueError, match="rank"):
        TPInfo(2, 2)


def test_without_collectives_tp_forward_fails_clearly():
    layer = RowParallelLinear(4, 4, tp=TPInfo(0, 2))
    layer.weight.data.normal_()
    with pytest.raises(RuntimeError, match="torch.distributed"):
        layer(torch.randn(1, 2))
