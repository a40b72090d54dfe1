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
        assert all(p.poll() is None for p in procs)
    finally:
        llm.shutdown()
    assert all(p.poll() is not None for p in procs)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_tp2_dummy_weights_equal_tp1(tmp_path, family):
    """Dummy weights are drawn per full tensor and sharded, so TP=2 runs the very model TP=1 runs."""
    build_tiny_checkpoint(family, tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts((3, 20))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", load_format="dummy", seed=3)
    want = [o.outputs[0].token_ids for o in LLM(str(tmp_path), **kw).generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    finally:
        llm.shutdown()


def test_heads_not_divisible_fails_at_startup(tmp_path):
    build_tiny_checkpoint("llama2", tmp_path)  # 4 heads
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size 3"):
        LLM(str(tmp_path), tensor_parallel_size=3, skip_tokenizer_init=True, dtype="float32", device="cpu")


def test_dead_worker_stops_the_engine_with_a_clear_error(tmp_path):
    build_tiny_checkpoint("qwen3", tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, skip_tokenizer_init=True, dtype="float32", device="cpu")
    proc = llm.engine.runner.workers.procs[0]
    proc.kill()
    proc.wait(10)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with pytest.raises(RuntimeError, match="worker rank 1 exited"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)
    llm.shutdown()
    assert proc.poll() is not None


def _generate_in_daemon(path: str, queue) -> None:
    llm = LLM(path, tensor_parallel_size=2, skip_tokenizer_init=True, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    queue.put(llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0].outputs[0].token_ids)
    llm.shutdown()


def test_tp_engine_inside_a_daemonic_process(tmp_path):
    """The server runs the engine core in a daemonic process; its TP workers must still start."""
    import multiprocessing as mp

    build_tiny_checkpoint("llama3", tmp_path)
    want = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cpu").generate(
        {"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_generate_in_daemon, args=(str(tmp_path), queue), daemon=True)
    proc.start()
    got = queue.get(timeout=120)
    proc.join(60)
    assert got == want and proc.exitcode == 0
