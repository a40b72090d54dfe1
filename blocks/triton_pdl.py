"""Programmatic dependent launch (PDL) for back-to-back Triton kernels on Hopper and newer.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream is still
running: once every program of the earlier kernel has executed ``gdc_launch_dependents`` (or exited),
the later kernel's programs are scheduled, and each waits in ``gdc_wait`` until the earlier kernel has
finished and its writes are visible. What it saves is the launch latency between the two kernels (the
split-KV merge after the attention kernel; and, in a decode step's CUDA graph, the gap before each of the
small per-layer kernels: RMSNorm, rotary, KV write, attention, SiLU-and-mul).

A kernel that takes part calls :func:`pdl_enter` first (wait, then let the next kernel launch), so it
touches no memory before the kernel before it has finished: the same order as a plain launch, with the
launch latency hidden. The attention kernel lets the merge launch right away instead.

On by default on CUDA devices of compute capability 9.0 or newer; ``BLOCKS_PDL=0`` turns it off (for A/B
timing). Off on other devices and under ``TRITON_INTERPRET=1`` (the interpreter has no grid control), where
the kernels compile the calls out (``PDL`` is a constexpr).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    _gdc_wait = _gdc_launch_dependents = None

__all__ = ["pdl_enabled", "pdl_launch_kwargs", "pdl_enter", "pdl_wait", "pdl_launch_dependents"]


@functools.lru_cache(maxsize=16)
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` use PDL (see the module docstring)."""
    if _gdc_wait is None or os.environ.get("BLOCKS_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch_kwargs(pdl: bool) -> dict:
    """The launch keyword (``launch_pdl=True``) when ``pdl`` (:func:`pdl_enabled`), else nothing: the Triton
    interpreter takes no such option."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """In a kernel launched with ``launch_pdl``: wait until the previous kernel's writes are visible."""
    if PDL:
        _gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel (launched with ``launch_pdl``) start scheduling its programs."""
    if PDL:
        _gdc_launch_dependents()


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First thing in a kernel launched with ``launch_pdl``: wait for the previous kernel, then let the next
    one launch."""
    if PDL:
        _gdc_wait()
        _gdc_launch_dependents()
