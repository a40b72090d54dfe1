"""The model runner's view of its live requests: known token ids, computed counts and block-table rows.

A :class:`RequestTable` applies each step's :class:`~blocks.sched.output.SchedulerOutput` in O(changes):
finished and preempted requests leave, new ones take a row of a persistent ``[rows, max blocks per
sequence]`` int32 block table, running ones append their new block ids and copy-on-write edits. A step
then gathers its requests' rows (:meth:`block_tables`) instead of rebuilding tables from lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from blocks.sched.output import SchedulerOutput

__all__ = ["RequestState", "RequestTable"]


@dataclass
class RequestState:
    """One request as the runner knows it."""

    token_ids: list[int]  # prompt + output tokens known so far
    num_blocks: int  # its block ids are ``table.table[row, :num_blocks]``
    num_computed: int  # tokens whose KV is in the cache
    num_prompt: int
    row: int = -1  # this request's row of the block table
    info: object = None  # the owner's per-request sampling info, cached on first use


class RequestTable:
    """Live requests and their block-table rows (see the module docstring).

    Args:
        rows: initial number of rows (``max_num_seqs``); doubles when beam forks need more.
        max_blocks: blocks of one sequence at ``max_model_len``.
        on_leave: ``fn(request_id, keep_stream)`` called for every request that leaves, so the owner can
            drop its other per-request state (``keep_stream`` is False when the id may already name a new
            request: a finished one, or one scheduled anew).
    """

    def __init__(self, rows: int, max_blocks: int, on_leave: Callable[[str, bool], None]) -> None:
        self.states: dict[str, RequestState] = {}
        self.table = np.zeros((rows, max_blocks), dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._on_leave = on_leave

    def __getitem__(self, request_id: str) -> RequestState:
        return self.states[request_id]

    def get(self, request_id: str) -> RequestState | None:
        return self.states.get(request_id)

    def apply(self, out: SchedulerOutput) -> None:
        """Apply one step's scheduler output (leavers, new requests, new blocks, copy-on-write edits)."""
        for rid in out.finished_req_ids:
            self._leave(rid, keep_stream=False)
        for rid in out.preempted_req_ids:
            self._leave(rid, keep_stream=True)
        for new in out.scheduled_new_reqs:
            self._leave(new.request_id, keep_stream=False)
            st = RequestState(token_ids=list(new.token_ids), num_blocks=len(new.block_ids),
                              num_computed=new.num_computed_tokens, num_prompt=new.num_prompt_tokens,
                              row=self._take_row())
            self.table[st.row, : st.num_blocks] = new.block_ids
            self.states[new.request_id] = st
        table = self.table
        cached = out.scheduled_cached_reqs
        for rid, blocks, computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            st = self.states[rid]
            if blocks:
                table[st.row, st.num_blocks : st.num_blocks + len(blocks)] = blocks
                st.num_blocks += len(blocks)
            st.num_computed = computed
        for rid, edits in out.block_replacements.items():  # copy-on-write: the table names the copy
            st = self.states.get(rid)
            if st is not None:
                for index, block in edits:
                    table[st.row, index] = block

    def block_tables(self, rows: list[int], width: int) -> np.ndarray:
        """``[len(rows), width]`` int32: the given rows' first ``width`` block ids."""
        return self.table[np.asarray(rows), :width]

    def _take_row(self) -> int:
        if not self._free_rows:  # more live sequences than rows (beam forks): double the table
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _leave(self, rid: str, *, keep_stream: bool) -> None:
        st = self.states.pop(rid, None)
        if st is not None:
            self._free_rows.append(st.row)
        self._on_leave(rid, keep_stream)
