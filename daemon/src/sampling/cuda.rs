//! Steps 4-9 of the pipeline (temperature, top-k, top-p, min-p and the Gumbel-max pick), with
//! step 2 (the repetition penalty) when no bias, presence or frequency penalty, logprobs or
//! plugin needs the logits in between, and the advance of the rows' keys and windows, as CUDA
//! kernels for MLX's CUDA backend, where a decode step costs host time per node: the same steps
//! as MLX operations are ~40 nodes per step, these are two (or one, fused), like greedy's
//! argmax. They read the logits in the model's dtype, so no conversion node runs before them.
//!
//! 1. One block per (chunk of 1,024 logits, row): penalty and temperature into shared memory, a
//!    radix select of the chunk's `k` best, written to the row's candidate slots as sort keys,
//!    and the chunk's best key. The row's `k` best are among its chunks' `k` best, and the whole
//!    GPU works on the vocabulary (a single block per row, the first version, spent ~0.15-0.2 ms
//!    of device time per step).
//! 2. Per row: the `k`-th best of the chunks' best keys bounds the row's `k`-th best from below,
//!    so only the chunks above it are read (on an H100, stage 2 took 34 µs reading every
//!    candidate, 20 µs reading these; session 13), then a radix select of the `k` best
//!    candidates, ranked, the filters in the pipeline's
//!    order, and the draw `argmax(logit + Gumbel noise)` with the noise hashed from the row's key
//!    and the token id exactly as [`super::pipeline`] hashes it, so both paths draw the same
//!    token up to floating-point rounding at a filter's boundary; then the row's next key and,
//!    with the penalty, its window shifted by the drawn token.
//!
//! By default the stages are two kernels (stage 2: one block of 256 threads per row; on an
//! H100, `mlxd-bench sampler-check` finds them drawing what the MLX-op graph draws, session 13:
//! 512 of 512 draws of the full pipeline on float32 and bfloat16 logits). With
//! `MLXD_SAMPLER_FUSED=1` they are one kernel, one node fewer per step: the row's last block to
//! finish stage 1 (a per-row arrival counter, CUDA's "last block" pattern: every block fences its
//! candidate writes, then counts itself in) runs stage 2 and sets the counter back to zero for
//! the next step (the counters: one device array per thread, [`counter`]). The same switch
//! fuses the greedy pick with the plugins' history append ([`pick_and_append`]). It draws what
//! the two kernels draw (`sampler-check` on H100s, sessions 10-13) but stays opt-in: its stage 2
//! runs in one 256-thread block and took more device time than the node it saves is worth
//! (docs/benchmarks.md, sessions 10-12). CI compiles every kernel here with NVRTC and runs them
//! through the CPU emulator against the MLX-op graph (`tests/emulated_kernels.rs`).
//!
//! Used where it applies (a CUDA device, every row drawing at random with a top-k of at most
//! [`MAX_K`], no typical-p, no inspection); `MLXD_SAMPLER_KERNEL=0` keeps the MLX-op graph.

use crate::ffi::{CudaKernel, KernelSwitch, TemplateArg};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;

/// Largest top-k the kernel handles (its candidates live in shared memory).
pub(crate) const MAX_K: i32 = 256;

/// Order-preserving 32-bit keys of floats (NaN below everything), shared by both kernels.
const HEADER: &str = r#"
// Each row's parameters, one float32 row of `params` (see `PARAMS`).
constexpr int MLXD_PARAMS = 8;
__device__ __forceinline__ unsigned int mlxd_key_of(float f) {
    const unsigned int b = __float_as_uint(f);
    return f != f ? 0u : ((b & 0x80000000u) ? ~b : (b | 0x80000000u));
}
// The float a key came from (NaN keys give a NaN).
__device__ __forceinline__ float mlxd_float_of(unsigned int u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
// MurmurHash3's 32-bit finalizer over (x ^ k0) * 0x9e3779b1 with k1 mixed in after its first
// round: the pipeline's `hash_words`, word for word.
__device__ __forceinline__ unsigned int mlxd_hash(unsigned int x, unsigned int k0, unsigned int k1) {
    unsigned int h = (x ^ k0) * 0x9e3779b1u;
    h = (h ^ (h >> 16)) * 0x85ebca6bu;
    h ^= k1;
    h = (h ^ (h >> 13)) * 0xc2b2ae35u;
    return h ^ (h >> 16);
}
// Inclusive prefix sums of x over threads 0-255 of the block, in thread order (threads from
// 256 on pass through and get their x back); every thread of the block calls it. totals: 8
// values of shared memory, holding each warp's sum after the call until the next barrier.
template <typename T>
__device__ T mlxd_scan256(T x, T* totals) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    if (tid < 256) {
        for (int o = 1; o < 32; o <<= 1) {
            const T up = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += up;
        }
        if (lane == 31) totals[tid >> 5] = x;
    }
    __syncthreads();
    if (tid < 256) {
        for (int w = 0; w < (tid >> 5); ++w) x += totals[w];
    }
    return x;
}
// Radix select, 8 bits at a time from the top, over the keys key(0..n): leaves in *kth the key
// of the need-th largest and in *ties how many keys equal to it the need largest take. Every
// thread of the block (at least 256, a multiple of 32) calls it; hist is 256 words of shared
// memory, kth, mask and ties shared. The histogram is counted a warp at a time: the lanes
// whose keys fall in one bin add their count with one atomic (a vocabulary's logits share a
// handful of exponents, so the first rounds' keys crowd into a few bins; on an H100 this and
// stage 2's key cache took ~23 us off the fused kernel, whose stage 2 has 256 threads, and
// barely moved the two kernels' time, session 12). Each round finds its bin with a
// parallel suffix sum over the 256 bins (one thread per bin, largest bin first): the bin where
// the running count reaches the keys still needed.
template <typename Key>
__device__ void mlxd_radix_select(
    int n, unsigned int need, Key key, unsigned int* hist,
    unsigned int* kth, unsigned int* mask, unsigned int* ties) {
    __shared__ unsigned int totals[8];
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    if (tid == 0) { *kth = 0u; *mask = 0u; *ties = need; }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += nt) hist[i] = 0u;
        __syncthreads();
        const unsigned int prefix = *kth, m = *mask, left = *ties;
        // Whole warps each iteration (bin 256: no key, or not under this round's prefix).
        for (int i0 = 0; i0 < n; i0 += nt) {
            const int i = i0 + tid;
            unsigned int bin = 256u;
            if (i < n) {
                const unsigned int u = key(i);
                if ((u & m) == prefix) bin = (u >> shift) & 255u;
            }
            const unsigned int peers = __match_any_sync(0xffffffffu, bin);
            if (bin < 256u && (tid & 31) == __ffs((int)peers) - 1) atomicAdd(&hist[bin], (unsigned int)__popc(peers));
        }
        __syncthreads();
        const int bin = 255 - tid;
        const unsigned int count = tid < 256 ? hist[bin] : 0u;
        // Keys in bins above and including this one.
        const unsigned int through = mlxd_scan256(count, totals);
        const unsigned int above = through - count;
        // One thread matches: the bin holding the left-th largest key (bin 0 if none does).
        if (tid < 256 && above < left && (through >= left || bin == 0)) {
            *ties = left - above;
            *kth = prefix | ((unsigned int)bin << shift);
            *mask = m | (255u << shift);
        }
        __syncthreads();
    }
}
"#;

/// Stage 1: one block per (chunk of `CH` logits, row). The chunk's logits go through the
/// repetition penalty and the temperature into shared memory, a radix select finds the chunk's
/// `k` best, and they go out to the row's candidate slots `[g * KMAX, g * KMAX + k)` (padding
/// with id -1 where a chunk has fewer than `k` logits). Every one of the row's `k` best logits
/// is among its chunk's `k` best, so the candidates hold the row's top-k.
const CHUNKS: &str = r#"
    const int row = blockIdx.y;
    const int g = blockIdx.x;
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    const int base = g * CH;
    const int n = min(CH, V - base);
    const float* pr = params + (size_t)row * MLXD_PARAMS;
    const int k = max(1, min((int)pr[1], KMAX));
    const int kk = min(k, n);
    const float inv_t = pr[0];
    const float pen = pr[4];
    const int C = window_shape[1];

    __shared__ float vals[CH];
    __shared__ unsigned int seen[(CH + 31) / 32];
    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_prefix, s_mask, s_need, n_gt, n_eq, s_top;
    // The window's tokens that fall in this chunk, as a bitmap: a token is penalized once.
    for (int i = tid; i < (CH + 31) / 32; i += nt) seen[i] = 0u;
    if (tid == 0) s_top = 0u;
    __syncthreads();
    for (int j = tid; j < C; j += nt) {
        const unsigned int t = window[(size_t)row * C + j];
        if (t >= (unsigned int)base && t < (unsigned int)(base + n)) {
            const unsigned int o = t - (unsigned int)base;
            atomicOr(&seen[o >> 5], 1u << (o & 31u));
        }
    }
    __syncthreads();
    const auto* x = logits + (size_t)row * V + base;
    unsigned int top = 0u;
    for (int i = tid; i < n; i += nt) {
        float f = static_cast<float>(x[i]);
        if ((seen[i >> 5] >> (i & 31)) & 1u) f = f < 0.0f ? f * pen : f / pen;
        vals[i] = f * inv_t;
        top = max(top, mlxd_key_of(f * inv_t));
    }
    // The chunk's best key, for stage 2's threshold.
    for (int o = 16; o > 0; o >>= 1) top = max(top, __shfl_down_sync(0xffffffffu, top, o));
    if ((tid & 31) == 0) atomicMax(&s_top, top);
    if (tid == 0) { n_gt = 0u; n_eq = 0u; }
    // The key of the chunk's kk-th largest logit (the call synchronizes the block first).
    mlxd_radix_select(n, (unsigned int)kk, [&](int i) { return mlxd_key_of(vals[i]); }, hist, &s_prefix, &s_mask, &s_need);
    const unsigned int kth = s_prefix;
    const unsigned int ties = s_need;
    // The row's candidates in `cand` (`candidate_words` in cuda.rs): keys, ids, chunk maxima.
    unsigned int* row_c = cand + (size_t)row * G * (2 * KMAX + 1);
    unsigned int* out_k = row_c + g * KMAX;
    int* out_i = reinterpret_cast<int*>(row_c + G * KMAX) + g * KMAX;
    for (int i = tid; i < n; i += nt) {
        const unsigned int u = mlxd_key_of(vals[i]);
        if (u > kth) {
            const unsigned int p = atomicAdd(&n_gt, 1u);
            if (p < (unsigned int)kk) { out_k[p] = u; out_i[p] = base + i; }
        } else if (u == kth) {
            const unsigned int q = atomicAdd(&n_eq, 1u);
            if (q < ties) { const unsigned int p = (unsigned int)kk - ties + q; out_k[p] = u; out_i[p] = base + i; }
        }
    }
    for (int p = kk + tid; p < k; p += nt) { out_k[p] = 0u; out_i[p] = -1; }
    if (tid == 0) row_c[2 * G * KMAX + g] = s_top;
"#;

/// Stage 2, one block per row (in the fused kernel, the row's last block of stage 1): a radix
/// select over the row's candidates that can be among its `k` best (those of the chunks whose
/// best key is at least the `k`-th best chunk's, and at least that key themselves; all `G * k`
/// where more than fit shared memory) finds its `k` best, they are ranked, the filters run over
/// them in order and the draw takes `argmax(logit + Gumbel noise)`; then the row's key advances
/// and its window shifts in the drawn token, as the pipeline's `next_keys` and `advance` do.
const PICK: &str = r#"
    const int row = blockIdx.y;
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    const float* pr = params + (size_t)row * MLXD_PARAMS;
    const int k = max(1, min((int)pr[1], KMAX));
    const float top_p_row = pr[2];
    const float ln_min_p_row = pr[3];
    const int C = window_shape[1];
    const unsigned int k0 = keys[2 * row];
    const unsigned int k1 = keys[2 * row + 1];
    const unsigned int* ck = cand + (size_t)row * G * (2 * KMAX + 1);
    const int* ci = reinterpret_cast<const int*>(ck + G * KMAX);
    const unsigned int* cm = ck + 2 * G * KMAX;

    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_prefix, s_mask, s_need, n_gt, n_eq, n_chunks, n_kept;
    __shared__ unsigned int best_k[KMAX];
    __shared__ int best_i[KMAX];
    __shared__ float sorted_v[KMAX];
    __shared__ int sorted_i[KMAX];
    __shared__ unsigned int s_token;
    __shared__ int chunk_of[G];
    constexpr int KEYS = 4096;
    static_assert(G <= KEYS, "a vocabulary of more than 4,096 chunks: the MLX-op graph samples instead");
    __shared__ unsigned int keys_of[KEYS];
    __shared__ int slot_of[KEYS];
    // Read past L1 throughout: other blocks wrote the candidates (in the fused kernel, during
    // this launch).
    // 1. The k-th best of the chunks' maxima, T: k chunks hold a logit of at least T, so the
    //    row's k best are all at least T, and each lies in a chunk whose maximum is at least T.
    if (tid == 0) { n_chunks = 0u; n_kept = 0u; }
    for (int c = tid; c < G; c += nt) keys_of[c] = __ldcg(cm + c);
    unsigned int floor_key = 0u;
    if (G > k) {
        mlxd_radix_select(G, (unsigned int)k, [&](int c) { return keys_of[c]; }, hist, &s_prefix, &s_mask, &s_need);
        floor_key = s_prefix;
    }
    __syncthreads();
    // 2. Those chunks' candidates of at least T go to shared memory (typically a few times k
    //    of the G * k); padding (key 0) only where T is 0.
    for (int c = tid; c < G; c += nt) {
        if (keys_of[c] >= floor_key) chunk_of[atomicAdd(&n_chunks, 1u)] = c;
    }
    __syncthreads();
    const int scan = (int)n_chunks * k;
    for (int c = tid; c < scan; c += nt) {
        const int s = chunk_of[c / k] * KMAX + (c % k);
        const unsigned int u = __ldcg(ck + s);
        if (u >= floor_key) {
            const unsigned int p = atomicAdd(&n_kept, 1u);
            if (p < (unsigned int)KEYS) { keys_of[p] = u; slot_of[p] = s; }
        }
    }
    __syncthreads();
    // More than fit (ties over many chunks): every candidate, from global memory.
    const bool kept = n_kept <= (unsigned int)KEYS;
    const int total = kept ? (int)n_kept : G * k;
    auto slot = [&](int c) -> int { return kept ? slot_of[c] : (c / k) * KMAX + (c % k); };
    auto key_of = [&](int c) -> unsigned int { return kept ? keys_of[c] : __ldcg(ck + slot(c)); };

    if (tid == 0) { n_gt = 0u; n_eq = 0u; }
    // 3. The row's k best among them.
    mlxd_radix_select(total, (unsigned int)k, key_of, hist, &s_prefix, &s_mask, &s_need);
    const unsigned int kth = s_prefix;
    const unsigned int ties = s_need;
    for (int c = tid; c < total; c += nt) {
        const unsigned int u = key_of(c);
        if (u > kth) {
            const unsigned int p = atomicAdd(&n_gt, 1u);
            if (p < (unsigned int)k) { best_k[p] = u; best_i[p] = __ldcg(ci + slot(c)); }
        } else if (u == kth) {
            const unsigned int q = atomicAdd(&n_eq, 1u);
            if (q < ties) {
                const unsigned int p = (unsigned int)k - ties + q;
                best_k[p] = u;
                best_i[p] = __ldcg(ci + slot(c));
            }
        }
    }
    __syncthreads();
    // Rank them, best first (equal logits by token id; padding last).
    for (int a = tid; a < k; a += nt) {
        const int ia = best_i[a];
        const unsigned int ua = ia < 0 ? 0u : best_k[a];
        int r = 0;
        for (int b = 0; b < k; ++b) {
            const unsigned int ub = best_i[b] < 0 ? 0u : best_k[b];
            r += (ub > ua) || (ub == ua && (unsigned int)best_i[b] < (unsigned int)ia);
        }
        sorted_v[r] = mlxd_float_of(ua);
        sorted_i[r] = ia;
    }
    __syncthreads();
    // The filters and the draw, candidate j on thread j (k <= KMAX = 256 <= threads): the
    // softmax mass before each candidate is a prefix sum, the pick a maximum of
    // (score, -rank) packed in 64 bits, so ties go to the better-ranked candidate.
    {
        const int j = tid;
        const bool valid = j < k && sorted_i[j] >= 0;
        const float best = sorted_v[0];
        const float v = valid ? sorted_v[j] : 0.0f;
        const float e = valid ? expf(v - best) : 0.0f;
        __shared__ float mass[8];
        const float through = mlxd_scan256(e, mass);
        float z = 0.0f;
        for (int w = 0; w < 8; ++w) z += mass[w];
        // Top-p: the mass strictly before this candidate; min-p: against the best logit.
        const bool keep = valid && (through - e) / z < top_p_row && v >= best + ln_min_p_row;
        unsigned long long c = 0ull;
        if (keep) {
            const unsigned int h = mlxd_hash((unsigned int)sorted_i[j], k0, k1);
            const float u = (float)(h >> 8) * (1.0f / 16777216.0f) + (0.5f / 16777216.0f);
            c = ((unsigned long long)mlxd_key_of(v - logf(-logf(u))) << 32) | (unsigned long long)(~(unsigned int)j);
        }
        __shared__ unsigned long long warp_best[8];
        if (tid < 256) {
            for (int o = 16; o > 0; o >>= 1) {
                const unsigned long long other = __shfl_down_sync(0xffffffffu, c, o);
                c = other > c ? other : c;
            }
            if ((tid & 31) == 0) warp_best[tid >> 5] = c;
        }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < 8; ++w) c = warp_best[w] > c ? warp_best[w] : c;
            // The best candidate is always kept (nothing before it, nothing above it).
            const int pick = c == 0ull ? sorted_i[0] : sorted_i[~(unsigned int)(c & 0xffffffffull)];
            token[row] = (unsigned int)pick;
            s_token = (unsigned int)pick;
            next_keys[2 * row] = mlxd_hash(0xffffffffu, k0, k1);
            next_keys[2 * row + 1] = mlxd_hash(0xfffffffeu, k0, k1);
        }
    }
    __syncthreads();
    // Shift left by one and take the token at the end; slots before the row's first live one
    // repeat it.
    const unsigned int t = s_token;
    const int first = (int)pr[5];
    for (int j = tid; j < C; j += nt) {
        next_window[(size_t)row * C + j] = (j < first || j == C - 1) ? t : window[(size_t)row * C + j + 1];
    }
"#;

/// Between the stages of the fused kernel: every thread fences its candidate writes, then one
/// thread per block counts the block in on the row's counter; the block that arrives last
/// resets the counter for the next step and runs stage 2, every other block is done.
/// (`counter` is an input, so MLX declares it `const`; it is this thread's own scratch array,
/// see [`counter`].)
const HANDOFF: &str = r#"
    __threadfence();
    __shared__ unsigned int s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* arrived = const_cast<unsigned int*>(counter) + blockIdx.y;
        const unsigned int before = atomicAdd(arrived, 1u);
        s_last = before == (unsigned int)(G - 1) ? 1u : 0u;
        if (s_last) atomicExch(arrived, 0u);
    }
    __syncthreads();
    if (s_last == 0u) return;
    __threadfence();
"#;

/// Threads of stage 2's block in the two-kernel version: 256, or `MLXD_SAMPLER_PICK_THREADS`
/// (256, 512 or 1,024; a measurement switch: fewer threads wait at each barrier, more share
/// the passes over the candidates). On an H100, 1,024 threads took 2 µs less device time
/// (session 13, ncu), but in decode the full pipeline cost 1.94% of greedy's step time with
/// them against 1.69% with 256, averaged over eight pairs of processes on four models, and
/// 2.5% against 1.0% and 1.6% against 0.7% in two more (session 14, `mlxd-bench alternate`).
fn pick_threads() -> i32 {
    static T: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MLXD_SAMPLER_PICK_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|t| [256, 512, 1024].contains(t))
            .unwrap_or(256)
    })
}

/// Words of a row's candidates between the stages, for `g` chunks: each chunk's `MAX_K` best
/// keys, then their token ids, then each chunk's best key. One array, so a step allocates,
/// tracks and passes one buffer between the kernels instead of three (host time per step).
fn candidate_words(g: i32) -> i32 {
    g * (2 * MAX_K + 1)
}

/// Logits per block of stage 1 (`CH` floats of shared memory).
const CH: i32 = 1024;

static SWITCH: KernelSwitch = KernelSwitch::new("MLXD_SAMPLER_KERNEL");
static FUSED: KernelSwitch = KernelSwitch::off_by_default("MLXD_SAMPLER_FUSED");

/// This thread's sampler kernels, made at first use (MLX compiles each at its first call):
/// stage 1, stage 2, both fused, the history append, and the greedy pick with the append.
struct Kernels {
    chunks: CudaKernel,
    pick: CudaKernel,
    fused: CudaKernel,
    append: CudaKernel,
    pick_append: CudaKernel,
}

/// Runs `f` on this thread's kernels.
fn with_kernels<T>(f: impl FnOnce(&Kernels) -> T) -> T {
    KERNELS.with(|cell| f(cell.borrow_mut().get_or_insert_with(kernels)))
}

thread_local! {
    static KERNELS: RefCell<Option<Kernels>> = const { RefCell::new(None) };
    /// The fused kernel's per-row arrival counters (uint32 zeros, at least one per row of a
    /// step), reused by every step of this thread: each step's last blocks leave them at zero
    /// again. Two draws never count on them at once: a model's steps run on one thread, and the
    /// engine queues each step's draw in an evaluation of its own, which MLX runs after the one
    /// before on the stream.
    static COUNTER: RefCell<Option<Array>> = const { RefCell::new(None) };
}

/// Turns the fused variant (one kernel for both stages, and the greedy pick with the history
/// append) on or off for the whole process; off unless `MLXD_SAMPLER_FUSED` is set (not `0`).
pub fn set_fused(enabled: bool) {
    FUSED.set(enabled);
}

/// Whether the fused variant runs (on, the kernels on, and MLX on CUDA).
pub(crate) fn fused() -> bool {
    available() && FUSED.available()
}

/// This thread's arrival counters for a step of `rows` rows: zeros, evaluated (made outside any
/// compiled trace, where the sampling graph takes it as an input).
pub(crate) fn counter(rows: i32) -> Result<Array, Exception> {
    COUNTER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some(c) = cell.as_ref().filter(|c| c.shape()[0] >= rows) {
            return Ok(c.clone());
        }
        let c = Array::zeros::<u32>(&[rows.max(64)])?;
        c.eval()?;
        *cell = Some(c.clone());
        Ok(c)
    })
}

/// Turns the kernels on or off for the whole process (on unless `MLXD_SAMPLER_KERNEL=0`); they
/// run only where MLX runs on CUDA.
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

const APPEND: &str = r#"
    const int T = history_shape[1];
    const int row = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < T) {
        out[(size_t)row * (T + 1) + i] = history[(size_t)row * T + i];
    } else if (i == T) {
        out[(size_t)row * (T + 1) + T] = static_cast<int32_t>(token[row]);
    }
"#;

/// `history` (`[B, T]` int32) with `token` (`[B]`, uint32) appended as column `T`: one node
/// where joining them takes a conversion and two copies. `None` where the kernels are off.
pub fn append_history(history: &Array, token: &Array) -> Option<Result<Array, Exception>> {
    if !available() || history.dtype() != Dtype::Int32 || token.dtype() != Dtype::Uint32 {
        return None;
    }
    let (b, t) = (history.shape()[0], history.shape()[1]);
    Some(with_kernels(|k| {
        let out = k.append.apply(
            &[history, token],
            &[(&[b, t + 1], Dtype::Int32)],
            &[],
            (t + 1, b, 1),
            (256, 1, 1),
            || format!("appending a token to a history of {:?}", history.shape()),
        )?;
        Ok(out.into_iter().next().expect("one output"))
    }))
}

/// The greedy pick of one row and the history append in one node: one block finds the first
/// index of the largest logit (float keys as [`HEADER`] orders them, packed above the inverted
/// index so one 64-bit maximum breaks ties toward the lower id, as MLX's argmax does), then
/// copies the history and puts the token after it.
const PICK_APPEND: &str = r#"
    const int V = logits_shape[1];
    const int T = history_shape[1];
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    __shared__ unsigned long long warp_best[32];
    unsigned long long best = 0ull;
    for (int i = tid; i < V; i += nt) {
        const unsigned long long c =
            ((unsigned long long)mlxd_key_of(static_cast<float>(logits[i])) << 32) | (unsigned long long)(~(unsigned int)i);
        best = c > best ? c : best;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_down_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    if ((tid & 31) == 0) warp_best[tid >> 5] = best;
    __syncthreads();
    if (tid < 32) {
        best = tid < (nt + 31) / 32 ? warp_best[tid] : 0ull;
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long other = __shfl_down_sync(0xffffffffu, best, o);
            best = other > best ? other : best;
        }
        if (tid == 0) warp_best[0] = best;
    }
    __syncthreads();
    const unsigned int pick = ~(unsigned int)(warp_best[0] & 0xffffffffull);
    if (tid == 0) {
        token[0] = pick;
        out[T] = (int32_t)pick;
    }
    for (int i = tid; i < T; i += nt) out[i] = history[i];
"#;

/// For one greedy row whose plugins read the history: its token (`[1]` uint32, the argmax of
/// `logits`, `[1, V]` any float dtype) and `history` (`[1, T]` int32) with that token appended,
/// from one kernel where the argmax and the append are two nodes. `None` where the fused
/// variant is off (see the module header) or the shapes are not one row.
pub fn pick_and_append(logits: &Array, history: &Array) -> Option<Result<(Array, Array), Exception>> {
    if !fused()
        || history.dtype() != Dtype::Int32
        || logits.ndim() != 2
        || logits.shape()[0] != 1
        || history.shape()[0] != 1
    {
        return None;
    }
    let t = history.shape()[1];
    Some(with_kernels(|k| {
        let out = k.pick_append.apply(
            &[logits, history],
            &[(&[1], Dtype::Uint32), (&[1, t + 1], Dtype::Int32)],
            &[],
            (1024, 1, 1),
            (1024, 1, 1),
            || format!("the greedy pick and history append for logits {:?}", logits.shape()),
        )?;
        let mut out = out.into_iter();
        match (out.next(), out.next()) {
            (Some(token), Some(history)) => Ok((token, history)),
            _ => Err(Exception::custom("the pick-and-append kernel returned too few outputs")),
        }
    }))
}

/// Whether the sampling graph may use the kernels: on, and MLX runs on CUDA.
pub(crate) fn available() -> bool {
    SWITCH.available()
}

/// On CUDA, has MLX compile the sampling kernels for a `vocab`-token model whose logits are
/// `dtype` now (one draw on zeros, and the history append of plugins that read the tokens), so
/// the first request that samples does not wait for NVRTC. The kernels' compile-time constants
/// are the vocabulary and the logits' dtype: every request of the model then uses these, except
/// one that samples a plugin's float32 output at random (stage 1 for float32 compiles at its
/// first use; MLX keeps the compiled code on disk for later processes).
/// If the fused variant fails here it is switched off and the two kernels are tried; if those
/// fail the kernels are switched off (the MLX-op graph samples instead), with a warning.
pub fn prepare(vocab: i32, dtype: Dtype) {
    if !available() {
        return;
    }
    let started = std::time::Instant::now();
    let draw = || -> Result<(), Exception> {
        let logits = mlx_rs::ops::zeros_dtype(&[1, vocab], dtype)?;
        let row = RowParams {
            inv_temperature: 1.0,
            top_k: 16,
            top_p: f32::INFINITY,
            ln_min_p: f32::NEG_INFINITY,
            penalty: 1.0,
            window_start: 0,
        };
        let drawn = sample(&Inputs {
            logits: &logits,
            params: &params(&[row]),
            keys: &Array::zeros::<u32>(&[1, 2])?,
            window: None,
            counter: Some(&counter(1)?),
        })?;
        let history = Array::zeros::<i32>(&[1, 1])?;
        let appended = append_history(&history, &Array::zeros::<u32>(&[1])?)
            .unwrap_or_else(|| Err(Exception::custom("the append kernel is off")))?;
        let mut outs = vec![drawn.tokens, drawn.keys, appended];
        // Fused: the greedy pick with the append too (on float32, what DRY returns).
        if let Some(fused) = pick_and_append(&Array::zeros::<f32>(&[1, vocab])?, &history) {
            let (token, history) = fused?;
            outs.extend([token, history]);
        }
        mlx_rs::transforms::eval(outs.iter())
    };
    let mut result = draw();
    if let (Err(e), true) = (&result, fused()) {
        tracing::warn!(error = %e, "fused sampling CUDA kernel unavailable; trying the two-kernel version");
        set_fused(false);
        result = draw();
    }
    match result {
        Ok(()) => {
            tracing::info!(ms = started.elapsed().as_millis() as u64, fused = fused(), "sampling CUDA kernels ready")
        }
        Err(e) => {
            set_enabled(false);
            tracing::warn!(error = %e, "sampling CUDA kernels unavailable; sampling with MLX operations");
        }
    }
}

fn kernels() -> Kernels {
    const INPUTS: [&str; 5] = ["logits", "params", "window", "keys", "counter"];
    const CANDIDATES: [&str; 1] = ["cand"];
    const DRAWN: [&str; 3] = ["token", "next_keys", "next_window"];
    let chunks = CudaKernel::new("mlxd_sample_chunks", &INPUTS[..3], &CANDIDATES, HEADER, CHUNKS, true);
    let pick_inputs = ["cand", "params", "window", "keys"];
    let pick = CudaKernel::new("mlxd_sample_pick", &pick_inputs, &DRAWN, HEADER, PICK, true);
    let outputs: Vec<&str> = CANDIDATES.iter().chain(&DRAWN).copied().collect();
    let body = format!("{{{CHUNKS}}}\n{HANDOFF}{{{PICK}}}");
    let fused = CudaKernel::new("mlxd_sample", &INPUTS, &outputs, HEADER, &body, true);
    let append = CudaKernel::new("mlxd_history_append", &["history", "token"], &["out"], "", APPEND, true);
    let pick_append =
        CudaKernel::new("mlxd_pick_append", &["logits", "history"], &["token", "out"], HEADER, PICK_APPEND, true);
    Kernels { chunks, pick, fused, append, pick_append }
}

/// Columns of a row's parameters in [`params`]'s array, as the kernels read them.
const PARAMS: usize = 8;

/// One row's parameters for the kernels. A stage a row does not use takes its neutral value:
/// top-p infinity, ln min-p minus infinity, penalty 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowParams {
    pub inv_temperature: f32,
    /// At most [`MAX_K`] (larger values are clamped by the kernels).
    pub top_k: i32,
    pub top_p: f32,
    pub ln_min_p: f32,
    pub penalty: f32,
    /// The first live slot of the row's repetition window.
    pub window_start: i32,
}

/// The rows' parameters as the kernels take them: one `[B, 8]` float32 array (the integers are
/// exact in float32), so a step passes one array where six `[B, 1]` columns were six inputs to
/// the compiled step and to each kernel, each of them host time on every step.
pub(crate) fn params(rows: &[RowParams]) -> Array {
    let mut flat = Vec::with_capacity(rows.len() * PARAMS);
    for r in rows {
        let row = [r.inv_temperature, r.top_k as f32, r.top_p, r.ln_min_p, r.penalty, r.window_start as f32];
        flat.extend(row);
        flat.resize(flat.len() + PARAMS - row.len(), 0.0);
    }
    Array::from_slice(&flat, &[rows.len() as i32, PARAMS as i32])
}

/// What the kernels draw from: the logits after steps 1-3 (`logits`, `[B, V]`, any float
/// dtype), the rows' [`params`], their keys (`[B, 2]` uint32) and, where the kernels apply the
/// repetition penalty, their windows (`[B, C]` uint32); `counter` is [`counter`]'s, for the
/// fused kernel.
pub(crate) struct Inputs<'a> {
    pub logits: &'a Array,
    pub params: &'a Array,
    pub keys: &'a Array,
    pub window: Option<&'a Array>,
    pub counter: Option<&'a Array>,
}

/// A step's draw: the tokens `[B]` uint32, the rows' next keys `[B, 2]`, and with the
/// repetition penalty their advanced windows `[B, C]`.
pub(crate) struct Drawn {
    pub tokens: Array,
    pub keys: Array,
    pub window: Option<Array>,
}

/// Runs the kernels on `inp` (two, or the fused one; see the module header); see [`Inputs`].
/// Without a window the kernels get a one-slot window no token matches (inside the compiled
/// sampling step, a constant of the trace, not an array made per step), so one compiled set
/// serves every request of a model.
pub(crate) fn sample(inp: &Inputs<'_>) -> Result<Drawn, Exception> {
    let (b, v) = (inp.logits.shape()[0], inp.logits.shape()[1]);
    let g = (v + CH - 1) / CH;
    // Without a penalty, a window no token id matches (the drawn one is shifted in and dropped).
    let no_window = Array::from_slice(&vec![u32::MAX; b as usize], &[b, 1]);
    let window = inp.window.unwrap_or(&no_window);
    let c = window.shape()[window.ndim() - 1];
    let template = [
        ("V", TemplateArg::Int(v)),
        ("CH", TemplateArg::Int(CH)),
        ("G", TemplateArg::Int(g)),
        ("KMAX", TemplateArg::Int(MAX_K)),
    ];
    let candidates = [(&[b, candidate_words(g)][..], Dtype::Uint32)];
    let drawn = [(&[b][..], Dtype::Uint32), (&[b, 2][..], Dtype::Uint32), (&[b, c][..], Dtype::Uint32)];
    let what = || format!("the sampling kernels for logits {:?}", inp.logits.shape());
    let out = with_kernels(|k| {
        let stage1 = [inp.logits, inp.params, window];
        if let (true, Some(counter)) = (fused(), inp.counter) {
            let inputs: Vec<&Array> = stage1.iter().copied().chain([inp.keys, counter]).collect();
            let all: Vec<_> = candidates.iter().chain(&drawn).copied().collect();
            // The candidates (output 0) are the kernel's scratch.
            Ok(k.fused.apply(&inputs, &all, &template, (256 * g, b, 1), (256, 1, 1), what)?.split_off(1))
        } else {
            let cands = k.chunks.apply(&stage1, &candidates, &template, (256 * g, b, 1), (256, 1, 1), what)?;
            let inputs = [&cands[0], inp.params, window, inp.keys];
            let t = pick_threads();
            k.pick.apply(&inputs, &drawn, &template, (t, b, 1), (t, 1, 1), what)
        }
    })?;
    let mut out = out.into_iter();
    let mut next = || out.next().ok_or_else(|| Exception::custom("the sampling kernels returned too few outputs"));
    let (tokens, keys, window) = (next()?, next()?, next()?);
    Ok(Drawn { tokens, keys, window: inp.window.is_some().then_some(window) })
}
