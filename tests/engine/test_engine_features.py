"""Engine features against transformers and vLLM's documented behaviour: logprobs, prompt logprobs,
stop strings, stop tokens with min_tokens, max_tokens, ignore_eos, n > 1, chat, and bad input."""

import pytest
import torch

from blocks import LLM, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    path, _ = tiny_llama
    return LLM(path, dtype="float32", device="cpu", max_model_len=128, enable_prefix_caching=True)


def _hf_log_softmax(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_and_prompt_logprobs_match_transformers(llm, tiny_llama):
    _, hf = tiny_llama
    prompt = [5, 17, 99, 3, 42, 8, 150, 77, 2, 19, 64, 33, 21, 90, 11, 7, 120, 45]
    params = SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2, **GREEDY)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    comp = out.outputs[0]
    ref = _hf_log_softmax(hf, prompt + comp.token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        entry = out.prompt_logprobs[j]
        want = ref[j - 1]
        assert prompt[j] in entry and len(entry) in (2, 3)
        assert entry[prompt[j]].logprob == pytest.approx(want[prompt[j]].item(), abs=1e-4)
        assert entry[prompt[j]].rank == int((want > want[prompt[j]]).sum()) + 1
    cumulative = 0.0
    for k, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        want = ref[len(prompt) - 1 + k]
        assert tok == int(want.argmax()) and entry[tok].rank == 1
        top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:3]
        assert [t for t, _ in top] == want.topk(3).indices.tolist()
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(want[t].item(), abs=1e-4)
        cumulative += want[tok].item()
    assert comp.cumulative_logprob == pytest.approx(cumulative, abs=1e-3)


def test_stop_strings_trim_and_report(llm):
    prompt = "The quick brown fox"
    free = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(free.text) >= 6, "the tiny model must produce some text for this test"
    stop = free.text[3:6]
    cut = free.text.index(stop)
    trimmed = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert trimmed.text == free.text[:cut]
    assert trimmed.finish_reason == "stop" and trimmed.stop_reason == stop
    kept = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[: cut + len(stop)]


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    prompt = {"prompt_token_ids": [9, 8, 7, 6, 5, 4]}
    free = llm.generate(prompt, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop_tok = free.token_ids[1]
    first = free.token_ids.index(stop_tok)
    stopped = llm.generate(prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop_tok], **GREEDY),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_tok
    held = llm.generate(prompt, SamplingParams(max_tokens=10, min_tokens=6, stop_token_ids=[stop_tok], **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 6
    assert stop_tok not in held.token_ids[:5]  # masked while under min_tokens


def test_eos_stops_unless_ignore_eos(llm):
    eos = llm.engine.eos_token_id
    assert eos is not None
    bias = {eos: 100.0}
    prompt = {"prompt_token_ids": [1, 2, 3]}
    stops = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, logit_bias=bias), use_tqdm=False)
    assert stops[0].outputs[0].token_ids == [eos] and stops[0].outputs[0].finish_reason == "stop"
    runs = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, logit_bias=bias, ignore_eos=True),
                        use_tqdm=False)
    assert runs[0].outputs[0].token_ids == [eos] * 8 and runs[0].outputs[0].finish_reason == "length"


def test_parallel_sampling_n4_shares_the_prompt_blocks(llm):
    engine = llm.engine
    prompt = {"prompt_token_ids": list(range(1, 66))}  # 65 tokens: 4 full blocks of 16
    before = engine.kv_manager.stats.prefix_hits if hasattr(engine.kv_manager.stats, "prefix_hits") else 0
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent streams
    assert engine.kv_manager.stats.prefix_hits - before >= 3  # children reuse the prompt's full blocks
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1


def test_chat_renders_the_template(llm):
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": "Paris is"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
    assert out.prompt == "<user>Paris is<assistant>"
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)


@pytest.mark.parametrize("prompt,match", [
    ({"prompt_token_ids": list(range(1, 129))}, "max_model_len"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, 2, 100000]}, "vocabulary"),
    ("", "empty"),
])
def test_bad_prompts_raise_without_affecting_the_engine(llm, prompt, match):
    good = {"prompt_token_ids": [4, 5, 6]}
    with pytest.raises(ValueError, match=match):
        llm.generate([good, prompt], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1
    again = llm.generate(good, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(again[0].outputs[0].token_ids) == 3


def test_unknown_argument_and_bad_sampling_values_are_named():
    with pytest.raises(ValueError, match="no_such_arg"):
        LLM("unused", no_such_arg=1)
    with pytest.raises(ValueError, match="block_size"):
        LLM("unused", block_size=7)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_seeded_sampling_is_reproducible_across_batches(llm):
    prompts = [[5, 6, 7, 8, 9, i] for i in range(7)]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[5]}, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)] * 6
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts], others[:5] + [seeded] + others[5:],
                         use_tqdm=False)
    assert mixed[5].outputs[0].token_ids == alone
    assert len(set(alone)) > 1  # really sampled, not a constant


@pytest.mark.parametrize("field,value", [("allowed_token_ids", [1, 99999]), ("logit_bias", {99999: 1.0}),
                                         ("stop_token_ids", [99999])])
def test_out_of_vocabulary_token_params_are_refused(llm, field, value):
    params = SamplingParams(max_tokens=3, **{field: value}, **GREEDY)
    good = SamplingParams(max_tokens=3, **GREEDY)
    with pytest.raises(ValueError, match=field):  # the good first request must not stay queued
        llm.generate([{"prompt_token_ids": [1, 2]}] * 2, [good, params], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2, **GREEDY),
                            use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_stop_strings_wait_for_min_tokens(llm):
    prompt = "The quick brown fox"
    free = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop = free.text[:3]  # matches in the very first tokens
    early = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 6
    held = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], min_tokens=6, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 6  # the early match did not count
    assert held.text.startswith(free.text[:3]) or held.finish_reason == "length"


def test_seeded_requests_resume_their_random_stream_after_preemption(tiny_llama, llm):
    path, _ = tiny_llama
    per_block = llm.engine.runner.bytes_per_block
    tight = LLM(path, dtype="float32", device="cpu", max_model_len=64, enable_prefix_caching=False,
                kv_cache_memory_bytes=12 * per_block)
    roomy = LLM(path, dtype="float32", device="cpu", max_model_len=64, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": [3 + i, 7, 11, 13, 17, 19, 23, 29, 31, 37]} for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=30, ignore_eos=True) for i in range(6)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.stats.num_preemptions > 0
    assert got == [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]


def test_a_reused_request_id_does_not_inherit_the_finished_requests_random_stream(llm):
    """A seeded request added under the id of one that just finished samples from its own seed."""
    core = llm.engine
    params = SamplingParams(temperature=1.0, seed=77, max_tokens=8, ignore_eos=True)
    prompt = [5, 6, 7, 8]

    def run_to_end(rid: str) -> list[int]:
        core.add_request(rid, prompt, params)
        while True:
            for out in core.step():
                if out.request_id == rid and out.finished:
                    return list(out.outputs[0].token_ids)

    first = run_to_end("same-id")
    second = run_to_end("same-id")  # the finished one leaves the sampling batch in this request's first step
    assert second == first
    assert len(set(first)) > 1
