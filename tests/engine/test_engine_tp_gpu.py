"""The engine with ``tensor_parallel_size=2`` on two GPUs (NCCL, CUDA graphs on every rank): greedy outputs
equal TP=1. Skipped without two CUDA devices."""

import pytest
import torch

from blocks import LLM, SamplingParams
from blocks.models.check import build_tiny_checkpoint, random_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def _greedy(model, prompts, tp, **kw):
    llm = LLM(model, tensor_parallel_size=tp, skip_tokenizer_init=True, device="cuda", max_num_seqs=8,
              gpu_memory_utilization=0.4, **kw)
    try:
        if tp > 1:
            assert llm.engine.runner.graphs is not None
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.runner.counters["graph_steps"]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_tp2_nccl_greedy_equals_tp1_tiny_checkpoint(tmp_path, family):
    build_tiny_checkpoint(family, tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts((1, 7, 17, 33, 50))]
    want, _ = _greedy(str(tmp_path), prompts, 1, dtype="float32", max_model_len=256)
    got, graph_steps = _greedy(str(tmp_path), prompts, 2, dtype="float32", max_model_len=256)
    assert got == want
    assert graph_steps > 0


def test_tp2_nccl_greedy_equals_tp1_dummy_weights_at_a_real_shape():
    """Qwen2.5-0.5B shape (14 heads, 2 KV heads: one KV head per rank), dummy weights, float32."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts((5, 64, 130), vocab_size=151936)]
    kw = dict(load_format="dummy", dtype="float32", max_model_len=1024)
    want, _ = _greedy("qwen2.5-0.5b", prompts, 1, **kw)
    got, _ = _greedy("qwen2.5-0.5b", prompts, 2, **kw)
    assert got == want
