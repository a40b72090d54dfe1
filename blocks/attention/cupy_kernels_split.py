"""CUDA C source of the vectorised split-KV paged decode kernel (CuPy backend, ``kernel="vector"``).

It passes the GPU tests (``tests/attention/test_gpu_attention.py``) on an H100, but its speed is not
measured yet, so the backend's default stays the scalar kernel of :mod:`cupy_kernels`. The sequence
lookup and the FP8 table/scales come from :data:`cupy_kernels.COMMON_SOURCE` (``token_sequence``,
``KV_SCALES``), shared with the scalar kernel.

One thread block per (query token, KV head, split): it finds its sequence by a binary search over
``query_start_loc`` (so the grid is fixed by ``num_tokens``, graph-capturable). A token's K/V row
of one head is read by ``TPR`` lanes, each loading ``VEC`` consecutive elements in one vector load;
the block's ``NWARPS * 32 / TPR`` row groups stride over the token's causal (optionally windowed)
KV range, ``UNROLL`` rows per group per step so several loads are in flight. Every lane keeps its
``VEC`` dims of the ``GROUP`` query heads that share the KV head; scores are reduced over the
``TPR`` lanes with shuffles, softmax is online per row group, and the groups' states are merged in
shared memory. With ``SPLIT`` (flash-decoding, for few long sequences) each block covers one
chunk of the range and writes a float32 partial output and its log-sum-exp; ``merge_splits``
combines them. Element types and conversions are those of :data:`cupy_kernels.COMMON_SOURCE`;
offsets are 64-bit; like the scalar kernel it is correct for any query length but meant for decode rows.

``cupy`` is imported inside :func:`get_vector_kernels` only, so this module imports without it.
"""

from __future__ import annotations

import functools

from blocks.attention.cupy_kernels import COMMON_SOURCE

__all__ = ["VECTOR_SOURCE", "get_vector_kernels", "vector_width", "MAX_GROUP_VEC", "NUM_WARPS"]

VECTOR_SOURCE = COMMON_SOURCE + r"""
#define ROWS_PER_WARP (32 / TPR)
#define NGROUPS (NWARPS * ROWS_PER_WARP)

struct alignas(VEC * sizeof(kv_t)) kv_vec_t { kv_t v[VEC]; };

extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_decode_attention(
    const q_t* __restrict__ query, const kv_t* __restrict__ key_cache, const kv_t* __restrict__ value_cache,
    q_t* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_lse,
    const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens, const int* __restrict__ block_table,
    const float* __restrict__ fp8_lut, const float* __restrict__ k_scale, const float* __restrict__ v_scale,
    float scale, float soft_cap, int window, int num_seqs, int num_tokens, int block_size,
    long long sq_t, long long sq_h, long long so_t, long long so_h, long long sk_b, long long sk_s, long long sk_h,
    long long sv_b, long long sv_s, long long sv_h, long long s_bt, long long sp_s, long long sp_t, long long sp_h,
    long long sl_s, long long sl_t)
{
    __shared__ float lut[256];
    __shared__ float m_sh[NGROUPS][GROUP];
    __shared__ float l_sh[GROUP];
    __shared__ float acc_sh[GROUP * HEAD_DIM];
    const int t = blockIdx.x;
    const int kvh = blockIdx.y;
    const int split = blockIdx.z;
    const int num_splits = gridDim.z;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int grp = warp * ROWS_PER_WARP + lane / TPR;  // token-row group of this lane
    const int d0 = (lane % TPR) * VEC;                  // first of this lane's VEC dims
    const bool d_ok = d0 < HEAD_DIM;

    int seq_len, pos;
    const int seq = token_sequence(query_start_loc, seq_lens, num_seqs, num_tokens, t, &seq_len, &pos);
    if (seq_len <= 0 || pos < 0) {  // padding: zeros (or an empty partial)
        for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) {
            int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
            if (SPLIT) {
                if (d == 0) part_lse[split * sl_s + t * sl_t + kvh * GROUP + h] = NEG_INF;
            } else {
                out[(long long)t * so_t + (long long)(kvh * GROUP + h) * so_h + d] = float_to_q(0.0f);
            }
        }
        return;
    }
    KV_SCALES(lut, fp8_lut, k_scale, v_scale);

    float qr[GROUP][VEC];
    float acc[GROUP][VEC];
    float m[GROUP], l[GROUP];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        m[h] = NEG_INF; l[h] = 0.0f;
        const long long q_off = (long long)t * sq_t + (long long)(kvh * GROUP + h) * sq_h + d0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            qr[h][j] = d_ok ? q_to_float(query[q_off + j]) * scale : 0.0f;
            acc[h][j] = 0.0f;
        }
    }
    int p_lo = window > 0 ? max(0, pos - window + 1) : 0;
    int p_hi = pos + 1;
    if (SPLIT) {
        const int chunk = ((p_hi - p_lo + num_splits - 1) / num_splits + 63) / 64 * 64;
        p_lo = p_lo + split * chunk;
        p_hi = min(p_lo + chunk, p_hi);
    }
    const int* bt_row = block_table + (long long)seq * s_bt;
    // warp-uniform trip count (the shuffles below need every lane): a row group past the end masks
    for (int wbase = p_lo + warp * ROWS_PER_WARP * UNROLL; wbase < p_hi; wbase += NGROUPS * UNROLL) {
        const int base = wbase + (lane / TPR) * UNROLL;
        float kf[UNROLL][VEC];
        long long voff[UNROLL];
        float s[UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = base + u;
            const bool ok = p < p_hi;
            const long long blk = ok ? (long long)bt_row[p / block_size] : 0;
            const long long koff = blk * sk_b + (long long)(p % block_size) * sk_s + (long long)kvh * sk_h + d0;
            voff[u] = blk * sv_b + (long long)(p % block_size) * sv_s + (long long)kvh * sv_h + d0;
            kv_vec_t kv;
            if (ok && d_ok) kv = *reinterpret_cast<const kv_vec_t*>(key_cache + koff);
#pragma unroll
            for (int j = 0; j < VEC; ++j) kf[u][j] = (ok && d_ok) ? kv_to_float(kv.v[j], lut) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                float part = 0.0f;
#pragma unroll
                for (int j = 0; j < VEC; ++j) part += qr[h][j] * kf[u][j];
#pragma unroll
                for (int o = TPR / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
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
            const float alpha = m_new == NEG_INF ? 1.0f : __expf(m[h] - m_new);
            l[h] *= alpha;
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[h][j] *= alpha;
            m[h] = m_new;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                s[u][h] = s[u][h] == NEG_INF ? 0.0f : __expf(s[u][h] - m_new);
                l[h] += s[u][h];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (base + u < p_hi && d_ok) {
                kv_vec_t vv = *reinterpret_cast<const kv_vec_t*>(value_cache + voff[u]);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float v = kv_to_float(vv.v[j], lut);
#pragma unroll
                    for (int h = 0; h < GROUP; ++h) acc[h][j] += s[u][h] * v;
                }
            }
        }
    }

    // merge the row groups' states: common max, then shared-memory sums
    if (lane % TPR == 0) {
#pragma unroll
        for (int h = 0; h < GROUP; ++h) m_sh[grp][h] = m[h];
    }
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) acc_sh[idx] = 0.0f;
    if (threadIdx.x < GROUP) l_sh[threadIdx.x] = 0.0f;
    __syncthreads();
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        float mm = NEG_INF;
        for (int g = 0; g < NGROUPS; ++g) mm = fmaxf(mm, m_sh[g][h]);
        const float f = m[h] == NEG_INF ? 0.0f : __expf(m[h] - mm);
        if (d_ok) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) atomicAdd(&acc_sh[h * HEAD_DIM + d0 + j], acc[h][j] * f);
        }
        if (lane % TPR == 0) atomicAdd(&l_sh[h], l[h] * f);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) {
        const int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
        const float denom = l_sh[h];
        const float o = denom > 0.0f ? acc_sh[idx] / denom * vscale : 0.0f;
        if (SPLIT) {
            part_out[split * sp_s + t * sp_t + (long long)(kvh * GROUP + h) * sp_h + d] = o;
            if (d == 0) {
                float mm = NEG_INF;
                for (int g = 0; g < NGROUPS; ++g) mm = fmaxf(mm, m_sh[g][h]);
                part_lse[split * sl_s + t * sl_t + kvh * GROUP + h] = denom > 0.0f ? mm + __logf(denom) : NEG_INF;
            }
        } else {
            out[(long long)t * so_t + (long long)(kvh * GROUP + h) * so_h + d] = float_to_q(o);
        }
    }
}

extern "C" __global__ void merge_splits(
    const float* __restrict__ part_out, const float* __restrict__ part_lse, q_t* __restrict__ out, int num_splits,
    long long sp_s, long long sp_t, long long sp_h, long long sl_s, long long sl_t, long long so_t, long long so_h)
{
    const long long t = blockIdx.x;
    const int h = blockIdx.y;
    float mm = NEG_INF;
    for (int s = 0; s < num_splits; ++s) mm = fmaxf(mm, part_lse[s * sl_s + t * sl_t + h]);
    float denom = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
        const float lse = part_lse[s * sl_s + t * sl_t + h];
        denom += lse == NEG_INF ? 0.0f : __expf(lse - mm);
    }
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float lse = part_lse[s * sl_s + t * sl_t + h];
            if (lse != NEG_INF) o += __expf(lse - mm) * part_out[s * sp_s + t * sp_t + h * sp_h + d];
        }
        out[t * so_t + (long long)h * so_h + d] = float_to_q(denom > 0.0f ? o / denom : 0.0f);
    }
}
"""

NUM_WARPS = 4
UNROLL = 4
MAX_GROUP_VEC = 64


def vector_width(head_dim: int, element_size: int) -> int:
    """Elements each lane loads at once: 16 bytes (8 for FP8), more when head_dim > 32 * that."""
    vec = max(1, min(8, 16 // element_size))
    while head_dim > 32 * vec:
        vec *= 2
    return vec


@functools.lru_cache(maxsize=64)
def get_vector_kernels(q_kind: int, kv_kind: int, head_dim: int, group: int, vec: int, split: bool):
    """Compile (once per configuration) and return ``(paged_decode_attention, merge_splits)`` RawKernels."""
    import cupy

    tpr = 1
    while tpr * vec < head_dim:
        tpr *= 2
    defines = (
        f"#define Q_KIND {q_kind}\n#define KV_KIND {kv_kind}\n#define HEAD_DIM {head_dim}\n"
        f"#define GROUP {group}\n#define NWARPS {NUM_WARPS}\n#define UNROLL {UNROLL}\n"
        f"#define VEC {vec}\n#define TPR {tpr}\n#define SPLIT {int(split)}\n"
    )
    module = cupy.RawModule(code=defines + VECTOR_SOURCE, options=("-std=c++14",))
    return module.get_function("paged_decode_attention"), module.get_function("merge_splits")
