"""The embedded default model through the engine: transformers' greedy tokens, right answers, chat turns
that stop at the end-of-turn token, and the defaults that pick it (``LLM()``)."""

import json
import random

import pytest
import torch

from blocks import LLM, SamplingParams
from blocks.default_model_path import default_model_path


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")  # no model: the embedded default


@pytest.fixture(scope="module")
def heldout():
    with open(f"{default_model_path()}/heldout.jsonl") as f:
        return [json.loads(line) for line in f]


def test_llm_without_a_model_uses_the_default(llm):
    assert llm.model_path == default_model_path()


def test_engine_greedy_equals_transformers_generate(llm, heldout):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), attn_implementation="eager").eval()
    tok = llm.get_tokenizer()
    rng = random.Random(5)
    convs = [[{"role": "user", "content": q["question"]}] for q in rng.sample(heldout, 12)]
    raw = ["Monday, Tuesday,", "The capital of", "12 + 7 ="]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs] + raw
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = llm.generate([{"prompt_token_ids": tok.encode(p, add_special_tokens=False)} for p in prompts], params,
                        use_tqdm=False)
    eos = hf.generation_config.eos_token_id
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)
        want = ref[0, ids.shape[1]:].tolist()
        eos_ids = eos if isinstance(eos, list) else [eos]
        cut = next((i for i, t in enumerate(want) if t in eos_ids), None)
        want = want if cut is None else want[: cut + 1]
        assert out.outputs[0].token_ids == want, prompt


def test_heldout_accuracy_and_chat_stops_at_end_of_turn(llm, heldout):
    convs = [[{"role": "user", "content": q["question"]}] for q in heldout]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
    end_of_turn = llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
    right = sum(o.outputs[0].text.strip() == q["answer"] for o, q in zip(outs, heldout))
    assert right >= 80, f"{right}/100 held-out answers right"
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(stopped) >= 95
    assert all(c.token_ids[-1] == end_of_turn and "<|im_end|>" not in c.text for c in stopped)
