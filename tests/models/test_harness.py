"""The greedy harness: non-contiguous, disjoint block tables; chunking does not change results."""

import pytest
import torch

from blocks.models.check import build_tiny_checkpoint, random_prompts
from blocks.models.harness import greedy_generate
from blocks.models.loader import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("harness")
    build_tiny_checkpoint("qwen3", path, seed=1)
    return load_model(path, attn_backend="torch")


def test_block_tables_are_disjoint_shuffled_and_skip_block_zero(model):
    prompts = random_prompts((1, 16, 17, 40))
    res = greedy_generate(model, prompts, 20, seed=4)
    ids = [b for table in res.block_tables for b in table]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for table, p in zip(res.block_tables, prompts):
        assert len(table) == -(-(len(p) + 20 - 1) // 16)
    assert any(b - a != 1 for table in res.block_tables for a, b in zip(table, table[1:]))
    assert [len(t) for t in res.tokens] == [20] * 4
    assert [lg.shape for lg in res.logits] == [(len(p) + 19, 256) for p in prompts]


def test_chunked_prefill_and_other_block_ids_give_the_same_tokens(model):
    prompts = random_prompts((3, 33, 18), seed=2)
    a = greedy_generate(model, prompts, 10, seed=0)
    b = greedy_generate(model, prompts, 10, seed=9, prefill_chunk=4)
    assert a.tokens == b.tokens
    assert b.num_steps > a.num_steps
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_invalid_arguments(model):
    with pytest.raises(ValueError, match="prompts"):
        greedy_generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        greedy_generate(model, [[1]], 1, prefill_chunk=0)


def test_forward_checks_the_cache_list(model):
    with pytest.raises(ValueError, match="one \\(key_cache, value_cache\\) per layer"):
        model(torch.tensor([1]), torch.tensor([0]), [], None)
