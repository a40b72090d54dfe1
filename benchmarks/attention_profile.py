"""One launch of each kernel that matters, for Nsight Compute (issue 4's "profile, not guess").

Run on the device machine::

    ncu --launch-skip 2 --launch-count 1 -k regex:paged_attn_kernel --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python3 benchmarks/attention_profile.py decode 64 4096

Modes: ``decode B CTX [SPLITS]`` (Triton paged decode), ``cupy B CTX`` (the CuPy backend's tiled kernel,
``-k regex:paged_decode_attention``), ``stream`` (the read-ceiling kernel).
"""

from __future__ import annotations

import sys

import torch

from benchmarks.attention_common import decode_inputs, stream_read_ceiling
from blocks.attention.triton_backend import TritonAttentionBackend


def main(argv: list[str]) -> None:
    if argv[0] == "stream":
        stream_read_ceiling()
        return
    batch, ctx = int(argv[1]), int(argv[2])
    over = {"num_splits": int(argv[3])} if len(argv) > 3 else {}
    inputs = decode_inputs(batch, ctx)
    if argv[0] == "cupy":
        from blocks.attention.cupy_backend import CupyAttentionBackend

        backend = CupyAttentionBackend()
    else:
        backend = TritonAttentionBackend(**over)
    md = backend.plan(inputs.metadata)
    for _ in range(4):
        backend.attend(inputs.query, inputs.key_cache, inputs.value_cache, md, scale=128**-0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1:])
