"""``blocks bench latency|throughput``: end-to-end engine benchmarks, like ``vllm bench``.

Both run the engine on a fixed synthetic workload (random token ids, ``ignore_eos``), usually with
``--load-format dummy`` at a named model shape (``llama-3-8b``, ``qwen2.5-0.5b``, ...) so no weights
are downloaded, print a summary and write a JSON result with ``--output-json``. ``--peer hf`` runs
transformers' ``generate`` on the same workload (or a subset, batched with left padding as a user
would) in the same process for the ratio.

* ``latency``: one batch of ``--batch-size`` prompts of ``--input-len`` tokens generating
  ``--output-len`` tokens; reports the prefill time (a run of one output token), the median decode step's
  wall time (engine step, sampling and detokenization included; with asynchronous scheduling a step call
  launches one step and reads the one before, so in the steady state it is the time between tokens) and the
  host time per step. ``--async-scheduling off`` runs the synchronous engine for comparison.
* ``serve``: the HTTP load generator of :mod:`serve.bench` against a running ``blocks serve`` (random
  prompts at a request rate or a max concurrency; throughput and TTFT/TPOT/ITL percentiles).
* ``throughput``: ``--num-prompts`` requests with prompt and output lengths uniform in the given
  ranges; reports requests/s, output tokens/s, total tokens/s and, from the bytes a step must move
  (weights once per step plus the KV cache read), the fraction of the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch

from blocks.engine.step_profile import triton_variants

__all__ = ["add_parser", "run_latency", "run_throughput"]


def _llm(args):
    from blocks.engine.llm import LLM

    return LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
               skip_tokenizer_init=True, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
               gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
               kv_cache_memory_bytes=args.kv_cache_memory_bytes, tensor_parallel_size=args.tensor_parallel_size,
               async_scheduling={"auto": None, "on": True, "off": False}[getattr(args, "async_scheduling", "auto")],
               seed=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _timed_generate(llm, prompts, outputs) -> float:
    from blocks.sample.params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outputs]
    device = llm.engine.runner.device
    _sync(device)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    _sync(device)
    return time.perf_counter() - start


def run_latency(args) -> dict[str, Any]:
    """Prefill and per-token decode latency of one batch (see module docstring)."""
    llm = _llm(args)
    vocab = llm.engine.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    _timed_generate(llm, prompts, [min(args.output_len, 4)] * args.batch_size)  # warm-up (compile, graphs)
    llm.engine.runner.reset_counters()  # host time of the timed runs only
    times = llm.engine.step_times
    prefill_steps, decode_steps, totals = [], [], []
    for _ in range(args.num_iters):
        # the prefill and its first token, alone: with asynchronous scheduling a step call returns before
        # its own tokens are read, so the first step's time is not the prefill's
        prefill_steps.append(_timed_generate(llm, prompts, [1] * args.batch_size))
        times.clear()
        totals.append(_timed_generate(llm, prompts, [args.output_len] * args.batch_size))
        decode_steps.extend(list(times)[2:-1])  # steady decode steps: not the prefill's, nor the draining one
    decode_steps.sort()
    per_token = decode_steps[len(decode_steps) // 2] if decode_steps else float("nan")
    prefill, full = min(prefill_steps), min(totals)
    model = llm.engine.runner.model
    result = {
        "model": args.model, "device": str(llm.engine.runner.device), "batch_size": args.batch_size,
        "tensor_parallel_size": args.tensor_parallel_size,
        "input_len": args.input_len, "output_len": args.output_len, "prefill_s": prefill, "total_s": full,
        "decode_ms_per_step": per_token * 1e3, "weight_bytes": _weight_bytes(model),
        "cuda_graphs": not args.enforce_eager and llm.engine.runner.device.type == "cuda",
    }
    host = getattr(llm.engine.runner, "host_time_per_step", None)
    if host is not None:
        result["host_ms_per_step"] = host * 1e3
    if args.peer == "hf":
        result["peer_hf"] = _hf_peer(args, llm, prompts, [args.output_len] * args.batch_size, args.batch_size)
        result["peer_hf"]["decode_ms_per_step"] = result["peer_hf"]["total_s"] / args.output_len * 1e3
    llm.shutdown()  # tensor-parallel workers and the process group end here, not at interpreter exit
    return result


def run_throughput(args) -> dict[str, Any]:
    """Offline throughput on a fixed random workload (see module docstring)."""
    from blocks.engine.workload import random_workload

    llm = _llm(args)
    prompts, outputs = random_workload(args.num_prompts, tuple(args.input_len_range), tuple(args.output_len_range),
                                       llm.engine.vocab_size, seed=0)
    _timed_generate(llm, prompts[:4], [4] * 4)  # warm-up
    runner = llm.engine.runner
    runner.reset_counters()
    compiled = sum(triton_variants().values())
    elapsed = _timed_generate(llm, prompts, outputs)
    variants = triton_variants()
    in_tok, out_tok = sum(map(len, prompts)), sum(outputs)
    weight = _weight_bytes(runner.model)
    moved = runner.counters["steps"] * weight + runner.counters["kv_tokens_read"] * runner.bytes_per_token
    result = {
        "model": args.model, "device": str(runner.device), "num_prompts": args.num_prompts,
        "tensor_parallel_size": args.tensor_parallel_size,
        "input_tokens": in_tok, "output_tokens": out_tok, "elapsed_s": elapsed,
        "requests_per_s": args.num_prompts / elapsed,
        "output_tokens_per_s": out_tok / elapsed, "total_tokens_per_s": (in_tok + out_tok) / elapsed,
        "steps": runner.counters["steps"], "graph_steps": runner.counters["graph_steps"], "bytes_moved": moved,
        # kernels compiled inside the timed run (each costs about a second of it) and the variants per kernel
        "triton_compiles_in_run": sum(variants.values()) - compiled, "triton_variants": variants,
    }
    if args.bandwidth_tbps:
        floor = moved / (args.bandwidth_tbps * 1e12)
        result["floor_s"] = floor
        result["fraction_of_floor"] = floor / elapsed
    if args.peer == "hf":
        n = min(args.peer_num_prompts, args.num_prompts)
        peer = _hf_peer(args, llm, prompts[:n], outputs[:n], args.peer_batch_size)
        result["peer_hf"] = peer
        result["ratio_vs_hf"] = result["output_tokens_per_s"] / peer["output_tokens_per_s"]
    llm.shutdown()
    return result


@torch.inference_mode()
def _hf_peer(args, llm, prompts, outputs, batch_size: int) -> dict[str, Any]:
    """transformers ``generate`` on the same prompts, batched with left padding, random weights."""
    import transformers

    runner = llm.engine.runner
    device, dtype = runner.device, runner.model.dtype
    cfg_path = llm.model_path
    from blocks.engine.shapes import MODEL_SHAPES, shape_config

    if cfg_path.lower() in MODEL_SHAPES:
        cfg = shape_config(cfg_path)
        arch = cfg.pop("architectures")[0]
        config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**cfg)
    else:
        config = transformers.AutoConfig.from_pretrained(cfg_path)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.eval()
    total_out = 0
    _sync(device)
    start = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        chunk, outs = prompts[s : s + batch_size], outputs[s : s + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(outs)  # a padded batch runs to its longest output
        model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        total_out += sum(outs)  # count only the tokens the workload asked for
    _sync(device)
    elapsed = time.perf_counter() - start
    del model
    return {"num_prompts": len(prompts), "batch_size": batch_size, "total_s": elapsed,
            "output_tokens_per_s": total_out / elapsed}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-0.5b", help="model folder, hub id, or a named shape with dummy weights")
    p.add_argument("--load-format", default="dummy", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="launch each step before reading the last one's tokens (auto: on for one CUDA device)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs (worker processes) per model")
    p.add_argument("--peer", choices=["none", "hf"], default="none", help="also run transformers generate")
    p.add_argument("--output-json", default=None, help="write the result here")


def add_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="{latency,throughput,serve}", required=True)
    lat = sub.add_parser("latency", help="prefill and per-token decode latency of one batch")
    _common(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.set_defaults(func=_main, runner=run_latency)
    thr = sub.add_parser("throughput", help="offline tokens/s on a fixed random workload")
    _common(thr)
    thr.add_argument("--num-prompts", type=int, default=1000)
    thr.add_argument("--input-len-range", type=int, nargs=2, default=[128, 1024])
    thr.add_argument("--output-len-range", type=int, nargs=2, default=[128, 512])
    thr.add_argument("--peer-num-prompts", type=int, default=64)
    thr.add_argument("--peer-batch-size", type=int, default=32)
    thr.add_argument("--bandwidth-tbps", type=float, default=None,
                     help="memory bandwidth (TB/s) for the floor, e.g. 3.0 measured on an H100")
    thr.set_defaults(func=_main, runner=run_throughput)
    srv = sub.add_parser("serve", help="load generator against a running `blocks serve` (TTFT/TPOT/ITL)",
                         add_help=False)
    srv.set_defaults(func=_serve_main, pass_through=True)


def _serve_main(args) -> int:
    # the load generator lives with the server (it speaks HTTP); imported only when this command runs
    from serve.bench import main as serve_bench_main

    return serve_bench_main(getattr(args, "serve_args", []))  # every flag passes through (see --help)


def _main(args) -> int:
    result = args.runner(args)
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
