"""The engine's greedy outputs equal transformers' ``generate`` token for token, for every model
family, also under preemption, chunked prefill, prefix caching, another block size and asynchronous
scheduling."""

import random

import pytest

from blocks import LLM, SamplingParams
from blocks.models.check import FAMILIES, VOCAB, build_tiny_checkpoint, hf_reference

MAX_NEW = 12
SHARED = 37  # shared-prefix length (two full blocks of 16 plus a partial one)


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    varied = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 7, 15, 16, 17, 33, 50, 3)]
    prefix = [rng.randrange(VOCAB) for _ in range(SHARED)]
    shared = [prefix + [rng.randrange(VOCAB) for _ in range(n)] for n in (1, 2, 5, 9, 16, 17, 20, 4)]
    return varied + shared


CONFIGS = {
    "default": dict(),
    "preempt": dict(kv_cache_memory_bytes="blocks:14", max_model_len=128),
    "chunked": dict(max_num_batched_tokens=16, long_prefill_token_threshold=8),
    "prefix": dict(enable_prefix_caching=True, max_num_seqs=3),
    "block32": dict(block_size=32),
    # asynchronous scheduling (the default on CUDA), forced on here on the CPU
    "async-preempt": dict(kv_cache_memory_bytes="blocks:14", max_model_len=128, async_scheduling=True),
    "async-chunked": dict(max_num_batched_tokens=16, long_prefill_token_threshold=8, async_scheduling=True),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_ref(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_checkpoint(request.param, path)
    prompts = _prompts()
    want, _ = hf_reference(hf, prompts, MAX_NEW)
    return request.param, str(path), prompts, want


def _engine(path: str, **overrides) -> LLM:
    kwargs = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", enable_prefix_caching=False)
    kwargs.update(overrides)
    budget = kwargs.get("kv_cache_memory_bytes")
    if isinstance(budget, str):  # "blocks:N" -> exactly N blocks
        probe = LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", max_num_seqs=1,
                    block_size=kwargs.get("block_size", 16), max_model_len=kwargs.get("max_model_len"))
        kwargs["kv_cache_memory_bytes"] = int(budget.split(":")[1]) * probe.engine.runner.bytes_per_block
    return LLM(path, **kwargs)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_greedy_equals_transformers(family_ref, config):
    family, path, prompts, want = family_ref
    llm = _engine(path, **CONFIGS[config])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    mismatched = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatched, f"{family}/{config}: prompts {mismatched} differ"
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    engine = llm.engine
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1  # all blocks back (null block kept)
    if config.endswith("preempt"):
        assert engine.scheduler.stats.num_preemptions > 0
    if config == "prefix":
        assert engine.scheduler.stats.prefix_hit_tokens >= 2 * 16
    if config.endswith("chunked"):
        assert max(len(p) for p in prompts) > 16
