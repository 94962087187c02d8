//! Fused kernels of a single sequence's decode step, for MLX's CUDA backend, where such a step
//! of a small model is bound by the host's work per node of the step's CUDA graphs (about 5 us
//! each on the lent H100s), not by the device. Each replaces several of MLX's nodes per layer
//! with one, computing what those operations compute, in the same precision:
//!
//! - [`add_rms_norm`]: the residual add and the next RMS norm (2 nodes -> 1, twice a layer);
//! - [`qk_norm_rope`]: the per-head q/k norms of Qwen3 and RoPE of q and k (4 -> 1; 2 -> 1
//!   without the norms);
//! - [`swiglu`]: `silu(gate) * up` written contiguous for the down projection (MLX's fused
//!   kernel keeps the strides of the stacked gate/up product's halves, so a copy followed).
//!
//! A Qwen3-0.6B step goes from 17 nodes per layer to 11, a Llama-3.2-1B step from 15 to 11.
//! On unless `MLXD_DECODE_FUSION=0` (or [`set_enabled`]); only on CUDA, for 16-bit activations
//! and head widths of 64, 128 or 256. `mlxd-bench kernel-check` compares each with MLX's
//! operations on the device.

use crate::ffi::{CudaKernel, KernelSwitch, TemplateArg};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;

static SWITCH: KernelSwitch = KernelSwitch::new("MLXD_DECODE_FUSION");

/// Turns the fused kernels on or off for the whole process.
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

/// Whether a step with activations of `dtype` and heads of `head_dim` uses the kernels.
pub fn applies(dtype: Dtype, head_dim: i32) -> bool {
    SWITCH.available() && matches!(dtype, Dtype::Bfloat16 | Dtype::Float16) && matches!(head_dim, 64 | 128 | 256)
}

/// A block's sum of `v` (every thread gets it); `blockDim.x` a multiple of 32, at most 1024.
const HEADER: &str = r#"
__device__ inline float mlxd_block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warps = blockDim.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
    for (int w = 0; w < warps; ++w) t += scratch[w];
    __syncthreads();
    return t;
}
"#;

const ADD_RMS_NORM: &str = r#"
    const int D = x_shape[1];
    const size_t at = (size_t)blockIdx.x * D;
    __shared__ float scratch[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const T hv = static_cast<T>(static_cast<float>(x[at + i]) + static_cast<float>(r[at + i]));
        h[at + i] = hv;
        const float f = static_cast<float>(hv);
        ss += f * f;
    }
    const float n = rsqrtf(mlxd_block_sum(ss, scratch) / D + __int_as_float(EPS_BITS));
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        y[at + i] = static_cast<T>(static_cast<float>(w[i]) * (static_cast<float>(h[at + i]) * n));
    }
"#;

const QK_NORM_ROPE: &str = r#"
    constexpr int HALF = D / 2;
    const int heads = HQ + HKV;
    const int row = blockIdx.x / heads;
    const int head = blockIdx.x % heads;
    const bool is_q = head < HQ;
    const T* src = is_q ? q + ((size_t)row * HQ + head) * D : k + ((size_t)row * HKV + head - HQ) * D;
    T* dst = is_q ? qo + ((size_t)row * HQ + head) * D : ko + ((size_t)row * HKV + head - HQ) * D;
    const int i = threadIdx.x;
    float x1 = static_cast<float>(src[i]);
    float x2 = static_cast<float>(src[i + HALF]);
    if constexpr (NORM) {
        __shared__ float scratch[32];
        const float n = rsqrtf(mlxd_block_sum(x1 * x1 + x2 * x2, scratch) / D + __int_as_float(EPS_BITS));
        const T* w = is_q ? qw : kw;
        // The norm's output is rounded to T before RoPE reads it, as between MLX's two kernels.
        x1 = static_cast<float>(static_cast<T>(static_cast<float>(w[i]) * (x1 * n)));
        x2 = static_cast<float>(static_cast<T>(static_cast<float>(w[i + HALF]) * (x2 * n)));
    }
    const float theta = __int_as_float(SCALE_BITS) * static_cast<float>(offset[row]) * inv_freq[i];
    const float c = cos(theta);
    const float s = sin(theta);
    dst[i] = static_cast<T>(x1 * c - x2 * s);
    dst[i + HALF] = static_cast<T>(x1 * s + x2 * c);
"#;

const SWIGLU: &str = r#"
    const int I = gate_shape[1];
    const size_t n = (size_t)gate_shape[0] * I;
    const size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    // Each operation rounds to T, as MLX's compiled silu(gate) * up does.
    const float g = static_cast<float>(gate[j]);
    const T sig = static_cast<T>(1.0f / (1.0f + expf(-g)));
    const T a = static_cast<T>(g * static_cast<float>(sig));
    out[j] = static_cast<T>(static_cast<float>(a) * static_cast<float>(up[j]));
"#;

thread_local! {
    static KERNELS: RefCell<Option<[CudaKernel; 3]>> = const { RefCell::new(None) };
}

fn with_kernel<R>(i: usize, f: impl FnOnce(&CudaKernel) -> R) -> R {
    KERNELS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let k = cell.get_or_insert_with(|| {
            [
                CudaKernel::new("mlxd_add_rms_norm", &["x", "r", "w"], &["h", "y"], HEADER, ADD_RMS_NORM, true),
                CudaKernel::new(
                    "mlxd_qk_norm_rope",
                    &["q", "k", "qw", "kw", "inv_freq", "offset"],
                    &["qo", "ko"],
                    HEADER,
                    QK_NORM_ROPE,
                    true,
                ),
                CudaKernel::new("mlxd_swiglu", &["gate", "up"], &["out"], "", SWIGLU, true),
            ]
        });
        f(&k[i])
    })
}

/// `h = x + r` and `rms_norm(h) * w` (`x`, `r`: `[M, D]`; `w`: `[D]`), as one kernel.
pub fn add_rms_norm(x: &Array, r: &Array, w: &Array, eps: f32) -> Result<(Array, Array), Exception> {
    let shape = x.shape().to_vec();
    let (m, d) = (shape[0], shape[1]);
    let template =
        [("T", TemplateArg::Dtype(x.dtype())), ("EPS_BITS", TemplateArg::Int(eps.to_bits() as i32))];
    let outs = with_kernel(0, |k| {
        k.apply(&[x, r, w], &[(&shape, x.dtype()), (&shape, x.dtype())], &template, (m * 256, 1, 1), (256, 1, 1), || {
            format!("residual add and RMS norm of {:?} ({d} wide)", x.shape())
        })
    })?;
    let [h, y]: [Array; 2] = outs.try_into().map_err(|_| Exception::custom("two outputs"))?;
    Ok((h, y))
}

/// What [`qk_norm_rope`] needs besides the activations.
pub struct QkParams<'a> {
    /// Query heads.
    pub heads: i32,
    /// Key (and value) heads.
    pub kv_heads: i32,
    /// Width of a head (64, 128 or 256).
    pub head_dim: i32,
    /// The per-head norms' weights (`[head_dim]` each) and epsilon, when the model has them.
    pub norms: Option<(&'a Array, &'a Array, f32)>,
    /// `[head_dim / 2]` float32 inverse frequencies.
    pub inv_freq: &'a Array,
    /// Factor on positions.
    pub scale: f32,
}

/// q (`[M, heads * head_dim]`) and k (`[M, kv_heads * head_dim]`) normalized per head (when
/// the model does) and rotated for position `offset[m]` (`[M]` int32), as `[M, heads, 1,
/// head_dim]` and `[M, kv_heads, 1, head_dim]`.
pub fn qk_norm_rope(q: &Array, k: &Array, offset: &Array, p: &QkParams<'_>) -> Result<(Array, Array), Exception> {
    let m = q.shape()[0];
    let (norm, qw, kw, eps) = match p.norms {
        Some((qw, kw, eps)) => (true, qw, kw, eps),
        // The weights are not read without the norms; any array of the dtype will do.
        None => (false, q, k, 0.0),
    };
    let template = [
        ("T", TemplateArg::Dtype(q.dtype())),
        ("D", TemplateArg::Int(p.head_dim)),
        ("HQ", TemplateArg::Int(p.heads)),
        ("HKV", TemplateArg::Int(p.kv_heads)),
        ("NORM", TemplateArg::Bool(norm)),
        ("EPS_BITS", TemplateArg::Int(eps.to_bits() as i32)),
        ("SCALE_BITS", TemplateArg::Int(p.scale.to_bits() as i32)),
    ];
    let (qs, ks) = ([m, p.heads, 1, p.head_dim], [m, p.kv_heads, 1, p.head_dim]);
    let blocks = m * (p.heads + p.kv_heads);
    let half = p.head_dim / 2;
    let outs = with_kernel(1, |kern| {
        kern.apply(
            &[q, k, qw, kw, p.inv_freq, offset],
            &[(&qs, q.dtype()), (&ks, q.dtype())],
            &template,
            (blocks * half, 1, 1),
            (half, 1, 1),
            || format!("q/k norm and RoPE of {:?} and {:?}", q.shape(), k.shape()),
        )
    })?;
    let [qo, ko]: [Array; 2] = outs.try_into().map_err(|_| Exception::custom("two outputs"))?;
    Ok((qo, ko))
}

/// `silu(gate) * up` (`[M, I]` each, views allowed) as a contiguous `[M, I]`.
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array, Exception> {
    let shape = gate.shape().to_vec();
    let n = shape[0] * shape[1];
    let template = [("T", TemplateArg::Dtype(gate.dtype()))];
    let outs = with_kernel(2, |k| {
        k.apply(&[gate, up], &[(&shape, gate.dtype())], &template, (n, 1, 1), (256, 1, 1), || {
            format!("SwiGLU of {:?}", gate.shape())
        })
    })?;
    Ok(outs.into_iter().next().expect("one output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_cuda() {
        // The tests run MLX on the CPU: the model keeps MLX's operations.
        assert!(!applies(Dtype::Bfloat16, 128));
    }
}
