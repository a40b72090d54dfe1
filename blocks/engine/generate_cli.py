"""``blocks generate``: one-off prompts through the engine, printed with their throughput.

Examples::

    blocks generate "What is the capital of France?"            # the embedded default model, chat
    blocks generate --raw "Once upon a time" --max-tokens 40     # plain completion
    blocks generate --model /path/to/hf-model --temperature 0.8 --top-p 0.95 "Hello"
    blocks generate --repeat 32 "2 + 3 ="                        # a batch of 32 copies (tokens/s)
"""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["add_parser"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts (default: a few built-in questions)")
    parser.add_argument("--model", default=None, help="HF folder or hub id (default: the embedded model)")
    parser.add_argument("--raw", action="store_true", help="plain completion instead of the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="run each prompt this many times (batching)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object per output")
    parser.set_defaults(func=_main)


DEFAULT_PROMPTS = ["What is the capital of France?", "What is 12 + 7?", "Write a JSON record for Ana, age 31."]


def _main(args) -> int:
    from blocks.engine.llm import LLM
    from blocks.sample.params import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager)
    prompts = (args.prompts or DEFAULT_PROMPTS) * args.repeat
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    start = time.perf_counter()
    if args.raw:
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 8)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 8)
    elapsed = time.perf_counter() - start
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    shown = outs if args.repeat == 1 else outs[: len(args.prompts or DEFAULT_PROMPTS)]
    for prompt, out in zip(prompts, shown):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.outputs[0].text,
                              "finish_reason": out.outputs[0].finish_reason}))
        else:
            print(f"> {prompt}\n{out.outputs[0].text}\n")
    print(f"{len(outs)} requests, {n_out} output tokens in {elapsed:.2f} s: {n_out / elapsed:.1f} output tokens/s")
    return 0
