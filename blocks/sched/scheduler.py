"""The scheduler: continuous batching with chunked prefill, prefix caching and preemption.

Usage (the engine loop)::

    sched = Scheduler(KVCacheManager(num_blocks, block_size, enable_prefix_caching=True),
                      SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192), policy="fcfs")
    sched.add_request(Request("a", prompt_ids, max_tokens=64, eos_token_id=2))
    while sched.has_unfinished_requests():
        out = sched.schedule()                   # SchedulerOutput: who computes how many tokens
        sampled = runner.execute(out)            # {request_id: [token_id]} (runner's job)
        finished = sched.update_from_output(sampled)

Each step spends ``max_num_batched_tokens`` on the running requests first (in order: decodes and
unfinished prefill chunks), then admits waiting requests in the policy's order, up to
``max_num_seqs``. A request's chunk is ``min(remaining tokens, long_prefill_token_threshold,
remaining budget)``. Prefix-cache hits at admission count as computed. When a running request
needs a block and none is free, the policy's victim is preempted by recompute (its blocks freed,
its progress dropped, queued again with its original key); a step that preempts admits nobody.

Asynchronous engines (the next step scheduled before this step's tokens are read): a request whose chunk
reaches its last known token will sample one; until ``update_from_output`` reports it, the request counts it
as in flight (``num_in_flight``) and its next step computes it (the runner takes its id from the device).
A request whose in-flight token is its last (``max_tokens``, ``max_model_len``) is not scheduled again. A
synchronous engine reports every token before the next ``schedule``, so nothing is ever in flight there.

Anti-thrashing (vLLM issue 25538: a request resumed with blocks for one chunk, then preempted
again the next step): a waiting or preempted request is admitted only when free blocks cover its
whole remaining prefill plus the watermark, not just the first chunk.

The scheduler calls the KV cache manager only when a request crosses a block boundary, so a decode
step costs O(running requests) with no call per request; full blocks are offered to the prefix
cache at the next boundary crossing (the last, partly filled block of a request is never cached).
This assumes no two live requests share a partly filled block: do not ``fork`` requests in the KV
cache manager behind the scheduler's back (run ``n > 1`` samples as separate requests, which share
full prompt blocks through the prefix cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from blocks.sched.config import SchedulerConfig, SchedulerStats
from blocks.sched.errors import QueueFullError
from blocks.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from blocks.sched.policy import SchedulingPolicy, make_policy
from blocks.sched.request import PreemptionReason, Request, RequestStatus
from blocks.sched.waiting import WaitingQueue

__all__ = ["Scheduler"]

_WAITING = RequestStatus.WAITING
_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED
_EMPTY: tuple[()] = ()
_HINT_STEPS = 8  # a waiting request's cached-prefix length is re-looked-up after this many steps


class Scheduler:
    """Decides each step which requests compute how many tokens (no tensors).

    Args:
        kv_cache_manager: a :class:`blocks.cache.manager.KVCacheManager` (or anything with its API:
            ``block_size``, ``num_free_blocks``, ``get_computed_blocks``, ``allocate_slots``, ``free``,
            ``get_block_table``, ``take_copies``, ``take_replacements``; ``fork`` for ``fork_request``).
        config: limits (``SchedulerConfig()`` for vLLM's defaults).
        policy: ``"fcfs"``, ``"priority"``, ``"cache_aware"`` or a :class:`SchedulingPolicy`.
        stop_checker: optional ``f(request) -> RequestStatus | None`` called after each appended
            token of a request whose ``check_stop`` is set (e.g. stop strings from a detokenizer); a
            finished status ends the request.

    Raises:
        ValueError: ``max_model_len`` needs more blocks than the KV cache has.
    """

    def __init__(
        self,
        kv_cache_manager,
        config: SchedulerConfig,
        *,
        policy: str | SchedulingPolicy = "fcfs",
        stop_checker: Callable[[Request], RequestStatus | None] | None = None,
    ):
        self.kv = kv_cache_manager
        self.config = config
        self.policy = make_policy(policy)
        self.stop_checker = stop_checker
        self.block_size = int(kv_cache_manager.block_size)
        free = kv_cache_manager.num_free_blocks  # a property; a method is accepted too
        self._num_free_blocks = free if callable(free) else (lambda: kv_cache_manager.num_free_blocks)
        self.num_usable_blocks = int(getattr(kv_cache_manager, "num_usable_blocks", self._num_free_blocks()))
        need = -(-self.config.max_model_len // self.block_size)
        if need > self.num_usable_blocks:
            raise ValueError(
                f"max_model_len={self.config.max_model_len} needs {need} blocks of {self.block_size} tokens, "
                f"but the KV cache has {self.num_usable_blocks} free blocks"
            )
        self.watermark_blocks = int(self.config.watermark * self.num_usable_blocks)
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self.waiting = WaitingQueue()
        self._forked: set[str] = set()  # forked requests not yet sent to the runner
        self._finished_ids: list[str] = []
        self._seq = 0
        self.step = 0
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        """Queue a request (state ``WAITING``).

        Raises:
            ValueError: duplicate id, or the prompt is longer than ``max_model_len``.
            QueueFullError: admission control (``max_num_queued_requests`` / ``max_num_queued_tokens``).
        """
        cfg = self.config
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already queued or running")
        if request.num_prompt_tokens > cfg.max_model_len:
            raise ValueError(
                f"prompt length {request.num_prompt_tokens} exceeds max_model_len={cfg.max_model_len}"
            )
        if request.status is not _WAITING or request.num_computed_tokens or request.output_token_ids:
            raise ValueError(f"request {request.request_id!r} must be fresh (WAITING, no tokens computed)")
        if cfg.max_num_queued_requests is not None and self.num_waiting + 1 > cfg.max_num_queued_requests:
            self.stats.num_rejected += 1
            raise QueueFullError("max_num_queued_requests", cfg.max_num_queued_requests, self.num_waiting + 1)
        tokens = self.num_queued_tokens + request.num_tokens
        if cfg.max_num_queued_tokens is not None and tokens > cfg.max_num_queued_tokens:
            self.stats.num_rejected += 1
            raise QueueFullError("max_num_queued_tokens", cfg.max_num_queued_tokens, tokens)
        self._seq += 1
        request.seq = self._seq
        self.requests[request.request_id] = request
        self.waiting.push(self.policy.key(request), request)

    def abort_request(self, request_id: str) -> bool:
        """Abort a request in any state, freeing its blocks; False if unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is _RUNNING:
            self.running.remove(req)
        else:  # waiting or preempted
            self.waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    @property
    def num_waiting(self) -> int:
        return self.waiting.num_waiting

    @property
    def num_queued_tokens(self) -> int:
        return self.waiting.num_queued_tokens

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def metrics(self) -> dict[str, float]:
        """Gauges and counters under vLLM's metric suffixes (the server adds the ``blocks:`` prefix)."""
        st = self.stats
        return {
            "num_requests_running": len(self.running),
            "num_requests_waiting": self.num_waiting,
            "kv_cache_usage_perc": float(self.kv.usage),
            "num_preemptions_total": st.num_preemptions,
            "prefix_cache_queries_total": st.prefix_query_tokens,
            "prefix_cache_hits_total": st.prefix_hit_tokens,
            "num_rejected_requests_total": st.num_rejected,
        }

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        """Plan one step; advances ``num_computed_tokens`` of every scheduled request."""
        cfg = self.config
        kv = self.kv
        bs = self.block_size
        thr = cfg.long_prefill_token_threshold
        budget = cfg.max_num_batched_tokens
        num_sched: dict[str, int] = {}
        c_ids: list[str] = []
        c_blocks: list = []
        c_computed: list[int] = []
        preempted: list[str] = []
        running = self.running
        forked = self._forked
        fork_reqs: list[NewRequestData] = []
        max_len = cfg.max_model_len
        step = self.step
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed_tokens
            total = len(req.all_token_ids) + req.num_in_flight
            if req.num_in_flight and (len(req.output_token_ids) + req.num_in_flight >= req.max_tokens
                                      or total >= max_len):
                i += 1  # its last token is in flight
                continue
            n = total - c
            if thr and n > thr:
                n = thr
            if n > budget:
                n = budget
            if n <= 0:  # nothing to compute (its sampled token was not reported)
                i += 1
                continue
            new_blocks = _EMPTY
            if c + n > req.num_blocks * bs or req.needs_cow_check:
                req.needs_cow_check = False
                # the manager last heard of num_slot_tokens tokens (calls are skipped inside a block)
                s = req.num_slot_tokens
                new_blocks = kv.allocate_slots(
                    req.request_id, c + n - s, num_computed_tokens=s, token_ids=req.all_token_ids,
                    extra_keys=req.extra_keys,
                )
                while new_blocks is None:  # out of blocks: preempt the policy's victim and retry
                    victim = self.policy.select_victim(running)
                    idx = running.index(victim)
                    del running[idx]
                    computed = victim.num_computed_tokens
                    if idx < i:  # before req in the list (scheduled this step, or skipped: last token in flight)
                        i -= 1
                    if victim.request_id in num_sched:  # already scheduled this step: give its tokens back
                        if victim.in_flight_step == step:
                            victim.num_in_flight -= 1
                            victim.in_flight_step = -1
                        budget += num_sched.pop(victim.request_id)
                        if victim.request_id in c_ids:
                            j = c_ids.index(victim.request_id)
                            computed = c_computed[j]
                            del c_ids[j], c_blocks[j], c_computed[j]
                        else:  # emitted as a forked request this step
                            j = next(k for k, d in enumerate(fork_reqs) if d.request_id == victim.request_id)
                            computed = fork_reqs.pop(j).num_computed_tokens
                    self._preempt(victim, PreemptionReason.OUT_OF_BLOCKS, preempted, computed)
                    if victim is req:
                        break
                    new_blocks = kv.allocate_slots(
                        req.request_id, c + n - s, num_computed_tokens=s, token_ids=req.all_token_ids,
                        extra_keys=req.extra_keys,
                    )
                if new_blocks is None:
                    continue  # req itself was preempted; running[i] is now the next request
                req.num_blocks += len(new_blocks)
                req.num_slot_tokens = c + n
            num_sched[req.request_id] = n
            budget -= n
            req.num_computed_tokens = c + n
            if c + n == total:  # the chunk reaches its last token: this step samples one
                req.num_in_flight += 1
                req.in_flight_step = step
            if forked and req.request_id in forked:  # new to the runner: send its whole state
                forked.discard(req.request_id)
                fork_reqs.append(NewRequestData(req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                                                list(kv.get_block_table(req.request_id)), c))
            else:
                c_ids.append(req.request_id)
                c_blocks.append(new_blocks)
                c_computed.append(c)
            i += 1

        new_reqs: list[NewRequestData] = fork_reqs
        if not preempted and budget > 0 and self.num_waiting and len(running) < cfg.max_num_seqs:
            budget = self._admit(budget, num_sched, new_reqs)

        self._finished_ids, finished = [], self._finished_ids
        out = SchedulerOutput(
            step=self.step,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=CachedRequestData(c_ids, c_blocks, c_computed),
            num_scheduled_tokens=num_sched,
            total_num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
            blocks_to_copy=kv.take_copies(),
            preempted_req_ids=preempted,
            finished_req_ids=finished,
            block_replacements=kv.take_replacements(),
        )
        self.step += 1
        self.stats.num_steps += 1
        return out

    def _admit(self, budget: int, num_sched: dict[str, int], new_reqs: list[NewRequestData]) -> int:
        """Admit waiting requests in policy order while budget, seats and blocks last."""
        cfg, kv, bs, policy = self.config, self.kv, self.block_size, self.policy
        thr = cfg.long_prefill_token_threshold
        guard = cfg.thrash_guard
        running = self.running
        stats = self.stats
        window = policy.window
        cands: list[Request] = []
        pos = 0
        while budget > 0 and len(running) < cfg.max_num_seqs:
            if pos == len(cands):
                cands = self.waiting.pop(window)
                pos = 0
                if not cands:
                    break
                if window > 1:
                    cands = policy.rank(cands, self._cached_tokens)
            req = cands[pos]
            if req.num_in_flight:  # preempted with a token in flight (not reported yet): wait for it
                break
            num_tokens = len(req.all_token_ids)
            hit_blocks, num_cached = kv.get_computed_blocks(
                req.request_id, req.all_token_ids, extra_keys=req.extra_keys
            )
            n = num_tokens - num_cached
            if thr and n > thr:
                n = thr
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            need = -(-num_tokens // bs) - len(hit_blocks)  # blocks for the whole remaining prefill
            if guard and running and self._num_free_blocks() - need < self.watermark_blocks:
                stats.num_thrash_guard_deferrals += 1
                break
            new_blocks = kv.allocate_slots(
                req.request_id, n, num_computed_tokens=num_cached, token_ids=req.all_token_ids,
                computed_blocks=hit_blocks, extra_keys=req.extra_keys,
            )
            if new_blocks is None:
                break
            pos += 1
            self.waiting.remove(req)
            stats.prefix_query_tokens += num_tokens
            stats.prefix_hit_tokens += num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_step = self.step
            req.status = _RUNNING
            req.num_blocks = len(hit_blocks) + len(new_blocks)
            req.num_computed_tokens = req.num_slot_tokens = num_cached + n
            if num_cached + n == num_tokens:
                req.num_in_flight = 1
                req.in_flight_step = self.step
            running.append(req)
            num_sched[req.request_id] = n
            budget -= n
            new_reqs.append(NewRequestData(
                req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                list(kv.get_block_table(req.request_id)), num_cached, req.num_preemptions > 0,
            ))
            if window > 1:
                policy.on_admitted(req, cands[pos:])
        for req in cands[pos:]:  # popped but not admitted: back to the queue
            self.waiting.put_back(policy.key(req), req)
        return budget

    # ------------------------------------------------------------------ after the forward
    def update_from_output(
        self, sampled_token_ids: Mapping[str, Sequence[int] | int], *, now: float | None = None
    ) -> list[Request]:
        """Append the step's sampled tokens and finish requests that stop; returns the finished ones.

        Args:
            sampled_token_ids: request id -> sampled token id(s) (an int or a list of ints) of one step.
                Entries of requests with no token in flight (a partial prefill chunk) or already finished
                are ignored. A request preempted while its token was in flight keeps the token.
            now: timestamp for ``first_token_time`` / ``finish_time`` (optional).
        """
        requests = self.requests
        stop_checker = self.stop_checker
        max_len = self.config.max_model_len
        finished: list[Request] = []
        waited: list[Request] = []  # finished while preempted (not in running)
        for rid, toks in sampled_token_ids.items():
            req = requests.get(rid)
            if req is None or not req.num_in_flight:
                continue  # finished, or a partial prefill chunk: its sample is not a token
            req.num_in_flight -= 1
            out_ids = req.output_token_ids
            if not out_ids:
                req.first_token_time = now
            if req.status is _PREEMPTED:  # sampled before it was preempted: the recompute prefills it too
                before = req.num_tokens
                status = self._append_tokens(req, toks)
                self.waiting.add_tokens(req.num_tokens - before)
                if status is not None:
                    self.waiting.remove(req)
                    req.finish_time = now
                    self._finish(req, status)
                    waited.append(req)
                continue
            all_ids = req.all_token_ids
            if type(toks) is int and (stop_checker is None or not req.check_stop):  # one token, no custom check
                out_ids.append(toks)
                all_ids.append(toks)
                if len(out_ids) < req.max_tokens and toks not in req.stop_ids and len(all_ids) < max_len:
                    continue
                del out_ids[-1], all_ids[-1]  # undo; the general path below decides the status
            status = self._append_tokens(req, toks)
            if status is not None:
                req.finish_time = now
                finished.append(req)
                self._finish(req, status)
        if finished:
            if len(finished) * 8 < len(self.running):
                for req in finished:
                    self.running.remove(req)
            else:
                self.running = [r for r in self.running if r.status is _RUNNING]
        return finished + waited

    # ------------------------------------------------------------------ helpers
    def _append_tokens(self, req: Request, toks) -> RequestStatus | None:
        """Append one step's token(s) to ``req``; the finished status they cause (``max_tokens``, a stop token,
        the stop checker, ``max_model_len``), or None."""
        status = None
        for tok in (toks,) if isinstance(toks, int) else toks:
            status = req.append_token(tok)
            if status is None and self.stop_checker is not None and req.check_stop:
                status = self.stop_checker(req)
            if status is None and len(req.all_token_ids) >= self.config.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                break
        return status

    def _cached_tokens(self, req: Request) -> int:
        """Prefix-cache hit tokens of a waiting request, looked up at most every ``_HINT_STEPS`` steps."""
        step, hits = req.prefix_hint
        if self.step - step >= _HINT_STEPS:
            hits = self.kv.get_computed_blocks(req.request_id, req.all_token_ids, extra_keys=req.extra_keys)[1]
            req.prefix_hint = (self.step, hits)
        return hits

    def fork_request(self, parent_id: str, child_id: str) -> Request:
        """Start ``child_id`` as a running copy of the running request ``parent_id``.

        The child gets the parent's tokens and progress and shares its KV blocks
        (``kv_cache_manager.fork``); the partly filled last block is copied on the first write by
        either of them (both ask the KV manager on their next step). The child is sent to the runner
        as a new request on its next step. Used by beam search and parallel sampling.

        Raises ValueError when the parent is not running or the child id is taken.
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.status is not _RUNNING:
            raise ValueError(f"fork_request: parent {parent_id!r} is not a running request")
        if child_id in self.requests:
            raise ValueError(f"fork_request: request_id {child_id!r} is already in use")
        child = Request(
            child_id, parent.prompt_token_ids, max_tokens=parent.max_tokens, arrival_time=parent.arrival_time,
            priority=parent.priority, eos_token_id=parent.eos_token_id, stop_token_ids=parent.stop_token_ids,
            min_tokens=parent.min_tokens, ignore_eos=parent.ignore_eos, cache_salt=parent.cache_salt,
            lora_id=parent.lora_id, check_stop=parent.check_stop,
        )
        self.kv.fork(parent_id, child_id)
        child.output_token_ids = list(parent.output_token_ids)
        child.all_token_ids = list(parent.all_token_ids)
        for name in ("num_computed_tokens", "num_blocks", "num_slot_tokens", "num_cached_tokens",
                     "first_scheduled_step", "first_token_time", "seq", "num_in_flight", "in_flight_step"):
            setattr(child, name, getattr(parent, name))
        child.status = _RUNNING
        parent.needs_cow_check = child.needs_cow_check = True
        self.requests[child_id] = child
        self.running.append(child)
        self._forked.add(child_id)
        return child

    def _preempt(self, req: Request, reason: PreemptionReason, preempted: list[str], computed: int) -> None:
        # blocks registered for tokens this step would have computed are dropped from the prefix cache
        self.kv.free(req.request_id, num_computed_tokens=min(computed, req.num_slot_tokens))
        self._forked.discard(req.request_id)
        req.needs_cow_check = False
        req.status = _PREEMPTED
        req.num_computed_tokens = req.num_slot_tokens = 0
        req.num_blocks = 0
        req.num_preemptions += 1
        req.preemptions.append((self.step, reason.value))
        self.stats.num_preemptions += 1
        by = self.stats.preemptions_by_reason
        by[reason.value] = by.get(reason.value, 0) + 1
        preempted.append(req.request_id)
        self.waiting.push(self.policy.key(req), req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status is _RUNNING:
            self.kv.free(req.request_id)
        self._forked.discard(req.request_id)
        req.status = status
        req.num_blocks = 0
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
        reason = status.finish_reason
        self.stats.num_finished[reason] = self.stats.num_finished.get(reason, 0) + 1

    def iter_waiting(self) -> Iterable[Request]:
        """Waiting and preempted requests in policy order (a sorted copy; for inspection and tests)."""
        return self.waiting.in_order()
