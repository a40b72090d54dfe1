"""Streaming outputs in delta form: what a request gained since its last output, O(new tokens) per step.

A request added with ``stream=True`` comes out of :meth:`EngineCore.step` as a :class:`StreamDelta`
every step it advances: each :class:`CompletionDelta` holds only the text, token ids and logprob
entries that are new since the previous delta (never a copy of the whole output). The last delta
(``finished=True``) carries the finish and stop reasons of every choice and the prompt logprobs.
Concatenating a choice's deltas gives exactly the ``CompletionOutput`` a non-streamed request
returns (text, token ids, logprobs); ``cumulative_logprob`` is the running total.

Text that might still turn into a stop string (the last ``len(longest stop) - 1`` characters) is
held back until it is final, so a stream never shows text that the finished output trims.

The field names mirror :class:`~blocks.engine.outputs.RequestOutput` / ``CompletionOutput`` (what
vLLM calls the DELTA output kind), so code that reads a delta reads either.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.engine.outputs import PromptLogprobs, RequestMetrics, SampleLogprobs

__all__ = ["CompletionDelta", "StreamDelta", "StreamCursor", "take_delta", "make_delta"]


@dataclass
class CompletionDelta:
    """New output of one choice (``index``) since the previous delta; reasons only on the last one."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class StreamDelta:
    """One step's news of a streaming request (see the module docstring)."""

    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class StreamCursor:
    """How much of one sequence's output was already handed out (characters, token ids, logprob entries)."""

    text: int = 0
    tokens: int = 0
    logprobs: int = 0


def holdback_chars(stop) -> int:
    """Characters of text to hold back while a stop string could still match (longest stop - 1)."""
    return max((len(s) for s in stop or () if s), default=1) - 1


def take_delta(seq, *, final: bool) -> CompletionDelta:
    """The new part of one engine sequence's output, advancing its ``cursor``.

    ``seq`` is the engine's per-sequence state (``index``, ``sched.output_token_ids``, ``detok``,
    ``logprobs``, ``cumulative_logprob``, ``finish_reason``, ``stop_reason``, ``params``, ``cursor``).
    ``final``: the whole request finished, so the detokenizer is flushed, nothing is held back and
    the reasons are reported. Costs O(new tokens): only slices past the cursor are touched.
    """
    cur: StreamCursor = seq.cursor
    ids = seq.sched.output_token_ids
    new_ids = ids[cur.tokens:]
    cur.tokens = len(ids)
    text = ""
    detok = seq.detok
    if detok is not None:
        if detok.stop_string is None and len(detok.output_token_ids) < len(ids):
            detok.add_tokens(ids[len(detok.output_token_ids):])
        if final:
            detok.flush()
        end = len(detok.text) - (0 if final else holdback_chars(seq.params.stop))
        if end > cur.text:
            text = detok.text[cur.text:end]
            cur.text = end
    logprobs = None
    if seq.logprobs is not None:
        logprobs = seq.logprobs[cur.logprobs:]
        cur.logprobs = len(seq.logprobs)
    return CompletionDelta(
        index=seq.index, text=text, token_ids=new_ids, logprobs=logprobs,
        cumulative_logprob=seq.cumulative_logprob, finish_reason=seq.finish_reason if final else None,
        stop_reason=seq.stop_reason if final else None,
    )


def make_delta(parent, *, final: bool) -> StreamDelta:
    """A streaming request's news since its last delta, over all its sequences (``n`` choices).

    ``parent`` is the engine's per-request state (``request_id``, ``seqs``, ``metrics``,
    ``prompt_logprobs``); ``final``: the request finished (or was aborted).
    """
    parent.metrics.num_preemptions = sum(s.sched.num_preemptions for s in parent.seqs)
    return StreamDelta(
        request_id=parent.request_id, outputs=[take_delta(s, final=final) for s in parent.seqs], finished=final,
        metrics=parent.metrics, num_cached_tokens=max(parent.seqs[0].sched.num_cached_tokens, 0),
        prompt_logprobs=parent.prompt_logprobs if final else None,
    )
