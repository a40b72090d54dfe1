"""Driving engine requests from routes: metrics, several prompts at once, disconnects, SSE framing.

* :func:`tracked` wraps :meth:`AsyncLLM.generate` and records the request's metrics.
* :class:`MergedStreams` runs one engine request per prompt concurrently, raising any request's
  error *before* a response starts (so an invalid request or a full queue is a plain HTTP error,
  never a broken stream), then yields ``(prompt_index, delta)`` in arrival order. Closing it aborts
  every request still running.
* :class:`ChoiceState` accumulates the deltas of one choice (non-streaming responses, usage), O(delta) each.
* :func:`run_until_disconnected` cancels a non-streaming request when its client goes away.
* :func:`sse_body` is the body of every streamed response: chunks per engine step, errors as an event,
  ``[DONE]`` at the end, the requests aborted if the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import Request

__all__ = ["tracked", "MergedStreams", "ChoiceState", "run_until_disconnected", "sse", "SSE_DONE",
           "ClientDisconnected", "ChunkTemplate", "to_json", "json_value", "sse_body"]

SSE_DONE = b"data: [DONE]\n\n"

#: compact JSON (non-ASCII kept), the encoder of every SSE event; one instance, not one per call
to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


_CONSTANT_JSON = {None: "null", "": '""', "length": '"length"', "stop": '"stop"', "abort": '"abort"'}


def json_value(value) -> str:
    """``to_json(value)`` for a chunk's text / finish reason / stop reason, with the usual ones precomputed."""
    if value is None or value == "":  # `value == ""` also matches "" only; ints and other strs fall through
        return "null" if value is None else '""'
    try:
        return _CONSTANT_JSON[value]
    except (KeyError, TypeError):
        return to_json(value)


def sse(payload: dict) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return b"data: " + to_json(payload).encode() + b"\n\n"


_HOLE = "\x00choice\x00"


class ChunkTemplate:
    """The SSE event of a stream chunk with one choice, as ``sse({**base, "choices": [choice]})`` would write it,
    but with the constant part (id, object, created, model, ``"usage": null``) serialised once per stream:
    ``event(choice_json)`` only pastes the choice's JSON in (a few string joins per chunk)."""

    __slots__ = ("head", "tail")

    def __init__(self, base: dict) -> None:
        text = "data: " + to_json({**base, "choices": [_HOLE]}) + "\n\n"
        self.head, self.tail = text.split(to_json(_HOLE))

    def event(self, choice_json: str) -> str:
        return self.head + choice_json + self.tail


class ClientDisconnected(Exception):
    """The client closed its connection before the response was ready."""


async def tracked(state, request_id: str, prompt_ids: list[int], params, *, prompt: str | None, priority: int,
                  stream: bool):
    """``state.engine.generate(...)`` plus metrics (prompt/generation tokens, TTFT, E2E, finish reasons)."""
    arrival = time.time()
    metrics = state.metrics
    first = True
    generated = 0
    last = arrival
    async for out in state.engine.generate(request_id, prompt_ids, params, prompt=prompt, priority=priority,
                                           stream=stream, arrival_time=arrival):
        new = sum(len(c.token_ids) for c in out.outputs)
        generated += new
        now = time.time()
        if first:
            m = out.metrics
            ftt = m.first_token_time if m is not None else None
            metrics.on_first_output(num_prompt_tokens=len(prompt_ids), ttft_s=None if ftt is None else ftt - arrival,
                                    queue_s=None if m is None or m.time_in_queue is None else m.time_in_queue)
            first = False
            # a non-streamed answer arrives whole: its tokens after the first are spaced evenly over the wait
            if new > 1 and ftt is not None:
                metrics.on_inter_token(now - ftt, new - len(out.outputs))
        elif new:
            metrics.on_inter_token(now - last, new)
        last = now
        metrics.on_tokens(new)
        if out.finished:
            m = out.metrics
            end = m.finished_time if m is not None and m.finished_time else time.time()
            decode = None if m is None or m.first_token_time is None else end - m.first_token_time
            per_choice = generated / max(len(out.outputs), 1)
            metrics.on_finished(finish_reasons=[c.finish_reason for c in out.outputs], e2e_s=end - arrival,
                                decode_s=decode, num_generated=int(per_choice))
        yield out


class MergedStreams:
    """Concurrent engine streams, one per prompt (see the module docstring).

    Use ``await start()`` (raises the first error, nothing left running), then ``async for i, out``,
    and always ``await aclose()`` (aborts unfinished requests).
    """

    def __init__(self, gens: list) -> None:
        self.gens = gens
        self._firsts: list = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        firsts = await asyncio.gather(*(anext(g) for g in self.gens), return_exceptions=True)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        self._firsts = firsts

    async def __aiter__(self):
        if len(self.gens) == 1:  # one prompt (every chat request): no pump task, no second queue per delta
            yield 0, self._firsts[0]
            if not self._firsts[0].finished:
                async for out in self.gens[0]:
                    yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()
        live = 0
        for i, first in enumerate(self._firsts):
            yield i, first
            if not first.finished:
                live += 1
                self._tasks.append(asyncio.ensure_future(self._pump(i, self.gens[i], q)))
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    @staticmethod
    async def _pump(i: int, gen, q: asyncio.Queue) -> None:
        try:
            async for out in gen:
                q.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, exc))
            return
        q.put_nowait((i, None))

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        for g in self.gens:
            with contextlib.suppress(BaseException):
                await g.aclose()


class ChoiceState:
    """Accumulated output of one choice; :meth:`add` costs O(the delta) however long the output is.

    ``text`` (joined on demand), ``num_chars``, ``token_ids``, ``logprobs`` (``None`` unless any
    delta had them), ``finish_reason``, ``stop_reason``.
    """

    __slots__ = ("_parts", "num_chars", "token_ids", "logprobs", "finish_reason", "stop_reason")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.num_chars = 0
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, c) -> None:
        if c.text:
            self._parts.append(c.text)
            self.num_chars += len(c.text)
        self.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


async def run_until_disconnected(request: Request, coro, *, poll_s: float = 0.2):
    """Await ``coro``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def sse_body(merged: MergedStreams, step_events, *, first: bytes = b"", last=None):
    """An SSE response body: ``first``, then for every engine output ``(prompt index, delta)`` the chunks
    ``step_events(i, delta)`` returns (one write per step), then ``last()`` (e.g. the usage chunk); an
    exception becomes an error event (the status line is already sent); the streams are always closed
    (aborting unfinished requests) and ``[DONE]`` ends the body."""
    try:
        if first:
            yield first
        async for i, out in merged:
            events = step_events(i, out)
            if events:
                yield "".join(events).encode()
        if last is not None:
            yield last()
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        yield sse({"error": {"message": str(exc), "type": "InternalServerError", "param": None, "code": 500}})
    finally:
        await merged.aclose()
    yield SSE_DONE
