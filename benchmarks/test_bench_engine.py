"""End-to-end engine throughput on the CPU with the embedded default model (CI-sized).

``blocks generate`` at a batch of 32 prompts must give at least 200 output tokens/s on a 2-core CPU
(issue 8); the figure goes in ``benchmark.extra_info`` (no threshold asserted here).
"""

import pytest

from blocks import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


@pytest.mark.parametrize("batch", [1, 32])
def test_bench_default_model_generate(benchmark, llm, batch):
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a JSON record for Ana, age 31."}],
                                     tokenize=False, add_generation_prompt=True)
    prompts = [{"prompt_token_ids": tok.encode(prompt, add_special_tokens=False)}] * batch
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = benchmark.pedantic(llm.generate, args=(prompts, params), kwargs={"use_tqdm": False}, rounds=5,
                              warmup_rounds=1)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    benchmark.extra_info["output_tokens_per_s"] = tokens / benchmark.stats.stats.median
    assert tokens == 64 * batch
