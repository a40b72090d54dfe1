"""Triton KV write (``reshape_and_cache``): this step's K and V into their cache slots.

One launch per layer, one program per token (all KV heads of the token at once); tokens whose
``slot_mapping`` is ``-1`` (CUDA-graph padding) are skipped. An FP8 (e4m3) cache stores
``clamp(x / scale, -448, 448)`` rounded to e4m3, as :func:`blocks.attention.reference.reshape_and_cache`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.attention.validation import check_cache_write
from blocks.triton_pdl import pdl_enabled, pdl_enter, pdl_launch_kwargs

__all__ = ["reshape_and_cache"]


@triton.jit
def _round_to_e4m3_grid(x):
    """Round float32 ``x`` (already clamped to +-448) to the nearest e4m3 value, ties to even.

    Done in float32 arithmetic so the conversion that follows is exact; the Triton interpreter's own
    float32 -> e4m3 conversion neither carries a rounded-up mantissa into the exponent nor rounds
    ties to even.
    """
    bits = x.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    step = ((tl.maximum(exp, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # spacing of e4m3 at x
    y = x / step
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: round-to-nearest-even to an integer
    return y * step


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
    if FP8:
        k = _round_to_e4m3_grid(tl.clamp(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -448.0, 448.0))
        v = _round_to_e4m3_grid(tl.clamp(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -448.0, 448.0))
    kc = block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :]
    vc = block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :]
    tl.store(key_cache_ptr + kc, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + vc, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write new tokens' K and V into their cache slots, in place (one launch, no host sync).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]`` (fp16/bf16/fp32; last dim contiguous).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the model
            dtype or ``torch.float8_e4m3fn`` (then ``k_scale``/``v_scale`` are required).
        slot_mapping: ``[num_tokens]`` int64 ``block_id * block_size + offset``; ``-1`` skips.
        k_scale, v_scale: float32 one-element tensors (FP8 caches only).

    Raises:
        ValueError: on mismatched shapes, dtypes, devices or a missing FP8 scale.
    """
    fp8 = check_cache_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    dummy = slot_mapping
    pdl = pdl_enabled(key.device)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        k_scale if fp8 else dummy, v_scale if fp8 else dummy,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=key_cache.shape[1], FP8=fp8, PDL=pdl, **pdl_launch_kwargs(pdl),
    )
