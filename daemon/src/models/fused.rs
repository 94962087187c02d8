//! A whole decoder block of a one-sequence decode step as one CUDA kernel, for 4-bit models on
//! MLX's CUDA backend.
//!
//! Why: a small model's single-stream decode on a GPU is bound by the host, not the device. MLX
//! 0.32 spends a few microseconds of host time on every node of a step's graph, and a Qwen3-0.6B
//! step is ~17 nodes per layer (~600 in all), so its 4-bit decode ran at under 4% of what the
//! card's memory bandwidth allows. Fusing pieces of a block into a few custom kernels does not
//! help (session 7: an MLX custom-kernel call costs the host about what 1.5 built-in nodes do),
//! so here the block is **one** node: the kernel's blocks work through the block's phases and
//! meet at grid-wide barriers between them.
//!
//! Phases (`P` participating blocks of 256 threads, each warp taking whole rows of a product):
//! 1. RMS norm of `x` (every block, into shared memory), then the stacked q/k/v product.
//! 2. Per (query head, chunk of positions): q/k norms (Qwen3), RoPE, the new key and value
//!    written into the cache at `pos`, attention over the chunk with an online softmax; the
//!    last block to finish a head merges its chunks (a per-head ticket, no barrier).
//! 3. The output projection plus the residual.
//! 4. RMS norm, the stacked gate/up product and SwiGLU.
//! 5. The down projection plus the residual, into the block's output.
//!
//! Intermediate values are rounded to the model's dtype wherever MLX's own step materializes an
//! array, so the fused step follows MLX's arithmetic closely (`tests/emulated_kernels.rs` checks
//! it against the unfused step).
//!
//! Grid barriers need every participating block resident at once. The kernel launches
//! [`GRID`] blocks and only the first `min(GRID, SMs / 2)` take part (the SM count read on the
//! device, `%nsmid`); the rest return at once. Two blocks of this kernel fit on any SM (256
//! threads, under 48 KB of shared memory), so even two such kernels running side by side are all
//! resident. A barrier that never opens ends the kernel with a trap after a few seconds instead of
//! hanging the daemon.
//!
//! State written in place (MLX sees these as inputs): the key/value cache (so the cache storage
//! must be the sequence's own, see [`LayerCache::fused_storage`]), and a per-sequence workspace
//! of scratch floats and barrier counters ([`Workspace`]). The emulator (`crate::cuda_emulator`)
//! runs blocks one after another, so there each phase is a launch of its own (`PHASE` 1-5; 0 is
//! all of them with the barriers, what the GPU runs), the
//! launches standing in for the barriers.

use super::layers::{Matrix, Quant, RmsNorm, Rope};
use super::transformer::Block;
use super::ModelError;
use crate::cache::SequenceCache;
use crate::ffi::{CudaKernel, KernelSwitch, TemplateArg};
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;
use std::sync::Arc;

type Result<T> = std::result::Result<T, ModelError>;

static SWITCH: KernelSwitch = KernelSwitch::new("MLXD_FUSED_DECODE");

/// Turns the fused decode step on or off for the whole process (on unless
/// `MLXD_FUSED_DECODE=0`); it runs only where MLX runs on CUDA.
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

/// Whether the switch is on now (it can be flipped while a model is loaded, to compare).
pub fn enabled() -> bool {
    SWITCH.available()
}

/// Blocks launched per layer; at most `SMs / 2` of them take part.
pub const GRID: i32 = 160;
/// Blocks launched per phase when emulated (no SM count there: all of them take part).
const EMULATED_GRID: i32 = 12;
const THREADS: i32 = 256;
/// Chunks of positions one head's attention is split into, at most.
const CHUNKS_MAX: i32 = 16;
/// Static shared memory the kernel may use, bytes (the 48 KB limit, with room for the rest).
const SHARED_MAX: i32 = 46 * 1024;
/// Barrier words: arrivals at 0, generation at 32, one ticket per query head from 64.
const SYNC_WORDS: i32 = 256;

const HEADER: &str = r#"
#define MLXD_WARPS 8
#define MLXD_CHMAX 16
#define MLXD_NR 4
__device__ inline unsigned int mlxd_nsmid() {
    unsigned int n;
    asm volatile("mov.u32 %0, %%nsmid;" : "=r"(n));
    return n;
}
template <typename T>
__device__ inline float mlxd_round(float v) { return static_cast<float>(static_cast<T>(v)); }
// Sum of v over the block (256 threads); red: MLXD_WARPS floats of shared memory.
__device__ inline float mlxd_block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
    for (int w = 0; w < MLXD_WARPS; ++w) t += red[w];
    return t;
}
// The first P blocks wait here for each other. sync[0] counts arrivals (back to 0 when the
// last one arrives), sync[32] is the barrier's generation.
__device__ inline void mlxd_grid_sync(unsigned int* sync, unsigned int P) {
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned int* gen = sync + 32;
        const unsigned int g = *gen;
        __threadfence();
        if (atomicAdd(sync, 1u) == P - 1) {
            atomicExch(sync, 0u);
            __threadfence();
            atomicAdd(sync + 32, 1u);
        } else {
            unsigned int spins = 0;
            while (*gen == g) {
                if (++spins > (1u << 28)) __trap();
            }
        }
        __threadfence();
    }
    __syncthreads();
}
// MLXD_NR rows of a 4-bit affine product (rows[j] < 0: none) with xs (K floats, shared
// memory): one warp, each lane 32 elements (one 16-byte load) of every row at a time, so a
// warp keeps MLXD_NR * 512 bytes of weights in flight per step; lanes read their eight float4s
// of xs in rotated order, which keeps a quarter-warp's reads on distinct banks. The sums land
// in y on every lane.
template <int K, int GS, typename W, typename S>
__device__ inline void mlxd_q4(const W* w, const S* s, const S* b, const float* xs, const int* rows, float* y) {
    const int lane = threadIdx.x & 31;
    constexpr int C = K / 32;
    float acc[MLXD_NR];
#pragma unroll
    for (int j = 0; j < MLXD_NR; ++j) acc[j] = 0.0f;
#pragma unroll
    for (int c0 = 0; c0 < C; c0 += 32) {
        const int c = c0 + lane;
        if (c < C) {
            uint4 q[MLXD_NR];
            float sc[MLXD_NR], bi[MLXD_NR], d[MLXD_NR];
            const int g = (32 * c) / GS;
#pragma unroll
            for (int j = 0; j < MLXD_NR; ++j) {
                const bool ok = rows[j] >= 0;
                const int r = ok ? rows[j] : 0;
                q[j] = ok ? reinterpret_cast<const uint4*>(w + (size_t)r * (K / 8))[c] : make_uint4(0u, 0u, 0u, 0u);
                sc[j] = ok ? static_cast<float>(s[(size_t)r * (K / GS) + g]) : 0.0f;
                bi[j] = ok ? static_cast<float>(b[(size_t)r * (K / GS) + g]) : 0.0f;
                d[j] = 0.0f;
            }
            const float4* x4 = reinterpret_cast<const float4*>(xs + 32 * c);
            float sx = 0.0f;
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                const int u = (t + lane) & 7;
                const float4 xv = x4[u];
                sx += (xv.x + xv.y) + (xv.z + xv.w);
                const int sh = (u & 1) * 16;
#pragma unroll
                for (int j = 0; j < MLXD_NR; ++j) {
                    const unsigned int wd = (u >> 1) == 0 ? q[j].x : (u >> 1) == 1 ? q[j].y : (u >> 1) == 2 ? q[j].z : q[j].w;
                    d[j] = fmaf((float)((wd >> sh) & 15u), xv.x, d[j]);
                    d[j] = fmaf((float)((wd >> (sh + 4)) & 15u), xv.y, d[j]);
                    d[j] = fmaf((float)((wd >> (sh + 8)) & 15u), xv.z, d[j]);
                    d[j] = fmaf((float)((wd >> (sh + 12)) & 15u), xv.w, d[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < MLXD_NR; ++j) acc[j] += sc[j] * d[j] + bi[j] * sx;
        }
    }
#pragma unroll
    for (int j = 0; j < MLXD_NR; ++j) {
        float v = acc[j];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        y[j] = v;
    }
}
// RMS norm of D values (load(k) gives value k) times w, each rounded to T where MLX rounds,
// into sh; every thread of the block calls it.
template <int D, typename T, typename L, typename Wn>
__device__ inline void mlxd_norm_to_shared(L load, const Wn* w, float eps, float* sh, float* red) {
    float ss = 0.0f;
    for (int k = threadIdx.x; k < D; k += 256) { const float v = load(k); sh[k] = v; ss += v * v; }
    const float n = rsqrtf(mlxd_block_sum(ss, red) / D + eps);
    for (int k = threadIdx.x; k < D; k += 256) sh[k] = mlxd_round<T>(mlxd_round<T>(sh[k] * n) * static_cast<float>(w[k]));
    __syncthreads();
}
// Rows 0..R of a 4-bit product with xs, MLXD_NR rows per warp at a time (warp gw of NW):
// put(row, sum) on each warp's lane 0.
template <int K, int GS, typename W, typename S, typename F>
__device__ inline void mlxd_q4_rows(int R, int gw, int NW, const W* w, const S* s, const S* b, const float* xs, F put) {
    int rows[MLXD_NR];
    float y[MLXD_NR];
    for (int r0 = gw; r0 < R; r0 += NW * MLXD_NR) {
#pragma unroll
        for (int j = 0; j < MLXD_NR; ++j) rows[j] = r0 + j * NW < R ? r0 + j * NW : -1;
        mlxd_q4<K, GS>(w, s, b, xs, rows, y);
        if ((threadIdx.x & 31) == 0) {
#pragma unroll
            for (int j = 0; j < MLXD_NR; ++j) if (rows[j] >= 0) put(rows[j], y[j]);
        }
    }
}
"#;

const SOURCE: &str = r#"
    constexpr int NQKV = (H + 2 * KVH) * HD;
    constexpr int OFF_ATT = NQKV;
    constexpr int OFF_PART = OFF_ATT + H * HD;
    constexpr int OFF_H1 = OFF_PART + H * MLXD_CHMAX * (HD + 2);
    constexpr int OFF_MLP = OFF_H1 + D;
    constexpr int DL = HD / 8;
    const float eps = __int_as_float(EPS_BITS);
    const float rope_scale = __int_as_float(ROPE_SCALE_BITS);
    const float att_scale = __int_as_float(ATT_SCALE_BITS);
    const float neg_inf = __int_as_float(0xff800000);
    __shared__ __align__(16) float sh[SH];
    __shared__ float hq[HD];
    __shared__ float hk[HD];
    __shared__ float hv[HD];
    __shared__ float red[MLXD_WARPS];
    __shared__ int last;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    unsigned int P = gridDim.x;
    if constexpr (PHASE == 0) {
        const unsigned int half = mlxd_nsmid() / 2;
        P = min(P, half > 0 ? half : 1u);
    }
    if (blockIdx.x >= P) return;
    const int gw = blockIdx.x * MLXD_WARPS + warp;
    const int NW = (int)P * MLXD_WARPS;
    const int p = pos[0];
    const int cap = kc_shape[2];
    const int CH = min(MLXD_CHMAX, max(1, (int)P / H));
    float* ws = const_cast<float*>(work);
    unsigned int* sy = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));
    T* kw = const_cast<T*>(kc);
    T* vw = const_cast<T*>(vc);
    if constexpr (PHASE == 0 || PHASE == 1) {
        mlxd_norm_to_shared<D, T>([&](int k) { return static_cast<float>(x[k]); }, w_in, eps, sh, red);
        mlxd_q4_rows<D, GS>(NQKV, gw, NW, qkv_w, qkv_s, qkv_b, sh, [&](int r, float v) { ws[r] = mlxd_round<T>(v); });
    }
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    if constexpr (PHASE == 0 || PHASE == 2) {
        const int grp = tid >> 3;
        const int e = tid & 7;
        for (int it = blockIdx.x; it < H * CH; it += P) {
            const int h = it / CH;
            const int c = it % CH;
            const int g = h / (H / KVH);
            float a = 0.0f, b = 0.0f;
            if (tid < HD) {
                a = __ldcg(ws + h * HD + tid);
                b = __ldcg(ws + (H + g) * HD + tid);
                hv[tid] = __ldcg(ws + (H + KVH + g) * HD + tid);
            }
            if constexpr (QKN) {
                const float na = rsqrtf(mlxd_block_sum(a * a, red) / HD + eps);
                const float nb = rsqrtf(mlxd_block_sum(b * b, red) / HD + eps);
                if (tid < HD) {
                    a = mlxd_round<T>(mlxd_round<T>(a * na) * static_cast<float>(w_qn[tid]));
                    b = mlxd_round<T>(mlxd_round<T>(b * nb) * static_cast<float>(w_kn[tid]));
                }
            }
            if (tid < HD) { hq[tid] = a; hk[tid] = b; }
            __syncthreads();
            if (tid < RD) {
                const int half = RD / 2;
                const float theta = (float)p * rope_scale / periods[tid % half];
                float sn, cs;
                sincosf(theta, &sn, &cs);
                if (tid < half) {
                    a = mlxd_round<T>(a * cs - hq[tid + half] * sn);
                    b = mlxd_round<T>(b * cs - hk[tid + half] * sn);
                } else {
                    a = mlxd_round<T>(a * cs + hq[tid - half] * sn);
                    b = mlxd_round<T>(b * cs + hk[tid - half] * sn);
                }
            }
            __syncthreads();
            if (tid < HD) {
                hq[tid] = a;
                hk[tid] = b;
                if (h % (H / KVH) == 0 && c == 0) {
                    kw[((size_t)g * cap + p) * HD + tid] = static_cast<T>(b);
                    vw[((size_t)g * cap + p) * HD + tid] = static_cast<T>(hv[tid]);
                }
            }
            __syncthreads();
            const int len = p + 1;
            const int per = (len + CH - 1) / CH;
            const int start = c * per;
            const int end = min(len, start + per);
            float qf[DL], acc[DL];
#pragma unroll
            for (int d = 0; d < DL; ++d) { qf[d] = hq[e * DL + d] * att_scale; acc[d] = 0.0f; }
            float m = neg_inf, l = 0.0f;
            for (int j0 = start; j0 < end; j0 += 32) {
                const int j = j0 + grp;
                const bool ok = j < end;
                float kf[DL], vf[DL];
                if (ok && j == p) {
#pragma unroll
                    for (int d = 0; d < DL; ++d) { kf[d] = hk[e * DL + d]; vf[d] = hv[e * DL + d]; }
                } else {
                    const size_t at = ((size_t)g * cap + (ok ? j : start)) * HD + e * DL;
#pragma unroll
                    for (int d = 0; d < DL; ++d) { kf[d] = static_cast<float>(kc[at + d]); vf[d] = static_cast<float>(vc[at + d]); }
                }
                float s = 0.0f;
#pragma unroll
                for (int d = 0; d < DL; ++d) s = fmaf(qf[d], kf[d], s);
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                if (ok) {
                    const float mn = fmaxf(m, s);
                    const float cr = expf(m - mn);
                    const float pr = expf(s - mn);
                    l = l * cr + pr;
#pragma unroll
                    for (int d = 0; d < DL; ++d) acc[d] = fmaf(pr, vf[d], acc[d] * cr);
                    m = mn;
                }
            }
            float* mb = sh + grp * (HD + 2);
#pragma unroll
            for (int d = 0; d < DL; ++d) mb[e * DL + d] = acc[d];
            if (e == 0) { mb[HD] = m; mb[HD + 1] = l; }
            __syncthreads();
            float* part = ws + OFF_PART + (h * MLXD_CHMAX + c) * (HD + 2);
            if (tid < HD) {
                float top = neg_inf;
                for (int q = 0; q < 32; ++q) top = fmaxf(top, sh[q * (HD + 2) + HD]);
                float num = 0.0f, den = 0.0f;
                for (int q = 0; q < 32; ++q) {
                    const float mq = sh[q * (HD + 2) + HD];
                    const float f = mq == neg_inf ? 0.0f : expf(mq - top);
                    num += sh[q * (HD + 2) + tid] * f;
                    den += sh[q * (HD + 2) + HD + 1] * f;
                }
                part[tid] = num;
                if (tid == 0) { part[HD] = top; part[HD + 1] = den; }
            }
            __threadfence();
            __syncthreads();
            if (tid == 0) last = atomicAdd(sy + 64 + h, 1u) == (unsigned int)(CH - 1);
            __syncthreads();
            if (last) {
                __threadfence();
                if (tid < HD) {
                    const float* base = ws + OFF_PART + h * MLXD_CHMAX * (HD + 2);
                    float top = neg_inf;
                    for (int q = 0; q < CH; ++q) top = fmaxf(top, __ldcg(base + q * (HD + 2) + HD));
                    float num = 0.0f, den = 0.0f;
                    for (int q = 0; q < CH; ++q) {
                        const float mq = __ldcg(base + q * (HD + 2) + HD);
                        const float f = mq == neg_inf ? 0.0f : expf(mq - top);
                        num += __ldcg(base + q * (HD + 2) + tid) * f;
                        den += __ldcg(base + q * (HD + 2) + HD + 1) * f;
                    }
                    ws[OFF_ATT + h * HD + tid] = mlxd_round<T>(num / den);
                }
                if (tid == 0) atomicExch(sy + 64 + h, 0u);
            }
            __syncthreads();
        }
    }
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    if constexpr (PHASE == 0 || PHASE == 3) {
        for (int k = tid; k < H * HD; k += 256) sh[k] = __ldcg(ws + OFF_ATT + k);
        __syncthreads();
        mlxd_q4_rows<H * HD, GS>(D, gw, NW, o_w, o_s, o_b, sh, [&](int r, float v) {
            ws[OFF_H1 + r] = mlxd_round<T>(static_cast<float>(x[r]) + mlxd_round<T>(v));
        });
    }
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    if constexpr (PHASE == 0 || PHASE == 4) {
        mlxd_norm_to_shared<D, T>([&](int k) { return __ldcg(ws + OFF_H1 + k); }, w_post, eps, sh, red);
        int rows[MLXD_NR];
        float y[MLXD_NR];
        for (int r0 = gw; r0 < I; r0 += NW * 2) {
            rows[0] = r0;
            rows[1] = r0 + I;
            rows[2] = r0 + NW < I ? r0 + NW : -1;
            rows[3] = r0 + NW < I ? r0 + NW + I : -1;
            mlxd_q4<D, GS>(gu_w, gu_s, gu_b, sh, rows, y);
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < MLXD_NR; j += 2) {
                    if (rows[j] < 0) continue;
                    const float gt = mlxd_round<T>(y[j]);
                    const float up = mlxd_round<T>(y[j + 1]);
                    const float sg = mlxd_round<T>(1.0f / (1.0f + expf(-gt)));
                    ws[OFF_MLP + rows[j]] = mlxd_round<T>(mlxd_round<T>(gt * sg) * up);
                }
            }
        }
    }
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    if constexpr (PHASE == 0 || PHASE == 5) {
        for (int k = tid; k < I; k += 256) sh[k] = __ldcg(ws + OFF_MLP + k);
        __syncthreads();
        mlxd_q4_rows<I, GS>(D, gw, NW, d_w, d_s, d_b, sh, [&](int r, float v) {
            out[r] = static_cast<T>(__ldcg(ws + OFF_H1 + r) + mlxd_round<T>(v));
        });
    }
"#;

const INPUTS: [&str; 23] = [
    "x", "pos", "w_in", "w_post", "w_qn", "w_kn", "qkv_w", "qkv_s", "qkv_b", "o_w", "o_s", "o_b", "gu_w", "gu_s",
    "gu_b", "d_w", "d_s", "d_b", "kc", "vc", "periods", "work", "sync",
];

thread_local! {
    static KERNEL: RefCell<Option<CudaKernel>> = const { RefCell::new(None) };
}

/// One block's arrays, in the kernel's input order from `w_in` to `d_b`.
#[derive(Debug)]
struct Layer {
    arrays: [Array; 16],
}

/// Everything the fused step needs of a model, taken when it loads (views of its arrays).
#[derive(Debug)]
pub struct FusedDecode {
    layers: Vec<Layer>,
    periods: Array,
    dtype: Dtype,
    template: Vec<(&'static str, TemplateArg)>,
    dims: Dims,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Dims {
    d: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    inter: i32,
}

impl Dims {
    /// Floats of a sequence's scratch space (see the offsets at the top of the kernel).
    fn work_floats(&self) -> i32 {
        (self.heads + 2 * self.kv_heads) * self.head_dim
            + self.heads * self.head_dim
            + self.heads * CHUNKS_MAX * (self.head_dim + 2)
            + self.d
            + self.inter
    }

    /// Floats of the kernel's main shared buffer.
    fn shared_floats(&self) -> i32 {
        self.d.max(self.heads * self.head_dim).max(self.inter).max(32 * (self.head_dim + 2))
    }
}

/// A sequence's scratch floats and barrier counters, written in place by the kernel (so never
/// shared between two sequences: [`SequenceCache`] keeps it behind an `Arc` and a clone makes
/// its own).
#[derive(Debug)]
pub struct Workspace {
    work: Array,
    sync: Array,
}

/// What the parts of a block are, if the fused kernel takes them: 4-bit affine products stacked
/// as q/k/v and gate/up, no biases.
fn quantized(m: &Matrix) -> Option<(&Array, &Array, &Array, Quant)> {
    match m {
        Matrix::Quantized { weight, scales, biases, quant } => Some((weight, scales, biases, *quant)),
        Matrix::Dense { .. } => None,
    }
}

impl FusedDecode {
    /// The fused step for `blocks`, when the kernel takes them (and the switch is on): `None`
    /// otherwise, and the model decodes through MLX's operations as before.
    pub(super) fn build(blocks: &[Block], rope: &Rope, args: &super::config::ModelArgs) -> Option<Self> {
        if !SWITCH.available() || blocks.is_empty() {
            return None;
        }
        let dims = Dims {
            d: args.hidden,
            heads: args.heads,
            kv_heads: args.kv_heads,
            head_dim: args.head_dim,
            inter: args.intermediate,
        };
        let (rope_dims, periods, rope_scale) = rope.periods();
        let shapes_ok = dims.d % 32 == 0
            && (dims.heads * dims.head_dim) % 32 == 0
            && dims.inter % 32 == 0
            && dims.head_dim % 8 == 0
            && dims.head_dim <= 256
            && rope_dims <= dims.head_dim
            && rope_dims % 2 == 0
            && dims.kv_heads > 0
            && dims.heads % dims.kv_heads == 0
            && dims.heads + 64 <= SYNC_WORDS
            && (dims.shared_floats() + 3 * dims.head_dim) * 4 <= SHARED_MAX;
        if !shapes_ok {
            return None;
        }
        let mut layers = Vec::with_capacity(blocks.len());
        let mut dtype = None;
        let mut group = None;
        for b in blocks {
            let parts = b.fused_parts()?;
            let norm = |n: &RmsNorm| n.weight.clone();
            let (qkv, o, gu, down) =
                (quantized(parts.qkv)?, quantized(parts.o)?, quantized(parts.gate_up)?, quantized(parts.down)?);
            for (_, s, _, q) in [&qkv, &o, &gu, &down] {
                let ok =
                    q.bits == 4 && matches!(q.group_size, 32 | 64 | 128) && group.is_none_or(|g| g == q.group_size);
                if !ok || dtype.is_some_and(|d| d != s.dtype()) {
                    return None;
                }
                group = Some(q.group_size);
                dtype = Some(s.dtype());
            }
            // Without q/k norms (`QKN` false) the kernel never reads these two inputs.
            let (q_norm, k_norm) = match (parts.q_norm, parts.k_norm) {
                (Some(q), Some(k)) if args.qk_norm => (norm(q), norm(k)),
                (None, None) if !args.qk_norm => (norm(parts.input_norm), norm(parts.input_norm)),
                _ => return None,
            };
            let arrays = [
                norm(parts.input_norm),
                norm(parts.post_norm),
                q_norm,
                k_norm,
                qkv.0.clone(),
                qkv.1.clone(),
                qkv.2.clone(),
                o.0.clone(),
                o.1.clone(),
                o.2.clone(),
                gu.0.clone(),
                gu.1.clone(),
                gu.2.clone(),
                down.0.clone(),
                down.1.clone(),
                down.2.clone(),
            ];
            layers.push(Layer { arrays });
        }
        let dtype = dtype?;
        if !matches!(dtype, Dtype::Bfloat16 | Dtype::Float16 | Dtype::Float32)
            || layers.iter().any(|l| l.arrays[..4].iter().any(|a| a.dtype() != dtype))
        {
            return None;
        }
        let template = template(dims, dtype, rope_dims, group?, args.qk_norm, args.eps, rope_scale);
        let n = periods.len() as i32;
        let periods = Array::from_slice(&periods, &[n]);
        periods.eval().ok()?;
        Some(FusedDecode { layers, periods, dtype, template, dims })
    }

    /// Whether the step takes `x` (`[1, D]` of the model's dtype).
    pub fn takes(&self, x: &Array) -> bool {
        x.dtype() == self.dtype && x.shape() == [1, self.dims.d]
    }

    /// One decode step through every block: `x` is the embedded token (`[1, D]`), `cache` the
    /// sequence's, which moves on by one position. Returns the last block's output.
    pub fn decode(&self, x: &Array, cache: &mut SequenceCache) -> Result<Array> {
        let work = cache.fused_workspace(self.dims.work_floats() as usize, || self.workspace())?;
        let at = cache.offset();
        let pos = Array::from_slice(&[at], &[1]);
        let mut h = x.clone();
        let emulated = crate::ffi::emulating();
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (kc, vc) = lc.fused_storage(self.dims.kv_heads, self.dims.head_dim, self.dtype)?;
            let mut inputs: Vec<&Array> = Vec::with_capacity(INPUTS.len());
            inputs.push(&h);
            inputs.push(&pos);
            inputs.extend(layer.arrays.iter());
            inputs.extend([&kc, &vc, &self.periods, &work.work, &work.sync]);
            // Phases launched one by one are ordered only because the emulator runs each at once: MLX
            // sees no dependency between them (the workspace is written in place).
            let phases: &[i32] = if emulated { &[1, 2, 3, 4, 5] } else { &[0] };
            let grid = if emulated { EMULATED_GRID } else { GRID };
            let mut out = None;
            for &phase in phases {
                let mut template = self.template.clone();
                template.push(("PHASE", TemplateArg::Int(phase)));
                out = Some(self.apply(&inputs, &template, grid)?);
            }
            lc.advance_in_place();
            h = out.expect("one phase at least");
        }
        Ok(h)
    }

    fn apply(&self, inputs: &[&Array], template: &[(&str, TemplateArg)], grid: i32) -> Result<Array> {
        let shape = [1, self.dims.d];
        KERNEL.with(|cell| {
            let mut cell = cell.borrow_mut();
            let k = cell
                .get_or_insert_with(|| CudaKernel::new("mlxd_fused_block", &INPUTS, &["out"], HEADER, SOURCE, false));
            let out =
                k.apply(inputs, &[(&shape, self.dtype)], template, (grid * THREADS, 1, 1), (THREADS, 1, 1), || {
                    format!("the fused decode block for hidden size {}", self.dims.d)
                })?;
            Ok(out.into_iter().next().expect("one output"))
        })
    }

    fn workspace(&self) -> std::result::Result<Workspace, mlx_rs::error::Exception> {
        let work = mlx_rs::ops::zeros::<f32>(&[self.dims.work_floats()])?;
        let sync = mlx_rs::ops::zeros::<u32>(&[SYNC_WORDS])?;
        mlx_rs::transforms::eval([&work, &sync])?;
        Ok(Workspace { work, sync })
    }
}

/// The kernel's template arguments for a model (all but `PHASE`).
fn template(
    dims: Dims,
    dtype: Dtype,
    rope_dims: i32,
    group: i32,
    qk_norm: bool,
    eps: f32,
    rope_scale: f32,
) -> Vec<(&'static str, TemplateArg)> {
    let bits = |v: f32| TemplateArg::Int(v.to_bits() as i32);
    vec![
        ("T", TemplateArg::Dtype(dtype)),
        ("D", TemplateArg::Int(dims.d)),
        ("H", TemplateArg::Int(dims.heads)),
        ("KVH", TemplateArg::Int(dims.kv_heads)),
        ("HD", TemplateArg::Int(dims.head_dim)),
        ("RD", TemplateArg::Int(rope_dims)),
        ("I", TemplateArg::Int(dims.inter)),
        ("GS", TemplateArg::Int(group)),
        ("QKN", TemplateArg::Bool(qk_norm)),
        ("SH", TemplateArg::Int(dims.shared_floats())),
        ("EPS_BITS", bits(eps)),
        ("ROPE_SCALE_BITS", bits(rope_scale)),
        ("ATT_SCALE_BITS", bits((dims.head_dim as f32).powf(-0.5))),
    ]
}

/// One fused step of a one-block model of these dimensions (4-bit, groups of 64) on zeros, at
/// position 3: for recording the kernel MLX would compile for a model shape
/// (`mlxd-bench kernel-sources`, whose NVRTC check compiles it) without loading the model.
pub fn queue_for_shape(
    d: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    inter: i32,
    qk_norm: bool,
    dtype: Dtype,
) -> std::result::Result<Array, mlx_rs::error::Exception> {
    let dims = Dims { d, heads, kv_heads, head_dim, inter };
    let zeros = |shape: &[i32], t: Dtype| mlx_rs::ops::zeros_dtype(shape, t);
    let q4 = |rows: i32, cols: i32| -> std::result::Result<[Array; 3], mlx_rs::error::Exception> {
        Ok([
            zeros(&[rows, cols / 8], Dtype::Uint32)?,
            zeros(&[rows, cols / 64], dtype)?,
            zeros(&[rows, cols / 64], dtype)?,
        ])
    };
    let [qw, qs, qb] = q4((heads + 2 * kv_heads) * head_dim, d)?;
    let [ow, os, ob] = q4(d, heads * head_dim)?;
    let [gw, gs, gb] = q4(2 * inter, d)?;
    let [dw, ds, db] = q4(d, inter)?;
    let arrays = [
        zeros(&[d], dtype)?,
        zeros(&[d], dtype)?,
        zeros(&[head_dim], dtype)?,
        zeros(&[head_dim], dtype)?,
        qw,
        qs,
        qb,
        ow,
        os,
        ob,
        gw,
        gs,
        gb,
        dw,
        ds,
        db,
    ];
    let periods: Vec<f32> = (0..head_dim / 2).map(|i| 10_000f32.powf(2.0 * i as f32 / head_dim as f32)).collect();
    let fused = FusedDecode {
        layers: vec![Layer { arrays }],
        periods: Array::from_slice(&periods, &[head_dim / 2]),
        dtype,
        template: template(dims, dtype, head_dim, 64, qk_norm, 1e-6, 1.0),
        dims,
    };
    let mut cache = SequenceCache::new(1);
    let x = zeros(&[1, d], dtype)?;
    for _ in 0..3 {
        cache.layers[0].fused_storage(kv_heads, head_dim, dtype)?;
        cache.layers[0].advance_in_place();
    }
    fused.decode(&x, &mut cache).map_err(|e| mlx_rs::error::Exception::custom(e.to_string()))
}

impl Workspace {
    /// Floats of scratch space (to tell one model's workspace from another's).
    fn floats(&self) -> usize {
        self.work.size()
    }
}

impl SequenceCache {
    /// This sequence's workspace, made on first use and whenever the one it holds is shared
    /// (the cache was cloned) or sized for another model.
    fn fused_workspace(
        &mut self,
        floats: usize,
        make: impl FnOnce() -> std::result::Result<Workspace, mlx_rs::error::Exception>,
    ) -> std::result::Result<Arc<Workspace>, mlx_rs::error::Exception> {
        match &self.fused_work {
            Some(w) if Arc::strong_count(w) == 1 && w.floats() == floats => Ok(w.clone()),
            _ => {
                let w = Arc::new(make()?);
                self.fused_work = Some(w.clone());
                Ok(w)
            }
        }
    }
}
