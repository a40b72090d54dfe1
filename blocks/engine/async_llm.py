"""``AsyncLLM``: an asyncio client of an engine core running in its own process.

The engine core (model, scheduler, KV cache, detokenizer) runs in a child process started with
``multiprocessing``'s "spawn" context (:mod:`blocks.engine.engine_proc`); this object lives in the
server's process, sends msgpack messages over a ``Pipe`` and turns the replies into one async
stream per request. Example::

    engine = AsyncLLM(EngineConfig(model=path, device="cpu"))   # blocks until the model is loaded
    async for out in engine.generate("r1", prompt_ids, SamplingParams(max_tokens=8), stream=True):
        print(out.outputs[0].text, end="")                        # only the new text of this step
    engine.shutdown()

Each item of :meth:`AsyncLLM.generate` is a :class:`~blocks.engine.outputs.RequestOutput` in
*delta* form: every ``CompletionOutput`` holds only the text, token ids and logprobs that are new
since the previous item, and ``finish_reason`` appears once, on the last item (``finished=True``,
which also carries ``prompt_logprobs``). A request that does not stream yields one item: all of it.
The engine core cuts a stream's deltas itself (:mod:`blocks.engine.stream_delta`), so a stream
costs O(new tokens) per step in the engine process, on the pipe and here; concatenating the items
(``serve.streams.ChoiceState`` does, in O(delta) each) gives exactly the non-streamed output. A
consumer slower than the engine never slows the engine: deltas that queued up meanwhile come out
merged as one item (as vLLM's output collector does), so under load there are fewer, larger items.
Leaving the ``async for`` early (a client that went away, a cancelled task) aborts the request in
the engine, which frees its KV blocks in its next loop iteration.

Two threads move bytes: a writer (so a busy engine never blocks the event loop on a full pipe)
and a reader (which hands each reply to the event loop). If the engine process dies, every open
stream raises :class:`EngineDeadError` and :meth:`is_alive` turns false.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

from blocks.engine.config import EngineConfig
from blocks.engine.engine_proc import pack, run_engine_proc, sampling_params_to_dict, unpack
from blocks.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from blocks.sample.params import SamplingParams
from blocks.sched.errors import QueueFullError

__all__ = ["AsyncLLM", "EngineDeadError", "EngineStats"]


class EngineDeadError(RuntimeError):
    """The engine process is gone (crashed, killed or shut down); the server answers 503."""


class EngineStats(dict):
    """The engine's latest counters: ``num_running``, ``num_waiting``, ``kv_usage`` (0..1),
    ``num_preemptions``, ``prefix_queries``, ``prefix_hits`` (cumulative), ``num_unfinished``."""


def _decode_logprobs(entries) -> list:
    return [None if e is None else {t: Logprob(lp, rank, dec) for t, lp, rank, dec in e} for e in entries]


def _to_output(delta: list, prompt_token_ids: list[int], prompt: str | None) -> RequestOutput:
    rid, finished, comps, metrics, cached, prompt_lps = delta
    outputs = [
        CompletionOutput(index=i, text=text, token_ids=ids, cumulative_logprob=cum,
                         logprobs=None if lps is None else _decode_logprobs(lps), finish_reason=fin,
                         stop_reason=stop)
        for i, text, ids, lps, cum, fin, stop in comps
    ]
    m = None
    if metrics is not None:
        m = RequestMetrics(arrival_time=metrics[0], first_token_time=metrics[1], finished_time=metrics[2],
                           num_preemptions=metrics[3], first_scheduled_time=metrics[4])
        if m.first_scheduled_time is not None:
            m.time_in_queue = m.first_scheduled_time - m.arrival_time
    return RequestOutput(request_id=rid, prompt=prompt, prompt_token_ids=prompt_token_ids,
                         prompt_logprobs=None if prompt_lps is None else _decode_logprobs(prompt_lps),
                         outputs=outputs, finished=finished, metrics=m, num_cached_tokens=cached)


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.put(item)


def _merge(items: list) -> list:
    """Merge consecutive wire deltas of one request (none after a finished one) into one. Concatenated pieces
    give the same output, in fewer items (as vLLM's output collector does when a client reads slower than
    the engine steps)."""
    last = items[-1]
    comps: dict[int, list] = {}
    for _, _, cs, *_ in items:
        for c in cs:
            comps.setdefault(c[0], []).append(c)
    merged = []
    for index, parts in comps.items():
        lps = [p[3] for p in parts if p[3] is not None]
        end = parts[-1]
        merged.append([index, "".join(p[1] for p in parts), [t for p in parts for t in p[2]],
                       [e for lp in lps for e in lp] if lps else None, end[4], end[5], end[6]])
    return [last[0], last[1], merged, last[3], last[4], last[5]]


def _take(items: list) -> tuple[Any, list]:
    """The next item of a mailbox's backlog and the rest: an error alone, else the wire deltas up to the
    first finished one (or an error) merged into one."""
    first = items[0]
    if len(items) == 1 or isinstance(first, BaseException) or first[1]:
        return first, items[1:]
    k = 1
    while k < len(items) and not isinstance(items[k], BaseException):
        k += 1
        if items[k - 1][1]:
            break
    return (first if k == 1 else _merge(items[:k])), items[k:]


class _Stream:
    """Per-request mailbox on the event loop: a list the reader thread appends to (through the loop) and
    at most one waiting consumer, woken once per engine message however many deltas it brought."""

    __slots__ = ("loop", "items", "waiter", "prompt_token_ids", "prompt")

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_token_ids: list[int], prompt: str | None) -> None:
        self.loop = loop
        self.items: list = []
        self.waiter: asyncio.Future | None = None
        self.prompt_token_ids = prompt_token_ids
        self.prompt = prompt

    def put(self, item: Any) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take_all(self) -> list:
        """Everything queued (waiting for at least one item)."""
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class AsyncLLM:
    """Asyncio front of an engine process (see the module docstring).

    Args:
        config: the engine's :class:`EngineConfig`; ``config.model=None`` = the embedded default model.
        startup_timeout: seconds to wait for the model to load before raising ``RuntimeError``.
        engine_main: the child's entry point (default :func:`~blocks.engine.engine_proc.run_engine_proc`);
            a module-level function with its signature, e.g. a synthetic engine for API benchmarks.

    Attributes (after start): ``max_model_len``, ``vocab_size``, ``eos_token_id``, ``num_blocks``,
    ``block_size``, ``model_path`` (resolved), ``engine_pid``, ``tokenizer`` (loaded in this process
    too, for chat templates and tokenization; ``None`` with ``skip_tokenizer_init``).
    """

    def __init__(self, config: EngineConfig, *, startup_timeout: float = 900.0, engine_main=None) -> None:
        self.config = config
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        kwargs = asdict(config)
        # not a daemon: the engine spawns its own tensor-parallel workers; atexit (and pipe EOF) end it
        self._proc = ctx.Process(target=engine_main or run_engine_proc, args=(child, kwargs, config.model),
                                 name="blocks-engine")
        self._proc.start()
        atexit.register(self.shutdown)
        child.close()
        self._dead: str | None = None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stats = EngineStats(num_running=0, num_waiting=0, kv_usage=0.0, num_preemptions=0, prefix_queries=0,
                                 prefix_hits=0, num_unfinished=0)
        if not self._conn.poll(startup_timeout):
            self._kill()
            raise RuntimeError(f"engine did not start within startup_timeout={startup_timeout} s")
        try:
            first = unpack(self._conn.recv_bytes())
        except EOFError:
            self._kill()
            raise RuntimeError(f"engine process exited during start-up (exit code {self._proc.exitcode})") from None
        if first[0] != "ready":
            self._kill()
            raise RuntimeError(first[1])
        info = first[1]
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.eos_token_id: int | None = info["eos_token_id"]
        self.num_blocks: int = info["num_blocks"]
        self.block_size: int = info["block_size"]
        self.engine_pid: int = info["pid"]
        self.model_path: str = info["model_path"]
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            from blocks.engine.llm import _load_tokenizer

            self.tokenizer = _load_tokenizer(config.tokenizer or self.model_path)
        self._writer = threading.Thread(target=self._write_loop, name="blocks-engine-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="blocks-engine-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    # ------------------------------------------------------------------ plumbing
    def _write_loop(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):
                return

    def _read_loop(self) -> None:
        reason = "engine process exited"
        try:
            while True:
                msg = unpack(self._conn.recv_bytes())
                kind = msg[0]
                if kind == "outs":
                    self.stats = EngineStats(msg[2])
                    self._deliver_all(msg[1])
                elif kind == "error":
                    _, rid, err_kind, text, extra = msg
                    if err_kind == "queue_full":
                        exc: Exception = QueueFullError(*extra)
                    else:
                        exc = ValueError(text) if err_kind == "value" else RuntimeError(text)
                    self._deliver(rid, exc)
                elif kind == "fatal":
                    reason = msg[1]
                    break
        except (EOFError, OSError):
            pass
        self._dead = reason
        with self._lock:
            streams = list(self._streams.items())
        for rid, _ in streams:
            self._deliver(rid, EngineDeadError(reason))

    def _deliver_all(self, deltas: list) -> None:
        """Hand one message's deltas to their streams: one event-loop wake-up per loop, not one per delta."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for delta in deltas:
                stream = self._streams.get(delta[0])
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream, delta))
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed
                loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed
                stream.loop.call_soon_threadsafe(stream.put, item)

    def _send(self, message: list) -> None:
        self._outbox.put(pack(message))

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    # ------------------------------------------------------------------ public API
    def is_alive(self) -> bool:
        """Whether the engine process is up and answering."""
        return self._dead is None and self._proc.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead if self._dead is not None else (None if self._proc.is_alive() else "engine process exited")

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        priority: int = 0,
        stream: bool = False,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Run one request; yields deltas (``stream=True``: every step it advances; else one at the end).

        Raises ``ValueError`` (invalid request), :class:`QueueFullError` (admission control) or
        :class:`EngineDeadError` from the first ``__anext__``. Closing the iterator early aborts it.
        """
        if not self.is_alive():
            raise EngineDeadError(self.dead_reason or "engine is not running")
        ids = [int(t) for t in prompt_token_ids]
        mailbox = _Stream(asyncio.get_running_loop(), ids, prompt)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = mailbox
        self._send(["add", {
            "request_id": request_id, "prompt_token_ids": ids, "params": sampling_params_to_dict(params),
            "prompt": prompt, "priority": int(priority), "stream": bool(stream),
            "arrival_time": time.time() if arrival_time is None else arrival_time,
        }])
        done = False
        backlog: list = []
        try:
            while True:
                if not backlog:
                    backlog = await mailbox.take_all()
                item, backlog = _take(backlog)  # a consumer that fell behind gets one item for all it missed
                if isinstance(item, BaseException):
                    done = not isinstance(item, EngineDeadError)  # an add error left nothing to abort
                    raise item
                out = _to_output(item, ids, prompt)
                if out.finished:
                    done = True
                yield out
                if done:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not done and self._dead is None:
                self._send(["abort", [request_id]])

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests by id (unknown ids are ignored); their blocks are freed in the engine."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._send(["abort", ids])

    def shutdown(self, *, timeout: float = 10.0) -> None:
        """Ask the engine to abort what is left and exit; kill it if it has not after ``timeout`` s."""
        atexit.unregister(self.shutdown)
        if self._proc.is_alive() and self._dead is None:
            self._send(["shutdown"])
            self._proc.join(timeout)
        self._kill()
        self._outbox.put(None)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._dead = self._dead or "engine was shut down"
