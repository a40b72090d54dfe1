"""The runner's request table: rows are reused, the table grows for more sequences than rows, block ids
and copy-on-write edits land in the right row, and leavers are reported with the right stream flag (a fixed
scenario, then a hypothesis state machine against a plain dict model)."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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


class TableMachine(RuleBasedStateMachine):
    """RequestTable against a plain dict model under random new / grow / copy-on-write / finish / preempt."""

    MAX_BLOCKS = 6

    def __init__(self):
        super().__init__()
        self.left: list[tuple[str, bool]] = []
        self.table = RequestTable(rows=2, max_blocks=self.MAX_BLOCKS,
                                  on_leave=lambda rid, keep: self.left.append((rid, keep)))
        self.model: dict[str, list[int]] = {}  # request id -> block ids
        self.next_block = 1
        self.step = 0
        self.next_id = 0

    def _blocks(self, n):
        out = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return out

    @rule(n=st.integers(1, 3), reuse=st.booleans())
    def new(self, n, reuse):
        rid = sorted(self.model)[0] if reuse and self.model else f"r{self.next_id}"
        self.next_id += 1
        blocks = self._blocks(n)
        self.table.apply(_out(self.step, new=[_new(rid, blocks)]))
        self.step += 1
        if reuse and rid in self.model:
            assert (rid, False) in self.left  # a request scheduled anew never keeps the old stream
        self.model[rid] = blocks

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def grow_and_edit(self, data):
        rid = data.draw(st.sampled_from(sorted(self.model)))
        room = self.MAX_BLOCKS - len(self.model[rid])
        add = self._blocks(data.draw(st.integers(0, room)))
        edits = []
        if data.draw(st.booleans()):
            idx = data.draw(st.integers(0, len(self.model[rid]) - 1))
            edits = [(idx, self._blocks(1)[0])]
        self.table.apply(_out(self.step, cached=[(rid, add or (), 1)], replacements={rid: edits} if edits else None))
        self.step += 1
        self.model[rid] = self.model[rid] + add
        for idx, block in edits:
            self.model[rid][idx] = block

    @precondition(lambda self: self.model)
    @rule(data=st.data(), preempt=st.booleans())
    def leave(self, data, preempt):
        rid = data.draw(st.sampled_from(sorted(self.model)))
        self.table.apply(_out(self.step, preempted=[rid] if preempt else [], finished=[] if preempt else [rid]))
        self.step += 1
        assert self.left[-1] == (rid, preempt)
        del self.model[rid]

    @invariant()
    def rows_and_tables_match(self):
        states = self.table.states
        assert set(states) == set(self.model)
        rows = [s.row for s in states.values()]
        assert len(set(rows)) == len(rows) and all(0 <= r < self.table.table.shape[0] for r in rows)
        for rid, blocks in self.model.items():
            st_ = states[rid]
            assert st_.num_blocks == len(blocks)
            assert self.table.block_tables([st_.row], len(blocks)).tolist() == [blocks]


TableMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_request_table_state_machine = TableMachine.TestCase
