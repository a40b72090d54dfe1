"""Every family matches transformers: fp32 logits to 1e-4 and 32 greedy tokens, through the paged cache.

Prompts of 1, 7, 16, 17 and 33 tokens run as one batched prefill and then decode steps with
block_size 16 and shuffled, non-contiguous block ids (see blocks.models.harness).
"""

import pytest

from blocks.models.check import FAMILIES, check_family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    result = check_family(family, workdir=tmp_path, max_new_tokens=32, atol=1e-4)
    assert result.tokens_total == 5 * 32
    assert result.max_abs_diff <= 1e-4, f"{family}: max |logit diff| {result.max_abs_diff:.2e}"
    assert result.tokens_equal == result.tokens_total, f"{family}: {result.tokens_equal}/{result.tokens_total}"


@pytest.mark.parametrize("family,chunk", [("llama3", 5), ("mistral", 7), ("opt-350m", 16)])
def test_chunked_prefill_mixed_with_decode_matches(family, chunk, tmp_path):
    """Prefill chunks of one sequence share steps with decode rows of the shorter ones."""
    result = check_family(family, workdir=tmp_path, max_new_tokens=12, prefill_chunk=chunk, seed=3)
    assert result.passed, result
