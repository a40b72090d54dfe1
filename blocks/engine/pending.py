"""What a launched engine step gives back: :class:`PendingStep` (launched, its sampled ids possibly still on the
way to the host) and :class:`StepResult` (host-side results), see :meth:`blocks.engine.runner.ModelRunner.launch`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from blocks.engine.runner import ModelRunner

__all__ = ["PendingStep", "StepResult"]


@dataclass
class StepResult:
    """Host-side results of one step.

    Attributes:
        sampled: request id -> sampled token id (only requests that sampled).
        logprobs: request id -> ``(token logprob, rank, {token id: (logprob, rank)} top-n)``.
        prompt_logprobs: request id -> list of ``{token id: (logprob, rank)}`` for prompt positions
            computed this step (position 0 excluded), for requests that asked for them.
        num_tokens: tokens computed this step.
        beam_logprobs: request id -> ``[vocab]`` float32 log-softmax row (on the device) of each
            beam-search sequence that completed its known tokens (beam search picks its token).
    """

    sampled: dict[str, int]
    logprobs: dict[str, tuple[float, int, dict[int, tuple[float, int]]]]
    prompt_logprobs: dict[str, list[dict[int, tuple[float, int]]]]
    num_tokens: int
    beam_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)


class PendingStep:
    """A launched step whose sampled ids may still be on their way to the host (:meth:`ModelRunner.launch`).

    ``resolve()`` waits for them (this step's device work only, not a later step's), appends them to the
    runner's per-request tokens and returns the :class:`StepResult`; it may be called once."""

    def __init__(self, runner: ModelRunner, sampled: tuple | None, partial: StepResult, step_start: float,
                 launched: float = 0.0) -> None:
        self.runner, self._sampled, self._result = runner, sampled, partial
        self._step_start, self._launched = step_start, launched

    def resolve(self) -> StepResult:
        if self._sampled is None:
            return self._result
        runner = self.runner
        req_ids, launched, sampled_ids, host_buf, done, lp = self._sampled
        self._sampled = None
        if done is not None:
            done.synchronize()
        synced = time.perf_counter()
        host = host_buf.tolist()
        runner.batch.record_tokens_on_host(sampled_ids, host)
        states = runner.requests.states
        if launched is None:  # resolved before any later launch: the runner's requests are the launch's
            sampled = dict(zip(req_ids, host))
            for rid, tok in sampled.items():
                states[rid].token_ids.append(tok)
        else:
            sampled = {}
            for rid, st0, tok in zip(req_ids, launched, host):
                st = states.get(rid)
                if st is st0:
                    st.token_ids.append(tok)
                elif st is not None:  # the id names a request added after this step's launch: not its token
                    continue
                # (None: finished or preempted since the launch; the scheduler keeps a preempted one's token)
                sampled[rid] = tok
        logprobs = {}
        if lp is not None:  # one host read for all rows that asked for logprobs (synchronous engines only)
            asked = [(i, p.logprobs) for i, p in enumerate(runner.batch.params) if p.logprobs is not None]
            entries = lp.to_host([i for i, _ in asked], [n for _, n in asked])
            logprobs = {req_ids[i]: e for (i, _), e in zip(asked, entries)}
        runner.counters["host_s"] += (self._launched - self._step_start) + (time.perf_counter() - synced)
        r = self._result
        return StepResult(sampled, logprobs, r.prompt_logprobs, r.num_tokens, r.beam_logprobs)
