"""Shared helpers of the sampler tests: random mixed batches."""

from __future__ import annotations

import torch

from blocks.sample.batch import SamplingBatch
from blocks.sample.params import SamplingParams

# Triton runs compiled on CUDA tensors when a GPU is present, else through the interpreter on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_params(gen: torch.Generator, *, vocab: int, allow_greedy: bool = True, **fixed) -> SamplingParams:
    """Random per-row parameters mixing temperature, top-k, top-p, min-p and repetition penalty."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand(1, generator=gen))

    kw = dict(
        temperature=pick([0.0, 0.5, 0.8, 1.0, 1.7] if allow_greedy else [0.5, 0.8, 1.0, 1.7]),
        top_k=pick([0, 0, 1, 5, 40, vocab - 1, vocab + 10]),
        top_p=pick([1.0, 1.0, uniform(0.2, 0.99)]),
        min_p=pick([0.0, 0.0, uniform(0.01, 0.3)]),
        repetition_penalty=pick([1.0, uniform(0.7, 1.6)]),
    )
    kw.update(fixed)
    return SamplingParams(**kw)


def mixed_batch(
    num_rows: int, vocab: int, *, seed: int, device: str = "cpu", allow_greedy: bool = True, **fixed
) -> tuple[SamplingBatch, list[list[int]], torch.Generator]:
    """A batch of ``num_rows`` random requests with random prompts and some generated tokens.

    Returns the batch, each row's full token list (prompt + output) and the generator used.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = SamplingBatch(max_num_rows=num_rows + 3, vocab_size=vocab, max_len=64, device=device)
    histories = []
    for r in range(num_rows):
        prompt = torch.randint(vocab, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist()
        output = torch.randint(vocab, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist()
        params = random_params(gen, vocab=vocab, allow_greedy=allow_greedy, **fixed)
        batch.add_request(f"r{r}", params, prompt, output_token_ids=output)
        histories.append(prompt + output)
    return batch, histories, gen
