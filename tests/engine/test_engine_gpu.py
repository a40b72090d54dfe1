"""The engine on CUDA: Triton attention and decode CUDA graphs give transformers' greedy tokens."""

import pytest
import torch

from blocks import LLM, SamplingParams
from blocks.models.check import build_tiny_checkpoint, hf_reference, random_prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama3", "qwen3", "mistral"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_engine_greedy_equals_transformers(tmp_path, family, enforce_eager):
    hf = build_tiny_checkpoint(family, tmp_path)
    prompts = random_prompts((1, 7, 16, 17, 33, 50, 3, 90))
    want, _ = hf_reference(hf, prompts, 16)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cuda", max_model_len=256,
              max_num_seqs=8, enforce_eager=enforce_eager, gpu_memory_utilization=0.3)
    runner = llm.engine.runner
    assert (runner.graphs is None) == enforce_eager
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == want
    if not enforce_eager:
        assert runner.counters["graph_steps"] > 0
    torch.cuda.synchronize()
