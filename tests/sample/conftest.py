"""Sampler tests: the Triton kernel runs through the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, i.e. before
``blocks.sample.triton_topk_topp`` is imported; this conftest is loaded before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
