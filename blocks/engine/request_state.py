"""Engine-side state of a request and the output built from it when it finishes.

A request (:class:`ParentRequest`) holds one :class:`SequenceState` a sampled sequence (``n > 1`` requests
hold ``n``), each tied to its scheduler :class:`~blocks.sched.request.Request`. :func:`final_output` turns a
finished or aborted request into vLLM's ``RequestOutput`` (a streaming request: its last delta), and
:class:`TokenTexts` gives logprob entries their token strings (decoded once per token id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blocks.engine.detokenizer import IncrementalDetokenizer
from blocks.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from blocks.engine.runner import SamplingInfo
from blocks.engine.stream_delta import StreamCursor, StreamDelta, make_delta
from blocks.sample.parallel import ParallelGroup
from blocks.sample.params import SamplingParams
from blocks.sched.request import Request

__all__ = ["SequenceState", "ParentRequest", "TokenTexts", "final_output"]


@dataclass
class SequenceState:
    """Engine-side state of one sequence (a request, or one child of an ``n > 1`` request)."""

    request_id: str
    parent_id: str
    index: int
    params: SamplingParams
    info: SamplingInfo
    sched: Request
    detok: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    stop_reason: int | str | None = None
    finish_reason: str | None = None
    cursor: StreamCursor = field(default_factory=StreamCursor)  # what a stream already handed out


@dataclass
class ParentRequest:
    """A request as the user sent it: its prompt, parameters, metrics and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[SequenceState]
    metrics: RequestMetrics
    group: ParallelGroup | None = None
    prompt_logprobs: list | None = None
    finished: bool = False
    stream: bool = False
    extra: dict = field(default_factory=dict)


class TokenTexts:
    """Token strings for logprob entries, decoded once per token id (``None`` without a tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._text.get(token)
        if text is None:
            text = self._text[token] = self.tokenizer.decode([token])
        return text

    def logprob_dicts(self, top: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        """``{token: (logprob, rank)}`` -> ``{token: Logprob}`` with decoded tokens."""
        return {t: Logprob(v, r, self.text(t)) for t, (v, r) in top.items()}


def final_output(parent: ParentRequest) -> RequestOutput | StreamDelta:
    """The final output of a finished (or aborted) request: all of it, or a stream's last delta."""
    if parent.stream:
        return make_delta(parent, final=True)
    completions = []
    for seq in parent.seqs:
        tokens = list(seq.sched.output_token_ids)
        text = ""
        if seq.detok is not None:
            missing = tokens[len(seq.detok.output_token_ids):]
            if missing and seq.detok.stop_string is None:
                seq.detok.add_tokens(missing)
            seq.detok.flush()
            text = seq.detok.text
        completions.append(CompletionOutput(
            index=seq.index, text=text, token_ids=tokens, cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        ))
    first = parent.seqs[0].sched
    parent.metrics.num_preemptions = sum(s.sched.num_preemptions for s in parent.seqs)
    return RequestOutput(
        request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
        prompt_logprobs=parent.prompt_logprobs, outputs=completions, finished=True,
        metrics=parent.metrics, num_cached_tokens=max(first.num_cached_tokens, 0),
    )
