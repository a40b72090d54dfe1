"""A bounded TP=2 engine smoke run (two GPUs): build, generate 8 greedy tokens, shut down, with timings.

``python3 benchmarks/tp_smoke.py [eager|graphs] [dump_after_s]``: on a hang every process (rank 0 here, the
workers through ``BLOCKS_TP_DUMP_AFTER``) prints its threads' stacks after ``dump_after_s`` and exits.
"""

import faulthandler
import os
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "graphs"
after = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
os.environ["BLOCKS_TP_DUMP_AFTER"] = str(after)
faulthandler.dump_traceback_later(after, exit=True)

from blocks import LLM, SamplingParams  # noqa: E402

t = time.time()
llm = LLM("qwen2.5-0.5b", load_format="dummy", tensor_parallel_size=2, enforce_eager=mode == "eager",
          max_model_len=1024, max_num_seqs=8, gpu_memory_utilization=0.4, skip_tokenizer_init=True)
print(f"{mode}: built in {time.time() - t:.1f} s", flush=True)
out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                   use_tqdm=False)
print(f"{mode}: generated {out[0].outputs[0].token_ids} at {time.time() - t:.1f} s", flush=True)
llm.shutdown()
print(f"{mode}: shut down at {time.time() - t:.1f} s", flush=True)
