"""Fixtures for engine tests: a tiny Llama checkpoint with a real byte-level BPE tokenizer."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from blocks.models.check import VOCAB, build_tiny_checkpoint

_TEXT = [
    "The quick brown fox jumps over the lazy dog. STOP here. Paris is the capital of France.",
    "Numbers 12345 and words, café naïve 日本 🙂 end of text.",
] * 50


def save_tiny_tokenizer(path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with fewer than ``VOCAB`` ids (the tiny models' vocabulary) and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # no full byte alphabet: 256 byte tokens alone would not fit the tiny models' vocabulary
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=["<eos>"])
    tok.train_from_iterator(_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="package")
def tiny_llama(tmp_path_factory):
    """``(path, transformers model)`` of a tiny Llama-3-style model with a tokenizer in its folder."""
    path = tmp_path_factory.mktemp("tiny_llama")
    hf = build_tiny_checkpoint("llama3", path)
    tok = save_tiny_tokenizer(path)
    assert len(tok) <= VOCAB
    return str(path), hf
