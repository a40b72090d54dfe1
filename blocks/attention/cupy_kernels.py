"""CUDA C source of the paged decode attention kernel for the CuPy backend, and its compile cache.

One thread block per (query token, KV head): it finds its sequence by a binary search over
``query_start_loc`` (so the grid is fixed by ``num_tokens``, graph-capturable), then its warps
stride over the token's causal (optionally windowed) KV range, ``UNROLL`` tokens per warp per step
so several row loads are in flight. Each lane owns dims ``lane + 32 * i`` of the ``GROUP`` query
heads that share the KV head; scores are warp-reduced with shuffles, softmax is online per warp,
and the warps' partial states are merged in shared memory. Element types are raw bits (no CUDA
headers needed by NVRTC): fp16 through ``cvt`` PTX, bf16 by shifts, FP8 e4m3 through a 256-entry
lookup table. Offsets are 64-bit. The kernel is correct for any query length (each token attends
causally to its own position) but it re-reads the context per token, so the backend uses it for
decode rows.

``cupy`` is imported inside :func:`get_kernel` only, so this module imports without it.
"""

from __future__ import annotations

import functools

__all__ = ["get_kernel", "KERNEL_SOURCE", "COMMON_SOURCE", "DTYPE_KINDS", "max_group_dims"]

# element kinds: 0 float32, 1 float16, 2 bfloat16, 3 float8 e4m3 (cache only)
DTYPE_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2, "float8_e4m3fn": 3}

COMMON_SOURCE = r"""
#define NEG_INF __int_as_float(0xff800000)

#if Q_KIND == 0
typedef float q_t;
#else
typedef unsigned short q_t;
#endif
#if KV_KIND == 0
typedef float kv_t;
#elif KV_KIND == 3
typedef unsigned char kv_t;
#else
typedef unsigned short kv_t;
#endif

__device__ __forceinline__ float half_to_float(unsigned short x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f;
}
__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short x; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f)); return x;
}
__device__ __forceinline__ float bf16_to_float(unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float q_to_float(q_t x) {
#if Q_KIND == 0
    return x;
#elif Q_KIND == 1
    return half_to_float(x);
#else
    return bf16_to_float(x);
#endif
}
__device__ __forceinline__ q_t float_to_q(float x) {
#if Q_KIND == 0
    return x;
#elif Q_KIND == 1
    return float_to_half(x);
#else
    return float_to_bf16(x);
#endif
}
// The sequence of query token t, by a binary search over query_start_loc (so a grid over tokens is fixed by
// num_tokens and graph-capturable), with its length and t's position in it; a padding token gets
// seq_len <= 0 or pos < 0.
__device__ __forceinline__ int token_sequence(const int* __restrict__ query_start_loc,
                                              const int* __restrict__ seq_lens, int num_seqs, int num_tokens,
                                              int t, int* seq_len, int* pos) {
    int lo = 0, hi = num_seqs;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
    }
    *seq_len = lo < num_seqs ? seq_lens[lo] : 0;
    const int q_end = lo < num_seqs ? query_start_loc[lo + 1] : num_tokens;
    *pos = *seq_len - (q_end - t);
    return lo;
}

// kscale / vscale for the block, and for an FP8 cache the e4m3 -> float table in shared memory.
#if KV_KIND == 3
#define KV_SCALES(lut, fp8_lut, k_scale, v_scale)                                  \
    for (int i_ = threadIdx.x; i_ < 256; i_ += NWARPS * 32) lut[i_] = fp8_lut[i_]; \
    const float kscale = k_scale[0];                                               \
    const float vscale = v_scale[0];                                               \
    __syncthreads()
#else
#define KV_SCALES(lut, fp8_lut, k_scale, v_scale) \
    const float kscale = 1.0f;                    \
    const float vscale = 1.0f
#endif

__device__ __forceinline__ float kv_to_float(kv_t x, const float* lut) {
#if KV_KIND == 0
    return x;
#elif KV_KIND == 1
    return half_to_float(x);
#elif KV_KIND == 2
    return bf16_to_float(x);
#else
    return lut[x];
#endif
}
"""

KERNEL_SOURCE = COMMON_SOURCE + r"""
#define DPL ((HEAD_DIM + 31) / 32)

extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_decode_attention(
    const q_t* __restrict__ query, const kv_t* __restrict__ key_cache, const kv_t* __restrict__ value_cache,
    q_t* __restrict__ out, const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
    const int* __restrict__ block_table, const float* __restrict__ fp8_lut, const float* __restrict__ k_scale,
    const float* __restrict__ v_scale, float scale, float soft_cap, int window, int num_seqs, int num_tokens,
    int block_size, long long sq_t, long long sq_h, long long so_t, long long so_h, long long sk_b,
    long long sk_s, long long sk_h, long long sv_b, long long sv_s, long long sv_h, long long s_bt)
{
    __shared__ float lut[256];
    __shared__ float m_sh[NWARPS][GROUP];
    __shared__ float l_sh[GROUP];
    __shared__ float acc_sh[GROUP * HEAD_DIM];
    const int t = blockIdx.x;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;

    int seq_len, pos;
    const int seq = token_sequence(query_start_loc, seq_lens, num_seqs, num_tokens, t, &seq_len, &pos);
    if (seq_len <= 0 || pos < 0) {
        for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) {
            int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
            out[(long long)t * so_t + (long long)(kvh * GROUP + h) * so_h + d] = float_to_q(0.0f);
        }
        return;
    }
    KV_SCALES(lut, fp8_lut, k_scale, v_scale);

    float qr[GROUP][DPL];
    float acc[GROUP][DPL];
    float m[GROUP], l[GROUP];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        m[h] = NEG_INF; l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            int d = lane + 32 * i;
            const long long q_off = (long long)t * sq_t + (long long)(kvh * GROUP + h) * sq_h + d;
            qr[h][i] = d < HEAD_DIM ? q_to_float(query[q_off]) * scale : 0.0f;
            acc[h][i] = 0.0f;
        }
    }
    const int p_lo = window > 0 ? max(0, pos - window + 1) : 0;
    const int p_hi = pos + 1;
    const int* bt_row = block_table + (long long)seq * s_bt;
    for (int base = p_lo + warp * UNROLL; base < p_hi; base += NWARPS * UNROLL) {
        float kf[UNROLL][DPL];
        long long voff[UNROLL];
        float s[UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = base + u;
            const bool ok = p < p_hi;
            const long long blk = ok ? (long long)bt_row[p / block_size] : 0;
            const long long koff = blk * sk_b + (long long)(p % block_size) * sk_s + (long long)kvh * sk_h;
            voff[u] = blk * sv_b + (long long)(p % block_size) * sv_s + (long long)kvh * sv_h;
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                int d = lane + 32 * i;
                kf[u][i] = (ok && d < HEAD_DIM) ? kv_to_float(key_cache[koff + d], lut) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                float part = 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; ++i) part += qr[h][i] * kf[u][i];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
                part *= kscale;
                if (soft_cap > 0.0f) part = soft_cap * tanhf(part / soft_cap);
                s[u][h] = (base + u < p_hi) ? part : NEG_INF;
            }
        }
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            float mx = s[0][h];
#pragma unroll
            for (int u = 1; u < UNROLL; ++u) mx = fmaxf(mx, s[u][h]);
            const float m_new = fmaxf(m[h], mx);
            const float alpha = __expf(m[h] - m_new);
            l[h] *= alpha;
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[h][i] *= alpha;
            m[h] = m_new;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                s[u][h] = __expf(s[u][h] - m_new);
                l[h] += s[u][h];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (base + u < p_hi) {
#pragma unroll
                for (int i = 0; i < DPL; ++i) {
                    int d = lane + 32 * i;
                    float v = d < HEAD_DIM ? kv_to_float(value_cache[voff[u] + d], lut) : 0.0f;
#pragma unroll
                    for (int h = 0; h < GROUP; ++h) acc[h][i] += s[u][h] * v;
                }
            }
        }
    }

    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < GROUP; ++h) m_sh[warp][h] = m[h];
    }
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) acc_sh[idx] = 0.0f;
    if (threadIdx.x < GROUP) l_sh[threadIdx.x] = 0.0f;
    __syncthreads();
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        float mm = NEG_INF;
        for (int w = 0; w < NWARPS; ++w) mm = fmaxf(mm, m_sh[w][h]);
        const float f = m[h] == NEG_INF ? 0.0f : __expf(m[h] - mm);
        l[h] *= f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[h][i] *= f;
    }
    for (int w = 0; w < NWARPS; ++w) {
        if (warp == w) {
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
#pragma unroll
                for (int i = 0; i < DPL; ++i) {
                    int d = lane + 32 * i;
                    if (d < HEAD_DIM) acc_sh[h * HEAD_DIM + d] += acc[h][i];
                }
                if (lane == 0) l_sh[h] += l[h];
            }
        }
        __syncthreads();
    }
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) {
        int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
        out[(long long)t * so_t + (long long)(kvh * GROUP + h) * so_h + d] = float_to_q(acc_sh[idx] / l_sh[h] * vscale);
    }
}
"""

NUM_WARPS = 4
UNROLL = 4


def max_group_dims() -> int:
    """Largest ``GROUP * ceil(head_dim / 32)`` the kernel keeps in registers."""
    return 64


@functools.lru_cache(maxsize=64)
def get_kernel(q_kind: int, kv_kind: int, head_dim: int, group: int):
    """Compile (once per configuration) and return the ``paged_decode_attention`` RawKernel."""
    import cupy

    defines = (
        f"#define Q_KIND {q_kind}\n#define KV_KIND {kv_kind}\n#define HEAD_DIM {head_dim}\n"
        f"#define GROUP {group}\n#define NWARPS {NUM_WARPS}\n#define UNROLL {UNROLL}\n"
    )
    module = cupy.RawModule(code=defines + KERNEL_SOURCE, options=("-std=c++14",))
    return module.get_function("paged_decode_attention")
