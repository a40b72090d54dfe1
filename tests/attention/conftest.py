"""Attention tests: run the Triton kernels through the interpreter when there is no CUDA device.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, i.e. before the
kernel modules are imported; this conftest is loaded before the test modules of this folder.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
