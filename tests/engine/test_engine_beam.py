"""Beam search inside the engine equals transformers' beam search on the best hypothesis, and its
beams share the prompt's KV blocks through the scheduler's fork (copy-on-write)."""

import pytest
import torch

from blocks import LLM
from blocks.sample.params import BeamSearchParams

PROMPTS = [[5, 17, 99, 3, 42, 8, 150], [7, 7, 1, 90, 33, 21, 64, 11, 200, 13, 5, 6, 2, 9, 40, 41, 42, 43]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    path, _ = tiny_llama
    return LLM(path, dtype="float32", device="cpu", max_model_len=128, enable_prefix_caching=False)


@pytest.mark.parametrize("beam_width,length_penalty", [(2, 1.0), (4, 1.0), (3, 0.5), (4, 2.0)])
def test_best_hypothesis_equals_transformers(llm, tiny_llama, beam_width, length_penalty):
    _, hf = tiny_llama
    max_new = 8
    params = BeamSearchParams(beam_width=beam_width, max_tokens=max_new, length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    eos = llm.engine.eos_token_id
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=beam_width, do_sample=False,
                              max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=False,
                              eos_token_id=eos, pad_token_id=eos, num_return_sequences=1)
        want = ref[0, len(prompt):].tolist()
        if eos in want:  # transformers pads after EOS
            want = want[: want.index(eos) + 1]
        best = out.sequences[0]
        assert best.tokens[: len(prompt)] == prompt
        assert best.tokens[len(prompt):] == want
        assert len(out.sequences) == beam_width
        assert [s.cum_logprob for s in out.sequences] != [0.0] * beam_width
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1


def test_beams_share_the_prompt_blocks(llm):
    engine = llm.engine
    prompt = list(range(1, 50))  # 49 tokens: 3 full blocks + 1 token
    peak = []
    step = engine.step

    def watched_step():
        out = step()
        peak.append(engine.runner.num_blocks - 1 - engine.kv_manager.num_free_blocks)
        return out

    engine.step = watched_step
    try:
        llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=4, max_tokens=6))
    finally:
        engine.step = step
    # four beams of up to 55 tokens would need 4 * 4 = 16 blocks unshared; sharing the 3 full prompt blocks
    # leaves 3 + 4 (each beam's own last block) = 7
    assert max(peak) <= 7
    assert engine.kv_manager.stats.cow_copies > 0


def test_more_beams_than_max_num_seqs(tiny_llama):
    path, _ = tiny_llama
    small = LLM(path, dtype="float32", device="cpu", max_model_len=64, max_num_seqs=2, enable_prefix_caching=False)
    wide = LLM(path, dtype="float32", device="cpu", max_model_len=64, enable_prefix_caching=False)
    params = BeamSearchParams(beam_width=5, max_tokens=6)
    prompt = {"prompt_token_ids": PROMPTS[0]}
    best = small.beam_search(prompt, params)[0].sequences[0].tokens
    assert best == wide.beam_search(prompt, params)[0].sequences[0].tokens
    assert small.engine.runner.requests.table.shape[0] > 2  # the runner's block table grew for the forks
