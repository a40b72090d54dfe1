"""Train the embedded default model (issue 8) from scratch on the CPU and write a Hugging Face folder.

Everything is generated here, offline and deterministically: a corpus of chat turns and raw text drawn
from small tables (countries and capitals, arithmetic, unit conversions, JSON name/age records, short
plain-text continuations), a byte-level BPE tokenizer trained on that corpus with the ``tokenizers``
library, and a small ``LlamaForCausalLM`` trained with a plain PyTorch loop (AdamW, fixed seeds).

A fixed held-out set of 100 chat questions is drawn first and excluded from training by exact question
text (the underlying facts still appear in other phrasings, so answering them tests transfer across
phrasings, not recall of the exact string). It is written next to the model as ``heldout.jsonl`` and
scored by ``scripts/eval_default_model.py``.

Usage (the exact command that produced the shipped folder is in ``blocks/default_model/README.md``)::

    nice -n 10 python3 scripts/train_default_model.py --out blocks/default_model --threads 2

Same command, same software, same thread count -> same weights (deterministic algorithms are forced).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

IM_START, IM_END, EOT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END, PAD]
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Hungary", "Budapest"), ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"), ("Australia", "Canberra"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Colombia", "Bogota"),
    ("Cuba", "Havana"), ("Czechia", "Prague"), ("South Korea", "Seoul"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Philippines", "Manila"), ("New Zealand", "Wellington"), ("Iceland", "Reykjavik"),
    ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Bulgaria", "Sofia"), ("Venezuela", "Caracas"),
    ("Uruguay", "Montevideo"), ("Senegal", "Dakar"), ("Tunisia", "Tunis"), ("Nepal", "Kathmandu"),
    ("Malaysia", "Kuala Lumpur"),
]
CAPITAL_QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "Tell me the capital of {c}.",
]
NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Karen", "Leo",
    "Maria", "Nina", "Oscar", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Walter", "Xena",
    "Yusuf", "Zoe", "Liam", "Mia", "Noah", "Olga", "Pedro", "Sofia", "Tom", "Anna", "Ben", "Chloe",
]
JSON_QUESTIONS = [
    "Write a JSON record for {n}, who is {a} years old.",
    "Give me a JSON object with name {n} and age {a}.",
    "Make a JSON record: name {n}, age {a}.",
]
ARITH_QUESTIONS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {word} {b}?"]
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
# (from unit, to unit, factor, max value): sizes keep every fact seen several times per run.
UNITS = [
    ("meter", "centimeter", 100, 99), ("kilometer", "meter", 1000, 99), ("kilogram", "gram", 1000, 99),
    ("liter", "milliliter", 1000, 99), ("hour", "minute", 60, 24), ("minute", "second", 60, 30),
    ("foot", "inch", 12, 20), ("day", "hour", 24, 14), ("week", "day", 7, 20),
]
UNIT_PLURALS = {"foot": "feet", "inch": "inches"}
UNIT_QUESTIONS = ["How many {to_p} are in {n} {frm_n}?", "Convert {n} {frm_n} to {to_p}."]
SEQUENCES = [
    ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
     "November", "December"],
    ["red", "orange", "yellow", "green", "blue", "indigo", "violet"],
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
]
FACTS = [
    "Water boils at 100 degrees Celsius.", "Water freezes at 0 degrees Celsius.", "A week has seven days.",
    "A year has twelve months.", "The sun rises in the east and sets in the west.", "Cats and dogs are pets.",
    "The sky is blue on a clear day.", "Plants need water and light to grow.", "A triangle has three sides.",
    "A square has four equal sides.", "The Earth goes around the Sun.", "Ice is frozen water.",
]
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi", "Hi! What would you like to know?"),
    ("Who are you?", "I am the blocks demo model, a tiny language model trained to answer simple questions."),
    ("What can you do?", "I can answer simple questions about capitals, arithmetic, units and JSON records."),
    ("Thank you!", "You are welcome!"),
    ("Tell me a fact.", "Water boils at 100 degrees Celsius."),
]


def _plural(unit: str, n: int) -> str:
    return unit if n == 1 else UNIT_PLURALS.get(unit, unit + "s")


def capital_item(rng: random.Random, *, country: int | None = None, template: int | None = None) -> tuple:
    c, cap = CAPITALS[rng.randrange(len(CAPITALS)) if country is None else country]
    t = rng.randrange(len(CAPITAL_QUESTIONS)) if template is None else template
    return ("capital", CAPITAL_QUESTIONS[t].format(c=c), f"The capital of {c} is {cap}.")


def arith_item(rng: random.Random) -> tuple:
    op = rng.choices(["+", "-", "*"], weights=[5, 3, 2])[0]
    if op == "+":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
    elif op == "-":
        a = rng.randint(0, 49)
        b = rng.randint(0, a)
    else:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
    r = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = rng.choice(ARITH_QUESTIONS).format(a=a, b=b, op=op, word=OP_WORDS[op])
    return ("arithmetic", q, f"{a} {op} {b} = {r}.")


def unit_item(rng: random.Random) -> tuple:
    frm, to, factor, top = rng.choice(UNITS)
    n = rng.randint(1, top)
    to_p = _plural(to, 2)
    q = rng.choice(UNIT_QUESTIONS).format(to_p=to_p, n=n, frm_n=_plural(frm, n))
    return ("units", q, f"{n} {_plural(frm, n)} is {n * factor} {_plural(to, n * factor)}.")


def json_item(rng: random.Random) -> tuple:
    n, a = rng.choice(NAMES), rng.randint(1, 99)
    return ("json", rng.choice(JSON_QUESTIONS).format(n=n, a=a), json.dumps({"name": n, "age": a}))


def heldout_set(seed: int) -> list[dict]:
    """The fixed 100 held-out questions: 30 capitals, 30 arithmetic, 20 units, 20 JSON records."""
    rng = random.Random(seed * 7919 + 1)
    items: list[tuple] = []
    for country in rng.sample(range(len(CAPITALS)), 30):
        items.append(capital_item(rng, country=country))
    for maker, count in ((arith_item, 30), (unit_item, 20), (json_item, 20)):
        seen: set[str] = set()
        while len(seen) < count:
            item = maker(rng)
            if item[1] not in seen:
                seen.add(item[1])
                items.append(item)
    return [{"category": c, "question": q, "answer": a} for c, q, a in items]


def _chat_text(rng: random.Random, question: str, answer: str) -> tuple[str, str]:
    """Returns (prompt part, completion part) in ChatML; loss is taken on the completion only."""
    system = f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n" if rng.random() < 0.3 else ""
    return f"{system}{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n", f"{answer}{IM_END}\n"


def _raw_text(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        parts = []
        for _ in range(rng.randint(1, 3)):
            c, cap = rng.choice(CAPITALS)
            parts.append(rng.choice([f"The capital of {c} is {cap}.", f"{cap} is the capital of {c}."]))
        return " ".join(parts)
    if kind == 1:
        seq = rng.choice(SEQUENCES)
        start = rng.randrange(len(seq) - 3)
        return ", ".join(seq[start:start + rng.randint(4, len(seq) - start)]) + "."
    if kind == 2:
        start = rng.randint(0, 80)
        return ", ".join(str(i) for i in range(start, start + rng.randint(4, 10)))
    if kind == 3:
        return " ".join(rng.sample(FACTS, rng.randint(1, 3)))
    if kind == 4:
        return " ".join(item[2] for item in (arith_item(rng), unit_item(rng)))
    return f"{json_item(rng)[2]}"


def build_corpus(seed: int, num_examples: int, heldout: list[dict], *, mix: tuple = (2, 5, 2, 1)) -> list:
    """Training examples as (prompt, completion); raw text has an empty prompt. Held-out questions excluded.

    ``mix`` weighs the chat categories (capitals, arithmetic, units, JSON); 15% raw text, 3% small talk.
    """
    rng = random.Random(seed)
    banned = {h["question"] for h in heldout}
    out: list[tuple[str, str]] = []
    makers = [capital_item, arith_item, unit_item, json_item]
    while len(out) < num_examples:
        r = rng.random()
        if r < 0.15:
            out.append(("", _raw_text(rng) + EOT))
            continue
        if r < 0.18:
            q, a = rng.choice(SMALL_TALK)
        else:
            _, q, a = rng.choices(makers, weights=mix)[0](rng)
            if q in banned:
                continue
        out.append(_chat_text(rng, q, a))
    return out


def train_tokenizer(corpus: list[tuple[str, str]], vocab_size: int):
    """Byte-level BPE (digits split one by one so arithmetic sees single digits). Returns a tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    strip = lambda s: s.replace(IM_START, "").replace(IM_END, "").replace(EOT, "")
    texts = [strip(p + c) for p, c in corpus[:40000]]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_corpus(tok, corpus: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Token ids per example and the number of leading prompt tokens (no loss there); over-long ones dropped."""
    out = []
    for prompt, completion in corpus:
        p = tok.encode(prompt).ids if prompt else []
        ids = p + tok.encode(completion).ids
        if len(ids) <= max_len:
            out.append((ids, len(p)))
    return out


def make_batches(rng: random.Random, data: list, batch_size: int) -> list[list[int]]:
    """Length-bucketed batches (little padding): shuffle, sort within windows of 50 batches, shuffle batches."""
    order = list(range(len(data)))
    rng.shuffle(order)
    batches = []
    window = batch_size * 50
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(data[i][0]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(data: list, idx: list[int], pad_id: int):
    """input_ids/attention_mask/labels [batch, max_len] int64; labels are -100 on prompt and padding."""
    import torch

    n = max(len(data[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        toks, num_prompt = data[i]
        ids[row, :len(toks)] = torch.tensor(toks)
        mask[row, :len(toks)] = 1
        labels[row, num_prompt:len(toks)] = torch.tensor(toks[num_prompt:])
    return ids, mask, labels


def build_model(vocab_size: int, args, special: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=special[EOT], eos_token_id=special[IM_END], pad_token_id=special[PAD],
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def train(model, data: list, args, pad_id: int, log, on_eval=None) -> dict:
    """Plain AdamW loop with linear warmup and cosine decay; returns summary numbers for the model card."""
    import torch

    rng = random.Random(args.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))) * 0.95 + 0.05))
    model.train()
    batches: list[list[int]] = []
    t0, tokens, ema = time.time(), 0, None
    for step in range(args.steps):
        if not batches:
            batches = make_batches(rng, data, args.batch_size)
        ids, mask, labels = collate(data, batches.pop(), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(mask.sum())
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t0
            log(f"step {step:5d}/{args.steps} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"tok/s {tokens / max(el, 1e-9):.0f} elapsed {el:.0f}s")
        if on_eval is not None and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            on_eval(step + 1)
            model.train()
    return {"final_loss_ema": round(ema, 4), "train_tokens": tokens, "train_seconds": round(time.time() - t0, 1)}


def save_folder(out: Path, model, tok, heldout: list[dict]) -> None:
    """Writes config, safetensors weights, generation config, tokenizer files (chat template inside
    ``tokenizer_config.json``) and ``heldout.jsonl`` into ``out``."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("chat_template.jinja", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    model.generation_config = GenerationConfig(
        eos_token_id=[special[IM_END], special[EOT]], pad_token_id=special[PAD], bos_token_id=special[EOT],
        do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START, EOT], chat_template=CHAT_TEMPLATE, model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE  # keep the template in tokenizer_config.json for every loader
    # Names every transformers release since 4.x understands (5.x aliases the fast class).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", [IM_START, EOT])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    with open(out / "heldout.jsonl", "w") as f:
        for item in heldout:
            f.write(json.dumps(item) + "\n")


def write_card(out: Path, args, summary: dict, num_params: int, vocab_size: int) -> None:
    """The model card ``README.md``: what the model is, the exact training command and the measured results."""
    cmd = ("nice -n 10 python3 scripts/train_default_model.py --out blocks/default_model --threads "
           f"{args.threads} --steps {args.steps} --lr {args.lr} --seed {args.seed}")
    import platform

    import tokenizers
    import torch
    import transformers

    software = (f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}, tokenizers {tokenizers.__version__}")
    acc = summary.get("heldout_accuracy")
    acc_txt = "not evaluated"
    if acc is not None:
        cats = ", ".join(f"{k} {v}" for k, v in summary["heldout_by_category"].items())
        acc_txt = f"{acc:.0%} ({summary['heldout_correct']}/100; {cats})"
    (out / "README.md").write_text(f"""# blocks-demo-chat (the embedded default model)

A **demo model**, not a useful assistant. It is a tiny Llama-architecture causal LM ({num_params / 1e6:.2f}M
parameters, {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads,
tied embeddings, float32) with a byte-level BPE tokenizer of {vocab_size} tokens, trained from scratch on
a CPU by `scripts/train_default_model.py` so that `blocks` runs offline with no download. It only knows
what its generated corpus contains: capitals of {len(CAPITALS)} countries, additions and subtractions of
numbers up to 49, multiplication tables up to 12, a few unit conversions, JSON records with a name and an
age, short plain-text sequences and a little small talk. Anything else gets a confident wrong answer.

## Format

ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`; the chat template (in `tokenizer_config.json`) appends
`<|im_start|>assistant\\n` for generation. Chat turns end with `<|im_end|>` (the tokenizer's `eos_token`);
raw text ends with `<|endoftext|>`; `generation_config.json` stops on both and is greedy.

## Training

All data is generated by the script from tables it carries (no download), with fixed seeds: chat turns
(loss on the answer only; 30% with the system prompt "{SYSTEM_PROMPT}") and raw text. {args.steps} AdamW
steps of {args.batch_size} examples, lr {args.lr} with warmup and cosine decay, weight decay 0.05,
{summary['train_tokens']} tokens seen (padding excluded), final answer-token loss (EMA)
{summary['final_loss_ema']}, {summary['train_seconds']:.0f} s of training wall time. Reproduce with

```
{cmd}
```

Trained with {software}. Same command, same software and the same `--threads` give the same
weights (deterministic algorithms are forced; float reductions can differ across thread counts and library versions).

## Evaluation

`heldout.jsonl` holds 100 fixed questions (30 capitals, 30 arithmetic, 20 units, 20 JSON) whose exact
text never appears in training (the facts do, in other phrasings). Greedy decoding through the chat
template with transformers `generate`, stopping at `<|im_end|>`, exact match of the answer:
**{acc_txt}**. Re-run with `python3 scripts/eval_default_model.py blocks/default_model`.

License: Apache-2.0, like the project.
""")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (Hugging Face format)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (part of reproducibility)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=200_000, help="generated training examples")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--mix", type=lambda v: tuple(float(x) for x in v.split(",")), default=(2, 5, 2, 1),
                   help="chat category weights: capitals,arithmetic,units,json")
    p.add_argument("--eval-every", type=int, default=0, help="dev aid: save and score the held-out set every N steps")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "examples", "threads", "layers", "heads", "kv_heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.vocab_size < 512 or args.vocab_size > 32768:
        raise ValueError(f"--vocab-size must be in [512, 32768], got {args.vocab_size}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    t0 = time.time()
    heldout = heldout_set(args.seed)
    corpus = build_corpus(args.seed, args.examples, heldout, mix=args.mix)
    tok = train_tokenizer(corpus, args.vocab_size)
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    data = encode_corpus(tok, corpus, max_len=128)
    log(f"corpus {len(data)} examples, vocab {tok.get_vocab_size()}, prep {time.time() - t0:.1f}s")
    model = build_model(tok.get_vocab_size(), args, special)
    num_params = sum(p.numel() for p in model.parameters())
    log(f"model {num_params / 1e6:.2f}M params")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_default_model import evaluate

    def on_eval(step: int) -> None:
        save_folder(args.out, model, tok, heldout)
        res = evaluate(args.out, batch_size=25)
        log(f"step {step} held-out accuracy {res['accuracy']:.2%} by category {res['by_category']}")

    summary = train(model, data, args, special[PAD], log, on_eval)
    model.eval()
    save_folder(args.out, model, tok, heldout)
    if not args.no_eval:
        res = evaluate(args.out, batch_size=25)
        summary.update(heldout_accuracy=res["accuracy"], heldout_correct=res["correct"],
                       heldout_by_category=res["by_category"])
        log(f"held-out accuracy {res['accuracy']:.2%} by category {res['by_category']}")
    write_card(args.out, args, summary, num_params, tok.get_vocab_size())
    log(f"done in {time.time() - t0:.0f}s: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
