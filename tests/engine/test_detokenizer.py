"""Incremental detokenizer: equal to one decode of the full output, UTF-8 safe, stop strings."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from blocks.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The capital of France is Paris. Größe, naïve café — 日本語のテキスト 🙂🚀 emoji.",
    "Stop strings can straddle tokens: END_OF_ANSWER and ###. Ünïcödé everywhere.",
    "def f(x):\n    return x * 2  # code with spaces\n\n",
] * 20


def _byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>", *byte_tokens])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request):
    return _byte_level() if request.param == "byte_level" else _metaspace()


def _stream(tokenizer, ids, chunk=1, **kw):
    detok = IncrementalDetokenizer(tokenizer, **kw)
    pieces = []
    for i in range(0, len(ids), chunk):
        update = detok.add_tokens(ids[i : i + chunk])
        assert "\ufffd" not in update.new_text or "\ufffd" in tokenizer.decode(ids)
        pieces.append(update.new_text)
        if update.stop_string is not None:
            break
    pieces.append(detok.flush())
    return detok, "".join(pieces)


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_full_decode_on_text_and_random_ids(tokenizer, chunk):
    rng = random.Random(7)
    for text in CORPUS[:3]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok, streamed = _stream(tokenizer, ids, chunk)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    for _ in range(20):  # random ids split multi-byte characters across tokens
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        detok, streamed = _stream(tokenizer, ids, chunk)
        assert streamed == detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_character_is_never_split(tokenizer):
    ids = tokenizer.encode("🙂🚀日本語", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for t in ids:
        piece = detok.add_tokens([t]).new_text
        assert "\ufffd" not in piece
    assert detok.text + detok.flush() == "🙂🚀日本語" or detok.text == "🙂🚀日本語"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries_is_trimmed(tokenizer, include):
    text = "Stop strings can straddle tokens: END_OF_ANSWER and more text after"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, streamed = _stream(tokenizer, ids, 1, stop=["END_OF_ANSWER", "never"], include_stop_str_in_output=include)
    assert detok.stop_string == "END_OF_ANSWER"
    want = "Stop strings can straddle tokens: " + ("END_OF_ANSWER" if include else "")
    assert detok.text == want
    assert streamed == want  # nothing of the stop string leaked into the stream when trimmed


def test_earliest_stop_string_wins_and_adding_after_stop_fails(tokenizer):
    ids = tokenizer.encode("a ### b END_OF_ANSWER", add_special_tokens=False)
    detok, _ = _stream(tokenizer, ids, 50, stop=["END_OF_ANSWER", "###"])
    assert detok.stop_string == "###" and detok.text.rstrip() == "a"
    with pytest.raises(ValueError, match="after a stop string"):
        detok.add_tokens([1])
