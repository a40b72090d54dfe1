"""``blocks serve [MODEL]``: the OpenAI-compatible server (vLLM's flag names).

Examples::

    blocks serve                                  # the embedded default model on 0.0.0.0:8000
    blocks serve /path/to/hf-model --port 8001 --max-model-len 4096 --api-key secret
    BLOCKS_API_KEY=secret blocks serve --served-model-name my-model
    blocks serve llama-3-8b --load-format dummy   # a named shape, random weights, token-id prompts only

The engine core loads in a child process first (``--help`` lists every flag); then uvicorn serves
the app. SIGTERM / Ctrl-C: uvicorn stops accepting connections, waits up to ``--shutdown-timeout``
seconds for in-flight requests, then the engine aborts what is left and exits (no orphans); uvicorn
then re-raises the signal, so the exit status is that of the signal (-15 for SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os

__all__ = ["add_parser", "run", "engine_kwargs", "resolve_api_key"]

_DEFAULT_NAME = "blocks-default"


def _bool_flag(sp, name: str, default: bool, help_text: str) -> None:
    sp.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)


def add_parser(sp: argparse.ArgumentParser) -> None:
    """Add ``blocks serve``'s flags to ``sp`` and set ``func``."""
    sp.add_argument("model", nargs="?", default=None,
                    help="local Hugging Face folder or hub id (default: the embedded default model)")
    g = sp.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the API answers to; the first is reported (default: the MODEL argument)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API routes (/health, /metrics, /version stay "
                        "open); default: the BLOCKS_API_KEY environment variable, else no key")
    g.add_argument("--chat-template", default=None,
                   help="Jinja chat template (a file path or the template itself) overriding the tokenizer's")
    g.add_argument("--root-path", default="", help="ASGI root_path when served behind a path-based proxy")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="largest logprobs / top_logprobs / prompt_logprobs a request may ask for (default: 20)")
    g.add_argument("--strict-fields", action="store_true",
                   help="reject unknown request fields with 400 (default: accept and list them in the "
                        "x-blocks-ignored-fields response header)")
    g.add_argument("--max-request-body-bytes", type=int, default=16 << 20,
                   help="larger request bodies are refused with 413 (default: 16 MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let in-flight requests finish on SIGTERM before aborting them (default: 10)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    e = sp.add_argument_group("engine")
    e.add_argument("--dtype", default="auto", help="weights dtype: auto, float16, bfloat16, float32 (default: auto)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto = cuda if present)")
    e.add_argument("--load-format", default="auto",
                   help="auto (safetensors) or dummy (random weights; with a named shape such as llama-3-8b, "
                        "no files at all and no tokenizer)")
    e.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    e.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer: prompts must be token ids, outputs carry no text (chat, /tokenize "
                        "and text prompts answer 400); implied for a named shape with --load-format dummy")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output); default: the model's max_position_embeddings")
    e.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch (default: 256)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens computed in one step (default: 8192 with chunked prefill)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory the engine may use, KV cache included (default: 0.9)")
    e.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size in bytes (overrides --gpu-memory-utilization; CPU default: 1 GiB)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: 16)")
    _bool_flag(e, "enable-prefix-caching", True, "reuse KV blocks of shared prompt prefixes (default: on)")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs per model (default: 1)")
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="KV cache dtype: auto (= model dtype) or fp8 (default: auto)")
    e.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "cache_aware"],
                   help="order of admission: fcfs, priority (the request's priority field) or cache_aware")
    e.add_argument("--max-num-queued-requests", type=int, default=None,
                   help="waiting requests beyond this are refused with 503 + Retry-After (default: no limit)")
    e.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each engine step before reading the last one's tokens (default: on for one "
                        "CUDA device)")
    e.add_argument("--seed", type=int, default=0, help="engine seed (default: 0)")
    sp.set_defaults(func=run)


def resolve_api_key(flag: str | None) -> str | None:
    """``--api-key``, else the ``BLOCKS_API_KEY`` environment variable, else ``None`` (no key); empty = none."""
    return flag or os.environ.get("BLOCKS_API_KEY") or None


def _is_named_shape(model: str | None, load_format: str) -> bool:
    from blocks.engine.shapes import MODEL_SHAPES

    return load_format == "dummy" and model is not None and model.lower() in MODEL_SHAPES


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``EngineConfig`` keyword arguments from parsed flags."""
    skip = args.skip_tokenizer_init or (args.tokenizer is None and _is_named_shape(args.model, args.load_format))
    return dict(
        model=args.model, tokenizer=args.tokenizer, skip_tokenizer_init=skip,
        dtype=args.dtype, device=args.device, load_format=args.load_format,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_dtype=args.kv_cache_dtype, scheduling_policy=args.scheduling_policy,
        max_num_queued_requests=args.max_num_queued_requests, max_logprobs=args.max_logprobs,
        enforce_eager=args.enforce_eager, seed=args.seed, async_scheduling=args.async_scheduling,
    )


def run(args: argparse.Namespace) -> int:
    """Start the engine process, then serve until SIGTERM / Ctrl-C; returns the exit code."""
    import uvicorn

    from blocks.engine.async_llm import AsyncLLM
    from blocks.engine.config import EngineConfig
    from serve.app import build_app
    from serve.state import ServerState

    try:
        config = EngineConfig(**engine_kwargs(args))
    except ValueError as exc:
        print(f"blocks serve: {exc}")
        return 2
    template = args.chat_template
    if template is not None and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    try:
        engine = AsyncLLM(config)
    except RuntimeError as exc:
        print(f"blocks serve: {exc}")
        return 1
    try:
        state = ServerState(
            engine, served_model_names=args.served_model_name or [args.model or _DEFAULT_NAME],
            api_key=resolve_api_key(args.api_key), max_logprobs=args.max_logprobs,
            chat_template=template, strict_fields=args.strict_fields,
        )
        def stop_engine() -> None:  # before uvicorn re-raises the SIGTERM it caught
            engine.shutdown(timeout=args.shutdown_timeout)
            logging.getLogger("blocks.serve").warning("blocks serve: engine stopped")

        app = build_app(state, root_path=args.root_path, on_shutdown=stop_engine,
                        max_body_bytes=args.max_request_body_bytes)
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, root_path=args.root_path,
            timeout_graceful_shutdown=args.shutdown_timeout,
        ))
        server.run()
    finally:
        engine.shutdown()
    return 0
