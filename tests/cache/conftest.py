"""Cache tests: the block-copy Triton kernel runs through the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined (before
``blocks.cache.block_copy`` is imported); this conftest loads before the test modules of this folder.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
