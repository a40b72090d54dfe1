"""The engine-core process: an :class:`EngineCore` loop that talks msgpack over a pipe.

:class:`~blocks.engine.async_llm.AsyncLLM` starts :func:`run_engine_proc` in a child process
(``multiprocessing`` "spawn" context) so the HTTP server, tokenization and JSON never hold the GIL
the model loop needs. Every message is one msgpack-encoded list sent with ``send_bytes`` (never a
pickle of our objects)::

    API -> engine   ["add", {request_id, prompt_token_ids, params, prompt, priority, stream, arrival_time}]
                    ["abort", [request_id, ...]]
                    ["shutdown"]
    engine -> API   ["ready", {max_model_len, vocab_size, eos_token_id, num_blocks, block_size, pid}]
                    ["fatal", message]                     (start-up or step failure; the process exits)
                    ["error", request_id, kind, message, extra]  (kind: "value" | "queue_full" | "internal";
                                                           extra: [field, limit, value] for queue_full)
                    ["outs", [delta, ...], stats]          (after every step and after aborts)

A *delta* carries only what is new for a request since its last delta (see :func:`encode_output`):
the engine core hands out a streaming request as :class:`~blocks.engine.stream_delta.StreamDelta`
records of its new tokens, so a stream costs O(new tokens) per step from the core to the socket.
Text that could still become a stop string is held back until it is final, so concatenated deltas
always equal the finished text. A request that does not stream sends one delta: all of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any

import msgpack

from blocks.engine.step_profile import triton_variants

__all__ = ["run_engine_proc", "pack", "unpack", "sampling_params_to_dict", "encode_output"]


def pack(message: list) -> bytes:
    """msgpack-encode one message (a list)."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    """Decode one message; int map keys (``logit_bias``) are allowed."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def sampling_params_to_dict(params) -> dict[str, Any]:
    """The constructor fields of a ``SamplingParams`` as a plain dict (msgpack-safe)."""
    from dataclasses import fields

    return {f.name: getattr(params, f.name) for f in fields(params) if f.init and f.name != "bad_words_token_ids"}


def _encode_logprobs(entries) -> list:
    """``[{token_id: Logprob}]`` -> ``[[[token_id, logprob, rank, decoded], ...], ...]`` (order kept)."""
    return [None if e is None else [[t, lp.logprob, lp.rank, lp.decoded_token] for t, lp in e.items()]
            for e in entries]


def encode_output(out) -> list:
    """One request's output as a wire *delta* (no state: the engine core already cut it).

    ``out`` is a :class:`~blocks.engine.stream_delta.StreamDelta` (a streaming request: only what is
    new since its last delta) or a finished :class:`~blocks.engine.outputs.RequestOutput` (a request
    that did not stream: all of it, once). The delta is ``[request_id, finished, completions, metrics,
    num_cached_tokens, prompt_logprobs]`` with completions ``[[index, text, token_ids, logprobs,
    cumulative_logprob, finish_reason, stop_reason], ...]``; ``finish_reason`` is only reported once the
    whole request finished, so a client sees every choice's last text before its finish. Costs O(what
    ``out`` holds): O(new tokens) per step for a stream.
    """
    comps = []
    for c in out.outputs:
        comps.append([c.index, c.text, c.token_ids, None if c.logprobs is None else _encode_logprobs(c.logprobs),
                      c.cumulative_logprob, c.finish_reason if out.finished else None,
                      c.stop_reason if out.finished else None])
    m = out.metrics
    metrics = None if m is None else [m.arrival_time, m.first_token_time, m.finished_time, m.num_preemptions,
                                      m.first_scheduled_time]
    prompt_lps = None
    if out.finished and out.prompt_logprobs is not None:
        prompt_lps = _encode_logprobs(out.prompt_logprobs)
    return [out.request_id, out.finished, comps, metrics, out.num_cached_tokens, prompt_lps]


class _Loop:
    """The child's main loop: drain messages, step while there is work, send deltas."""

    def __init__(self, core, conn) -> None:
        self.core = core
        self.conn = conn
        self.running = True
        # where the loop's time goes (seconds), printed to stderr at shutdown: the server log shows it
        self.timing = {"handle": 0.0, "step": 0.0, "encode": 0.0, "send": 0.0}
        self.counts = {"steps": 0, "sends": 0, "deltas": 0, "running_sum": 0, "tokens_sum": 0}

    def send(self, message: list) -> None:
        t = time.perf_counter()
        self.conn.send_bytes(pack(message))
        self.timing["send"] += time.perf_counter() - t
        self.counts["sends"] += 1

    def report(self) -> str:
        """One line: steps, mean running requests and tokens a step, milliseconds a step in each phase."""
        n = max(self.counts["steps"], 1)
        ms = " ".join(f"{k} {v / n * 1e3:.2f}" for k, v in self.timing.items())
        counters = getattr(getattr(self.core, "runner", None), "counters", {})
        graphs = f", {counters['graph_steps']} by CUDA graph" if "graph_steps" in counters else ""
        variants = triton_variants()
        compiled = f"; Triton variants compiled: {sum(variants.values())} {variants}" if variants else ""
        return (f"engine loop: {self.counts['steps']} steps{graphs}, {self.counts['running_sum'] / n:.1f} running and "
                f"{self.counts['tokens_sum'] / n:.1f} tokens a step, {self.counts['deltas']} deltas in "
                f"{self.counts['sends']} messages; ms a step: {ms}{compiled}")

    def handle(self, message: list) -> list:
        """Apply one message; returns deltas of requests it finished (aborts)."""
        from blocks.sample.params import SamplingParams
        from blocks.sched.errors import QueueFullError

        kind = message[0]
        if kind == "add":
            req = message[1]
            rid = req["request_id"]
            try:
                params = SamplingParams(**req["params"])
                self.core.add_request(rid, req["prompt_token_ids"], params, prompt=req.get("prompt"),
                                      arrival_time=req.get("arrival_time"), priority=req.get("priority", 0),
                                      stream=bool(req.get("stream")))
            except QueueFullError as exc:
                self.send(["error", rid, "queue_full", str(exc), [exc.field, exc.limit, exc.value]])
            except (ValueError, TypeError) as exc:
                self.send(["error", rid, "value", str(exc), None])
            except Exception as exc:  # noqa: BLE001 - one bad request must not kill the engine
                self.send(["error", rid, "internal", f"{type(exc).__name__}: {exc}", None])
            return []
        if kind == "abort":
            outs = []
            for rid in message[1]:
                out = self.core.abort_request(rid)
                if out is not None:
                    outs.append(encode_output(out))
            return outs or [None]  # [None]: stats changed, send them even without outputs
        if kind == "shutdown":
            self.running = False
            return []
        raise ValueError(f"unknown engine message {kind!r}")

    def run(self) -> None:
        while self.running:
            busy = self.core.has_unfinished_requests()
            finished: list = []
            if self.conn.poll(0 if busy else None):
                t = time.perf_counter()
                while self.running and self.conn.poll(0):
                    finished.extend(self.handle(unpack(self.conn.recv_bytes())))
                self.timing["handle"] += time.perf_counter() - t
            if not self.running:
                break
            stepped = self.core.has_unfinished_requests()
            if stepped:
                t0 = time.perf_counter()
                outs = self.core.step()
                t1 = time.perf_counter()
                finished.extend(encode_output(o) for o in outs)
                self.timing["step"] += t1 - t0
                self.timing["encode"] += time.perf_counter() - t1
            if stepped or finished:
                stats = self.core.stats()  # once a step: the report's counts and the message
                if stepped:
                    self.counts["steps"] += 1
                    self.counts["running_sum"] += stats.num_running
                    self.counts["tokens_sum"] += stats.num_tokens
            if finished:
                deltas = [d for d in finished if d is not None]
                self.counts["deltas"] += len(deltas)
                self.send(["outs", deltas, asdict(stats)])
        for rid in self.core.unfinished_request_ids():  # shutdown: abort what is left, free its blocks
            self.core.abort_request(rid)
        print(self.report(), file=sys.stderr, flush=True)


def run_engine_proc(conn, config_kwargs: dict[str, Any], model_path: str | None) -> None:
    """Entry point of the engine process (``conn``: the child end of a duplex ``Pipe``).

    Builds the tokenizer and :class:`EngineCore`, sends ``["ready", info]`` (or ``["fatal", msg]``)
    and serves messages until ``["shutdown"]`` or the parent's end of the pipe closes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which shuts us down
    try:
        from blocks.engine.config import EngineConfig
        from blocks.engine.core import EngineCore

        config = EngineConfig(**config_kwargs)
        if model_path is None:
            from blocks.default_model_path import default_model_path

            model_path = default_model_path()
        tokenizer = None
        if not config.skip_tokenizer_init:
            from blocks.engine.llm import _load_tokenizer

            tokenizer = _load_tokenizer(config.tokenizer or model_path)
        core = EngineCore(config, model_path, tokenizer)
    except BaseException as exc:  # noqa: BLE001 - report any start-up failure to the parent
        conn.send_bytes(pack(["fatal", f"engine failed to start: {type(exc).__name__}: {exc}"]))
        conn.close()
        return
    conn.send_bytes(pack(["ready", {
        "max_model_len": core.max_model_len, "vocab_size": core.vocab_size, "eos_token_id": core.eos_token_id,
        "num_blocks": core.runner.num_blocks, "block_size": config.block_size, "pid": os.getpid(),
        "model_path": model_path,
    }]))
    loop = _Loop(core, conn)
    try:
        loop.run()
    except (EOFError, OSError, BrokenPipeError):
        pass  # the server went away: exit quietly
    except BaseException:  # noqa: BLE001
        with contextlib.suppress(OSError):
            conn.send_bytes(pack(["fatal", "engine step failed:\n" + traceback.format_exc()]))
    finally:
        with contextlib.suppress(Exception):
            core.close()  # tensor-parallel workers, if any
        conn.close()
