"""The shipped default model folder: transformers loads it, its chat template is ChatML, and it answers.

The answers are checked on random held-out questions (``heldout.jsonl``, never seen verbatim in
training), so a folder with random or broken weights fails. Engine parity and tokens/s come with the
engine (issue 7), not here.
"""

import json
import random

import pytest
import torch

from blocks.default_model_path import DEFAULT_MODEL_PATH, default_model_path

transformers = pytest.importorskip("transformers")

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_path()).eval()


@pytest.fixture(scope="module")
def heldout():
    lines = (DEFAULT_MODEL_PATH / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _chatml(messages):
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def test_folder_is_complete_small_and_documented():
    names = {p.name for p in DEFAULT_MODEL_PATH.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "README.md", "heldout.jsonl"):
        assert required in names, required
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_PATH.iterdir() if p.is_file())
    assert total <= 30 * 2**20, f"default model folder is {total / 2**20:.1f} MB (limit 30 MB)"
    card = (DEFAULT_MODEL_PATH / "README.md").read_text()
    assert "demo model" in card and "scripts/train_default_model.py --out blocks/default_model" in card
    assert "chat_template" in json.loads((DEFAULT_MODEL_PATH / "tokenizer_config.json").read_text())


def test_default_model_path_checks_files(tmp_path, monkeypatch):
    import blocks.default_model_path as dmp

    assert default_model_path() == str(DEFAULT_MODEL_PATH)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(dmp, "DEFAULT_MODEL_PATH", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        dmp.default_model_path()
    assert dmp.default_model_path(check=False) == str(tmp_path)


def test_transformers_loads_a_small_llama(model, tok):
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.max_position_embeddings >= 512
    num_params = sum(p.numel() for p in model.parameters())
    assert 1e6 <= num_params <= 20e6
    assert model.get_input_embeddings().weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert len(tok) == cfg.vocab_size
    assert tok.eos_token == IM_END and tok.pad_token is not None
    end_ids = model.generation_config.eos_token_id
    end_ids = end_ids if isinstance(end_ids, list) else [end_ids]
    assert tok.convert_tokens_to_ids(IM_END) in end_ids and tok.convert_tokens_to_ids(EOT) in end_ids
    for special in (IM_START, IM_END, EOT, tok.pad_token):  # each special token is one id
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_chat_template_renders_chatml(tok):
    rng = random.Random(1234)
    words = ["alpha", "Beta", "12", "x+y", "é", "{", "\"q\"", "  ", "line\nbreak", "?"]
    for _ in range(5):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 4)):
            role = "user" if turn % 2 == 0 else "assistant"
            messages.append({"role": role, "content": " ".join(rng.choices(words, k=rng.randint(1, 7)))})
        plain = tok.apply_chat_template(messages, tokenize=False)
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert plain == _chatml(messages)
        assert prompt == _chatml(messages) + f"{IM_START}assistant\n"
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == prompt  # byte-level BPE round-trips any text
        assert ids.count(tok.convert_tokens_to_ids(IM_START)) == len(messages) + 1


def test_greedy_chat_answers_heldout_questions_and_stop_at_end_of_turn(model, tok, heldout):
    rng = random.Random(99)
    items = rng.sample(heldout, 10)
    end_id = tok.convert_tokens_to_ids(IM_END)
    right = 0
    for item in items:
        prompt = tok.apply_chat_template([{"role": "user", "content": item["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=40)
        new = out[0, ids.shape[1]:].tolist()
        assert new[-1] == end_id, f"{item['question']!r}: no end of turn in {tok.decode(new)!r}"
        right += tok.decode(new[:-1]).strip() == item["answer"]
    assert right >= 8, f"only {right}/10 held-out answers right"


def test_raw_text_continuation(model, tok):
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    start = random.Random(5).randrange(3)
    ids = tok(", ".join(days[start:start + 3]) + ",", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=4)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith(days[start + 3])
