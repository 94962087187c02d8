//! Every decoder block of a decode step in one CUDA kernel launch, for 4-bit models on MLX's
//! CUDA backend: one sequence (on by default where it times faster), or a stacked batch of up to
//! [`BATCH_MAX`] rows (the server's step when several clients decode at once; also where it
//! times faster, `MLXD_FUSED_BATCH=0` turns it off).
//!
//! Why: a small model's single-stream decode on a GPU is bound by the host, not the device. MLX
//! 0.32 spends a few microseconds of host time on every node of a step's graph, and a Qwen3-0.6B
//! step is ~17 nodes per layer (~600 in all), so its 4-bit decode ran at under 4% of what the
//! card's memory bandwidth allows. Fusing pieces of a block into a few custom kernels does not
//! help (session 7: an MLX custom-kernel call costs the host about what 1.5 built-in nodes do),
//! so here the block is **one** node: the kernel's blocks work through the block's phases and
//! meet at grid-wide barriers between them. Since session 20 one launch runs all the decoder
//! blocks (`NL` of them, one more barrier between two): a step is one node, not one per block,
//! which took the host's share of a 4-bit Qwen3-0.6B step on an H200 from 0.77 to 0.34 ms and
//! the kernel boundaries (a launch's gap, and its blocks starting one after another) out of the
//! device's time. `MLXD_FUSED_LAYERS=N` runs N blocks per launch instead.
//!
//! Phases (`P` participating blocks of 256 threads, each warp taking whole rows of a product):
//! 1. RMS norm of each row of `x` (every block, into shared memory), then the stacked q/k/v
//!    product.
//! 2. Per (row, query head, chunk of positions): q/k norms (Qwen3), RoPE at the row's position,
//!    the new key and value written into the cache at column `pos` (a batch's rows are
//!    left-padded to one column; row b's live columns start at `starts[b]`), attention over the
//!    chunk with an online softmax; the last block to finish a head merges its chunks (a ticket
//!    per row and head, no barrier).
//! 3. The output projection plus the residual.
//! 4. RMS norm, the stacked gate/up product and SwiGLU.
//! 5. The down projection plus the residual, into the block's output: the launch's output for
//!    its last block, else one of two workspace buffers (block l writes buffer l % 2, which
//!    block l + 1 reads as its `x`).
//!
//! A launch's blocks reach their arrays through `mlxd_select(l)`: kernel parameters cannot be
//! indexed by a loop counter, so the body starts with a switch over the launch's blocks
//! (written for `NL` by [`layer_table`]) that puts block l's 18 arrays in shared memory.
//!
//! Two kernel texts: one row (`SOURCE_ONE`, session 15's, floats in static shared memory)
//! and batches (`SOURCE`: the rows' inputs in the model's dtype in dynamic shared memory, each
//! weight unpacked once for all rows, variants for 2, 4 and 8 rows). Running one row through the
//! batched text cost 20% of the single stream on the H100 (session 16), so the one-row text
//! stays as measured, and the attention phase is written in both.
//!
//! Intermediate values are rounded to the model's dtype wherever MLX's own step materializes an
//! array, so the fused step follows MLX's arithmetic closely (`tests/emulated_kernels.rs` checks
//! both kernels against the unfused step).
//!
//! Grid barriers need every participating block resident at once. The kernel launches
//! [`GRID`] blocks and only the first `P` take part (the SM count read on the device, `%nsmid`,
//! over the template's `SMDIV`); the rest return at once. Either kernel counts on one block per
//! SM, no more: `P` is every SM in a process that serves one model ([`set_one_model`]: nothing
//! else runs such a kernel beside it), else half of them, so that two models' kernels side by
//! side (two streams) are always all resident. At most two models hold the kernel at once
//! ([`MODELS_MAX`]). Two blocks of the batched kernel on one SM would fit by its registers and
//! shared memory, but on an H200 (session 19) a launch of two per SM never opened its first
//! barrier: the driver does not promise that residency, so nothing here relies on it. A barrier
//! that never opens ends the kernel with a trap after a few seconds instead of hanging the
//! daemon (the CUDA context is lost with it).
//!
//! State written in place (MLX sees these as inputs): the key/value cache (so the cache storage
//! must be the sequence's own, see `LayerCache::fused_storage`; a batch's stack always is, see
//! `BatchCache::storage`), and a workspace of scratch floats and barrier counters per sequence
//! or batch ([`Workspace`]). The emulator (`crate::cuda_emulator`) runs blocks one after
//! another, so there each phase of each decoder block is a launch of its own (`PHASE` 1-5 over
//! the `span` input's one block; 0 is all of them with the barriers, what the GPU runs), the
//! launches standing in for the barriers.

use super::layers::{Matrix, Quant, RmsNorm, Rope};
use super::transformer::Block;
use super::ModelError;
use crate::cache::{BatchCache, LayerCache, SequenceCache};
use crate::ffi::{CudaKernel, KernelSwitch, TemplateArg};
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;
use std::sync::Arc;

type Result<T> = std::result::Result<T, ModelError>;

static SWITCH: KernelSwitch = KernelSwitch::new("MLXD_FUSED_DECODE");
/// Batched steps (on unless `MLXD_FUSED_BATCH=0`). Session 16 kept them opt-in after one
/// load-time check in four disagreed (6.5%); session 17 (`mlxd-bench fused-check`, 150 repeats
/// per batch size on an H100) found the kernel answering the same input identically every time,
/// and MLX's own operations, the reference, answering an 8-row step differently once in 30-60
/// repeats (4-8% of the largest logit), so a disagreement is now checked once more.
static BATCH_SWITCH: KernelSwitch = KernelSwitch::new("MLXD_FUSED_BATCH");

/// Turns the fused kernel for batched steps on or off (see `MLXD_FUSED_BATCH`); it is checked
/// and timed at load only while on.
pub fn set_batches_enabled(enabled: bool) {
    BATCH_SWITCH.set(enabled);
}

/// Whether batched steps may take the fused kernel.
pub fn batches_enabled() -> bool {
    BATCH_SWITCH.available()
}

/// `MLXD_FUSED_BATCH=force`: batched steps take the fused kernel wherever it agrees with MLX's
/// operations at load, without the load-time timing deciding (for measuring it in serving).
pub fn batches_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("MLXD_FUSED_BATCH").is_ok_and(|v| v == "force"))
}

/// Turns the fused decode step on or off for the whole process (on unless
/// `MLXD_FUSED_DECODE=0`); it runs only where MLX runs on CUDA.
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

/// Whether the switch is on now (it can be flipped while a model is loaded, to compare).
pub fn enabled() -> bool {
    SWITCH.available()
}

/// Blocks launched per layer; at most the SM count take part (half of it where two models may
/// hold the kernel).
pub const GRID: i32 = 160;
/// Blocks launched per phase when emulated (no SM count there: all of them take part).
const EMULATED_GRID: i32 = 12;
/// Threads per block (eight warps; the bodies' `NT`). Session 20 tried 512 on an H200: the
/// batched kernel then needed more registers than an SM has for a block of 512 (the launch
/// failed), and one row ran 2-4% slower.
const THREADS: i32 = 256;
/// Chunks of positions one head's attention is split into, at most.
const CHUNKS_MAX: i32 = 16;
/// Dynamic shared memory the kernel may take, bytes: the rows' inputs of a product, as the
/// model's dtype (one block per SM; consumer cards let a block take up to 99 KB, data-center
/// ones more).
const SHARED_MAX: i32 = 96 * 1024;
/// Static shared memory the one-row kernel may use, bytes (the 48 KB limit, with room for the
/// rest).
const ONE_ROW_SHARED_MAX: i32 = 46 * 1024;
/// Rows (sequences) one step of the kernel takes at most.
pub const BATCH_MAX: i32 = 8;
/// Where the timing counters start in the barrier words (see [`TIMING_COUNTERS`]).
const TIMING_AT: i32 = 64 + 64 * BATCH_MAX;
/// 64-bit counters of `MLXD_FUSED_TIMING=1`: decoder blocks run, then the nanoseconds of each
/// stretch of block 0 (phase 1, barrier, phase 2, barrier, phase 3, barrier, phase 4, barrier,
/// phase 5), the barriers between blocks of a launch and how many, the gaps between launches and
/// how many; the last holds the latest block's end.
const TIMING_COUNTERS: i32 = 16;
/// Barrier words: arrivals at 0, generation at 32, one ticket per (row, query head) from 64,
/// then the timing counters.
const SYNC_WORDS: i32 = TIMING_AT + 2 * TIMING_COUNTERS;

/// Device helpers both kernel texts start with: the SM count, rounding to the model's dtype,
/// a block-wide sum, the grid barrier and the RMS norm into shared memory.
macro_rules! common_header {
    () => {
        r#"
#define MLXD_CHMAX 16
__device__ inline unsigned int mlxd_nsmid() {
    unsigned int n;
    asm volatile("mov.u32 %0, %%nsmid;" : "=r"(n));
    return n;
}
__device__ inline unsigned long long mlxd_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// MLXD_FUSED_TIMING=1: block 0's thread 0 adds each stretch's nanoseconds to the counters ctr
// (k 0 starts a decoder block and counts the gap since the last one's end: at 10-11 when it
// follows a block of the same launch (the barrier between them), at 12-13 when it starts a
// launch; 1-9 end a stretch).
__device__ inline void mlxd_stamp(unsigned long long* ctr, int k, unsigned long long& t_prev, bool first) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const unsigned long long t = mlxd_now();
    if (k == 0) {
        ctr[0] += 1;
        const unsigned long long end = ctr[15];
        const int at = first ? 12 : 10;
        if (end != 0 && t > end && t - end < 1000000ull) { ctr[at] += t - end; ctr[at + 1] += 1; }
    } else {
        ctr[k] += t - t_prev;
    }
    if (k == 9) ctr[15] = t;
    t_prev = t;
}
template <typename T>
__device__ inline float mlxd_round(float v) { return static_cast<float>(static_cast<T>(v)); }
// The body's stamp(k) (MLXD_FUSED_TIMING=1, see mlxd_stamp).
#define MLXD_TIMING_STAMPS \
    unsigned long long* ctr = reinterpret_cast<unsigned long long*>(const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync)) + TIMING_AT); \
    unsigned long long t_prev = 0; \
    auto stamp = [&](int k, bool first = false) { if constexpr (TIMED && PHASE == 0) mlxd_stamp(ctr, k, t_prev, first); };
// A launch takes NL consecutive decoder blocks; mlxd_select(l) (the body's MLXD_LAYER_TABLE,
// written for NL by fused.rs) puts block l's arrays in lp (shared memory), in LAYER_INPUTS'
// order, and each phase takes the ones it reads.
#define MLXD_P(i, type) static_cast<const type*>(lp[i])
#define MLXD_LAYER_POINTERS_1 const T* w_in = MLXD_P(0, T); const uint32_t* qkv_w = MLXD_P(4, uint32_t); const T* qkv_s = MLXD_P(5, T); const T* qkv_b = MLXD_P(6, T);
#define MLXD_LAYER_POINTERS_2 const T* w_qn = MLXD_P(2, T); const T* w_kn = MLXD_P(3, T); const T* kc = MLXD_P(16, T); const T* vc = MLXD_P(17, T); T* kw = const_cast<T*>(kc); T* vw = const_cast<T*>(vc);
#define MLXD_LAYER_POINTERS_3 const uint32_t* o_w = MLXD_P(7, uint32_t); const T* o_s = MLXD_P(8, T); const T* o_b = MLXD_P(9, T);
#define MLXD_LAYER_POINTERS_4 const T* w_post = MLXD_P(1, T); const uint32_t* gu_w = MLXD_P(10, uint32_t); const T* gu_s = MLXD_P(11, T); const T* gu_b = MLXD_P(12, T);
#define MLXD_LAYER_POINTERS_5 const uint32_t* d_w = MLXD_P(13, uint32_t); const T* d_s = MLXD_P(14, T); const T* d_b = MLXD_P(15, T);
// Sum of v over the block; red: a float of shared memory per warp.
template <int NT>
__device__ inline float mlxd_block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
    for (int w = 0; w < NT / 32; ++w) t += red[w];
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
// RMS norm of D values (load(k) gives value k, a value of T) times w, each rounded to T where
// MLX rounds, into sh (floats, or the model's dtype: exact either way); every thread of the
// block calls it.
template <int NT, int D, typename T, typename XS, typename L, typename Wn>
__device__ inline void mlxd_norm_to_shared(L load, const Wn* w, float eps, XS* sh, float* red) {
    float ss = 0.0f;
    for (int k = threadIdx.x; k < D; k += NT) { const float v = load(k); sh[k] = static_cast<XS>(v); ss += v * v; }
    const float n = rsqrtf(mlxd_block_sum<NT>(ss, red) / D + eps);
    for (int k = threadIdx.x; k < D; k += NT)
        sh[k] = static_cast<XS>(mlxd_round<T>(mlxd_round<T>(static_cast<float>(sh[k]) * n) * static_cast<float>(w[k])));
    __syncthreads();
}
"#
    };
}

// The one-sequence kernel, as session 15 measured it (690 tok/s on 4-bit Qwen3-0.6B, H100).
// Session 16 ran one row through the batched kernel below instead and lost 20% (run 5: 569
// against 708 tok/s, same card, same run), so one row keeps its own text, floats in static
// shared memory, four rows per warp.
const HEADER_ONE: &str = concat!(
    common_header!(),
    r#"
#define MLXD_NR 4
// NR rows of a 4-bit affine product (rows[j] < 0: none) with xs (K floats, shared
// memory): one warp, each lane 32 elements (one 16-byte load) of every row at a time, so a
// warp keeps NR * 512 bytes of weights in flight per step; lanes read their eight float4s
// of xs in rotated order, which keeps a quarter-warp's reads on distinct banks. The sums land
// in y on every lane.
template <int K, int GS, int NR, typename W, typename S>
__device__ inline void mlxd_q4(const W* w, const S* s, const S* b, const float* xs, const int* rows, float* y) {
    const int lane = threadIdx.x & 31;
    constexpr int C = K / 32;
    float acc[NR];
#pragma unroll
    for (int j = 0; j < NR; ++j) acc[j] = 0.0f;
#pragma unroll
    for (int c0 = 0; c0 < C; c0 += 32) {
        const int c = c0 + lane;
        if (c < C) {
            uint4 q[NR];
            float sc[NR], bi[NR], d[NR];
            const int g = (32 * c) / GS;
#pragma unroll
            for (int j = 0; j < NR; ++j) {
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
                for (int j = 0; j < NR; ++j) {
                    const unsigned int wd = (u >> 1) == 0 ? q[j].x : (u >> 1) == 1 ? q[j].y : (u >> 1) == 2 ? q[j].z : q[j].w;
                    d[j] = fmaf((float)((wd >> sh) & 15u), xv.x, d[j]);
                    d[j] = fmaf((float)((wd >> (sh + 4)) & 15u), xv.y, d[j]);
                    d[j] = fmaf((float)((wd >> (sh + 8)) & 15u), xv.z, d[j]);
                    d[j] = fmaf((float)((wd >> (sh + 12)) & 15u), xv.w, d[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < NR; ++j) acc[j] += sc[j] * d[j] + bi[j] * sx;
        }
    }
#pragma unroll
    for (int j = 0; j < NR; ++j) {
        float v = acc[j];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        y[j] = v;
    }
}
// Rows r0, r0 + NW, ... (NR of them, those below R) of a 4-bit product with xs: put(row, sum)
// on the warp's lane 0.
template <int K, int GS, int NR, typename W, typename S, typename F>
__device__ inline void mlxd_q4_group(int r0, int R, int NW, const W* w, const S* s, const S* b, const float* xs, F& put) {
    int rows[NR];
    float y[NR];
#pragma unroll
    for (int j = 0; j < NR; ++j) rows[j] = r0 + j * NW < R ? r0 + j * NW : -1;
    mlxd_q4<K, GS, NR>(w, s, b, xs, rows, y);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int j = 0; j < NR; ++j) if (rows[j] >= 0) put(rows[j], y[j]);
    }
}
// Rows 0..R of a 4-bit product with xs, MLXD_NR rows per warp at a time (warp gw of NW). A warp
// with one or two rows left takes just those (FIT): a product with no more rows than warps (the
// output and down projections), or not many more (q/k/v of a Llama-3.2-1B shape), would
// otherwise compute empty rows beside them.
template <int K, int GS, bool FIT, typename W, typename S, typename F>
__device__ inline void mlxd_q4_rows(int R, int gw, int NW, const W* w, const S* s, const S* b, const float* xs, F put) {
    for (int r0 = gw; r0 < R; r0 += NW * MLXD_NR) {
        const int left = (R - r0 + NW - 1) / NW;
        if (FIT && left == 1) {
            mlxd_q4_group<K, GS, 1>(r0, R, NW, w, s, b, xs, put);
        } else if (FIT && left == 2) {
            mlxd_q4_group<K, GS, 2>(r0, R, NW, w, s, b, xs, put);
        } else {
            mlxd_q4_group<K, GS, MLXD_NR>(r0, R, NW, w, s, b, xs, put);
        }
    }
}
"#
);

const SOURCE_ONE: &str = r#"
    constexpr int NQKV = (H + 2 * KVH) * HD;
    constexpr int OFF_ATT = NQKV;
    constexpr int OFF_PART = OFF_ATT + H * HD;
    constexpr int OFF_H1 = OFF_PART + H * MLXD_CHMAX * (HD + 2);
    constexpr int OFF_MLP = OFF_H1 + D;
    // Two buffers of a block's output between blocks of one launch (block l writes l % 2).
    constexpr int OFF_HB = OFF_MLP + I;
    constexpr int DL = HD / 8;
    const float eps = __int_as_float(EPS_BITS);
    const float rope_scale = __int_as_float(ROPE_SCALE_BITS);
    const float att_scale = __int_as_float(ATT_SCALE_BITS);
    const float neg_inf = __int_as_float(0xff800000);
    __shared__ __align__(16) float sh[SH];
    __shared__ float hq[HD];
    __shared__ float hk[HD];
    __shared__ float hv[HD];
    __shared__ float red[NT / 32];
    __shared__ int last;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    unsigned int P = gridDim.x;
    if constexpr (PHASE == 0) {
        const unsigned int part = mlxd_nsmid() / SMDIV;
        P = min(P, part > 0 ? part : 1u);
    }
    if (blockIdx.x >= P) return;
    MLXD_TIMING_STAMPS
    // Warps: this one's place among all taking part, and how many.
    const int gw = blockIdx.x * (NT / 32) + warp;
    const int NW = (int)P * (NT / 32);
    const int p = pos[0];
    const int cap = kc_0_shape[2];
    const int CH = min(MLXD_CHMAX, max(1, (int)P / H));
    float* ws = const_cast<float*>(work);
    unsigned int* sy = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));
    MLXD_LAYER_TABLE
    for (int li = span[0]; li < span[1]; ++li) {
    mlxd_select(li);
    stamp(0, li == span[0]);
    // Decoder block li of the launch (the attention's running sum is an l of its own). Its
    // input: x for the launch's first block, else the previous block's output.
    const float* hin = ws + OFF_HB + ((li + 1) & 1) * D;
    auto x_at = [&](int k) { return li == 0 ? static_cast<float>(x[k]) : __ldcg(hin + k); };
    if constexpr (PHASE == 0 || PHASE == 1) {
        MLXD_LAYER_POINTERS_1
        mlxd_norm_to_shared<NT, D, T>(x_at, w_in, eps, sh, red);
        mlxd_q4_rows<D, GS, NR1>(NQKV, gw, NW, qkv_w, qkv_s, qkv_b, sh, [&](int r, float v) { ws[r] = mlxd_round<T>(v); });
    }
    stamp(1);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(2);
    if constexpr (PHASE == 0 || PHASE == 2) {
        MLXD_LAYER_POINTERS_2
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
                const float na = rsqrtf(mlxd_block_sum<NT>(a * a, red) / HD + eps);
                const float nb = rsqrtf(mlxd_block_sum<NT>(b * b, red) / HD + eps);
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
            for (int j0 = start; j0 < end; j0 += NT / 8) {
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
                for (int q = 0; q < NT / 8; ++q) top = fmaxf(top, sh[q * (HD + 2) + HD]);
                float num = 0.0f, den = 0.0f;
                for (int q = 0; q < NT / 8; ++q) {
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
    stamp(3);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(4);
    if constexpr (PHASE == 0 || PHASE == 3) {
        MLXD_LAYER_POINTERS_3
        for (int k = tid; k < H * HD; k += NT) sh[k] = __ldcg(ws + OFF_ATT + k);
        __syncthreads();
        mlxd_q4_rows<H * HD, GS, NR1>(D, gw, NW, o_w, o_s, o_b, sh, [&](int r, float v) {
            ws[OFF_H1 + r] = mlxd_round<T>(x_at(r) + mlxd_round<T>(v));
        });
    }
    stamp(5);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(6);
    if constexpr (PHASE == 0 || PHASE == 4) {
        MLXD_LAYER_POINTERS_4
        mlxd_norm_to_shared<NT, D, T>([&](int k) { return __ldcg(ws + OFF_H1 + k); }, w_post, eps, sh, red);
        int rows[MLXD_NR];
        float y[MLXD_NR];
        for (int r0 = gw; r0 < I; r0 += NW * 2) {
            rows[0] = r0;
            rows[1] = r0 + I;
            rows[2] = r0 + NW < I ? r0 + NW : -1;
            rows[3] = r0 + NW < I ? r0 + NW + I : -1;
            // A warp's last gate/up pair alone, not beside an empty one (NR1).
            if (NR1 && rows[2] < 0) {
                mlxd_q4<D, GS, 2>(gu_w, gu_s, gu_b, sh, rows, y);
            } else {
                mlxd_q4<D, GS, MLXD_NR>(gu_w, gu_s, gu_b, sh, rows, y);
            }
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
    stamp(7);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(8);
    if constexpr (PHASE == 0 || PHASE == 5) {
        MLXD_LAYER_POINTERS_5
        for (int k = tid; k < I; k += NT) sh[k] = __ldcg(ws + OFF_MLP + k);
        __syncthreads();
        float* hout = ws + OFF_HB + (li & 1) * D;
        mlxd_q4_rows<I, GS, NR1>(D, gw, NW, d_w, d_s, d_b, sh, [&](int r, float v) {
            const float o = __ldcg(ws + OFF_H1 + r) + mlxd_round<T>(v);
            if (li == NL - 1) out[r] = static_cast<T>(o); else hout[r] = mlxd_round<T>(o);
        });
    }
    stamp(9);
    if constexpr (PHASE == 0) { if (li + 1 < span[1]) mlxd_grid_sync(sy, P); }
    }
"#;

/// Each decoder block's inputs, in `mlxd_select`'s order (`lp[i]`): its 16 arrays from `w_in`
/// to `d_b` ([`Layer`]), then its key and value cache.
const LAYER_INPUTS: [&str; 18] = [
    "w_in", "w_post", "w_qn", "w_kn", "qkv_w", "qkv_s", "qkv_b", "o_w", "o_s", "o_b", "gu_w", "gu_s", "gu_b", "d_w",
    "d_s", "d_b", "kc", "vc",
];

/// A kernel's inputs for `nl` blocks per launch: `first` (x, pos and for batches starts), the
/// launch's span of blocks, each block's [`LAYER_INPUTS`] suffixed with its index in the launch,
/// then what every block shares.
fn input_names(first: &[&str], nl: usize) -> Vec<String> {
    let mut names: Vec<String> = first.iter().map(|n| n.to_string()).collect();
    names.push("span".into());
    for l in 0..nl {
        names.extend(LAYER_INPUTS.iter().map(|n| format!("{n}_{l}")));
    }
    names.extend(["periods", "work", "sync"].map(String::from));
    names
}

/// The body's `MLXD_LAYER_TABLE` for `nl` blocks per launch: `lp`, and `mlxd_select(l)`, which
/// has thread 0 put block l's arrays there (a switch over the launch's blocks: the arrays are
/// kernel parameters, which a loop cannot index) and the block wait for them.
fn layer_table(nl: usize) -> String {
    let mut t = String::from(
        "__shared__ const void* lp[18];\nauto mlxd_select = [&](int l) {\nif (threadIdx.x == 0) {\nswitch (l) {\n",
    );
    for l in 0..nl {
        t.push_str(&format!("case {l}:"));
        for (i, n) in LAYER_INPUTS.iter().enumerate() {
            t.push_str(&format!(" lp[{i}] = {n}_{l};"));
        }
        t.push_str(" break;\n");
    }
    t.push_str("}\n}\n__syncthreads();\n};\n");
    t
}

// The batched kernel (2 to 8 rows, `B` the most a variant takes).
const HEADER: &str = concat!(
    common_header!(),
    r#"
#ifdef MLXD_EMULATED
#define MLXD_DYNAMIC_SHARED(name, bytes) static __align__(16) unsigned char name[bytes]
#else
#define MLXD_DYNAMIC_SHARED(name, bytes) extern __shared__ __align__(16) unsigned char name[]
#endif
// Eight consecutive values of T (16-byte aligned) as floats.
template <typename T>
__device__ inline void mlxd_load8(const T* p, float* v) {
    if constexpr (sizeof(T) == 4) {
        const float4 a = reinterpret_cast<const float4*>(p)[0];
        const float4 b = reinterpret_cast<const float4*>(p)[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = static_cast<float>(t[e]);
    }
}
// Eight floats into eight consecutive values of T (16-byte aligned), one store.
template <typename T>
__device__ inline void mlxd_store8(T* p, const float* v) {
    if constexpr (sizeof(T) == 4) {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        uint4 u;
        T* t = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int e = 0; e < 8; ++e) t[e] = static_cast<T>(v[e]);
        *reinterpret_cast<uint4*>(p) = u;
    }
}
// Eight consecutive floats of the workspace (16-byte aligned), past the L1 (other blocks wrote
// them before the last grid barrier).
__device__ inline void mlxd_ldcg8(const float* p, float* v) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldcg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
// RMS norm of nb rows of D values, one warp per row (no block-wide sums, so the rows' loads
// are in flight together; session 16's kernel normed row after row, ~2 us each): load8(v, c, f)
// puts values 8c..8c+7 of row v in f. Each value is scaled and multiplied by w, rounded to T
// where MLX rounds, into sh[v * D + k]; the raw values wait in sh (exact: they are values of T).
template <int NT, int D, typename T, typename XS, typename L, typename Wn>
__device__ inline void mlxd_norm_rows(int nb, L load8, const Wn* w, float eps, XS* sh) {
    const int lane = threadIdx.x & 31;
    for (int v = threadIdx.x >> 5; v < nb; v += NT / 32) {
        XS* row = sh + v * D;
        float ss = 0.0f;
#pragma unroll 4
        for (int c = lane; c < D / 8; c += 32) {
            float f[8];
            load8(v, c, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) ss = fmaf(f[e], f[e], ss);
            mlxd_store8(row + 8 * c, f);
        }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float n = rsqrtf(ss / D + eps);
        for (int c = lane; c < D / 8; c += 32) {
            float f[8];
            mlxd_load8(row + 8 * c, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = mlxd_round<T>(mlxd_round<T>(f[e] * n) * static_cast<float>(w[8 * c + e]));
            mlxd_store8(row + 8 * c, f);
        }
    }
    __syncthreads();
}
// xs[v * N + k] = src[v * stride + k] for nb rows of N workspace floats, as XS, eight values
// per thread at a time with several loads in flight (one value per thread at a time took
// ~1 us per row at 8 rows).
template <int NT, int N, typename XS>
__device__ inline void mlxd_fill_rows(int nb, const float* src, int stride, XS* xs) {
    constexpr int N8 = N / 8;
#pragma unroll 4
    for (int i = threadIdx.x; i < nb * N8; i += NT) {
        const int v = i / N8;
        const int c = i - v * N8;
        float f[8];
        mlxd_ldcg8(src + (size_t)v * stride + 8 * c, f);
        mlxd_store8(xs + v * N + 8 * c, f);
    }
    __syncthreads();
}
// NR rows of a 4-bit affine product (rows[j] < 0: none) with nb <= B vectors of K values (xs:
// rows of K, shared memory): one warp, each lane 32 elements (one 16-byte load) of every row at a
// time, so a warp keeps NR * 512 bytes of weights in flight per step. Each lane unpacks a
// weight once for all B vectors; lanes start their four 8-value reads of xs at rotated offsets
// (fewer bank conflicts). y[j][b]: row j with vector b, on every lane.
template <int K, int GS, int NR, int B, typename T, typename W, typename S>
__device__ inline void mlxd_q4(const W* w, const S* s, const S* b, const T* xs, int nb, const int* rows, float (*y)[B]) {
    const int lane = threadIdx.x & 31;
    constexpr int C = K / 32;
    float acc[NR][B];
#pragma unroll
    for (int j = 0; j < NR; ++j)
#pragma unroll
        for (int v = 0; v < B; ++v) acc[j][v] = 0.0f;
#pragma unroll
    for (int c0 = 0; c0 < C; c0 += 32) {
        const int c = c0 + lane;
        if (c < C) {
            uint4 q[NR];
            float sc[NR], bi[NR];
            const int g = (32 * c) / GS;
#pragma unroll
            for (int j = 0; j < NR; ++j) {
                const bool ok = rows[j] >= 0;
                const int r = ok ? rows[j] : 0;
                q[j] = ok ? reinterpret_cast<const uint4*>(w + (size_t)r * (K / 8))[c] : make_uint4(0u, 0u, 0u, 0u);
                sc[j] = ok ? static_cast<float>(s[(size_t)r * (K / GS) + g]) : 0.0f;
                bi[j] = ok ? static_cast<float>(b[(size_t)r * (K / GS) + g]) : 0.0f;
            }
            float d[NR][B], sx[B];
#pragma unroll
            for (int v = 0; v < B; ++v) {
                sx[v] = 0.0f;
#pragma unroll
                for (int j = 0; j < NR; ++j) d[j][v] = 0.0f;
            }
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const int u = (t + lane) & 3;
                float wf[NR][8];
#pragma unroll
                for (int j = 0; j < NR; ++j) {
                    const unsigned int wd = u == 0 ? q[j].x : u == 1 ? q[j].y : u == 2 ? q[j].z : q[j].w;
#pragma unroll
                    for (int e = 0; e < 8; ++e) wf[j][e] = (float)((wd >> (4 * e)) & 15u);
                }
#pragma unroll
                for (int v = 0; v < B; ++v) {
                    if (v >= nb) break;
                    float xv[8];
                    mlxd_load8(xs + v * K + 32 * c + 8 * u, xv);
                    sx[v] += ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
                    for (int j = 0; j < NR; ++j)
#pragma unroll
                        for (int e = 0; e < 8; ++e) d[j][v] = fmaf(wf[j][e], xv[e], d[j][v]);
                }
            }
#pragma unroll
            for (int j = 0; j < NR; ++j)
#pragma unroll
                for (int v = 0; v < B; ++v) acc[j][v] += sc[j] * d[j][v] + bi[j] * sx[v];
        }
    }
#pragma unroll
    for (int j = 0; j < NR; ++j)
#pragma unroll
        for (int v = 0; v < B; ++v) {
            float a = acc[j][v];
            for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
            y[j][v] = a;
        }
}
// Rows r0, r0 + NW, ... (NR of them, those below R) of a 4-bit product with the nb vectors of
// xs: put(row, vector, sum), each sum from one lane.
template <int K, int GS, int NR, int B, typename XS, typename W, typename S, typename F>
__device__ inline void mlxd_q4_group(int r0, int R, int NW, const W* w, const S* s, const S* b, const XS* xs, int nb, F& put) {
    const int lane = threadIdx.x & 31;
    int rows[NR];
    float y[NR][B];
#pragma unroll
    for (int j = 0; j < NR; ++j) rows[j] = r0 + j * NW < R ? r0 + j * NW : -1;
    mlxd_q4<K, GS, NR, B>(w, s, b, xs, nb, rows, y);
#pragma unroll
    for (int j = 0; j < NR; ++j)
#pragma unroll
        for (int v = 0; v < B; ++v)
            if (lane == (j * B + v) % 32 && rows[j] >= 0 && v < nb) put(rows[j], v, y[j][v]);
}
// Rows 0..R of a 4-bit product with the nb vectors of xs, NR rows per warp at a time (warp gw
// of NW). A warp with fewer rows left than NR takes just those (FIT: one, or two of four): with
// no more rows than warps (the output and down projections) each warp would otherwise compute
// NR - 1 empty rows.
template <int K, int GS, int NR, int B, bool FIT, typename XS, typename W, typename S, typename F>
__device__ inline void mlxd_q4_rows(int R, int gw, int NW, const W* w, const S* s, const S* b, const XS* xs, int nb, F put) {
    for (int r0 = gw; r0 < R; r0 += NW * NR) {
        const int left = (R - r0 + NW - 1) / NW;
        if (FIT && left == 1) {
            mlxd_q4_group<K, GS, 1, B>(r0, R, NW, w, s, b, xs, nb, put);
        } else if (FIT && NR > 2 && left == 2) {
            mlxd_q4_group<K, GS, 2, B>(r0, R, NW, w, s, b, xs, nb, put);
        } else {
            mlxd_q4_group<K, GS, NR, B>(r0, R, NW, w, s, b, xs, nb, put);
        }
    }
}
"#
);

const SOURCE: &str = r#"
    constexpr int NQKV = (H + 2 * KVH) * HD;
    constexpr int OFF_ATT = NQKV;
    constexpr int OFF_PART = OFF_ATT + H * HD;
    constexpr int OFF_H1 = OFF_PART + H * MLXD_CHMAX * (HD + 2);
    constexpr int OFF_MLP = OFF_H1 + D;
    // Two buffers of a block's output between blocks of one launch (block l writes l % 2).
    constexpr int OFF_HB = OFF_MLP + I;
    constexpr int WF = OFF_HB + 2 * D;
    // Rows of the workspace and of the inputs in shared memory are read and written eight
    // values at a time, 16-byte aligned.
    static_assert(HD % 8 == 0 && D % 8 == 0 && I % 8 == 0, "8-value loads need dimensions in multiples of 8");
    constexpr int NR = B <= 2 ? 4 : 2;
    // The rows' inputs are kept in the model's dtype (exact: MLX rounds there too), which fits
    // up to 8 rows in the shared memory.
    using XS = T;
    constexpr int DL = HD / 8;
    const float eps = __int_as_float(EPS_BITS);
    const float rope_scale = __int_as_float(ROPE_SCALE_BITS);
    const float att_scale = __int_as_float(ATT_SCALE_BITS);
    const float neg_inf = __int_as_float(0xff800000);
    MLXD_DYNAMIC_SHARED(dyn, SMEM);
    XS* xs = reinterpret_cast<XS*>(dyn);
    float* sh = reinterpret_cast<float*>(dyn);
    __shared__ float hq[HD];
    __shared__ float hk[HD];
    __shared__ float hv[HD];
    __shared__ float red[NT / 32];
    __shared__ int last;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    unsigned int P = gridDim.x;
    if constexpr (PHASE == 0) {
        // Every SM in a process serving one model, else half of them (see GRID in fused.rs).
        const unsigned int part = mlxd_nsmid() / SMDIV;
        P = min(P, part > 0 ? part : 1u);
    }
    if (blockIdx.x >= P) return;
    MLXD_TIMING_STAMPS
    // Warps: this one's place among all taking part, and how many.
    const int gw = blockIdx.x * (NT / 32) + warp;
    const int NW = (int)P * (NT / 32);
    // This call's rows: B is the most this variant takes.
    const int NB = x_shape[0];
    const int cur = pos[0];
    const int cap = kc_0_shape[2];
    const int CH = min(MLXD_CHMAX, max(1, (int)P / (NB * H)));
    float* wk = const_cast<float*>(work);
    unsigned int* sy = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));
    MLXD_LAYER_TABLE
    for (int li = span[0]; li < span[1]; ++li) {
    mlxd_select(li);
    stamp(0, li == span[0]);
    // Decoder block li of the launch (the attention's running sum is an l of its own). Row v's
    // input: x for the launch's first block, else the previous block's output.
    const int hin = OFF_HB + ((li + 1) & 1) * D;
    auto x_at = [&](int v, int k) { return li == 0 ? static_cast<float>(x[v * D + k]) : __ldcg(wk + v * WF + hin + k); };
    if constexpr (PHASE == 0 || PHASE == 1) {
        MLXD_LAYER_POINTERS_1
        mlxd_norm_rows<NT, D, T>(NB, [&](int v, int c, float* f) {
            if (li == 0) {
#pragma unroll
                for (int e = 0; e < 8; ++e) f[e] = static_cast<float>(x[v * D + 8 * c + e]);
            } else {
                mlxd_ldcg8(wk + v * WF + hin + 8 * c, f);
            }
        }, w_in, eps, xs);
        mlxd_q4_rows<D, GS, NR, B, NR1>(NQKV, gw, NW, qkv_w, qkv_s, qkv_b, xs, NB, [&](int r, int v, float y) {
            wk[v * WF + r] = mlxd_round<T>(y);
        });
    }
    stamp(1);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(2);
    if constexpr (PHASE == 0 || PHASE == 2) {
        MLXD_LAYER_POINTERS_2
        const int grp = tid >> 3;
        const int e = tid & 7;
        for (int it = blockIdx.x; it < NB * H * CH; it += P) {
            const int row = it / (H * CH);
            const int h = (it / CH) % H;
            const int c = it % CH;
            const int g = h / (H / KVH);
            const int first = starts[row];
            const int p = cur - first;
            float* ws = wk + row * WF;
            const size_t kv = ((size_t)row * KVH + g) * cap;
            float a = 0.0f, b = 0.0f;
            if (tid < HD) {
                a = __ldcg(ws + h * HD + tid);
                b = __ldcg(ws + (H + g) * HD + tid);
                hv[tid] = __ldcg(ws + (H + KVH + g) * HD + tid);
            }
            if constexpr (QKN) {
                const float na = rsqrtf(mlxd_block_sum<NT>(a * a, red) / HD + eps);
                const float nb = rsqrtf(mlxd_block_sum<NT>(b * b, red) / HD + eps);
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
                    kw[(kv + cur) * HD + tid] = static_cast<T>(b);
                    vw[(kv + cur) * HD + tid] = static_cast<T>(hv[tid]);
                }
            }
            __syncthreads();
            const int len = cur + 1 - first;
            const int per = (len + CH - 1) / CH;
            const int start = first + c * per;
            const int end = min(cur + 1, start + per);
            float qf[DL], acc[DL];
#pragma unroll
            for (int d = 0; d < DL; ++d) { qf[d] = hq[e * DL + d] * att_scale; acc[d] = 0.0f; }
            float m = neg_inf, l = 0.0f;
            for (int j0 = start; j0 < end; j0 += NT / 8) {
                const int j = j0 + grp;
                const bool ok = j < end;
                float kf[DL], vf[DL];
                if (ok && j == cur) {
#pragma unroll
                    for (int d = 0; d < DL; ++d) { kf[d] = hk[e * DL + d]; vf[d] = hv[e * DL + d]; }
                } else {
                    const size_t at = (kv + (ok ? j : start)) * HD + e * DL;
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
                for (int q = 0; q < NT / 8; ++q) top = fmaxf(top, sh[q * (HD + 2) + HD]);
                float num = 0.0f, den = 0.0f;
                for (int q = 0; q < NT / 8; ++q) {
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
            if (tid == 0) last = atomicAdd(sy + 64 + row * H + h, 1u) == (unsigned int)(CH - 1);
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
                if (tid == 0) atomicExch(sy + 64 + row * H + h, 0u);
            }
            __syncthreads();
        }
    }
    stamp(3);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(4);
    if constexpr (PHASE == 0 || PHASE == 3) {
        MLXD_LAYER_POINTERS_3
        mlxd_fill_rows<NT, H * HD>(NB, wk + OFF_ATT, WF, xs);
        mlxd_q4_rows<H * HD, GS, NR, B, NR1>(D, gw, NW, o_w, o_s, o_b, xs, NB, [&](int r, int v, float y) {
            wk[v * WF + OFF_H1 + r] = mlxd_round<T>(x_at(v, r) + mlxd_round<T>(y));
        });
    }
    stamp(5);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(6);
    if constexpr (PHASE == 0 || PHASE == 4) {
        MLXD_LAYER_POINTERS_4
        mlxd_norm_rows<NT, D, T>(NB, [&](int v, int c, float* f) { mlxd_ldcg8(wk + v * WF + OFF_H1 + 8 * c, f); }, w_post, eps, xs);
        // Each warp takes NR / 2 rows of the gate and the same rows of up.
        int rows[NR];
        float y[NR][B];
        for (int r0 = gw; r0 < I; r0 += NW * (NR / 2)) {
#pragma unroll
            for (int j = 0; j < NR / 2; ++j) {
                const int r = r0 + j * NW;
                rows[2 * j] = r < I ? r : -1;
                rows[2 * j + 1] = r < I ? r + I : -1;
            }
            mlxd_q4<D, GS, NR, B>(gu_w, gu_s, gu_b, xs, NB, rows, y);
#pragma unroll
            for (int j = 0; j < NR / 2; ++j)
#pragma unroll
                for (int v = 0; v < B; ++v) {
                    if (lane != (j * B + v) % 32 || rows[2 * j] < 0 || v >= NB) continue;
                    const float gt = mlxd_round<T>(y[2 * j][v]);
                    const float up = mlxd_round<T>(y[2 * j + 1][v]);
                    const float sg = mlxd_round<T>(1.0f / (1.0f + expf(-gt)));
                    wk[v * WF + OFF_MLP + rows[2 * j]] = mlxd_round<T>(mlxd_round<T>(gt * sg) * up);
                }
        }
    }
    stamp(7);
    if constexpr (PHASE == 0) mlxd_grid_sync(sy, P);
    stamp(8);
    if constexpr (PHASE == 0 || PHASE == 5) {
        MLXD_LAYER_POINTERS_5
        mlxd_fill_rows<NT, I>(NB, wk + OFF_MLP, WF, xs);
        mlxd_q4_rows<I, GS, NR, B, NR1>(D, gw, NW, d_w, d_s, d_b, xs, NB, [&](int r, int v, float y) {
            const float o = __ldcg(wk + v * WF + OFF_H1 + r) + mlxd_round<T>(y);
            if (li == NL - 1) out[v * D + r] = static_cast<T>(o); else wk[v * WF + OFF_HB + (li & 1) * D + r] = mlxd_round<T>(o);
        });
    }
    stamp(9);
    if constexpr (PHASE == 0) { if (li + 1 < span[1]) mlxd_grid_sync(sy, P); }
    }
"#;

thread_local! {
    /// The kernel objects made on this thread, one per dynamic shared memory size (MLX sets a
    /// kernel's size when it makes the object) and blocks per launch (their inputs).
    static KERNELS: RefCell<Vec<((i32, usize), CudaKernel)>> = const { RefCell::new(Vec::new()) };
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
    /// Rows one batched step may have (what the shared memory and the tickets allow).
    batch_max: i32,
    /// `[0]`: the one row of a one-sequence step starts at column 0.
    no_padding: Array,
    /// Decoder blocks one launch runs (all of them unless `MLXD_FUSED_LAYERS` says fewer).
    per_launch: usize,
    /// `[0, n]` for each block count a launch has (made once, not every step).
    spans: Vec<(i32, Array)>,
    /// Whether one-sequence steps take the kernel (decided at load, [`super::Transformer`]).
    pub(super) single: bool,
    /// Whether batched steps (2..=`batch_max` rows) take it.
    pub(super) batched: bool,
    /// This model's place among the few that may hold the kernel at once (see [`Slot`]).
    slot: Slot,
}

/// Models that may hold the fused kernel at once in one process, on a GPU (one where the
/// process serves one model, see [`set_one_model`]).
const MODELS_MAX: usize = 2;

/// Whether this process serves one model at a time ([`set_one_model`]).
static ONE_MODEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Declares, before any model loads, that this process serves one model at a time (a daemon
/// with one configured model, `mlxd generate`, the benchmarks). Then one model holds the fused
/// kernel and it takes every SM (session 18, one row: 747 against 697 tok/s on an H100, same
/// machine; an 8-row block 107 µs instead of 128 µs). Otherwise two models may hold it, and
/// each takes half the SMs, so that two models' kernels side by side are always all resident.
pub fn set_one_model(one: bool) {
    ONE_MODEL.store(one, std::sync::atomic::Ordering::SeqCst);
}

/// A model's hold on the fused kernel. Grid barriers need all of a kernel's participating blocks
/// resident at once, and two models decode on two streams, so their kernels can run side by
/// side: two on half the SMs each fit (see [`GRID`]), three could each hold SMs the others wait
/// for, which would end in the barrier's trap. So at most [`MODELS_MAX`] models hold the kernel
/// (one in a one-model process, whose kernels take every SM); another decodes through MLX's
/// operations. The emulator (one block at a time, no barriers) takes no slot.
#[derive(Debug)]
struct Slot {
    counted: bool,
    /// Either kernel's participating blocks are the SM count over this: 1 in a one-model
    /// process, else 2.
    sm_divisor: i32,
}

static MODELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Slot {
    fn take() -> Option<Slot> {
        Self::take_within(std::time::Duration::from_secs(5))
    }

    fn take_within(wait: std::time::Duration) -> Option<Slot> {
        use std::sync::atomic::Ordering::SeqCst;
        let one = ONE_MODEL.load(SeqCst);
        let (most, sm_divisor) = if one { (1, 1) } else { (MODELS_MAX, 2) };
        if crate::ffi::emulating() {
            return Some(Slot { counted: false, sm_divisor });
        }
        // A model unloaded a moment ago may still be ending on its thread (its stream
        // synchronized, then its slot let go): wait for that a little, not for a stuck one.
        let deadline = std::time::Instant::now() + wait;
        while MODELS.fetch_update(SeqCst, SeqCst, |n| (n < most).then_some(n + 1)).is_err() {
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(Slot { counted: true, sm_divisor })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.counted {
            MODELS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
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
            + 2 * self.d
    }

    /// Floats of the one-row kernel's main shared buffer.
    fn shared_floats(&self) -> i32 {
        self.d.max(self.heads * self.head_dim).max(self.inter).max(THREADS / 8 * (self.head_dim + 2))
    }

    /// The most rows one batched step takes: what the shared memory and the tickets allow (1:
    /// no batched step does; the one-row kernel's own limit is stricter than one row here).
    fn batch_max(&self, dtype: Dtype) -> i32 {
        (1..=BATCH_MAX)
            .take_while(|&b| self.shared_bytes(b, dtype) <= SHARED_MAX && 64 + b * self.heads <= SYNC_WORDS)
            .last()
            .unwrap_or(1)
    }

    /// Bytes of the batched kernel's dynamic shared memory for `rows` rows of `dtype`: every
    /// product's inputs in the model's dtype, or the attention's merge scratch (a head's partial
    /// results, one per eight threads, floats).
    fn shared_bytes(&self, rows: i32, dtype: Dtype) -> i32 {
        let size = if dtype == Dtype::Float32 { 4 } else { 2 };
        let widest = self.d.max(self.heads * self.head_dim).max(self.inter);
        (rows * widest * size).max(THREADS / 8 * (self.head_dim + 2) * 4)
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
            && (dims.shared_floats() + 3 * dims.head_dim) * 4 <= ONE_ROW_SHARED_MAX;
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
        let batch_max = dims.batch_max(dtype);
        let template = template(dims, dtype, rope_dims, group?, args.qk_norm, args.eps, rope_scale);
        let n = periods.len() as i32;
        let periods = Array::from_slice(&periods, &[n]);
        let no_padding = Array::from_slice(&[0i32], &[1]);
        mlx_rs::transforms::eval([&periods, &no_padding]).ok()?;
        let Some(slot) = Slot::take() else {
            tracing::warn!(
                one_model = ONE_MODEL.load(std::sync::atomic::Ordering::SeqCst),
                "fused decode kernel not used: as many models as may hold it at once already do \
                 (one in a process serving one model, else two); this one decodes through MLX's operations"
            );
            return None;
        };
        let per_launch = layers_per_launch(layers.len());
        let spans = spans(layers.len(), per_launch);
        mlx_rs::transforms::eval(spans.iter().map(|(_, a)| a)).ok()?;
        Some(FusedDecode {
            per_launch,
            spans,
            layers,
            periods,
            dtype,
            template,
            dims,
            batch_max,
            no_padding,
            single: true,
            batched: true,
            slot,
        })
    }

    /// Decoder blocks one launch of the kernel runs.
    pub fn per_launch(&self) -> usize {
        self.per_launch
    }

    /// Runs `n` blocks per launch from now on (at least one; the last launch takes the rest).
    pub fn set_per_launch(&mut self, n: usize) {
        self.per_launch = n.clamp(1, self.layers.len().max(1));
        self.spans = spans(self.layers.len(), self.per_launch);
    }

    /// The most rows a batched step takes.
    pub fn batch_max(&self) -> i32 {
        self.batch_max
    }

    /// The variant of the kernel (the most rows it takes, its `B`) that a step of `rows` rows
    /// runs, the rest of its rows idle: 1, 2, 4, 8 or the model's most. A server's batch grows
    /// and shrinks a row at a time, and a size first seen mid-serving would stall every client
    /// for a compile; these few are compiled when the model loads.
    pub fn variant(&self, rows: i32) -> i32 {
        if rows <= 1 {
            return 1;
        }
        [2, 4, 8]
            .into_iter()
            .filter(|&v| v < self.batch_max)
            .chain([self.batch_max])
            .find(|&v| v >= rows)
            .unwrap_or(self.batch_max)
    }

    /// Every batched variant [`FusedDecode::variant`] picks from (none where the most is 1).
    pub fn variants(&self) -> Vec<i32> {
        let mut all: Vec<i32> = (2..=self.batch_max).map(|r| self.variant(r)).collect();
        all.dedup();
        all
    }

    /// Whether a one-sequence step takes `x` (`[1, D]` of the model's dtype).
    pub fn takes(&self, x: &Array) -> bool {
        self.single && x.dtype() == self.dtype && x.shape() == [1, self.dims.d]
    }

    /// Whether a batched step takes `x` (`[B, D]`, B from 2 to the model's most).
    pub fn takes_batch(&self, x: &Array) -> bool {
        let rows = x.shape().first().copied().unwrap_or(0);
        self.batched
            && BATCH_SWITCH.available()
            && x.dtype() == self.dtype
            && x.ndim() == 2
            && x.shape()[1] == self.dims.d
            && (2..=self.batch_max).contains(&rows)
    }

    /// One decode step through every block: `x` is the embedded token (`[1, D]`), `cache` the
    /// sequence's, which moves on by one position. Returns the last block's output.
    pub fn decode(&self, x: &Array, cache: &mut SequenceCache) -> Result<Array> {
        let work = own_workspace(&mut cache.fused_work, self.dims.work_floats() as usize, || self.workspace(1))?;
        let pos = Array::from_slice(&[cache.offset()], &[1]);
        let (kv_heads, head_dim, dtype) = (self.dims.kv_heads, self.dims.head_dim, self.dtype);
        let layers = &mut cache.layers;
        // Storage the kernel may write in place, made where a layer's does not fit (a fresh
        // sequence: all of them) and evaluated in one wait.
        let mut fresh = Vec::new();
        for layer in layers.iter_mut() {
            fresh.extend(layer.prepare_fused_storage(kv_heads, head_dim, dtype, 0)?.into_iter().flatten());
        }
        // One launch reads every layer's capacity from the first's: a layer with less (its
        // storage kept from an earlier size) is given the most any layer has.
        let most = layers.iter().map(LayerCache::fused_capacity).max().unwrap_or(0);
        if layers.iter().any(|l| l.fused_capacity() != most) {
            for layer in layers.iter_mut() {
                fresh.extend(layer.prepare_fused_storage(kv_heads, head_dim, dtype, most)?.into_iter().flatten());
            }
        }
        if !fresh.is_empty() {
            mlx_rs::transforms::eval(fresh.iter())?;
        }
        let out =
            self.blocks(x, &pos, &self.no_padding, &work, |l| layers[l].fused_storage(kv_heads, head_dim, dtype))?;
        layers.iter_mut().for_each(LayerCache::advance_in_place);
        Ok(out)
    }

    /// One decode step of a stacked batch (`x`: `[B, D]`, the batch's rows in order), writing
    /// each row's key and value at the batch's next column in place (the stack is the batch's
    /// own). Returns the last block's output; the caller moves the batch on.
    pub fn decode_batch(&self, x: &Array, batch: &mut BatchCache) -> Result<Array> {
        let rows = x.shape()[0];
        let floats = (self.dims.work_floats() * rows) as usize;
        let work = own_workspace(&mut batch.fused_work, floats, || self.workspace(rows))?;
        let pos = Array::from_slice(&[batch.column()], &[1]);
        let starts = batch.starts().clone();
        self.blocks(x, &pos, &starts, &work, |l| batch.storage(l))
    }

    /// Every block on `x` (`[B, D]`), the new keys and values at column `pos`, row b's first
    /// live column `starts[b]`; `storage(layer)` gives that layer's cache arrays to write.
    fn blocks(
        &self,
        x: &Array,
        pos: &Array,
        starts: &Array,
        work: &Workspace,
        mut storage: impl FnMut(usize) -> std::result::Result<(Array, Array), mlx_rs::error::Exception>,
    ) -> Result<Array> {
        let rows = x.shape()[0];
        let emulated = crate::ffi::emulating();
        let mut h = x.clone();
        let mut template = self.template.clone();
        template.extend([("TIMING_AT", TemplateArg::Int(TIMING_AT)), ("TIMED", TemplateArg::Bool(timing()))]);
        let smem = if rows == 1 {
            template.push(("SH", TemplateArg::Int(self.dims.shared_floats())));
            0
        } else {
            let (variant, smem) = (self.variant(rows), self.dims.shared_bytes(self.variant(rows), self.dtype));
            template.extend([("B", TemplateArg::Int(variant)), ("SMEM", TemplateArg::Int(smem))]);
            smem
        };
        template.push(("SMDIV", TemplateArg::Int(self.slot.sm_divisor)));
        let grid = if emulated { EMULATED_GRID } else { GRID };
        for (c, chunk) in self.layers.chunks(self.per_launch).enumerate() {
            let caches = (0..chunk.len())
                .map(|i| storage(c * self.per_launch + i))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            // Every block's cache has the columns of the first (the kernel reads its shape).
            if caches.iter().any(|(k, v)| k.shape() != caches[0].0.shape() || v.shape() != k.shape()) {
                return Err(ModelError::Config("fused decode: the blocks' caches differ in shape".into()));
            }
            let nl = chunk.len() as i32;
            let mut template = template.clone();
            template.push(("NL", TemplateArg::Int(nl)));
            // On a GPU one launch runs the chunk's blocks, phases and blocks parted by grid
            // barriers. The emulator has no barriers: each (block, phase) is a launch of its own,
            // ordered only because it runs each at once (MLX sees no dependency between them:
            // the workspace is written in place).
            let launches: Vec<(i32, i32)> = if emulated {
                (0..nl).flat_map(|l| (1..=5).map(move |phase| (l, phase))).collect()
            } else {
                vec![(-1, 0)]
            };
            let mut out = None;
            for (l, phase) in launches {
                let one;
                let span = match self.spans.iter().find(|(n, _)| l < 0 && *n == nl) {
                    Some((_, all)) => all,
                    None => {
                        one = Array::from_slice(&if l < 0 { [0, nl] } else { [l, l + 1] }, &[2]);
                        &one
                    }
                };
                let mut inputs: Vec<&Array> = Vec::with_capacity(7 + LAYER_INPUTS.len() * chunk.len());
                inputs.extend([&h, pos]);
                if rows > 1 {
                    inputs.push(starts);
                }
                inputs.push(span);
                for (layer, (kc, vc)) in chunk.iter().zip(&caches) {
                    inputs.extend(layer.arrays.iter());
                    inputs.extend([kc, vc]);
                }
                inputs.extend([&self.periods, &work.work, &work.sync]);
                let mut template = template.clone();
                template.push(("PHASE", TemplateArg::Int(phase)));
                out = Some(self.apply(&inputs, rows, smem, chunk.len(), &template, grid)?);
            }
            h = out.expect("one launch at least");
        }
        Ok(h)
    }

    fn apply(
        &self,
        inputs: &[&Array],
        rows: i32,
        smem: i32,
        nl: usize,
        template: &[(&str, TemplateArg)],
        grid: i32,
    ) -> Result<Array> {
        let shape = [rows, self.dims.d];
        KERNELS.with(|cell| {
            let mut kernels = cell.borrow_mut();
            let at = match kernels.iter().position(|(key, _)| *key == (smem, nl)) {
                Some(at) => at,
                // 0: the one-row kernel (static shared memory).
                None => {
                    let first: &[&str] = if smem == 0 { &["x", "pos"] } else { &["x", "pos", "starts"] };
                    let names = input_names(first, nl);
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let (header_text, source) = if smem == 0 { (HEADER_ONE, SOURCE_ONE) } else { (HEADER, SOURCE) };
                    let source = source.replace("MLXD_LAYER_TABLE", &layer_table(nl));
                    let k = if smem == 0 {
                        CudaKernel::new("mlxd_fused_block", &names, &["out"], header_text, &source, false)
                    } else {
                        CudaKernel::with_dynamic_shared(
                            "mlxd_fused_batch",
                            &names,
                            &["out"],
                            header_text,
                            &source,
                            false,
                            smem,
                        )
                    };
                    kernels.push(((smem, nl), k));
                    kernels.len() - 1
                }
            };
            let out = kernels[at].1.apply(
                inputs,
                &[(&shape, self.dtype)],
                template,
                (grid * THREADS, 1, 1),
                (THREADS, 1, 1),
                || format!("the fused decode block for hidden size {}, {rows} rows", self.dims.d),
            )?;
            Ok(out.into_iter().next().expect("one output"))
        })
    }

    fn workspace(&self, rows: i32) -> std::result::Result<Workspace, mlx_rs::error::Exception> {
        let work = mlx_rs::ops::zeros::<f32>(&[self.dims.work_floats() * rows])?;
        let sync = mlx_rs::ops::zeros::<u32>(&[SYNC_WORDS])?;
        mlx_rs::transforms::eval([&work, &sync])?;
        Ok(Workspace { work, sync })
    }
}

/// The spans `[0, n]` of a model of `layers` blocks run `per_launch` at a time.
fn spans(layers: usize, per_launch: usize) -> Vec<(i32, Array)> {
    let mut counts = vec![per_launch.min(layers) as i32];
    if per_launch > 0 && layers % per_launch != 0 && layers > per_launch {
        counts.push((layers % per_launch) as i32);
    }
    counts.into_iter().map(|n| (n, Array::from_slice(&[0, n], &[2]))).collect()
}

/// Decoder blocks per launch for a model of `layers` blocks: all of them, so that a step is one
/// launch (one MLX node, no gaps between kernels), unless `MLXD_FUSED_LAYERS=N` asks for N.
fn layers_per_launch(layers: usize) -> usize {
    let asked = std::env::var("MLXD_FUSED_LAYERS").ok().and_then(|v| v.parse::<usize>().ok());
    asked.unwrap_or(layers).clamp(1, layers.max(1))
}

/// Whether the kernel counts its stretches' time (`MLXD_FUSED_TIMING=1`, read once; costs a
/// few atomic adds per call, for `mlxd-bench fused-timing`).
fn timing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLXD_FUSED_TIMING").is_ok_and(|v| v == "1"))
}

/// The kernel's template arguments for a model (all but `B`, `SMEM` and `PHASE`).
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
        ("EPS_BITS", bits(eps)),
        ("ROPE_SCALE_BITS", bits(rope_scale)),
        ("ATT_SCALE_BITS", bits((dims.head_dim as f32).powf(-0.5))),
        ("NR1", TemplateArg::Bool(std::env::var("MLXD_FUSED_NR1").as_deref() != Ok("0"))),
        ("NT", TemplateArg::Int(THREADS)),
    ]
}

/// One fused step of a two-block model of these dimensions (4-bit, groups of 64; both blocks in
/// one launch) on zeros, at position 3, one sequence and the most rows a batched step takes: for
/// recording the kernels MLX would compile for a model shape (`mlxd-bench kernel-sources`, whose
/// NVRTC check compiles it) without loading the model.
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
    let batch_max = dims.batch_max(dtype);
    // Two blocks in one launch (the same arrays twice), as a model's step runs them.
    let second = Layer { arrays: arrays.clone() };
    let fused = FusedDecode {
        per_launch: 2,
        spans: spans(2, 2),
        layers: vec![Layer { arrays }, second],
        periods: Array::from_slice(&periods, &[head_dim / 2]),
        dtype,
        template: template(dims, dtype, head_dim, 64, qk_norm, 1e-6, 1.0),
        dims,
        batch_max,
        no_padding: Array::from_slice(&[0i32], &[1]),
        single: true,
        batched: true,
        // Recording the kernels' sources, not a model that decodes.
        slot: Slot { counted: false, sm_divisor: 2 },
    };
    let err = |e: ModelError| mlx_rs::error::Exception::custom(e.to_string());
    let mut cache = SequenceCache::new(2);
    for _ in 0..3 {
        for layer in cache.layers.iter_mut() {
            layer.fused_storage(kv_heads, head_dim, dtype)?;
            layer.advance_in_place();
        }
    }
    let one = fused.decode(&zeros(&[1, d], dtype)?, &mut cache).map_err(err)?;
    // The most rows a batched step takes, at column 3 of a stack whose rows start at 0..B.
    let rows = batch_max;
    let storage = zeros(&[rows, kv_heads, 256, head_dim], dtype)?;
    let starts = Array::from_slice(&(0..rows).map(|r| r.min(3)).collect::<Vec<i32>>(), &[rows]);
    let work = fused.workspace(rows)?;
    let many = fused
        .blocks(&zeros(&[rows, d], dtype)?, &Array::from_slice(&[3i32], &[1]), &starts, &work, |_| {
            Ok((storage.clone(), storage.clone()))
        })
        .map_err(err)?;
    mlx_rs::ops::concatenate(&[one, many], 0)
}

impl Workspace {
    /// Floats of scratch space (to tell one model's workspace from another's).
    fn floats(&self) -> usize {
        self.work.size()
    }

    /// What the kernel counted under `MLXD_FUSED_TIMING=1` (all zeros otherwise): the decoder
    /// blocks run, and block 0's mean microseconds per decoder block in phase 1, the barrier
    /// after it, phase 2, barrier, phase 3, barrier, phase 4, barrier, phase 5, then the mean
    /// barrier between two blocks of one launch and the mean gap between one launch's end and
    /// the next one's start (0 where there were none).
    pub fn timing(&self) -> std::result::Result<(u64, [f64; 11]), mlx_rs::error::Exception> {
        self.sync.eval()?;
        let words = self.sync.as_slice::<u32>();
        let at = TIMING_AT as usize;
        let counter = |i: usize| words[at + 2 * i] as u64 | (words[at + 2 * i + 1] as u64) << 32;
        let calls = counter(0);
        let mut out = [0.0; 11];
        for (i, o) in out.iter_mut().enumerate().take(9) {
            *o = counter(i + 1) as f64 / calls.max(1) as f64 / 1e3;
        }
        out[9] = counter(10) as f64 / counter(11).max(1) as f64 / 1e3;
        out[10] = counter(12) as f64 / counter(13).max(1) as f64 / 1e3;
        Ok((calls, out))
    }
}

impl BatchCache {
    /// This batch's fused-kernel workspace, once a step has made one.
    pub fn fused_workspace(&self) -> Option<&Workspace> {
        self.fused_work.as_deref()
    }
}

impl SequenceCache {
    /// This sequence's fused-kernel workspace, once a step has made one.
    pub fn fused_workspace(&self) -> Option<&Workspace> {
        self.fused_work.as_deref()
    }
}

/// The workspace in `slot` (a sequence's or a batch's), made on first use and whenever the one
/// it holds is shared (a sequence's cache was cloned) or sized for another model or batch.
fn own_workspace(
    slot: &mut Option<Arc<Workspace>>,
    floats: usize,
    make: impl FnOnce() -> std::result::Result<Workspace, mlx_rs::error::Exception>,
) -> std::result::Result<Arc<Workspace>, mlx_rs::error::Exception> {
    match slot {
        Some(w) if Arc::strong_count(w) == 1 && w.floats() == floats => Ok(w.clone()),
        _ => {
            let w = Arc::new(make()?);
            *slot = Some(w.clone());
            Ok(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_launch_of_several_blocks_names_each_blocks_arrays_and_selects_them_by_index() {
        let names = input_names(&["x", "pos"], 3);
        assert_eq!(names.len(), 2 + 1 + 3 * LAYER_INPUTS.len() + 3);
        assert_eq!(&names[..4], ["x", "pos", "span", "w_in_0"]);
        assert_eq!(names[3 + LAYER_INPUTS.len()], "w_in_1", "block 1's arrays follow block 0's 18");
        assert_eq!(names[2 + 3 * LAYER_INPUTS.len()], "vc_2");
        assert_eq!(&names[names.len() - 3..], ["periods", "work", "sync"]);
        let table = layer_table(3);
        for l in 0..3 {
            assert!(table.contains(&format!("case {l}:")), "{table}");
            for (i, n) in LAYER_INPUTS.iter().enumerate() {
                assert!(table.contains(&format!("lp[{i}] = {n}_{l};")), "block {l}'s {n} at lp[{i}]");
            }
        }
        assert!(!table.contains("case 3:"));
    }

    #[test]
    fn spans_cover_a_models_blocks_in_launches_of_the_asked_size() {
        let counts = |layers, per| spans(layers, per).into_iter().map(|(n, _)| n).collect::<Vec<i32>>();
        assert_eq!(counts(28, 28), [28], "one launch of every block");
        assert_eq!(counts(28, 7), [7], "four launches of 7");
        assert_eq!(counts(5, 2), [2, 1], "two launches of 2 and one of the last block");
        assert_eq!(counts(2, 9), [2], "asking for more blocks than the model has");
        let span = &spans(5, 2)[1].1;
        assert_eq!(span.as_slice::<i32>(), [0, 1]);
    }

    #[test]
    fn two_models_hold_the_kernel_at_most_and_one_in_a_one_model_process() {
        set_one_model(false);
        let a = Slot::take_within(Duration::ZERO).expect("a first model holds the kernel");
        let b = Slot::take_within(Duration::ZERO).expect("and a second");
        assert!(Slot::take_within(Duration::from_millis(50)).is_none(), "a third decodes through MLX's operations");
        assert_eq!((a.sm_divisor, b.sm_divisor), (2, 2), "two models: each kernel on half the SMs");
        drop(b);
        let c = Slot::take_within(Duration::ZERO).expect("an unloaded model's slot is free again");
        drop((a, c));

        set_one_model(true);
        let only = Slot::take_within(Duration::ZERO).expect("the one model holds the kernel");
        assert_eq!(only.sm_divisor, 1, "one model: every SM");
        assert!(Slot::take_within(Duration::ZERO).is_none(), "no second model beside it");
        // A reload while the unloaded model's thread is still ending waits for its slot.
        let ending = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(only);
        });
        let next = Slot::take_within(Duration::from_secs(10)).expect("the slot let go is taken");
        ending.join().unwrap();
        assert!(MODELS.load(std::sync::atomic::Ordering::SeqCst) == 1);
        drop(next);
        assert_eq!(MODELS.load(std::sync::atomic::Ordering::SeqCst), 0);
        set_one_model(false);
    }
}
