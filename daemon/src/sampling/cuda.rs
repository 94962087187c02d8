//! Steps 4-9 of the pipeline (temperature, top-k, top-p, min-p and the Gumbel-max pick; with
//! step 2, the repetition penalty, when no bias, presence or frequency penalty, logprobs or
//! plugin needs the logits in between) as one CUDA kernel,
//! for MLX's CUDA backend, where a decode step is bound by how many kernels the host launches:
//! the same steps as MLX operations cost ~35 launches. One block per row: a radix select
//! finds the row's k best tempered logits, they are ranked, the filters run over them in
//! order and the draw takes `argmax(logit + Gumbel noise)` with the noise hashed from the row's
//! key and the token id exactly as [`super::pipeline`] hashes it, so both paths draw the same
//! token up to floating-point rounding at a filter's boundary.
//!
//! Experimental, off by default (`MLXD_SAMPLER_KERNEL=1` turns it on), and used only where it
//! applies (a CUDA device, every row drawing at random with a top-k of at most [`MAX_K`], no
//! typical-p, no inspection). On an H100 it drew exactly what the graph draws (1,024 of 1,024
//! draws, `mlxd-bench sampler-check`) and cut the full pipeline from 40 to 7 primitives per step
//! beyond greedy, but the host time full sampling adds did not measurably drop (docs/
//! benchmarks.md, session 4), and the kernel adds ~0.15 ms of device time per step.

use crate::ffi::{CudaKernel, TemplateArg};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::cell::{Cell, RefCell};

/// Largest top-k the kernel handles (its candidates live in shared memory).
pub(crate) const MAX_K: i32 = 256;

const SOURCE: &str = r#"
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    const float* x = logits + (size_t)row * V;
    const float inv_t = inv_temperature[row];
    const int k = max(1, min(top_k[row], KMAX));
    const float top_p_row = HAS_TOP_P ? top_p[row] : __int_as_float(0x7f800000);
    const float ln_min_p_row = HAS_MIN_P ? ln_min_p[row] : __int_as_float(0xff800000);
    const float pen = HAS_REP ? penalty[row] : 1.0f;
    const unsigned int k0 = keys[2 * row];
    const unsigned int k1 = keys[2 * row + 1];

    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_prefix, s_mask, s_need, n_gt, n_eq;
    __shared__ float cand_v[KMAX];
    __shared__ int cand_i[KMAX];
    __shared__ float sorted_v[KMAX];
    __shared__ int sorted_i[KMAX];
    // The repetition window as a bitmap of the vocabulary: a token in it is penalized once.
    __shared__ unsigned int seen[HAS_REP ? (V + 31) / 32 : 1];
    if (HAS_REP) {
        for (int i = tid; i < (V + 31) / 32; i += nt) seen[i] = 0u;
        __syncthreads();
        for (int j = tid; j < C; j += nt) {
            const unsigned int t = window[(size_t)row * C + j];
            if (t < (unsigned int)V) atomicOr(&seen[t >> 5], 1u << (t & 31u));
        }
    }
    // The tempered logit of token i after the repetition penalty (the graph's steps 2 and 4).
    auto value = [&](int i) -> float {
        float f = x[i];
        if (HAS_REP && ((seen[i >> 5] >> (i & 31)) & 1u)) f = f < 0.0f ? f * pen : f / pen;
        return f * inv_t;
    };
    // Order-preserving 32-bit keys of the floats (NaN below everything).
    auto key_of = [](float f) -> unsigned int {
        const unsigned int b = __float_as_uint(f);
        return f != f ? 0u : ((b & 0x80000000u) ? ~b : (b | 0x80000000u));
    };

    if (tid == 0) { s_prefix = 0u; s_mask = 0u; s_need = (unsigned int)k; }
    __syncthreads();
    // Radix select, 8 bits at a time from the top: the key of the k-th largest logit.
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += nt) hist[i] = 0u;
        __syncthreads();
        const unsigned int prefix = s_prefix, mask = s_mask;
        for (int i = tid; i < V; i += nt) {
            const unsigned int u = key_of(value(i));
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            unsigned int need = s_need;
            int bin = 255;
            for (; bin > 0; --bin) {
                if (hist[bin] >= need) break;
                need -= hist[bin];
            }
            s_need = need;
            s_prefix = prefix | ((unsigned int)bin << shift);
            s_mask = mask | (255u << shift);
        }
        __syncthreads();
    }
    const unsigned int kth = s_prefix;
    const unsigned int ties = s_need;
    if (tid == 0) { n_gt = 0u; n_eq = 0u; }
    __syncthreads();
    // The k candidates: every logit above the k-th, and as many equal to it as fit.
    for (int i = tid; i < V; i += nt) {
        const float f = value(i);
        const unsigned int u = key_of(f);
        if (u > kth) {
            const unsigned int p = atomicAdd(&n_gt, 1u);
            if (p < (unsigned int)k) { cand_v[p] = f; cand_i[p] = i; }
        } else if (u == kth) {
            const unsigned int q = atomicAdd(&n_eq, 1u);
            if (q < ties) { const unsigned int p = (unsigned int)k - ties + q; cand_v[p] = f; cand_i[p] = i; }
        }
    }
    __syncthreads();
    // Rank them, best first (equal logits by token id).
    for (int a = tid; a < k; a += nt) {
        const float va = cand_v[a];
        const int ia = cand_i[a];
        int r = 0;
        for (int b = 0; b < k; ++b) {
            const float vb = cand_v[b];
            r += (vb > va) || (vb == va && cand_i[b] < ia);
        }
        sorted_v[r] = va;
        sorted_i[r] = ia;
    }
    __syncthreads();
    if (tid == 0) {
        const float best = sorted_v[0];
        float z = 0.0f;
        for (int j = 0; j < k; ++j) z += expf(sorted_v[j] - best);
        float before = 0.0f;
        float best_score = __int_as_float(0xff800000);
        int pick = sorted_i[0];
        for (int j = 0; j < k; ++j) {
            const float v = sorted_v[j];
            // Top-p: the mass strictly before this candidate; min-p: against the best logit.
            const bool keep = before < top_p_row && v >= best + ln_min_p_row;
            before += expf(v - best) / z;
            if (!keep) continue;
            unsigned int h = ((unsigned int)sorted_i[j] ^ k0) * 0x9e3779b1u;
            h = (h ^ (h >> 16)) * 0x85ebca6bu;
            h ^= k1;
            h = (h ^ (h >> 13)) * 0xc2b2ae35u;
            h ^= h >> 16;
            const float u = (float)(h >> 8) * (1.0f / 16777216.0f) + (0.5f / 16777216.0f);
            const float s = v - logf(-logf(u));
            if (s > best_score) { best_score = s; pick = sorted_i[j]; }
        }
        token[row] = (unsigned int)pick;
    }
"#;

thread_local! {
    static ENABLED: Cell<bool> = Cell::new(std::env::var("MLXD_SAMPLER_KERNEL").is_ok_and(|v| v == "1"));
    static KERNEL: RefCell<Option<CudaKernel>> = const { RefCell::new(None) };
}

/// Turns the kernel on or off for this thread (off unless `MLXD_SAMPLER_KERNEL=1`).
pub fn set_enabled(enabled: bool) {
    ENABLED.with(|c| c.set(enabled));
}

/// Whether this thread's sampling graph may use the kernel: on, and MLX runs on CUDA.
pub(crate) fn available() -> bool {
    static CUDA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    ENABLED.with(Cell::get) && *CUDA.get_or_init(|| crate::runtime::backend() == "cuda")
}

fn kernel() -> CudaKernel {
    CudaKernel::new(
        "mlxd_sample_topk",
        &["logits", "inv_temperature", "top_k", "top_p", "ln_min_p", "keys", "window", "penalty"],
        &["token"],
        "",
        SOURCE,
        true,
    )
}

/// Largest vocabulary whose repetition bitmap the kernel keeps in shared memory.
pub(crate) const MAX_PENALTY_VOCAB: i32 = 262_144;

/// The drawn token of each row, `[B]` uint32, from the logits after steps 1-3 (`logits`,
/// `[B, V]` float32): the repetition penalty when `repetition` gives the rows' windows
/// (`[B, C]` uint32) and penalties (`[B, 1]` float32; vocabularies up to
/// [`MAX_PENALTY_VOCAB`]), then the temperature (`[B, 1]` reciprocals), then the rows' top-k
/// (`[B, 1]` int32, at most [`MAX_K`]), top-p and ln min-p (`[B, 1]` float32, or `None` when
/// no row filters that way) and the pick with the rows' keys (`[B, 2]` uint32).
pub(crate) struct Inputs<'a> {
    pub logits: &'a Array,
    pub inv_temperature: &'a Array,
    pub top_k: &'a Array,
    pub top_p: Option<&'a Array>,
    pub ln_min_p: Option<&'a Array>,
    pub keys: &'a Array,
    pub repetition: Option<(&'a Array, &'a Array)>,
}

/// Runs the kernel on `inp`; see [`Inputs`].
pub(crate) fn sample(inp: &Inputs<'_>) -> Result<Array, Exception> {
    let (b, v) = (inp.logits.shape()[0], inp.logits.shape()[1]);
    let unused = Array::from_slice(&[0.0f32], &[1]);
    let unused_window = Array::from_slice(&[u32::MAX], &[1, 1]);
    let (window, penalty) = inp.repetition.unwrap_or((&unused_window, &unused));
    let inputs = [
        inp.logits,
        inp.inv_temperature,
        inp.top_k,
        inp.top_p.unwrap_or(&unused),
        inp.ln_min_p.unwrap_or(&unused),
        inp.keys,
        window,
        penalty,
    ];
    let c = window.shape()[window.ndim() - 1];
    let template = [
        ("V", TemplateArg::Int(v)),
        ("KMAX", TemplateArg::Int(MAX_K)),
        ("C", TemplateArg::Int(c)),
        ("HAS_REP", TemplateArg::Bool(inp.repetition.is_some())),
        ("HAS_TOP_P", TemplateArg::Bool(inp.top_p.is_some())),
        ("HAS_MIN_P", TemplateArg::Bool(inp.ln_min_p.is_some())),
    ];
    KERNEL.with(|cell| {
        let mut cell = cell.borrow_mut();
        let k = cell.get_or_insert_with(kernel);
        let out = k.apply(&inputs, &[(&[b], Dtype::Uint32)], &template, (1024 * b, 1, 1), (1024, 1, 1), || {
            format!("the sampling kernel for logits {:?}", inp.logits.shape())
        })?;
        Ok(out.into_iter().next().expect("one output"))
    })
}
