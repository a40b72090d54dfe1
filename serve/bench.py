"""A load generator for a running OpenAI-compatible server (the core of a future ``blocks bench serve``).

Sends ``--num-prompts`` streaming completions of random token-id prompts (``--input-len`` tokens,
ids below ``--id-range`` so any vocabulary fits; ``ignore_eos`` so each produces ``--output-len``
tokens), at ``--request-rate`` requests/s (Poisson arrivals; ``inf`` = all at once) with at most
``--max-concurrency`` in flight, and reports throughput and TTFT / TPOT / ITL / E2E percentiles, like
``vllm bench serve``::

    python -m serve.bench --base-url http://127.0.0.1:8000 --num-prompts 500 --max-concurrency 500

``--input-len-range LO HI --output-len-range LO HI --vocab-size V`` instead sends the workload of
``blocks bench throughput`` (:func:`blocks.engine.workload.random_workload`: the same seed gives the
same prompts and output lengths), so a server's tokens/s compares with the offline engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["RequestResult", "run_benchmark", "summarize", "main"]


@dataclass
class RequestResult:
    """One request: success, prompt/output token counts, TTFT, inter-token gaps and end-to-end time (s)."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    text: str = ""
    error: str = ""


class _StreamProtocol(asyncio.Protocol):
    """One streaming completion over a plain HTTP/1.1 connection (``Connection: close``).

    Parses the status line, headers, a chunked (or ``Content-Length``) body and the SSE events in it
    straight from ``data_received``: every event is timestamped when its bytes arrived, and costs one
    small ``json.loads`` (no HTTP client stack per event, so one core parses well over 10k events/s).
    """

    def __init__(self, request: bytes, res: RequestResult, start: float, done: asyncio.Future) -> None:
        self.request = request
        self.res = res
        self.start = start
        self.done = done
        self.transport = None
        self.buf = bytearray()
        self.status = 0
        self.headers_done = False
        self.chunked = False
        self.length: int | None = None
        self.chunk_left = -1  # -1: a chunk-size line comes next; >= 0: payload bytes left (+2 for CRLF)
        self.body = bytearray()  # a non-200 response's body
        self.sse = b""
        self.last: float | None = None
        self.text: list[str] = []
        self.complete = False
        self.last_data = time.perf_counter()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = self.last_data = time.perf_counter()
        try:
            self.buf += data
            if not self.headers_done:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
                del self.buf[:end + 4]
                self.status = int(head[0].split(" ", 2)[1])
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "transfer-encoding" and "chunked" in value.lower():
                        self.chunked = True
                    elif name == "content-length":
                        self.length = int(value.strip())
                self.headers_done = True
            if self.chunked:
                self._dechunk(now)
            else:
                payload = bytes(self.buf)
                self.buf.clear()
                self._body(payload, now)
                if self.length is not None and self._seen >= self.length:
                    self._finish()
        except Exception as exc:  # noqa: BLE001 - a malformed response fails this request only
            self._finish(f"{type(exc).__name__}: {exc}")

    _seen = 0

    def _dechunk(self, now: float) -> None:
        buf = self.buf
        pos = 0
        parts = []
        while True:
            if self.chunk_left < 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    del buf[:pos]
                    if parts:
                        self._body(b"".join(parts), now)
                    self._finish()
                    return
                self.chunk_left = size + 2
            left = self.chunk_left  # payload bytes still to come, plus the CRLF after them
            take = min(left, len(buf) - pos)
            if take <= 0:
                break
            n = min(take, max(left - 2, 0))
            if n:
                parts.append(bytes(buf[pos:pos + n]))
            pos += take
            self.chunk_left = left - take or -1
        del buf[:pos]
        if parts:
            self._body(b"".join(parts), now)

    def _body(self, payload: bytes, now: float) -> None:
        self._seen += len(payload)
        if self.status != 200:
            self.body += payload
            return
        data = self.sse + payload if self.sse else payload
        start = 0
        res = self.res
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            event = data[start:end]
            start = end + 2
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            usage = chunk.get("usage")
            if usage:
                res.prompt_tokens = usage["prompt_tokens"]
                res.output_tokens = usage["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if self.last is None:
                    res.ttft = now - self.start
                else:
                    res.itl.append(now - self.last)
                self.last = now
                text = choice.get("text")
                if text:
                    self.text.append(text)
        self.sse = data[start:]

    def _finish(self, error: str | None = None) -> None:
        if self.complete:
            return
        self.complete = True
        res = self.res
        if error is not None:
            res.error = error
        elif self.status != 200:
            res.error = f"HTTP {self.status}: {bytes(self.body)[:200]!r}"
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.complete:
            if exc is None and self.headers_done and not self.chunked and self.length is None:
                self._finish()  # a body delimited by the end of the connection
            else:
                self._finish(f"connection closed before the response ended ({exc or 'EOF'})")


async def _one_raw(host: str, port: int, path: str, body: dict, headers: dict, timeout: float) -> RequestResult:
    payload = json.dumps(body, separators=(",", ":")).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n{extra}\r\n"
               ).encode("latin-1") + payload
    loop = asyncio.get_running_loop()
    res = RequestResult(ok=False)
    start = time.perf_counter()
    done = loop.create_future()
    transport = None
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _StreamProtocol(request, res, start, done), host, port), timeout)
        while not done.done():  # idle timeout: no bytes for ``timeout`` s
            await asyncio.wait([done], timeout=max(proto.last_data + timeout - time.perf_counter(), 0.01))
            if not done.done() and time.perf_counter() - proto.last_data > timeout:
                proto._finish(f"ReadTimeout: no data for {timeout} s")
        res.e2e = time.perf_counter() - start
        res.text = "".join(proto.text)
    except (TimeoutError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    finally:
        if transport is not None:
            transport.close()
    if res.error:
        return res
    res.ok = res.output_tokens > 0
    if not res.ok:
        res.error = "no usage chunk"
    return res


async def _one(client, url: str, body: dict, headers: dict) -> RequestResult:
    """The same over httpx (used for ``https://`` base URLs)."""
    import httpx

    start = time.perf_counter()
    res = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.text += choice.get("text", "")
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "no usage chunk"
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_benchmark(*, base_url: str, model: str | None, num_prompts: int, input_len: int, output_len: int,
                        max_concurrency: int, request_rate: float, id_range: int = 100, seed: int = 0,
                        api_key: str | None = None,
                        workload: tuple[list[list[int]], list[int]] | None = None) -> tuple[list[RequestResult], float]:
    """Run the load; returns the per-request results and the wall time (s).

    ``workload``: ``(prompts, output_lens)`` to send instead of ``num_prompts`` random prompts of
    ``input_len`` ids below ``id_range`` generating ``output_len`` tokens each.
    """
    rng = random.Random(seed)
    if workload is None:
        workload = ([[rng.randrange(1, id_range) for _ in range(input_len)] for _ in range(num_prompts)],
                    [output_len] * num_prompts)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/completions"
    parts = urlsplit(url)
    sem = asyncio.Semaphore(max_concurrency)
    timeout = 600.0
    client = None
    if parts.scheme == "https":  # TLS: through httpx (slower per event)
        import httpx

        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits)
    elif parts.scheme != "http":
        raise ValueError(f"base_url must be http:// or https://, got {base_url!r}")
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def guarded(body: dict) -> RequestResult:
        async with sem:
            if client is not None:
                return await _one(client, url, body, headers)
            return await _one_raw(host, port, path, body, headers, timeout)

    try:
        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in zip(*workload):
            body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if model:
                body["model"] = model
            tasks.append(asyncio.ensure_future(guarded(body)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start
    finally:
        if client is not None:
            await client.aclose()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Throughput and latency percentiles (milliseconds) of successful requests."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    summary = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall_s,
               "input_tokens": in_tokens, "output_tokens": out_tokens,
               "request_throughput": len(ok) / wall_s, "output_tokens_per_s": out_tokens / wall_s,
               "total_tokens_per_s": (in_tokens + out_tokens) / wall_s}
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl), ("e2e", [r.e2e for r in ok])):
        ms = [v * 1000 for v in values]
        summary[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else float("nan")
        for q in (50, 90, 99):
            summary[f"p{q}_{name}_ms"] = _pct(ms, q)
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_error"] = errors[0]
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default: inf)")
    p.add_argument("--id-range", type=int, default=100, help="prompt token ids are drawn from [1, id_range)")
    p.add_argument("--input-len-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="prompt lengths uniform in [LO, HI]: the workload of `blocks bench throughput` "
                        "(needs --output-len-range and --vocab-size; replaces --input-len/--output-len/--id-range)")
    p.add_argument("--output-len-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="output lengths uniform in [LO, HI] (with --input-len-range)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="prompt ids are drawn from [0, vocab_size) (with --input-len-range; the model's vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency", "id_range"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    workload = None
    if args.input_len_range or args.output_len_range:
        if not (args.input_len_range and args.output_len_range and args.vocab_size):
            p.error("--input-len-range, --output-len-range and --vocab-size go together")
        from blocks.engine.workload import random_workload

        try:
            workload = random_workload(args.num_prompts, tuple(args.input_len_range), tuple(args.output_len_range),
                                       args.vocab_size, seed=args.seed)
        except ValueError as exc:
            p.error(str(exc))
    results, wall = asyncio.run(run_benchmark(
        base_url=args.base_url, model=args.model, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, max_concurrency=args.max_concurrency, request_rate=args.request_rate,
        id_range=args.id_range, seed=args.seed, api_key=args.api_key, workload=workload))
    summary = summarize(results, wall)
    if workload is not None:
        short = sum(r.ok and r.output_tokens != n for r, n in zip(results, workload[1]))
        summary["wrong_output_lengths"] = short  # ignore_eos: every request should produce exactly its length
    for key, value in summary.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
