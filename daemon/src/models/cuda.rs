//! Two kernels of a batched decode step for MLX's CUDA backend, where a step of a small model
//! is bound by the host's work per node of the step's CUDA graphs, not by the device:
//!
//! - **Products of a few rows** (`x [M, K] @ W^T`, 2 <= M <= [`MAX_ROWS`]): MLX 0.32 runs a
//!   one-row product with its own gemv kernel but several rows through cuBLASLt, set up and
//!   captured into the step's graph as a child graph per call, which also makes MLX rebuild
//!   those graphs every step instead of updating them. Here one warp computes one output column
//!   for every row, reading the weight row once (16 bytes per lane per load) and accumulating in
//!   float. A stacked weight (q/k/v, gate/up) writes each part's columns to an output of its own,
//!   so the parts come out contiguous without a split.
//! - **Attention over a left-padded stack** ([`crate::cache::BatchCache`]): MLX's fused decode
//!   attention refuses an array mask, and its fallback (two batched products through cuBLASLt, a
//!   mask and a softmax) costs several nodes per layer. Here one block per (row, query head)
//!   walks that row's live key columns only, sixteen warps each keeping an online softmax over
//!   four columns at a time (their loads in flight together), merged at the end; no mask is
//!   built.
//!
//! Both are used only on CUDA, for shapes they handle (see [`rows_apply`], [`attention_applies`]),
//! and can be switched off (`MLXD_MODEL_KERNELS=0`, or [`set_enabled`]) to compare against
//! MLX's own path. `mlxd-bench kernel-check` compares their results with MLX's on the device.

use crate::ffi::{CudaKernel, TemplateArg};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Most rows one product kernel call takes (its accumulators live in registers).
pub const MAX_ROWS: i32 = 16;

static ENABLED: std::sync::LazyLock<AtomicBool> =
    std::sync::LazyLock::new(|| AtomicBool::new(std::env::var("MLXD_MODEL_KERNELS").map_or(true, |v| v != "0")));

/// Turns the kernels on or off for the whole process (on unless `MLXD_MODEL_KERNELS=0`); they
/// run only where MLX runs on CUDA.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

fn available() -> bool {
    static CUDA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    ENABLED.load(Ordering::Relaxed) && *CUDA.get_or_init(|| crate::runtime::backend() == "cuda")
}

fn float_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::Bfloat16 | Dtype::Float16 | Dtype::Float32)
}

/// Loads 8 consecutive elements (16-byte aligned for 16-bit types, 32 bytes for float) as floats.
const HEADER: &str = r#"
template <typename T> __device__ inline void mlxd_load8(const T* p, float* f);
template <> __device__ inline void mlxd_load8<__nv_bfloat16>(const __nv_bfloat16* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}
template <> __device__ inline void mlxd_load8<__half>(const __half* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 v = __half22float2(h[j]);
        f[2 * j] = v.x;
        f[2 * j + 1] = v.y;
    }
}
template <> __device__ inline void mlxd_load8<float>(const float* p, float* f) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
"#;

/// The product kernel's body for `parts` outputs (1 to 3); part `i` holds columns
/// `[P0 + ... + P(i-1), ...)` of the product, `[M, Pi]`.
fn rows_source(parts: usize) -> String {
    let mut s = String::from(
        r#"
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * COLS;
    if (n0 >= N) return;
    float acc[COLS][MAX_ROWS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
#pragma unroll
        for (int m = 0; m < MAX_ROWS; ++m) acc[c][m] = 0.0f;
    }
    // Past the last column a warp re-reads the last one; those sums are not written.
    const T* wr[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) wr[c] = w + (size_t)min(n0 + c, N - 1) * K;
    // COLS weight rows per round, and rounds unrolled, so that several loads are in flight at
    // once; each row of x loaded serves COLS columns.
#pragma unroll UNROLL
    for (int k = lane * 8; k < K; k += 256) {
        float wf[COLS][8];
#pragma unroll
        for (int c = 0; c < COLS; ++c) mlxd_load8<T>(wr[c] + k, wf[c]);
#pragma unroll
        for (int m = 0; m < MAX_ROWS; ++m) {
            if (m < M) {
                float xf[8];
                mlxd_load8<T>(x + (size_t)m * K + k, xf);
#pragma unroll
                for (int c = 0; c < COLS; ++c) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[c][m] = fmaf(wf[c][j], xf[j], acc[c][m]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
#pragma unroll
        for (int m = 0; m < MAX_ROWS; ++m) {
            if (m < M) {
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc[c][m] += __shfl_xor_sync(0xffffffffu, acc[c][m], o);
            }
        }
    }
    if (lane != 0) return;
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
        const int n = n0 + c;
        if (n >= N) break;
"#,
    );
    // Part i's columns start at the sum of the widths before it; the last part's width is
    // whatever is left of N.
    let mut start = String::from("0");
    for i in 0..parts {
        let width = if i + 1 < parts { format!("P{i}") } else { format!("(N - ({start}))") };
        let cond = match (i, i + 1 < parts) {
            (0, true) => format!("if (n < ({start}) + P{i}) "),
            (0, false) => String::new(),
            (_, true) => format!("else if (n < ({start}) + P{i}) "),
            (_, false) => "else ".to_string(),
        };
        s.push_str(&format!(
            "        {cond}{{\n            const int col = n - ({start});\n#pragma unroll\n            for (int m = 0; m < MAX_ROWS; ++m) if (m < M) y{i}[(size_t)m * {width} + col] = static_cast<T>(acc[c][m]);\n        }}\n"
        ));
        start = format!("{start} + P{i}");
    }
    s.push_str("    }\n");
    s
}

static FORCED_COLS: std::sync::LazyLock<AtomicI32> = std::sync::LazyLock::new(|| {
    AtomicI32::new(std::env::var("MLXD_ROWS_COLS").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
});

/// Forces the product kernel's columns per warp (1, 2 or 4; `None`: chosen by the row count),
/// for measuring; `MLXD_ROWS_COLS` sets it at start.
pub fn set_columns_per_warp(cols: Option<i32>) {
    FORCED_COLS.store(cols.unwrap_or(0), Ordering::Relaxed);
}

/// Columns per warp and unrolled rounds for a product of up to `rows` rows: enough loads in
/// flight, accumulators within the registers.
fn layout(rows: i32) -> (i32, i32) {
    let forced = FORCED_COLS.load(Ordering::Relaxed);
    let cols = if forced > 0 {
        forced.min(4)
    } else if rows <= 8 {
        4
    } else {
        2
    };
    (cols, (4 / cols).max(1))
}

thread_local! {
    /// Product kernels by number of parts (index 0: one part).
    static ROWS: RefCell<[Option<CudaKernel>; 3]> = const { RefCell::new([None, None, None]) };
    static ATTENTION: RefCell<Option<CudaKernel>> = const { RefCell::new(None) };
}

/// Whether [`rows`] takes `x @ weight^T` (`weight` row-major `[N, K]`): on CUDA, 2 to
/// [`MAX_ROWS`] rows, one float dtype for both, `K` a multiple of 8.
pub fn rows_apply(x: &Array, weight: &Array) -> bool {
    let (xs, ws) = (x.shape(), weight.shape());
    available()
        && x.ndim() == 2
        && weight.ndim() == 2
        && (2..=MAX_ROWS).contains(&xs[0])
        && xs[1] == ws[1]
        && xs[1] % 8 == 0
        && x.dtype() == weight.dtype()
        && float_dtype(x.dtype())
}

/// `x @ weight^T` split by output columns into `widths` (they sum to `weight`'s rows; at most
/// three parts), each part `[M, width]` and contiguous. Only where [`rows_apply`] holds.
pub fn rows(x: &Array, weight: &Array, widths: &[i32]) -> Result<Vec<Array>, Exception> {
    let (m, n) = (x.shape()[0], weight.shape()[0]);
    let parts = widths.len();
    assert!((1..=3).contains(&parts) && widths.iter().sum::<i32>() == n, "parts {widths:?} of {n} columns");
    let shapes: Vec<[i32; 2]> = widths.iter().map(|&w| [m, w]).collect();
    let outputs: Vec<(&[i32], Dtype)> = shapes.iter().map(|s| (&s[..], x.dtype())).collect();
    // Accumulators for 4, 8 or 16 rows (three compiled variants per matrix layout): fewer
    // registers for fewer rows, so more warps fit on a multiprocessor (53, 82 and 114
    // registers on sm_90).
    let room = [4, 8, MAX_ROWS].into_iter().find(|&r| m <= r).unwrap_or(MAX_ROWS);
    let (cols, unroll) = layout(room);
    let mut template = vec![
        ("T", TemplateArg::Dtype(x.dtype())),
        ("MAX_ROWS", TemplateArg::Int(room)),
        ("COLS", TemplateArg::Int(cols)),
        ("UNROLL", TemplateArg::Int(unroll)),
    ];
    let names = ["P0", "P1"];
    for (i, &w) in widths[..parts - 1].iter().enumerate() {
        template.push((names[i], TemplateArg::Int(w)));
    }
    // Eight warps per block, `cols` output columns per warp.
    let warps = (n + cols - 1) / cols;
    let blocks = (warps + 7) / 8;
    ROWS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let k = cell[parts - 1].get_or_insert_with(|| {
            let outs = ["y0", "y1", "y2"];
            CudaKernel::new(
                &format!("mlxd_rows{parts}"),
                &["x", "w"],
                &outs[..parts],
                HEADER,
                &rows_source(parts),
                true,
            )
        });
        k.apply(&[x, weight], &outputs, &template, (blocks * 256, 1, 1), (256, 1, 1), || {
            format!("the product of {:?} by the transpose of {:?}", x.shape(), weight.shape())
        })
    })
}

const ATTENTION_SOURCE: &str = r#"
    constexpr int E = D / 32;
    constexpr int WARPS = 16;
    constexpr int U = 4;
    const int b = blockIdx.x / HQ;
    const int h = blockIdx.x % HQ;
    const int kvh = h / (HQ / HKV);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int cap = k_shape[2];
    const int first = start[b];
    const int end = start[b] + offset[b] + 1;
    const float scale = __int_as_float(SCALE_BITS);
    const float neg_inf = __int_as_float(0xff800000);
    float qf[E], acc[E];
    const T* qp = q + ((size_t)b * HQ + h) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) { qf[e] = static_cast<float>(qp[e]) * scale; acc[e] = 0.0f; }
    float mx = neg_inf, l = 0.0f;
    const size_t head = ((size_t)b * HKV + kvh) * (size_t)cap;
    // Each warp takes U columns per round (WARPS apart), all loads issued before any use.
    for (int j0 = first + warp; j0 < end; j0 += WARPS * U) {
        float kf[U][E], vf[U][E];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u * WARPS;
            ok[u] = j < end;
            const size_t at = (head + (ok[u] ? j : j0)) * D + lane * E;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                kf[u][e] = static_cast<float>(k[at + e]);
                vf[u][e] = static_cast<float>(v[at + e]);
            }
        }
        float s[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float t = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) t = fmaf(qf[e], kf[u][e], t);
            s[u] = t;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int u = 0; u < U; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        }
        // Column j0 is live (the loop's condition), so the new maximum is finite.
        float m_new = mx;
#pragma unroll
        for (int u = 0; u < U; ++u) if (ok[u]) m_new = fmaxf(m_new, s[u]);
        const float c = expf(mx - m_new);
        l *= c;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= c;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (!ok[u]) continue;
            const float p = expf(s[u] - m_new);
            l += p;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] = fmaf(p, vf[u][e], acc[e]);
        }
        mx = m_new;
    }
    __shared__ float s_m[WARPS];
    __shared__ float s_l[WARPS];
    __shared__ float s_acc[WARPS][D];
    if (lane == 0) { s_m[warp] = mx; s_l[warp] = l; }
#pragma unroll
    for (int e = 0; e < E; ++e) s_acc[warp][lane * E + e] = acc[e];
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float top = neg_inf;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, s_m[w]);
        float den = 0.0f, num = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = s_m[w] == neg_inf ? 0.0f : expf(s_m[w] - top);
            den += s_l[w] * f;
            num += s_acc[w][d] * f;
        }
        out[((size_t)b * HQ + h) * D + d] = static_cast<T>(num / den);
    }
"#;

/// Whether [`attention`] takes queries `[B, heads, 1, head_dim]` against a stack of
/// `kv_heads` heads: on CUDA, a float dtype, `head_dim` a multiple of 32 up to 256, query
/// heads a multiple of key heads.
pub fn attention_applies(q: &Array, heads: i32, kv_heads: i32, head_dim: i32) -> bool {
    available()
        && float_dtype(q.dtype())
        && head_dim % 32 == 0
        && head_dim <= 256
        && kv_heads > 0
        && heads % kv_heads == 0
}

/// Decode attention for a left-padded stack: `q` `[B, heads, 1, head_dim]`, `keys` / `values`
/// the stack's whole storage `[B, kv_heads, capacity, head_dim]`, row `b` attending to columns
/// `starts[b] ..= starts[b] + offsets[b]` (`[B]` int32 each: its padding, and its cached
/// length before this step's token). Returns `[B, heads, 1, head_dim]`.
pub fn attention(
    q: &Array,
    keys: &Array,
    values: &Array,
    starts: &Array,
    offsets: &Array,
    scale: f32,
) -> Result<Array, Exception> {
    let (b, heads, d) = (q.shape()[0], q.shape()[1], q.shape()[3]);
    let kv_heads = keys.shape()[1];
    let template = [
        ("T", TemplateArg::Dtype(q.dtype())),
        ("HQ", TemplateArg::Int(heads)),
        ("HKV", TemplateArg::Int(kv_heads)),
        ("D", TemplateArg::Int(d)),
        ("SCALE_BITS", TemplateArg::Int(scale.to_bits() as i32)),
    ];
    let shape = [b, heads, 1, d];
    ATTENTION.with(|cell| {
        let mut cell = cell.borrow_mut();
        let k = cell.get_or_insert_with(|| {
            CudaKernel::new(
                "mlxd_padded_attention",
                &["q", "k", "v", "start", "offset"],
                &["out"],
                "",
                ATTENTION_SOURCE,
                true,
            )
        });
        let out = k.apply(
            &[q, keys, values, starts, offsets],
            &[(&shape, q.dtype())],
            &template,
            (b * heads * 512, 1, 1),
            (512, 1, 1),
            || format!("padded attention for queries {:?} over keys {:?}", q.shape(), keys.shape()),
        )?;
        Ok(out.into_iter().next().expect("one output"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_kernel_writes_each_part_to_its_own_output() {
        let one = rows_source(1);
        assert!(one.contains("y0[(size_t)m * (N - (0)) + col]") && !one.contains("y1"));
        let three = rows_source(3);
        assert!(three.contains("if (n < (0) + P0)"));
        assert!(three.contains("else if (n < (0 + P0) + P1)"));
        assert!(three.contains("else {\n            const int col = n - (0 + P0 + P1);"));
        assert!(three.contains("y2[(size_t)m * (N - (0 + P0 + P1)) + col]"));
    }

    #[test]
    fn kernels_stay_off_without_cuda() {
        // The tests run MLX on the CPU: every shape falls back to MLX's own operations.
        let x = Array::zeros::<f32>(&[4, 64]).unwrap();
        let w = Array::zeros::<f32>(&[32, 64]).unwrap();
        assert!(!rows_apply(&x, &w));
        let q = Array::zeros::<f32>(&[2, 4, 1, 64]).unwrap();
        assert!(!attention_applies(&q, 4, 2, 64));
    }
}
