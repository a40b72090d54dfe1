"""CUDA C source of the tiled split-KV paged decode kernel (CuPy backend, ``kernel="tiled"``, the default).

The sequence lookup and the FP8 table/scales come from :data:`cupy_kernels.COMMON_SOURCE` (``token_sequence``,
``KV_SCALES``), shared with the scalar kernel.

One thread block of ``NWARPS`` warps per (query token, KV head, split); it finds its sequence by a binary search
over ``query_start_loc`` (so the grid is fixed by ``num_tokens``, graph-capturable). The block walks its causal
(optionally windowed) KV range in tiles of ``TILE`` keys. Each tile's K and V rows are copied into shared memory by
16-byte ``cp.async`` copies, ``NSTAGE - 1`` tiles ahead of the one being computed, so a block keeps tens of KB in
flight without holding them in registers; a thread reads all its block ids before it issues a copy, and a K chunk
and the V chunk at the same place share one offset computation. Rows past the range are zero-filled by the copy.
On an H100 (RESULTS.md) an earlier version that loaded rows into registers read ~1 TB/s; this one 2.8 TB/s, 91% of
the read ceiling.

Compute: warp ``w`` owns rows ``[w ROWS, (w + 1) ROWS)`` of a tile, and lane ``l`` owns ``DPL`` dims of the
``GROUP`` query heads that share the KV head (consecutive where that is one vector load from shared memory, else
32 apart; heads padded to ``GP``, a power of two). A lane forms its partial dot products for all ``GP x ROWS``
(head, row) pairs, then one *transpose reduction* over the warp (``log2 V`` halving steps of ``shfl_xor``,
V = GP x ROWS <= 32) leaves lane ``l`` holding the full score of pair ``l >> (5 - log2 V)``: 31 shuffles for 32
scores instead of 160. Softmax is online per warp (base e, as the merge expects); the probabilities go through
shared memory, one vector load of a row's heads, for P V. At the end the warps' states are merged in shared memory.
With ``SPLIT`` (flash-decoding) each block covers one chunk of the range and writes a float32 partial output with
its log-sum-exp; ``merge_splits`` combines them. Offsets are 64-bit; like the scalar kernel it is correct for any
query length but meant for decode rows.

``cupy`` is imported inside :func:`get_tiled_kernels` only, so this module imports without it.
"""

from __future__ import annotations

import functools

from blocks.attention.cupy_kernels import COMMON_SOURCE

__all__ = ["TILED_SOURCE", "get_tiled_kernels", "tile_config", "group_pad", "NUM_WARPS", "MAX_GROUP_DIMS"]

TILED_SOURCE = COMMON_SOURCE + r"""
#define FULL_MASK 0xffffffffu
#define ROWS (TILE / NWARPS)
#define LOGV (LOGGP + LOGROWS)
#define SHIFT (5 - LOGV)
#define DPL ((HEAD_DIM + 31) / 32)
#define EPC (16 / (int)sizeof(kv_t))
#define RC (HEAD_DIM / EPC)
#define STAGE_ELEMS (2 * TILE * HEAD_DIM)
#define CPT ((TILE * RC + NWARPS * 32 - 1) / (NWARPS * 32))

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok) {
    unsigned long long s;
    asm volatile("cvta.to.shared.u64 %0, %1;" : "=l"(s) : "l"(smem));
    // no "memory" clobber: the block-id loads of later copies may be issued before this one (the commit and the
    // wait carry the ordering that matters)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"((unsigned)s), "l"(gmem), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// Sums C values over a warp so that lane l ends with the total of value l >> (5 - log2 C): each step trades half of
// the values with the lane MASK apart (the upper half stays where lane & MASK is set); once one value is left, plain
// xor steps add the copies. A template, so every index is a compile-time constant and v stays in registers.
template <int N, int C, int MASK> struct TransposeReduce {
    static __device__ __forceinline__ void run(float (&v)[N], int lane) {
        constexpr int H = C / 2;
        const bool upper = (lane & MASK) != 0;
#pragma unroll
        for (int j = 0; j < H; ++j) {
            const float send = upper ? v[j] : v[j + H];
            const float keep = upper ? v[j + H] : v[j];
            v[j] = keep + __shfl_xor_sync(FULL_MASK, send, MASK);
        }
        TransposeReduce<N, H, MASK / 2>::run(v, lane);
    }
};
template <int N, int MASK> struct TransposeReduce<N, 1, MASK> {
    static __device__ __forceinline__ void run(float (&v)[N], int lane) {
        v[0] += __shfl_xor_sync(FULL_MASK, v[0], MASK);
        TransposeReduce<N, 1, MASK / 2>::run(v, lane);
    }
};
template <int N> struct TransposeReduce<N, 1, 0> {
    static __device__ __forceinline__ void run(float (&)[N], int) {}
};

// Dim i of a lane: consecutive dims when each lane's share is a power-of-two number of bytes (one vector load from
// shared memory), else strided by 32 (any head_dim).
#if CONSEC
#define DIM(i) (lane * DPL + (i))
struct alignas(DPL * sizeof(kv_t)) lane_vec_t { kv_t v[DPL]; };
#else
#define DIM(i) (lane + 32 * (i))
#endif

__device__ __forceinline__ void load_row(float (&f)[DPL], const kv_t* row, int lane, const float* lut) {
#if CONSEC && KV_KIND == 2 && DPL % 2 == 0
    // bf16 pairs: the low half is a shift, the high half a mask (one instruction an element)
    const lane_vec_t x = *reinterpret_cast<const lane_vec_t*>(row + lane * DPL);
    const unsigned int* w = reinterpret_cast<const unsigned int*>(&x);
#pragma unroll
    for (int i = 0; i < DPL / 2; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
#elif CONSEC
    const lane_vec_t x = *reinterpret_cast<const lane_vec_t*>(row + lane * DPL);
#pragma unroll
    for (int i = 0; i < DPL; ++i) f[i] = kv_to_float(x.v[i], lut);
#else
#pragma unroll
    for (int i = 0; i < DPL; ++i) f[i] = DIM(i) < HEAD_DIM ? kv_to_float(row[DIM(i)], lut) : 0.0f;
#endif
}

struct alignas(GP * 4 <= 16 ? GP * 4 : 16) p_vec_t { float v[GP]; };

#if MIN_BLOCKS > 0
#define LAUNCH_BOUNDS __launch_bounds__(NWARPS * 32, MIN_BLOCKS)
#else
#define LAUNCH_BOUNDS __launch_bounds__(NWARPS * 32)
#endif

extern "C" __global__ void LAUNCH_BOUNDS paged_decode_attention(
    const q_t* __restrict__ query, const kv_t* __restrict__ key_cache, const kv_t* __restrict__ value_cache,
    q_t* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_lse,
    const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens, const int* __restrict__ block_table,
    const float* __restrict__ fp8_lut, const float* __restrict__ k_scale, const float* __restrict__ v_scale,
    float scale, float soft_cap, int window, int num_seqs, int num_tokens, int block_size,
    long long sq_t, long long sq_h, long long so_t, long long so_h, long long sk_b, long long sk_s, long long sk_h,
    long long sv_b, long long sv_s, long long sv_h, long long s_bt, long long sp_s, long long sp_t, long long sp_h,
    long long sl_s, long long sl_t)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    kv_t* stages = reinterpret_cast<kv_t*>(smem_raw);
    // each warp's probabilities of a tile, [ROWS][GP] (a row's heads side by side: one vector load), past the stages
    float* p_sh = reinterpret_cast<float*>(smem_raw + NSTAGE * STAGE_ELEMS * sizeof(kv_t))
                  + (threadIdx.x / 32) * ROWS * GP;
#if KV_KIND == 3
    __shared__ float lut[256];
#else
    const float* lut = nullptr;  // kv_to_float reads the table for FP8 only
#endif
    const int t = blockIdx.x;
    const int kvh = blockIdx.y;
    const int split = blockIdx.z;
    const int num_splits = gridDim.z;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;

    int seq_len, pos;
    const int seq = token_sequence(query_start_loc, seq_lens, num_seqs, num_tokens, t, &seq_len, &pos);
    if (seq_len <= 0 || pos < 0) {  // padding: zeros (or an empty partial)
        for (int idx = tid; idx < GROUP * HEAD_DIM; idx += NWARPS * 32) {
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

    float q[GROUP][DPL];
    float acc[GROUP][DPL];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        const long long q_off = (long long)t * sq_t + (long long)(kvh * GROUP + h) * sq_h;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = DIM(i);
            q[h][i] = d < HEAD_DIM ? q_to_float(query[q_off + d]) * scale : 0.0f;
            acc[h][i] = 0.0f;
        }
    }
    const int pair = lane >> SHIFT;        // the (head, row) score this lane ends up holding
    const int my_h = pair >> LOGROWS;
    const int my_r = pair & (ROWS - 1);
    float m_run = NEG_INF;                 // running max of head my_h (equal on all its lanes)
    float l_run = 0.0f;                    // running sum of this lane's row's probabilities, rescaled

    int p_lo = window > 0 ? max(0, pos - window + 1) : 0;
    int p_hi = pos + 1;
    if (SPLIT) {
        const int chunk = ((p_hi - p_lo + num_splits - 1) / num_splits + 63) / 64 * 64;
        p_lo = p_lo + split * chunk;
        p_hi = min(p_lo + chunk, p_hi);
    }
    const int n_tiles = p_hi > p_lo ? (p_hi - p_lo + TILE - 1) / TILE : 0;
    const int* bt_row = block_table + (long long)seq * s_bt;
    const kv_t* kbase = key_cache + (long long)kvh * sk_h;
    const kv_t* vbase = value_cache + (long long)kvh * sv_h;

    // chunk c = tid + k * 32 NWARPS of a tile's K rows (RC 16-byte chunks a row); the V chunk at the same place
    // shares its block id and offsets
    auto issue = [&](int tile) {
        const int start = p_lo + tile * TILE;
        kv_t* dst_stage = stages + (tile % NSTAGE) * STAGE_ELEMS;
        long long koff[CPT], voff[CPT];
#pragma unroll
        for (int k = 0; k < CPT; ++k) {  // every block id first, so their loads overlap
            const int c = tid + k * NWARPS * 32;
            const int p = start + c / RC;
            koff[k] = 0;
            voff[k] = 0;
            if ((TILE * RC) % (NWARPS * 32) == 0 || c < TILE * RC) {
                if (p < p_hi) {
                    const long long blk = bt_row[p / BLOCK_SIZE];
                    const long long slot = p % BLOCK_SIZE;
                    koff[k] = blk * sk_b + slot * sk_s;
                    voff[k] = blk * sv_b + slot * sv_s;
                }
            }
        }
#pragma unroll
        for (int k = 0; k < CPT; ++k) {
            const int c = tid + k * NWARPS * 32;
            if ((TILE * RC) % (NWARPS * 32) == 0 || c < TILE * RC) {
                const int row = c / RC;
                const int col = c - row * RC;
                const bool ok = start + row < p_hi;
                kv_t* dst = dst_stage + row * HEAD_DIM + col * EPC;
                cp_async16(dst, kbase + koff[k] + col * EPC, ok);
                cp_async16(dst + TILE * HEAD_DIM, vbase + voff[k] + col * EPC, ok);
            }
        }
    };

#pragma unroll
    for (int s = 0; s < NSTAGE - 1; ++s) {
        if (s < n_tiles) issue(s);
        cp_async_commit();
    }
    for (int tile = 0; tile < n_tiles; ++tile) {
        if (tile + NSTAGE - 1 < n_tiles) issue(tile + NSTAGE - 1);
        cp_async_commit();
        cp_async_wait<NSTAGE - 1>();
        __syncthreads();
        const kv_t* ks = stages + (tile % NSTAGE) * STAGE_ELEMS + warp * ROWS * HEAD_DIM;
        const kv_t* vs = ks + TILE * HEAD_DIM;

        // partial scores of every (head, row) pair over this lane's dims, then the transpose reduction
        float v[GP * ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float kf[DPL];
            load_row(kf, ks + r * HEAD_DIM, lane, lut);
#pragma unroll
            for (int h = 0; h < GP; ++h) {
                float a = 0.0f;
                if (h < GROUP) {
#pragma unroll
                    for (int i = 0; i < DPL; ++i) a += q[h][i] * kf[i];
                }
                v[h * ROWS + r] = a;
            }
        }
        TransposeReduce<GP * ROWS, GP * ROWS, 16>::run(v, lane);

        float sc = v[0] * kscale;
        if (soft_cap > 0.0f) sc = soft_cap * tanhf(sc / soft_cap);
        const int p = p_lo + tile * TILE + warp * ROWS + my_r;
        if (my_h >= GROUP || p >= p_hi) sc = NEG_INF;
        float mt = sc;
#pragma unroll
        for (int k = 0; k < LOGROWS; ++k) mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, 1 << (SHIFT + k)));
        const float m_new = fmaxf(m_run, mt);
        const float alpha = m_new == NEG_INF ? 1.0f : __expf(m_run - m_new);
        const float pr = sc == NEG_INF ? 0.0f : __expf(sc - m_new);
        l_run = l_run * alpha + pr;
        m_run = m_new;
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            const float ah = __shfl_sync(FULL_MASK, alpha, (h * ROWS) << SHIFT);
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[h][i] *= ah;
        }
        if ((lane & ((1 << SHIFT) - 1)) == 0) p_sh[my_r * GP + my_h] = pr;
        __syncwarp();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float vf[DPL];
            load_row(vf, vs + r * HEAD_DIM, lane, lut);
            const p_vec_t pv = *reinterpret_cast<const p_vec_t*>(p_sh + r * GP);
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
#pragma unroll
                for (int i = 0; i < DPL; ++i) acc[h][i] += pv.v[h] * vf[i];
            }
        }
        __syncwarp();  // p_sh is rewritten by the next tile
        __syncthreads();  // the next iteration refills this stage
    }

    // each head's sum over the warp's rows, then the warps' states merged in shared memory (the stages' space)
#pragma unroll
    for (int k = 0; k < LOGROWS; ++k) l_run += __shfl_xor_sync(FULL_MASK, l_run, 1 << (SHIFT + k));
    cp_async_wait<0>();
    __syncthreads();
    float* m_sh = reinterpret_cast<float*>(smem_raw);  // [NWARPS][GP]
    float* l_sh = m_sh + NWARPS * GP;                  // [NWARPS][GP]
    float* acc_sh = l_sh + NWARPS * GP;                // [NWARPS][GROUP][HEAD_DIM]
    if ((lane & ((1 << SHIFT) - 1)) == 0 && my_r == 0) {
        m_sh[warp * GP + my_h] = m_run;
        l_sh[warp * GP + my_h] = l_run;
    }
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = DIM(i);
            if (d < HEAD_DIM) acc_sh[(warp * GROUP + h) * HEAD_DIM + d] = acc[h][i];
        }
    }
    __syncthreads();
    for (int e = tid; e < GROUP * HEAD_DIM; e += NWARPS * 32) {
        const int h = e / HEAD_DIM, d = e % HEAD_DIM;
        float mm = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) mm = fmaxf(mm, m_sh[w * GP + h]);
        float denom = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) {
            const float mw = m_sh[w * GP + h];
            const float f = mw == NEG_INF ? 0.0f : __expf(mw - mm);
            denom += l_sh[w * GP + h] * f;
            o += acc_sh[(w * GROUP + h) * HEAD_DIM + d] * f;
        }
        o = denom > 0.0f ? o / denom * vscale : 0.0f;
        if (SPLIT) {
            part_out[split * sp_s + t * sp_t + (long long)(kvh * GROUP + h) * sp_h + d] = o;
            if (d == 0) {
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
MAX_GROUP_DIMS = 32  # GP * ceil(head_dim / 32): the q and acc registers a lane holds, each
STAGE_BYTES = 16 * 1024  # a tile's K and V rows, at most (where a warp keeps at least one row)
SMEM_BYTES = 48 * 1024  # the stages' budget (the launcher raises the kernel's dynamic shared-memory limit past it)
FP8_LUT_BYTES = 1024
MAX_STAGES = 4  # H100 at 64 x 4096: 2 stages 379 us, 3 (the bf16 d=128 choice) 382 us, 6 stages 391 us
# __launch_bounds__ minimum blocks an SM where a lane's q and acc registers are few (GP * DPL <= 16; bf16, head_dim
# 128, group 4: 121 registers, 4 blocks, whose shared memory fits); wider layers keep the compiler's choice rather
# than risk spills under a 128-register cap
MIN_BLOCKS = 4


def _log2(x: int) -> int:
    return x.bit_length() - 1


def group_pad(group: int) -> int:
    """``GP``: the query heads of a KV head rounded up to a power of two (the kernel's score layout)."""
    return 1 << (group - 1).bit_length()


def tile_config(head_dim: int, group: int, element_size: int) -> tuple[int, int, int]:
    """``(rows a warp owns in a tile, pipeline stages, dynamic shared-memory bytes)`` for this layer shape.

    Rows a warp: ``32 / GP`` up to 8 (the transpose reduction's 32 lanes), halved while a tile's K and V rows pass
    ``STAGE_BYTES``; stages: as many as fit in 48 KB, at most 4, at least 2."""
    gp = group_pad(group)
    rows = max(1, min(8, 32 // gp))
    row_bytes = 2 * head_dim * element_size
    while rows > 1 and NUM_WARPS * rows * row_bytes > STAGE_BYTES:
        rows //= 2
    stage = NUM_WARPS * rows * row_bytes
    budget = SMEM_BYTES - (FP8_LUT_BYTES if element_size == 1 else 0)  # static shared memory: the FP8 table
    stages = max(2, min(MAX_STAGES, budget // stage))
    merge = 4 * NUM_WARPS * (2 * gp + group * head_dim)
    probs = 4 * NUM_WARPS * rows * gp  # each warp's probabilities of a tile, after the stages
    return rows, stages, max(stages * stage + probs, merge)


def consecutive_dims(head_dim: int, element_size: int) -> bool:
    """Whether each lane owns ``head_dim / 32`` consecutive dims, loaded from shared memory as one vector (a
    power-of-two number of bytes), rather than dims 32 apart."""
    if head_dim % 32:
        return False
    lane_bytes = head_dim // 32 * element_size
    return lane_bytes & (lane_bytes - 1) == 0


@functools.lru_cache(maxsize=64)
def get_tiled_kernels(q_kind: int, kv_kind: int, head_dim: int, group: int, element_size: int, block_size: int,
                      split: bool, device: int):
    """Compile (once per configuration and device) and return ``(paged_decode_attention, merge_splits,
    shared-memory bytes)``; past 48 KB the kernel's dynamic shared-memory limit is raised for ``device``."""
    import cupy

    rows, stages, smem = tile_config(head_dim, group, element_size)
    gp = group_pad(group)
    defines = (
        f"#define Q_KIND {q_kind}\n#define KV_KIND {kv_kind}\n#define HEAD_DIM {head_dim}\n"
        f"#define GROUP {group}\n#define GP {gp}\n#define LOGGP {_log2(gp)}\n#define NWARPS {NUM_WARPS}\n"
        f"#define TILE {NUM_WARPS * rows}\n#define LOGROWS {_log2(rows)}\n#define NSTAGE {stages}\n"
        f"#define SPLIT {int(split)}\n#define BLOCK_SIZE {block_size}\n"
        f"#define MIN_BLOCKS {MIN_BLOCKS if gp * -(-head_dim // 32) <= 16 else 0}\n"
        f"#define CONSEC {int(consecutive_dims(head_dim, element_size))}\n"
    )
    module = cupy.RawModule(code=defines + TILED_SOURCE, options=("-std=c++14",))
    attn = module.get_function("paged_decode_attention")
    if smem > 48 * 1024:
        with cupy.cuda.Device(device):
            attn.max_dynamic_shared_size_bytes = smem
    return attn, module.get_function("merge_splits"), smem
