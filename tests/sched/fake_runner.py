"""A fake model runner that checks every ``SchedulerOutput`` it executes (tests only).

It keeps per-request token ids and block tables exactly as a real runner would (from new-request
data, appended block ids, preempted and finished ids), writes each scheduled token's id into a fake
KV pool ``kv[block][offset]``, then checks that every request's context (all positions it
attends to) holds its own tokens: this catches wrong block tables, bad prefix-cache hits, blocks
shared or reused while live, and tokens skipped or computed twice. A request samples (a random
token) only when the step completes its known tokens.
"""

from __future__ import annotations

import random

from blocks.sched.output import SchedulerOutput


class FakeRunner:
    def __init__(self, block_size: int, *, vocab_size: int = 50, seed: int = 0, check_every: int = 1):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.check_every = check_every
        self.kv: dict[int, list[int | None]] = {}
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.writes: dict[str, list[int]] = {}  # per position: times written since (re)admission
        self.hits: dict[str, int] = {}  # prefix-cache tokens at (re)admission
        self.retired: dict[str, tuple] = {}  # finished requests' (tokens, writes, hits)
        self.total_written = 0
        self.steps = 0

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        bs = self.block_size
        for rid in out.finished_req_ids:
            if rid in self.tokens:
                self.retired[rid] = (self.tokens[rid], self.writes[rid], self.hits[rid])
        for rid in out.preempted_req_ids:  # kept in case it finishes while waiting (async: a token in flight)
            if rid in self.tokens:
                self.retired[rid] = (self.tokens[rid], self.writes[rid], self.hits[rid])
        for rid in (*out.finished_req_ids, *out.preempted_req_ids):
            for d in (self.tables, self.tokens, self.computed, self.writes, self.hits):
                d.pop(rid, None)
        for src, dst in out.blocks_to_copy:
            self.kv[dst] = list(self.kv.get(src, [None] * bs))
        for new in out.scheduled_new_reqs:
            assert new.request_id not in self.tables, "new request already known to the runner"
            assert len(new.block_ids) * bs >= new.num_computed_tokens
            self.tables[new.request_id] = list(new.block_ids)
            self.tokens[new.request_id] = list(new.token_ids)
            self.computed[new.request_id] = new.num_computed_tokens
            self.writes[new.request_id] = [0] * len(new.token_ids)
            self.hits[new.request_id] = new.num_computed_tokens
            # its cached prefix may be written by another request in this same step (as in one forward pass,
            # where every layer writes the step's KV before attending): checked after the write phase.
        cached = out.scheduled_cached_reqs
        for rid, nb, c in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            assert rid in self.tables, f"cached request {rid} unknown to the runner"
            assert self.computed[rid] == c, f"{rid}: runner computed {self.computed[rid]}, scheduler says {c}"
            self.tables[rid].extend(nb)
        for rid, edits in out.block_replacements.items():  # copy-on-write: the table now names the copy
            for index, block in edits:
                if rid in self.tables:
                    self.tables[rid][index] = block
        assert set(out.num_scheduled_tokens) == set(cached.req_ids) | {n.request_id for n in out.scheduled_new_reqs}
        assert sum(out.num_scheduled_tokens.values()) == out.total_num_scheduled_tokens
        # write phase: every scheduled token's KV goes to its slot
        for rid, n in out.num_scheduled_tokens.items():
            assert n >= 1
            start, table, toks, w = self.computed[rid], self.tables[rid], self.tokens[rid], self.writes[rid]
            assert start + n <= len(toks), f"{rid}: computes past its known tokens"
            assert len(table) * bs >= start + n, f"{rid}: block table too short"
            for p in range(start, start + n):
                self.kv.setdefault(table[p // bs], [None] * bs)[p % bs] = toks[p]
                w[p] += 1
            self.total_written += n
        # read phase and sampling
        self.steps += 1
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            end = self.computed[rid] = self.computed[rid] + n
            if self.steps % self.check_every == 0:
                self._check_context(rid, end)
            if end == len(self.tokens[rid]):
                tok = self.rng.randrange(self.vocab_size)
                self.tokens[rid].append(tok)
                self.writes[rid].append(0)
                sampled[rid] = [tok]
        return sampled

    def _check_context(self, rid: str, end: int) -> None:
        bs, table, toks = self.block_size, self.tables[rid], self.tokens[rid]
        for p in range(end):
            got = self.kv.get(table[p // bs], [None] * bs)[p % bs]
            assert got == toks[p], f"{rid}: position {p} holds {got}, expected {toks[p]}"

    def assert_computed_once(self, rid: str, final_tokens: list[int], *, late_stop: bool = False) -> None:
        """Since its last admission, each position before the last token was computed exactly once.
        ``late_stop``: an asynchronous scheduler saw the stop a step late, so this runner may have computed
        the final token and sampled one more (dropped)."""
        if rid in self.tokens:
            toks, w, hits = self.tokens[rid], self.writes[rid], self.hits[rid]
        else:
            toks, w, hits = self.retired[rid]
        if late_stop and len(toks) == len(final_tokens) + 1:
            toks = toks[:-1]
        assert toks == final_tokens
        for p in range(len(final_tokens) - 1):
            expected = 0 if p < hits else 1
            assert w[p] == expected, f"{rid}: position {p} written {w[p]} times (hits {hits})"
