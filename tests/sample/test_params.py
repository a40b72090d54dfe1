"""SamplingParams / BeamSearchParams: vLLM defaults, normalisation and validation messages."""

import pytest

from blocks.sample.params import BeamSearchParams, SamplingParams, SamplingType


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and not p.include_stop_str_in_output
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert p.logit_bias is None and p.allowed_token_ids is None and p.bad_words is None
    assert p.sampling_type == SamplingType.RANDOM


def test_normalisation():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.2, stop="###", stop_token_ids=[3])
    assert p.sampling_type == SamplingType.GREEDY and (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert p.stop == ["###"] and p.stop_token_ids == [3]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0.001).temperature == 0.01
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(logit_bias={"5": 300, 6: -1000}).logit_bias == {5: 100.0, 6: -100.0}
    c = SamplingParams(n=3, seed=1).clone(n=1)
    assert c.n == 1 and c.seed == 1
    with pytest.raises(ValueError, match="n must be at least 1"):
        SamplingParams().clone(n=0)


@pytest.mark.parametrize(
    "kwargs,field,limit",
    [
        ({"n": 0}, "n", "at least 1"),
        ({"n": 1.5}, "n", "integer"),
        ({"temperature": -0.1}, "temperature", "non-negative"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.01}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", "at least 1"),
        ({"top_k": 2.5}, "top_k", "at least 1"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "greater than zero"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"min_tokens": -1}, "min_tokens", "at least 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens=4"),
        ({"logprobs": -1}, "logprobs", "at least 0"),
        ({"prompt_logprobs": -2}, "prompt_logprobs", "at least 0"),
        ({"stop": ["a", ""]}, "stop", "empty string"),
        ({"allowed_token_ids": []}, "allowed_token_ids", "empty"),
        ({"seed": "x"}, "seed", "integer"),
        ({"temperature": float("nan")}, "temperature", "NaN"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"bad_words": [""]}, "bad_words", "non-empty"),
    ],
)
def test_invalid_values_name_the_field_and_range(kwargs, field, limit):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert field in str(err.value) and limit in str(err.value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"beam_width": 0}, "beam_width"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"early_stopping": 1}, "early_stopping"),
    ],
)
def test_beam_search_params_validation(kwargs, field):
    base = {"beam_width": 2, "max_tokens": 4}
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**base)


def test_beam_search_params_defaults():
    p = BeamSearchParams(beam_width=3, max_tokens=10)
    assert (p.temperature, p.length_penalty, p.ignore_eos, p.include_stop_str_in_output) == (0.0, 1.0, False, False)
    assert not p.is_stochastic and BeamSearchParams(beam_width=3, max_tokens=10, temperature=0.5).is_stochastic
