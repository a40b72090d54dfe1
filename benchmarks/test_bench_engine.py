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


@pytest.mark.parametrize("batch", [32, 256])
def test_bench_engine_host_step(benchmark, batch):
    """The engine's own Python per decode step (scheduler, runner bookkeeping, request updates): the model
    forward and the sampler are replaced by constant outputs, so only host work is timed. On a GPU the
    asynchronous engine overlaps it with the forward; where it is longer than the forward (small models, or
    synchronous steps), it bounds throughput."""
    import torch

    from blocks.sample.sampler import SamplerOutput

    llm = LLM(device="cpu", max_model_len=512, max_num_seqs=batch, enable_prefix_caching=False,
              skip_tokenizer_init=True)
    eng, runner = llm.engine, llm.engine.runner
    logits = torch.zeros(batch, eng.vocab_size)
    tokens = torch.full((batch,), 7)

    def fake_forward(inputs, src_rows=None):
        runner._count(inputs)
        return logits[: len(inputs.logits_rows)]

    runner.run_model = fake_forward
    runner.sampler = lambda x, batch_, inplace=False, id_sinks=(): SamplerOutput(sampled_token_ids=tokens[: x.shape[0]])
    for i in range(batch):
        eng.add_request(f"r{i}", [3 + i % 50] * 64, SamplingParams(temperature=0.0, max_tokens=400,
                                                                   ignore_eos=True))
    for _ in range(3):
        eng.step()
    benchmark.pedantic(eng.step, rounds=200, warmup_rounds=5)
    assert eng.scheduler.num_running == batch
    benchmark.extra_info["host_ms_per_step"] = benchmark.stats.stats.median * 1e3
