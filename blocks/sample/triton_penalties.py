"""Triton kernel: vLLM's repetition / frequency / presence penalties in one launch (the torch reference,
:func:`blocks.sample.ops.apply_penalties`, takes about ten small kernels, which cost more in launches than
in bytes at batch 256).

One program per row, two phases over the row's ``max_len`` seen tokens: (1) read each seen token's logit
and output count and write the penalised value to a scratch row; (2) after a barrier, scatter the scratch
into the logits. Every new value is computed from the original logits, so repeated token ids (padding
repeats a row's first token) write the same value and the update stays idempotent, as in the reference.
Rows without penalties return at once. The sampling kernel (:func:`blocks.sample.triton_sample.triton_sample`,
``penalties=``) runs the same two phases for its row before reading it, which saves this launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.sample.triton_search import per_stream

__all__ = ["triton_apply_penalties", "penalize_row", "penalty_launch_args"]


@triton.jit
def penalize_row(row, logits_ptr, stride_l, ids_ptr, stride_ids, counts_ptr, stride_c, rep_ptr, freq_ptr, pres_ptr,
                 scratch_ptr, max_len, BLOCK: tl.constexpr):
    """Row ``row``'s penalties, in place (both phases of the module docstring; returns at once for a row without
    penalties). The caller's later reads of the row by other threads need a barrier first."""
    rep = tl.load(rep_ptr + row)
    freq = tl.load(freq_ptr + row)
    pres = tl.load(pres_ptr + row)
    if (rep != 1.0) | (freq != 0.0) | (pres != 0.0):
        row64 = tl.zeros([], dtype=tl.int64) + row
        logits = logits_ptr + row64 * stride_l
        ids_row = ids_ptr + row64 * stride_ids
        scratch = scratch_ptr + row64 * max_len
        offs = tl.arange(0, BLOCK)
        for start in range(0, max_len, BLOCK):
            j = start + offs
            valid = j < max_len
            ids = tl.load(ids_row + j, mask=valid, other=0)
            x = tl.load(logits + ids, mask=valid, other=0.0)
            cnt = tl.load(counts_ptr + row64 * stride_c + ids, mask=valid, other=0).to(tl.float32)
            x = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep)  # IEEE division, as torch's
            x = x - freq * cnt - pres * (cnt > 0).to(tl.float32)
            tl.store(scratch + j, x, mask=valid)
        tl.debug_barrier()
        for start in range(0, max_len, BLOCK):
            j = start + offs
            valid = j < max_len
            ids = tl.load(ids_row + j, mask=valid, other=0)
            tl.store(logits + ids, tl.load(scratch + j, mask=valid), mask=valid)


@triton.jit(do_not_specialize=["stride_ids", "max_len"])  # they change every step
def _penalty_kernel(logits_ptr, stride_l, ids_ptr, stride_ids, counts_ptr, stride_c, rep_ptr, freq_ptr, pres_ptr,
                    scratch_ptr, max_len, BLOCK: tl.constexpr):
    penalize_row(tl.program_id(0), logits_ptr, stride_l, ids_ptr, stride_ids, counts_ptr, stride_c, rep_ptr, freq_ptr,
                 pres_ptr, scratch_ptr, max_len, BLOCK)


def penalty_launch_args(logits, token_ids, output_counts, repetition_penalty, frequency_penalty, presence_penalty,
                        block: int = 1024) -> tuple[tuple, int]:
    """Checks, scratch and the kernel arguments shared by :func:`triton_apply_penalties` and the sampling kernel
    that applies them itself: ``(arguments after the logits and their row stride, BLOCK)``."""
    num_rows, max_len = token_ids.shape
    if logits.stride(1) != 1 or token_ids.stride(1) != 1 or output_counts.stride(1) != 1:
        raise ValueError("logits, token_ids and output_counts must have unit stride along their last dimension.")
    scratch = per_stream("penalty scratch", logits.device, (num_rows * max_len,),
                         lambda n: torch.empty(max(n, 1), dtype=torch.float32, device=logits.device))
    block = min(block, 256) if max_len <= 256 else block  # two tile sizes: one compiled variant each, not one per length
    return (token_ids, token_ids.stride(0), output_counts, output_counts.stride(0), repetition_penalty,
            frequency_penalty, presence_penalty, scratch, max_len), block


def triton_apply_penalties(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    output_counts: torch.Tensor,
    *,
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    block: int = 1024,
) -> torch.Tensor:
    """Same contract as :func:`blocks.sample.ops.apply_penalties` (in place on ``logits`` ``[num_rows, vocab]``
    float32, which is returned; ``token_ids`` ``[num_rows, max_len]`` int64; ``output_counts``
    ``[num_rows, vocab]`` int32; the penalties ``[num_rows]`` float32)."""
    num_rows, max_len = token_ids.shape
    if num_rows == 0 or max_len == 0:
        return logits
    args, block = penalty_launch_args(logits, token_ids, output_counts, repetition_penalty, frequency_penalty,
                                      presence_penalty, block)
    _penalty_kernel[(num_rows,)](logits, logits.stride(0), *args, BLOCK=block, num_warps=4)
    return logits
