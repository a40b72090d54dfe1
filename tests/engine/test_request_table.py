"""The runner's request table: rows are reused, the table grows for more sequences than rows, block ids
and copy-on-write edits land in the right row, and leavers are reported with the right stream flag."""

from blocks.engine.request_table import RequestTable
from blocks.sched.output import CachedRequestData, NewRequestData, SchedulerOutput


def _out(step, new=(), cached=(), finished=(), preempted=(), replacements=None):
    cached_data = CachedRequestData([c[0] for c in cached], [c[1] for c in cached], [c[2] for c in cached])
    sched = {n.request_id: 1 for n in new} | {c[0]: 1 for c in cached}
    return SchedulerOutput(step=step, scheduled_new_reqs=list(new), scheduled_cached_reqs=cached_data,
                           num_scheduled_tokens=sched, total_num_scheduled_tokens=len(sched),
                           blocks_to_copy=[], preempted_req_ids=list(preempted), finished_req_ids=list(finished),
                           block_replacements=replacements or {})


def _new(rid, blocks, tokens=(1, 2, 3)):
    return NewRequestData(rid, list(tokens), len(tokens), list(blocks), 0)


def test_rows_blocks_edits_and_leavers():
    left = []
    table = RequestTable(rows=2, max_blocks=4, on_leave=lambda rid, keep: left.append((rid, keep)))
    table.apply(_out(0, new=[_new("a", [5]), _new("b", [6, 7]), _new("c", [8])]))  # 3 requests, 2 rows
    assert table.table.shape[0] == 4  # doubled
    rows = [table["a"].row, table["b"].row, table["c"].row]
    assert len(set(rows)) == 3
    table.apply(_out(1, cached=[("a", [9], 3), ("b", (), 3)], replacements={"b": [(1, 11)]}))
    assert table.block_tables([table["a"].row, table["b"].row], 2).tolist() == [[5, 9], [6, 11]]
    assert table["a"].num_blocks == 2 and table["a"].num_computed == 3
    table.apply(_out(2, finished=["a"], preempted=["b"]))
    assert ("a", False) in left and ("b", True) in left and table.get("a") is None
    freed = {rows[0], rows[1]}
    table.apply(_out(3, new=[_new("d", [1]), _new("e", [2])]))
    assert {table["d"].row, table["e"].row} == freed  # rows are reused
    assert table.block_tables([table["d"].row], 1).tolist() == [[1]]
