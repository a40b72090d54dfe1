"""The engine with ``tensor_parallel_size=2`` on the CPU (gloo, one worker process): greedy outputs equal
TP=1, including chunked prefill and beam search; bad TP configurations fail at startup; no worker is left."""

import pytest

from blocks import LLM, SamplingParams
from blocks.models.check import build_tiny_checkpoint, random_prompts
from blocks.sample.params import BeamSearchParams


@pytest.mark.parametrize("family", ["llama3", "opt-350m"])
def test_tp2_greedy_equals_tp1(tmp_path, family):
    build_tiny_checkpoint(family, tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts((1, 7, 17, 33, 50))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    kw = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", max_num_batched_tokens=24)
    want = [o.outputs[0].token_ids for o in LLM(str(tmp_path), **kw).generate(prompts, params, use_tqdm=False)]
    beam = BeamSearchParams(beam_width=3, max_tokens=5)
    want_beam = LLM(str(tmp_path), **kw).beam_search(prompts[2], beam)[0].sequences[0].tokens
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **kw)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        assert llm.beam_search(prompts[2], beam)[0].sequences[0].tokens == want_beam
        procs = llm.engine.runner.workers.procs
        assert all(p.is_alive() for p in procs)
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_heads_not_divisible_fails_at_startup(tmp_path):
    build_tiny_checkpoint("llama2", tmp_path)  # 4 heads
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size 3"):
        LLM(str(tmp_path), tensor_parallel_size=3, skip_tokenizer_init=True, dtype="float32", device="cpu")


def test_dead_worker_stops_the_engine_with_a_clear_error(tmp_path):
    build_tiny_checkpoint("qwen3", tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, skip_tokenizer_init=True, dtype="float32", device="cpu")
    proc = llm.engine.runner.workers.procs[0]
    proc.kill()
    proc.join(10)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with pytest.raises(RuntimeError, match="worker rank 1 exited"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)
    llm.shutdown()
    assert not proc.is_alive()
