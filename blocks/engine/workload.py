"""The fixed synthetic workload of the end-to-end benchmarks (no torch: the HTTP load generator uses it too).

``blocks bench throughput`` runs it offline and ``blocks bench serve --input-len-range ...
--output-len-range ... --vocab-size ...`` sends the very same requests to a server, so the two
tokens/s figures are comparable: same seed, same prompts, same output lengths.
"""

from __future__ import annotations

import random

__all__ = ["random_workload"]


def random_workload(num_prompts: int, input_len_range: tuple[int, int], output_len_range: tuple[int, int],
                    vocab_size: int, *, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``num_prompts`` prompts of random token ids in ``[0, vocab_size)`` with lengths uniform in
    ``input_len_range`` (inclusive), and output lengths uniform in ``output_len_range`` (inclusive).

    Returns ``(prompts, output_lens)``; the same arguments always give the same workload.
    """
    (lo_in, hi_in), (lo_out, hi_out) = input_len_range, output_len_range
    if not 1 <= lo_in <= hi_in or not 1 <= lo_out <= hi_out:
        raise ValueError(f"length ranges must satisfy 1 <= low <= high, got input {input_len_range}, "
                         f"output {output_len_range}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num_prompts):
        prompts.append([rng.randrange(vocab_size) for _ in range(rng.randint(lo_in, hi_in))])
        outputs.append(rng.randint(lo_out, hi_out))
    return prompts, outputs
