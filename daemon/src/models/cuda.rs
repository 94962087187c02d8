//! Two kernels of a batched decode step for MLX's CUDA backend, where a step of a small model
//! is bound by the host's work per node of the step's CUDA graphs, not by the device:
//!
//! - **Products of a few rows** (`x [M, K] @ W^T`, 2 <= M <= [`MAX_ROWS`]): MLX 0.32 runs a
//!   one-row product with its own gemv kernel but several rows through cuBLASLt, set up and
//!   captured into the step's graph as a child graph per call, which also makes MLX rebuild
//!   those graphs every step instead of updating them. Here a block of eight warps computes
//!   eight output columns for every row on the tensor cores (`mma.sync` m16n8k16, float
//!   accumulators), reading each weight row once, the warps splitting the inner dimension. A
//!   stacked weight (q/k/v, gate/up) writes each part's columns to an output of its own, so the
//!   parts come out contiguous without a split.
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

use crate::ffi::{CudaKernel, KernelSwitch, TemplateArg};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;

/// Most rows one product kernel call takes (one 16-row tensor-core tile).
pub const MAX_ROWS: i32 = 16;

static SWITCH: KernelSwitch = KernelSwitch::new("MLXD_MODEL_KERNELS");

/// Turns the kernels on or off for the whole process (on unless `MLXD_MODEL_KERNELS=0`); they
/// run only where MLX runs on CUDA.
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

pub(crate) fn available() -> bool {
    SWITCH.available()
}

fn float_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::Bfloat16 | Dtype::Float16 | Dtype::Float32)
}

/// One `m16n8k16` tensor-core multiply-accumulate (16-bit inputs, float accumulators).
const HEADER: &str = r#"
template <bool BF16>
__device__ inline void mlxd_mma(float* d, unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3,
                                unsigned int b0, unsigned int b1) {
    if constexpr (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}
"#;

/// The product kernel's body for `parts` outputs (1 to 3); part `i` holds columns
/// `[P0 + ... + P(i-1), ...)` of the product, `[M, Pi]`.
///
/// One block of eight warps computes eight output columns for all (up to 16) rows with
/// tensor-core `m16n8k16` multiplies, the eight warps splitting `K` between them (so a
/// matrix's rows are streamed by many blocks at once) and summing through shared memory.
/// Per 64 elements of `K`, lane `(g, t)` (`g = lane / 4`, `t = lane % 4`) loads 16 consecutive
/// elements at `64c + 16t` of weight row `n0 + g` and of x rows `g` and `g + 8`: the products'
/// `k` index is then a permutation of the physical one, the same for both operands, which the
/// sum does not see, and every load is 32 contiguous bytes.
fn rows_source(parts: usize) -> String {
    let mut s = String::from(
        r#"
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int n0 = blockIdx.x * 8;
    // Past the last column the block re-reads the last one; those sums are not written.
    const uint4* wp = reinterpret_cast<const uint4*>(w + (size_t)min(n0 + g, N - 1) * K + t * 16);
    const bool lo = g < M;
    const bool hi = g + 8 < M;
    const uint4* xlo = reinterpret_cast<const uint4*>(x + (size_t)(lo ? g : 0) * K + t * 16);
    const uint4* xhi = reinterpret_cast<const uint4*>(x + (size_t)(hi ? g + 8 : 0) * K + t * 16);
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
    for (int c = warp; c < K / 64; c += 8) {
        const int q = c * 8;
        const uint4 w0 = wp[q], w1 = wp[q + 1];
        const uint4 a0 = lo ? xlo[q] : zero, a1 = lo ? xlo[q + 1] : zero;
        const uint4 b0 = hi ? xhi[q] : zero, b1 = hi ? xhi[q + 1] : zero;
        const unsigned int W[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
        const unsigned int A[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const unsigned int B[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            mlxd_mma<BF16>(d, A[2 * k], B[2 * k], A[2 * k + 1], B[2 * k + 1], W[2 * k], W[2 * k + 1]);
        }
    }
    __shared__ float part[8][32][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][lane][i] = d[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float v = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) v += part[j][lane][i];
        d[i] = v;
    }
    // d[0], d[1]: row g, columns n0 + 2t and + 1; d[2], d[3]: row g + 8.
    auto put = [&](int m, int n, float v) {
        if (m >= M || n >= N) return;
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
        s.push_str(&format!("        {cond}y{i}[(size_t)m * {width} + (n - ({start}))] = static_cast<T>(v);\n"));
        start = format!("{start} + P{i}");
    }
    s.push_str("    };\n");
    s.push_str("    put(g, n0 + 2 * t, d[0]);\n    put(g, n0 + 2 * t + 1, d[1]);\n");
    s.push_str("    put(g + 8, n0 + 2 * t, d[2]);\n    put(g + 8, n0 + 2 * t + 1, d[3]);\n");
    s
}

thread_local! {
    /// Product kernels by number of parts (index 0: one part).
    static ROWS: RefCell<[Option<CudaKernel>; 3]> = const { RefCell::new([None, None, None]) };
    static ATTENTION: RefCell<Option<CudaKernel>> = const { RefCell::new(None) };
}

/// Whether [`rows`] takes `x @ weight^T` (`weight` row-major `[N, K]`): on CUDA, 2 to
/// [`MAX_ROWS`] rows (one row stays with MLX's gemv, as fast on the device and cheaper to
/// build: measured in docs/benchmarks.md, session 5), both bfloat16 or both float16 (the
/// tensor cores' inputs), `K` a multiple of 64. The kernel reads both in 16-byte loads, so
/// they must start 16-byte aligned: fresh arrays, or row slices of one (as the stacked
/// projections' parts are), not arbitrary views.
pub fn rows_apply(x: &Array, weight: &Array) -> bool {
    let (xs, ws) = (x.shape(), weight.shape());
    available()
        && x.ndim() == 2
        && weight.ndim() == 2
        && (2..=MAX_ROWS).contains(&xs[0])
        && xs[1] == ws[1]
        && xs[1] % 64 == 0
        && x.dtype() == weight.dtype()
        && matches!(x.dtype(), Dtype::Bfloat16 | Dtype::Float16)
}

/// `x @ weight^T` split by output columns into `widths` (they sum to `weight`'s rows; at most
/// three parts), each part `[M, width]` and contiguous. Only where [`rows_apply`] holds.
pub fn rows(x: &Array, weight: &Array, widths: &[i32]) -> Result<Vec<Array>, Exception> {
    let (m, n) = (x.shape()[0], weight.shape()[0]);
    let parts = widths.len();
    assert!((1..=3).contains(&parts) && widths.iter().sum::<i32>() == n, "parts {widths:?} of {n} columns");
    let shapes: Vec<[i32; 2]> = widths.iter().map(|&w| [m, w]).collect();
    let outputs: Vec<(&[i32], Dtype)> = shapes.iter().map(|s| (&s[..], x.dtype())).collect();
    let mut template =
        vec![("T", TemplateArg::Dtype(x.dtype())), ("BF16", TemplateArg::Bool(x.dtype() == Dtype::Bfloat16))];
    let names = ["P0", "P1"];
    for (i, &w) in widths[..parts - 1].iter().enumerate() {
        template.push((names[i], TemplateArg::Int(w)));
    }
    // One block of eight warps per eight output columns.
    let blocks = (n + 7) / 8;
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

/// Whether [`attention`] takes queries of `dtype`, `[B, heads, 1, head_dim]`, against a stack
/// of `kv_heads` heads: on CUDA, a float dtype, `head_dim` a multiple of 32 up to 256, query
/// heads a multiple of key heads.
pub fn attention_applies(dtype: Dtype, heads: i32, kv_heads: i32, head_dim: i32) -> bool {
    available() && float_dtype(dtype) && head_dim % 32 == 0 && head_dim <= 256 && kv_heads > 0 && heads % kv_heads == 0
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
        assert!(one.contains("y0[(size_t)m * (N - (0)) + (n - (0))]") && !one.contains("y1"));
        let three = rows_source(3);
        assert!(three.contains("if (n < (0) + P0) y0[(size_t)m * P0 + (n - (0))]"));
        assert!(three.contains("else if (n < (0 + P0) + P1) y1[(size_t)m * P1 + (n - (0 + P0))]"));
        assert!(three.contains("else y2[(size_t)m * (N - (0 + P0 + P1)) + (n - (0 + P0 + P1))]"));
    }

    #[test]
    fn kernels_stay_off_without_cuda() {
        // The tests run MLX on the CPU: every shape falls back to MLX's own operations.
        let x = Array::zeros::<f32>(&[4, 64]).unwrap();
        let w = Array::zeros::<f32>(&[32, 64]).unwrap();
        assert!(!rows_apply(&x, &w));
        assert!(!attention_applies(Dtype::Float32, 4, 2, 64));
    }
}
