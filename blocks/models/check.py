"""``blocks check-models``: parity of every model family with Hugging Face transformers.

For each family a tiny random transformers model is built (fp32, eager attention), saved with
``save_pretrained`` to a temporary folder, loaded back with :func:`blocks.models.loader.load_model`,
and run through :func:`blocks.models.harness.greedy_generate` (prefill then decode through the
paged cache, ``block_size`` 16, shuffled non-contiguous block ids) on prompts of 1, 7, 16, 17 and
33 tokens. It compares

* logits at every computed position with a transformers forward over ``prompt + generated[:-1]``
  (max absolute difference must be ``<= atol``, default 1e-4), and
* the greedy continuation with transformers' ``generate`` token for token.

It prints a table (family, max |diff|, tokens equal) and exits 1 on any mismatch::

    blocks check-models                      # all families, ~10 s on a laptop CPU
    blocks check-models --families llama3 opt-350m --prefill-chunk 5

The same functions back ``tests/models``: :func:`build_tiny_checkpoint`, :func:`check_family`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blocks.models.harness import greedy_generate
from blocks.models.loader import load_model

__all__ = ["FAMILIES", "PROMPT_LENS", "tiny_hf_config", "build_tiny_checkpoint", "random_prompts", "hf_reference",
           "check_family", "FamilyResult", "add_parser"]

PROMPT_LENS = (1, 7, 16, 17, 33)
VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, initializer_range=0.2)

#: family -> (transformers config class name, kwargs). Each exercises a distinct code path.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 2: multi-head attention, plain RoPE
    "llama2": ("LlamaConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=4)),
    # Llama 3.1/3.2: GQA, llama3 rope scaling active past position 32, tied embeddings (3.2 1B/3B)
    "llama3": ("LlamaConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, rope_theta=500000.0,
                                   tie_word_embeddings=True,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # linear rope scaling (legacy "type" key) with attention and MLP biases
    "llama-linear": ("LlamaConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=1,
                                         attention_bias=True, mlp_bias=True,
                                         rope_scaling={"type": "linear", "factor": 4.0})),
    # Mistral: GQA and a sliding window shorter than the prompts
    "mistral": ("MistralConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, sliding_window=8,
                                      head_dim=16)),
    # Qwen2/2.5: q/k/v bias, tied embeddings
    "qwen2": ("Qwen2Config", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head_dim != hidden_size / num_heads
    "qwen3": ("Qwen3Config", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=24)),
    # OPT-125m style: pre-norm, learned positions, ReLU
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=96, max_position_embeddings=256, init_std=0.2)),
    # OPT-350m style: post-norm, project_in/project_out (word_embed_proj_dim != hidden_size)
    "opt-350m": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=96, max_position_embeddings=256, init_std=0.2, word_embed_proj_dim=32,
                                   do_layer_norm_before=False)),
}


def tiny_hf_config(family: str):
    """The transformers config of ``family`` (one of :data:`FAMILIES`)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    cls_name, kwargs = FAMILIES[family]
    return getattr(transformers, cls_name)(**kwargs)


def build_tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0):
    """Build a random tiny transformers model of ``family``, ``save_pretrained`` it to ``path``.

    Returns the transformers model (fp32, eager attention, eval mode, EOS disabled for generate).
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family), attn_implementation="eager")
    model.eval()
    model.save_pretrained(str(path))
    model.generation_config.eos_token_id = None
    return model


def random_prompts(lens=PROMPT_LENS, *, vocab_size: int = VOCAB, seed: int = 0) -> list[list[int]]:
    """Random token id prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lens]


@torch.no_grad()
def hf_reference(hf_model, prompts: list[list[int]], max_new_tokens: int,
                 continuations: list[list[int]] | None = None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy tokens per prompt and its fp32 logits over ``prompt + continuation[:-1]``.

    ``continuations`` defaults to transformers' own tokens (pass ours to compare logits on the same
    inputs even where the continuations diverge).
    """
    tokens, logits = [], []
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
        toks = out[0, len(p):].tolist()
        tokens.append(toks)
        cont = continuations[i] if continuations is not None else toks
        full = torch.tensor([p + cont[:-1]])
        logits.append(hf_model(full, attention_mask=torch.ones_like(full)).logits[0].float())
    return tokens, logits


@dataclass
class FamilyResult:
    """Outcome of :func:`check_family` for one family."""

    family: str
    max_abs_diff: float
    tokens_equal: int
    tokens_total: int
    seconds: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.tokens_equal == self.tokens_total


def check_family(family: str, *, workdir: str | Path | None = None, max_new_tokens: int = 32,
                 prompt_lens=PROMPT_LENS, prefill_chunk: int | None = None, atol: float = 1e-4,
                 attn_backend: str = "torch", device: str = "cpu", seed: int = 0, model_hook=None) -> FamilyResult:
    """Build, save, load and compare one family (see the module docstring).

    ``model_hook(model)`` may modify our loaded model before the run (tests use it to break things).
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        hf_model = build_tiny_checkpoint(family, tmp, seed=seed)
        ours = load_model(tmp, dtype="float32", device=device, attn_backend=attn_backend)
        if model_hook is not None:
            model_hook(ours)
        prompts = random_prompts(prompt_lens, seed=seed)
        res = greedy_generate(ours, prompts, max_new_tokens, block_size=16, prefill_chunk=prefill_chunk, seed=seed)
        ref_tokens, ref_logits = hf_reference(hf_model, prompts, max_new_tokens, continuations=res.tokens)
    diff = max(float((a - b).abs().max()) for a, b in zip(res.logits, ref_logits))
    equal = sum(int(x == y) for ours_t, ref_t in zip(res.tokens, ref_tokens) for x, y in zip(ours_t, ref_t))
    total = sum(len(t) for t in ref_tokens)
    return FamilyResult(family, diff, equal, total, time.perf_counter() - start, atol)


def format_table(results: list[FamilyResult]) -> str:
    """A plain-text table of results."""
    lines = [f"{'family':<14} {'max |diff|':>11} {'tokens equal':>13} {'time':>7}  result"]
    for r in results:
        lines.append(f"{r.family:<14} {r.max_abs_diff:>11.2e} {f'{r.tokens_equal}/{r.tokens_total}':>13} "
                     f"{r.seconds:>6.1f}s  {'ok' if r.passed else 'MISMATCH'}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    results = []
    for family in args.families:
        results.append(check_family(family, max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk,
                                    atol=args.atol, attn_backend=args.attn_backend, device=args.device))
        print(format_table(results[-1:]).splitlines()[-1] if len(results) > 1 else format_table(results), flush=True)
    bad = [r.family for r in results if not r.passed]
    print(f"{len(results) - len(bad)}/{len(results)} families match transformers"
          + (f"; MISMATCH: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Configure the ``check-models`` subcommand."""
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="families to check (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prefill at most this many tokens per sequence per step (mixes prefill and decode)")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    parser.add_argument("--attn-backend", default="torch", choices=["torch", "triton", "cupy", "auto"],
                        help="attention backend of our model (default torch)")
    parser.add_argument("--device", default="cpu", help="device of our model (transformers runs on the CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: tiny models)")
    parser.set_defaults(func=_run)
