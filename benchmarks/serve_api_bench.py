"""CPU micro-benchmark of the API side of ``blocks serve``: synthetic engine, real server, real load generator.

What runs (all on 127.0.0.1, three processes):

* a **synthetic engine process** (:func:`fake_engine_main`): the real engine-process loop
  (:class:`blocks.engine.engine_proc._Loop`: msgpack over the ``Pipe``, :func:`encode_output`) around a
  fake core that, every ``--step-ms`` milliseconds, gives every running request one new token as a
  :class:`~blocks.engine.stream_delta.StreamDelta` (no model, no tokenizer: like
  ``blocks serve --load-format dummy`` at a named shape, ``--skip-tokenizer-init``);
* the **API server process**: the real :class:`~blocks.engine.async_llm.AsyncLLM`, the real FastAPI app
  (:func:`serve.app.build_app`) under uvicorn, exactly as ``blocks serve`` builds them;
* the **load generator** (this process): :func:`serve.bench.run_benchmark`, i.e. ``blocks bench serve``,
  sending the workload of ``blocks bench throughput`` (token-id prompts U[--input-len-range], outputs
  U[--output-len-range], streaming, ``include_usage``) with ``--max-concurrency`` requests in flight.

It reports output tokens/s and SSE chunks/s seen by the client, ITL/TTFT percentiles, and the CPU
seconds each process used (from ``/proc``), as microseconds per streamed token and per chunk: the
API process's figure is the cost this benchmark is about (1e6 / that = tokens/s one core sustains).
With ``--step-ms`` small the engine offers more than the API can take; the engine never waits for the
API, so a slow API shows as fewer, bigger chunks (merged deltas), high ITL and a CPU-bound server.

Run from the repository root (about 10-40 s; every step is bounded, the whole run by ``--timeout``)::

    python3 benchmarks/serve_api_bench.py                       # 256 streams, a step every 10 ms (25.6k tok/s offered)
    python3 benchmarks/serve_api_bench.py --step-ms 25 --num-prompts 400
    python3 benchmarks/serve_api_bench.py --json out.json

The figures depend on the machine and on whatever else uses its cores (three busy processes here):
compare runs made back to back on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- fake engine
class _Runner:
    num_blocks = 1 << 16


class FakeCore:
    """Enough of ``EngineCore`` for ``_Loop``: each step (paced to ``step_s``) gives every request one token."""

    max_model_len = 1 << 16
    vocab_size = 128256
    eos_token_id = None
    runner = _Runner()

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.reqs: dict[str, list] = {}  # rid -> [max_tokens, generated, metrics, stream]
        self.next_step = 0.0
        self.last_tokens = 0

    def add_request(self, rid, prompt_ids, params, *, prompt=None, arrival_time=None, priority=0, stream=False):
        from blocks.engine.outputs import RequestMetrics

        if rid in self.reqs:
            raise ValueError(f"request id {rid!r} is already running")
        self.reqs[rid] = [params.max_tokens, 0, RequestMetrics(arrival_time=arrival_time or time.time()), stream]

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.reqs)

    def _delta(self, rid, st, new_ids, finish):
        from blocks.engine.stream_delta import CompletionDelta, StreamDelta

        return StreamDelta(request_id=rid, outputs=[CompletionDelta(index=0, text="", token_ids=new_ids,
                                                                    finish_reason=finish)],
                           finished=finish is not None, metrics=st[2])

    def abort_request(self, rid):
        st = self.reqs.pop(rid, None)
        return None if st is None else self._delta(rid, st, [], "abort")

    def step(self) -> list:
        now = time.perf_counter()
        if self.next_step > now:
            time.sleep(self.next_step - now)
        self.next_step = max(now, self.next_step) + self.step_s
        t = time.time()
        outs = []
        done = []
        for rid, st in self.reqs.items():
            st[1] += 1
            m = st[2]
            if m.first_token_time is None:
                m.first_scheduled_time = m.first_token_time = t
            finished = st[1] >= st[0]
            if finished:
                m.finished_time = t
                done.append(rid)
            if st[3]:
                outs.append(self._delta(rid, st, [(st[1] * 7919) % 32000], "length" if finished else None))
            elif finished:
                outs.append(self._delta(rid, st, [(k * 7919) % 32000 for k in range(1, st[1] + 1)], "length"))
        for rid in done:
            del self.reqs[rid]
        self.last_tokens = len(outs)
        return outs

    def stats(self):
        from blocks.engine.core import StepStats

        return StepStats(num_tokens=self.last_tokens, num_running=len(self.reqs), num_unfinished=len(self.reqs))

    def close(self) -> None:
        pass


def fake_engine_main(conn, config_kwargs: dict, model_path) -> None:
    """Child entry point with ``run_engine_proc``'s signature: the real message loop over :class:`FakeCore`."""
    import signal

    from blocks.engine.engine_proc import _Loop, pack

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    core = FakeCore(float(os.environ.get("SERVE_API_BENCH_STEP_S", "0.01")))
    conn.send_bytes(pack(["ready", {"max_model_len": core.max_model_len, "vocab_size": core.vocab_size,
                                    "eos_token_id": None, "num_blocks": core.runner.num_blocks, "block_size": 16,
                                    "pid": os.getpid(), "model_path": "synthetic"}]))
    with contextlib.suppress(EOFError, OSError):
        _Loop(core, conn).run()
    conn.close()


# ---------------------------------------------------------------------------------------------- server
def _server_main(port: int, step_s: float, ready, stop, profile: str | None = None) -> None:
    os.environ["SERVE_API_BENCH_STEP_S"] = str(step_s)
    import logging

    import uvicorn

    from blocks.engine.async_llm import AsyncLLM
    from blocks.engine.config import EngineConfig
    from serve.app import build_app
    from serve.state import ServerState

    config = EngineConfig(model=None, skip_tokenizer_init=True)
    try:
        engine = AsyncLLM(config, startup_timeout=60, engine_main=fake_engine_main)
    except TypeError:  # an older tree (before engine_main=): the same through the module's name
        import blocks.engine.async_llm as async_llm

        async_llm.run_engine_proc = fake_engine_main
        engine = AsyncLLM(config, startup_timeout=60)
    try:
        app = build_app(ServerState(engine, served_model_names=["bench"]), on_shutdown=engine.shutdown)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        ready.put(engine.engine_pid)

        def stopper() -> None:  # a clean exit (uvicorn re-raises a SIGTERM it caught, skipping our finally)
            stop.wait()
            server.should_exit = True

        import threading

        threading.Thread(target=stopper, daemon=True).start()
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        if profile:  # the event-loop thread only
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            try:
                server.run()
            finally:
                prof.disable()
                prof.dump_stats(profile)
        else:
            server.run()
    finally:
        engine.shutdown()


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of a live process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, deadline: float) -> None:
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError("server did not start listening")


def run(args) -> dict:
    from blocks.engine.workload import random_workload
    from serve.bench import run_benchmark, summarize

    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ready = ctx.Queue()
    stop = ctx.Event()
    proc = ctx.Process(target=_server_main, args=(port, args.step_ms / 1000.0, ready, stop, args.profile),
                       name="serve-api-bench")
    proc.start()
    try:
        engine_pid = ready.get(timeout=60)
        _wait_listening(port, time.time() + 30)
        workload = random_workload(args.num_prompts, tuple(args.input_len_range), tuple(args.output_len_range),
                                   32000, seed=args.seed)
        cpu0 = {"server": _cpu_s(proc.pid), "engine": _cpu_s(engine_pid)}
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        results, wall = asyncio.run(asyncio.wait_for(run_benchmark(
            base_url=f"http://127.0.0.1:{port}/v1", model="bench", num_prompts=args.num_prompts, input_len=1,
            output_len=1, max_concurrency=args.max_concurrency, request_rate=float("inf"), workload=workload),
            timeout=args.timeout))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {"server": _cpu_s(proc.pid) - cpu0["server"], "engine": _cpu_s(engine_pid) - cpu0["engine"],
               "loadgen": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    s = summarize(results, wall)
    tokens = s["output_tokens"]
    chunks = sum(len(r.itl) + 1 for r in results if r.ok)
    wrong = sum(r.ok and r.output_tokens != n for r, n in zip(results, workload[1]))
    out = {
        "step_ms": args.step_ms, "max_concurrency": args.max_concurrency, "num_prompts": args.num_prompts,
        "completed": s["completed"], "failed": s["failed"], "wrong_output_lengths": wrong,
        "duration_s": round(wall, 3), "output_tokens": tokens, "output_tokens_per_s": round(tokens / wall, 1),
        "offered_tokens_per_s_at_full_batch": round(args.max_concurrency * 1000.0 / args.step_ms, 1),
        "chunks": chunks, "chunks_per_s": round(chunks / wall, 1),
        "tokens_per_chunk": round(tokens / max(chunks, 1), 3),
        "p50_ttft_ms": round(s["p50_ttft_ms"], 1), "p99_ttft_ms": round(s["p99_ttft_ms"], 1),
        "p50_itl_ms": round(s["p50_itl_ms"], 2), "p99_itl_ms": round(s["p99_itl_ms"], 2),
    }
    for name, sec in cpu.items():
        out[f"{name}_cpu_s"] = round(sec, 2)
        out[f"{name}_cpu_util"] = round(sec / wall, 2)
        out[f"{name}_us_per_token"] = round(sec * 1e6 / max(tokens, 1), 1)
        out[f"{name}_us_per_chunk"] = round(sec * 1e6 / max(chunks, 1), 1)
    out["server_tokens_per_cpu_s"] = round(tokens / max(cpu["server"], 1e-9), 1)
    out["server_chunks_per_cpu_s"] = round(chunks / max(cpu["server"], 1e-9), 1)  # what one core sustains
    out["loadgen_chunks_per_cpu_s"] = round(chunks / max(cpu["loadgen"], 1e-9), 1)
    if "first_error" in s:
        out["first_error"] = s["first_error"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=10.0, help="synthetic engine step period (one token per request)")
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--input-len-range", type=int, nargs=2, default=[128, 1024])
    p.add_argument("--output-len-range", type=int, nargs=2, default=[64, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=50.0, help="give up on the load after this many seconds")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--profile", default=None, help="cProfile the server's event loop into this file (slows it)")
    args = p.parse_args(argv)
    out = run(args)
    for k, v in out.items():
        print(f"{k:>36}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["failed"] == 0 and out["wrong_output_lengths"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
