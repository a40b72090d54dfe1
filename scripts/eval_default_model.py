"""Score a chat model folder on its held-out questions with transformers ``generate`` (greedy).

Each question of ``<folder>/heldout.jsonl`` (``{"category", "question", "answer"}`` per line) is rendered
through the tokenizer's chat template with the generation prompt, decoded greedily until ``<|im_end|>``,
and counted right when the decoded answer equals the expected one exactly (after stripping whitespace).

Usage::

    python3 scripts/eval_default_model.py blocks/default_model [--show-wrong]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def load_heldout(folder: str | Path) -> list[dict]:
    """The held-out questions shipped next to the model, in file order."""
    path = Path(folder) / "heldout.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def greedy_answers(model, tok, questions: list[str], *, max_new_tokens: int = 48, batch_size: int = 25) -> list[str]:
    """Greedy chat answers, one string per question (batched with left padding; stops at ``<|im_end|>``)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    tok.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                   for q in questions[i:i + batch_size]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=end_id,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            if end_id in row:
                row = row[:row.index(end_id)]
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return answers


def evaluate(folder: str | Path, *, batch_size: int = 25, show_wrong: bool = False) -> dict:
    """Loads ``folder`` with Auto classes and returns accuracy, correct count and per-category accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    items = load_heldout(folder)
    answers = greedy_answers(model, tok, [it["question"] for it in items], batch_size=batch_size)
    right, total = Counter(), Counter()
    for it, ans in zip(items, answers):
        total[it["category"]] += 1
        ok = ans == it["answer"]
        right[it["category"]] += ok
        if show_wrong and not ok:
            print(f"WRONG [{it['category']}] {it['question']!r}: got {ans!r}, want {it['answer']!r}")
    correct = sum(right.values())
    return {"accuracy": correct / len(items), "correct": correct, "total": len(items),
            "by_category": {c: f"{right[c]}/{total[c]}" for c in total}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Greedy held-out accuracy of a chat model folder.")
    p.add_argument("folder", type=Path)
    p.add_argument("--show-wrong", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = evaluate(args.folder, show_wrong=args.show_wrong)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
