"""Decode-graph variants timed on one card in one process: L2 prefetch, decode fusion and slab-GEMV settings.

Builds the engine once (dummy weights at a named shape), decodes a few steps so every bucket's inputs hold a
real batch, then for each variant recaptures the decode graphs and replays each bucket 20 times between CUDA
events (forward and LM head; no sampler, no host), median of 5. Logits are compared with the first variant's
(the prefetch only moves data, so it must match bit for bit; the slab GEMV sums in another order)::

    PYTHONPATH=. python3 benchmarks/graph_variants.py --model llama-3-8b --variants "slab=0 slab=1 slab=1,min=300"
    PYTHONPATH=. python3 benchmarks/graph_variants.py --model qwen2.5-0.5b --buckets 1,8,256 \\
        --variants "prefetch=0 prefetch=1"

A variant is comma-separated settings: ``prefetch=0|1`` (``BLOCKS_L2_PREFETCH``), ``fusion=0|1`` (the fused
decode layers, ``BLOCKS_DECODE_FUSION``), ``felems=N`` / ``fwarps=N`` (their weight elements and warps a
program), ``walk=0|1`` (the sorted attention walk, ``BLOCKS_SORTED_WALK``), ``slab=0|1``,
``min=MB`` (smallest weight for the slab GEMV), ``selems=N`` (its weight elements a program), ``rows=N`` (most
rows), ``maxk=K``, ``pgroup=0|1`` (the fused layers' L2 prefetches in one launch),
``splits=N`` (force the decode attention's split count; 0: the plan's choice), ``owarps=N`` (warps of the decode
attention's one-stage splits, ``ONE_STAGE_WARPS``).
"""

from __future__ import annotations

import argparse
import os
import random

import torch

import blocks.attention.triton_paged as triton_paged
import blocks.layers.fused as fused
import blocks.layers.l2_prefetch as l2_prefetch
import blocks.layers.triton_decode_fused as decode_fused
import blocks.layers.triton_gemv as triton_gemv
from blocks.engine.cuda_graphs import DecodeGraphs
from blocks.engine.llm import LLM
from blocks.sample.params import SamplingParams

DEFAULTS = {"prefetch": os.environ.get("BLOCKS_L2_PREFETCH", "1"), "fusion": int(fused.DECODE_FUSION),
            "slab": int(fused.SLAB_GEMV), "walk": int(triton_paged.SORTED_WALK), "felems": decode_fused.ELEMS,
            "fwarps": 0, "selems": triton_gemv.SLAB_ELEMS, "pgroup": int(l2_prefetch.GROUPED),
            "splits": 0, "owarps": triton_paged.ONE_STAGE_WARPS,
            "min": fused.SLAB_MIN_WEIGHT_BYTES >> 20, "rows": fused.SLAB_ROWS, "maxk": fused.SLAB_MAX_K}


def _apply(variant: str, backend) -> None:
    cfg = dict(DEFAULTS)
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        if key not in cfg:
            raise ValueError(f"unknown setting {key!r} in variant {variant!r} (known: {', '.join(cfg)})")
        cfg[key] = value
    os.environ["BLOCKS_L2_PREFETCH"] = str(cfg["prefetch"])
    fused.DECODE_FUSION = str(cfg["fusion"]) == "1"
    triton_paged.SORTED_WALK = str(cfg["walk"]) == "1"
    decode_fused.ELEMS = int(cfg["felems"])
    decode_fused.WARPS = int(cfg["fwarps"]) or None
    triton_gemv.SLAB_ELEMS = int(cfg["selems"])
    l2_prefetch.GROUPED = str(cfg["pgroup"]) == "1"
    triton_paged.ONE_STAGE_WARPS = int(cfg["owarps"])
    backend.overrides.pop("num_splits", None)
    if int(cfg["splits"]):
        backend.overrides["num_splits"] = int(cfg["splits"])
    fused.SLAB_GEMV = str(cfg["slab"]) == "1"
    fused.SLAB_MIN_WEIGHT_BYTES = int(cfg["min"]) << 20
    fused.SLAB_ROWS = int(cfg["rows"])
    fused.SLAB_MAX_K = int(cfg["maxk"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--variants", default="prefetch=0 prefetch=1", help="space-separated variants")
    p.add_argument("--buckets", default="1,2,4,8")
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    seqs = max(buckets)
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.max_model_len,
              max_num_seqs=seqs, enable_prefix_caching=False, seed=0)
    engine, runner = llm.engine, llm.engine.runner
    rng = random.Random(0)
    for i in range(seqs):  # fills every bucket's static inputs with a real decode batch
        engine.add_request(f"w{i}", [rng.randrange(engine.vocab_size) for _ in range(args.prompt_len)],
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    base = runner.graphs
    reference: dict[int, torch.Tensor] = {}
    for variant in args.variants.split():
        _apply(variant, base.model.attn_backend)
        graphs = DecodeGraphs(base.model, base.kv_caches, block_size=base.block_size, max_batch=seqs,
                              max_model_len=base.max_model_len, prev_ids=runner.prev_ids)
        for bs in buckets:
            graphs._dev[bs].copy_(base._dev[bs])
        graphs.capture()
        cells = []
        for bs in buckets:
            graph, out = graphs.graphs[bs]
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            ref = reference.setdefault(bs, out.clone())
            same = "same" if torch.equal(out, ref) else f"max diff {(out - ref).abs().max().item():.3f}"
            times = []
            for _ in range(5):
                torch.cuda._sleep(2_000_000)  # the GPU busy while the host queues the replays
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 20 * 1e3)
            cells.append(f"bs{bs} {sorted(times)[2]:.1f} us ({same})")
        print(f"{args.model} [{variant}]: " + "; ".join(cells), flush=True)
        del graphs
    llm.shutdown()


if __name__ == "__main__":
    main()
