"""The engine core: the loop that assembles every block.

One step, in five lines (see :meth:`EngineCore.step`)::

    sched_out = self.scheduler.schedule()            # who computes how many tokens
    result = self.runner.execute(sched_out)          # prepare inputs (plan), forward, sample
    finished = self.scheduler.update_from_output(result.sampled)   # append, stop checks, free
    self._update_requests(result, finished)          # detokenize, logprobs, outputs

**Asynchronous scheduling** (``async_scheduling``; on by default on one CUDA device): the step launches its
device work (``runner.launch``), then reads and processes the step before it, so the host's scheduling, input
building, stop checks and detokenization overlap the GPU instead of idling it. The tokens of the step before
are then unknown when this one is scheduled: the scheduler counts them as in flight, and the runner takes
them from the device. A request that stops is seen one step late; that step's token for it is dropped (and
requests whose last token is in flight by ``max_tokens`` are not scheduled). Outputs equal the synchronous
engine's. Steps run synchronously while any request asks for logprobs or prompt logprobs or has
``bad_words``, or a beam search runs (each needs the last token on the host before the next step), and with
tensor parallelism. A step's tokens go to the requests that were launched with it: a request id reused
after an abort (or a late-seen stop) while that step was in flight does not receive them.

Requests enter with :meth:`add_request` (token ids + ``SamplingParams``) and leave when they
finish or by :meth:`abort_request`. ``n > 1`` requests run as ``n`` child sequences with derived
seeds (see :mod:`blocks.sample.parallel`) and come back as one ``RequestOutput``; with ``stream=True``
as a :class:`~blocks.engine.stream_delta.StreamDelta` of only the new tokens every step it advances.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from blocks.cache.manager import KVCacheManager
from blocks.engine.beam import BeamGroup, BeamSearchOutput
from blocks.engine.config import EngineConfig
from blocks.engine.detokenizer import IncrementalDetokenizer
from blocks.engine.outputs import Logprob, RequestMetrics, RequestOutput
from blocks.engine.request_state import ParentRequest, SequenceState, TokenTexts, final_output
from blocks.engine.runner import ModelRunner, SamplingInfo
from blocks.engine.step_profile import StepProfiler
from blocks.engine.stream_delta import StreamDelta, make_delta
from blocks.sample.parallel import fork_parallel
from blocks.sample.params import BeamSearchParams, SamplingParams
from blocks.sched.config import SchedulerConfig
from blocks.sched.request import Request, RequestStatus
from blocks.sched.scheduler import Scheduler

__all__ = ["EngineCore", "StepStats"]


@dataclass
class StepStats:
    """Engine counters (for logs, progress bars and metrics), see :meth:`EngineCore.stats`."""

    num_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_unfinished: int = 0


class EngineCore:
    """The engine loop over a loaded model (see the module docstring).

    Args:
        config: validated :class:`EngineConfig`.
        model_path: local folder or hub id of the model.
        tokenizer: a transformers tokenizer, or ``None`` (token ids in and out, no text).
    """

    def __init__(self, config: EngineConfig, model_path: str, tokenizer=None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._seqs: dict[str, SequenceState] = {}
        self._parents: dict[str, ParentRequest] = {}
        self.runner = ModelRunner(config, model_path, self._sampling_info)
        self._step_profiler = StepProfiler()  # BLOCKS_ENGINE_PROFILE: see step_profile.py
        mc = self.runner.model.config
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = mc.vocab_size
        self.eos_token_id = mc.eos_token_ids[0] if mc.eos_token_ids else getattr(tokenizer, "eos_token_id", None)
        self.extra_eos_ids = list(mc.eos_token_ids[1:])
        self.kv_manager = KVCacheManager(
            self.runner.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        max_batched = config.token_budget(self.max_model_len)
        self.scheduler = Scheduler(
            self.kv_manager,
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
                max_model_len=self.max_model_len, enable_chunked_prefill=config.enable_chunked_prefill,
                long_prefill_token_threshold=config.long_prefill_token_threshold,
                max_num_queued_requests=config.max_num_queued_requests,
            ),
            policy=config.scheduling_policy,
            stop_checker=self._check_stop_strings,
        )
        self._last_num_tokens = 0
        self.step_times: deque[float] = deque(maxlen=65536)  # wall seconds of recent steps (benchmarks)
        self._texts = TokenTexts(tokenizer)
        self._beam_groups: dict[str, BeamGroup] = {}
        self._beam_of: dict[str, BeamGroup] = {}
        self._beam_info = SamplingInfo(SamplingParams(), 0, beam=True)
        auto = self.runner.device.type == "cuda"
        self._async = (auto if config.async_scheduling is None else config.async_scheduling) and (
            config.tensor_parallel_size == 1)
        self._pending = None  # the launched step not read yet (asynchronous scheduling)
        self._sync_seqs: set[str] = set()  # sequences whose sampling needs the host to see every token first

    # ------------------------------------------------------------------ requests
    def _sampling_info(self, request_id: str) -> SamplingInfo:
        seq = self._seqs.get(request_id)
        if seq is not None:
            return seq.info
        if request_id in self._beam_of:
            return self._beam_info
        raise KeyError(request_id)

    def validate_prompt(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """Check a prompt's token ids; raises ``ValueError`` naming the problem."""
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt must not be empty (0 tokens)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {self.vocab_size}) (the vocabulary), got {bad[0]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens but max_model_len is {self.max_model_len}: the prompt must be "
                f"shorter than max_model_len to leave room for at least one output token"
            )
        return ids

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        stream: bool = False,
    ) -> None:
        """Queue a request. Raises ``ValueError`` (nothing queued) for invalid input."""
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt_token_ids)
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs must be <= max_logprobs={self.config.max_logprobs}, got {params.logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.config.max_logprobs:
            raise ValueError(
                f"prompt_logprobs must be <= max_logprobs={self.config.max_logprobs}, got {params.prompt_logprobs}"
            )
        for name in ("allowed_token_ids", "logit_bias", "stop_token_ids"):  # would fail later, inside a step
            bad = next((int(t) for t in getattr(params, name) or () if not 0 <= int(t) < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} token ids must be in [0, {self.vocab_size}) (the vocabulary), got {bad}")
        if params.bad_words and self.tokenizer is not None and params.bad_words_token_ids is None:
            params.bad_words_token_ids = [self.tokenizer.encode(w, add_special_tokens=False) for w in params.bad_words]
        now = time.time() if arrival_time is None else arrival_time
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        group = fork_parallel(request_id, params) if params.n > 1 else None
        children = [(c.request_id, c.index, c.params) for c in group.children] if group else [(request_id, 0, params)]
        parent = ParentRequest(request_id, prompt, ids, params, [], RequestMetrics(arrival_time=now), group=group,
                         stream=stream)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else self.extra_eos_ids)
        for seq_id, index, seq_params in children:
            sched_req = Request(
                seq_id, ids, max_tokens=max_tokens, arrival_time=now, priority=priority,
                eos_token_id=self.eos_token_id, stop_token_ids=stop_ids, min_tokens=params.min_tokens,
                ignore_eos=params.ignore_eos, check_stop=bool(params.stop),
            )
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer, stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                )
            seq = SequenceState(
                seq_id, request_id, index, seq_params,
                SamplingInfo(seq_params, len(ids), eos_token_id=self.eos_token_id), sched_req, detok,
                [] if params.logprobs is not None else None, 0.0 if params.logprobs is not None else None,
            )
            parent.seqs.append(seq)
        for seq in parent.seqs:  # register all before queueing so a queue-full error leaves nothing behind
            self._seqs[seq.request_id] = seq
            if (params.logprobs is not None or params.prompt_logprobs is not None or params.bad_words
                    or params.bad_words_token_ids):  # each needs the last token on the host before a step
                self._sync_seqs.add(seq.request_id)
        self._parents[request_id] = parent
        try:
            for seq in parent.seqs:
                self.scheduler.add_request(seq.sched)
        except Exception:
            self._drop_parent(parent, abort=True)
            raise

    def add_beam_request(self, request_id: str, prompt_token_ids: Sequence[int], params: BeamSearchParams) -> None:
        """Queue a beam search over one prompt (see :mod:`blocks.engine.beam`); it finishes with a
        :class:`~blocks.engine.beam.BeamSearchOutput` from :meth:`step`."""
        if request_id in self._parents or request_id in self._beam_groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt_token_ids)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        eos = [] if self.eos_token_id is None else [self.eos_token_id, *self.extra_eos_ids]
        group = BeamGroup(request_id, ids, params, eos)
        rid = group.slot_to_rid[0]
        self._beam_groups[request_id] = group
        self._beam_of[rid] = group
        self.scheduler.add_request(Request(rid, ids, max_tokens=params.max_tokens + 1, ignore_eos=True,
                                           check_stop=False))

    def _advance_beams(self, rows: dict) -> tuple[dict[str, int], list[BeamSearchOutput]]:
        for rid, row in rows.items():
            group = self._beam_of.get(rid)
            if group is not None:
                group.rows[rid] = row
        tokens: dict[str, int] = {}
        outputs = []
        for gid, group in list(self._beam_groups.items()):
            if not group.rows or not group.ready():
                continue
            new, freed, done = group.advance(self.scheduler, lambda child, g=group: self._beam_of.__setitem__(child, g))
            tokens.update(new)
            for rid in freed:
                self._beam_of.pop(rid, None)
            if done:
                del self._beam_groups[gid]
                outputs.append(group.output(self.tokenizer))
        return tokens, outputs

    def abort_request(self, request_id: str) -> RequestOutput | StreamDelta | None:
        """Abort a request (any state); its blocks are freed at once. Returns its final output
        (a streaming request: its last delta)."""
        group = self._beam_groups.pop(request_id, None)
        if group is not None:
            for rid in group.abort_all(self.scheduler):
                self._beam_of.pop(rid, None)
            return None
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for seq in parent.seqs:
            if seq.finish_reason is None:
                self.scheduler.abort_request(seq.request_id)
                seq.finish_reason = "abort"
        out = final_output(parent)
        self._drop_parent(parent, abort=False)
        return out

    def _drop_parent(self, parent: ParentRequest, *, abort: bool) -> None:
        for seq in parent.seqs:
            if abort:
                self.scheduler.abort_request(seq.request_id)
            self._seqs.pop(seq.request_id, None)
            self._sync_seqs.discard(seq.request_id)
        self._parents.pop(parent.request_id, None)

    def close(self) -> None:
        """Release the engine's processes (tensor-parallel workers); the engine is unusable afterwards."""
        self.runner.close()

    def unfinished_request_ids(self) -> list[str]:
        """Ids of the requests (and beam searches) not finished yet."""
        return [*self._parents, *self._beam_groups]

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or bool(self._beam_groups) or self._pending is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput | StreamDelta | BeamSearchOutput]:
        """Run one engine step; returns outputs of finished requests and the deltas of streaming ones (with
        asynchronous scheduling, those of the step launched by the previous call)."""
        self._step_profiler.before_step()
        start = time.perf_counter()
        overlap = self._can_overlap()
        outputs: list = []
        if self._pending is not None and not overlap:  # the next step needs this one's tokens on the host
            pending, self._pending = self._pending, None
            outputs += self._complete(pending)
        sched_out = self.scheduler.schedule()
        if sched_out.scheduled_new_reqs:
            self._mark_scheduled(sched_out.scheduled_new_reqs)
        keep = overlap and sched_out.total_num_scheduled_tokens > 0
        launched = self.runner.launch(sched_out, overlap=keep)
        if self._pending is not None:  # the step before, read while this one runs on the device
            pending, self._pending = self._pending, None
            outputs += self._complete(pending)
        if keep:
            self._pending = launched
        else:
            outputs += self._complete(launched)
        self.step_times.append(time.perf_counter() - start)
        return outputs

    def _can_overlap(self) -> bool:
        """Whether the next step may be launched before this one's tokens reach the host."""
        return (self._async and not self._beam_groups and not self._sync_seqs
                and not self.runner.batch.needs_host_tokens)

    def _complete(self, launched) -> list[RequestOutput | StreamDelta | BeamSearchOutput]:
        """Read a launched step's tokens and apply them: beams, stop checks, finished requests, outputs."""
        result = launched.resolve()
        now = time.time()
        sampled, beam_outputs = result.sampled, []
        if self._beam_groups:  # beam search picks the tokens of its sequences (and forks/frees them)
            beam_tokens, beam_outputs = self._advance_beams(result.beam_logprobs)
            self.runner.append_tokens(beam_tokens)
            sampled = {**sampled, **beam_tokens}
        finished = self.scheduler.update_from_output(sampled, now=now)
        outputs = self._update_requests(result, finished, now)
        self._last_num_tokens = result.num_tokens
        return outputs + beam_outputs

    def _mark_scheduled(self, new_reqs) -> None:
        """Queue time: the first time any sequence of a request is scheduled."""
        now = time.time()
        for data in new_reqs:
            seq = self._seqs.get(data.request_id)
            if seq is None:
                continue
            m = self._parent_of(seq).metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
                m.time_in_queue = now - m.arrival_time

    def _check_stop_strings(self, req: Request) -> RequestStatus | None:
        seq = self._seqs.get(req.request_id)
        if seq is None or seq.detok is None or not seq.params.stop:
            return None
        # vLLM: stop strings count only once min_tokens outputs exist (text before that never stops it)
        seq.detok.stop_enabled = len(req.output_token_ids) >= seq.params.min_tokens
        update = seq.detok.add_tokens(req.output_token_ids[len(seq.detok.output_token_ids):])
        if update.stop_string is not None:
            seq.stop_reason = update.stop_string
            return RequestStatus.FINISHED_STOPPED
        return None

    def _update_requests(self, result, finished: list[Request], now: float) -> list[RequestOutput | StreamDelta]:
        touched: dict[str, ParentRequest] = {}
        for rid, entries in result.prompt_logprobs.items():
            seq = self._seqs[rid]
            parent = self._parent_of(seq)
            if seq.index == 0:
                parent.prompt_logprobs.extend(self._texts.logprob_dicts(e) for e in entries)
        seqs, parents, logprobs = self._seqs, self._parents, result.logprobs
        for rid, token in result.sampled.items():
            seq = seqs.get(rid)
            if seq is None:
                continue
            if seq.logprobs is not None and rid in logprobs:
                value, rank, top = logprobs[rid]
                entry = self._texts.logprob_dicts(top)
                entry[token] = Logprob(value, rank, self._texts.text(token))
                seq.logprobs.append(entry)
                seq.cumulative_logprob += value
            parent = parents[seq.parent_id]
            metrics = parent.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            touched[parent.request_id] = parent
        ending: set[str] = set()  # parents with a sequence that finished this step
        for req in finished:
            seq = self._seqs.get(req.request_id)
            if seq is None:
                continue
            seq.finish_reason = req.finish_reason
            if seq.stop_reason is None and req.finish_reason == "stop":
                last = req.output_token_ids[-1]
                seq.stop_reason = last if last in seq.params.stop_token_ids else None
            parent = self._parent_of(seq)
            touched[parent.request_id] = parent
            ending.add(parent.request_id)
        outputs = []
        for rid, parent in touched.items():
            if rid in ending and all(s.finish_reason is not None for s in parent.seqs):
                parent.metrics.finished_time = now
                outputs.append(final_output(parent))
                self._drop_parent(parent, abort=False)
            elif parent.stream:
                outputs.append(make_delta(parent, final=False))
        return outputs

    def _parent_of(self, seq: SequenceState) -> ParentRequest:
        return self._parents[seq.parent_id]

    def stats(self) -> StepStats:
        """Counters now (the last step's tokens; running, waiting, KV usage; totals since start)."""
        kv = self.kv_manager
        return StepStats(
            num_tokens=self._last_num_tokens, num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting, kv_usage=float(kv.usage),
            num_preemptions=self.scheduler.stats.num_preemptions, prefix_queries=kv.stats.prefix_queries,
            prefix_hits=kv.stats.prefix_hits, num_unfinished=self.num_unfinished_requests,
        )
