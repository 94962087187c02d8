//! Building blocks shared by every architecture: linear layers (dense or MLX-quantized),
//! embeddings, RMS norm, and rotary embeddings (plain and Llama 3 scaled).

use super::weights::Weights;
use super::ModelError;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::ops::{self, dequantize, quantized_matmul};
use mlx_rs::{fast, Array};

type Result<T> = std::result::Result<T, ModelError>;

/// MLX's affine quantization parameters of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Quant {
    /// Elements sharing one scale and bias.
    pub group_size: i32,
    /// Bits per element.
    pub bits: i32,
}

/// A weight matrix stored `[out, in]` as checkpoints do, dense or quantized.
#[derive(Debug)]
pub enum Matrix {
    /// A plain float matrix `[out, in]`, and its transpose as an evaluated view of the same
    /// buffer: multiplying by it adds no Transpose node to every step's graph.
    Dense {
        /// `[out, in]`, for row gathers (embeddings).
        weight: Array,
        /// `[in, out]`, a view of `weight`.
        weight_t: Array,
    },
    /// MLX-quantized: packed `u32` weights with per-group scales and biases.
    Quantized {
        /// Packed weights `[out, in * bits / 32]`.
        weight: Array,
        /// Per-group scales `[out, in / group_size]`.
        scales: Array,
        /// Per-group biases `[out, in / group_size]`.
        biases: Array,
        /// Quantization parameters.
        quant: Quant,
    },
}

impl Matrix {
    /// A dense matrix; its transposed view is evaluated once here.
    pub fn dense(weight: Array) -> Result<Self> {
        let weight_t = weight.t();
        weight_t.eval()?;
        Ok(Matrix::Dense { weight, weight_t })
    }

    /// Takes `{prefix}.weight` (and `.scales` / `.biases` when quantized) out of `w`.
    pub fn load(w: &mut Weights, prefix: &str, quant: Option<Quant>) -> Result<Self> {
        let weight = w.take(&format!("{prefix}.weight"))?;
        match w.take_opt(&format!("{prefix}.scales")) {
            Some(scales) => {
                let biases = w.take(&format!("{prefix}.biases"))?;
                let quant = quant.or(w.quant_of(prefix)).ok_or_else(|| {
                    ModelError::Weights(format!("`{prefix}` is quantized but no group size / bits are known"))
                })?;
                Ok(Matrix::Quantized { weight, scales, biases, quant })
            }
            None => Ok(Matrix::dense(weight)?),
        }
    }

    /// Bytes the tensor occupies on the device.
    pub fn nbytes(&self) -> usize {
        match self {
            Matrix::Dense { weight, .. } => weight.nbytes(),
            Matrix::Quantized { weight, scales, biases, .. } => weight.nbytes() + scales.nbytes() + biases.nbytes(),
        }
    }

    /// `x @ W^T`.
    pub fn apply(&self, x: &Array) -> Result<Array> {
        Ok(match self {
            Matrix::Dense { weight, .. } if super::cuda::rows_apply(x, weight) => {
                let n = weight.shape()[0];
                super::cuda::rows(x, weight, &[n])?.pop().expect("one part")
            }
            Matrix::Dense { weight_t, .. } => ops::matmul(x, weight_t)?,
            Matrix::Quantized { weight, scales, biases, quant } => {
                quantized_matmul(x, weight, scales, biases, true, quant.group_size, quant.bits)?
            }
        })
    }

    /// Output features (rows).
    pub fn out_features(&self) -> i32 {
        match self {
            Matrix::Dense { weight, .. } | Matrix::Quantized { weight, .. } => weight.shape()[0],
        }
    }

    /// The matrices' rows one after another, as one matrix (evaluated, so the parts' buffers
    /// can go); `None` when they are not all dense or all quantized with the same parameters.
    fn stack_rows(parts: &[&Matrix]) -> Result<Option<Matrix>> {
        let dense: Option<Vec<&Array>> =
            parts.iter().map(|m| if let Matrix::Dense { weight, .. } = m { Some(weight) } else { None }).collect();
        if let Some(dense) = dense {
            if dense.windows(2).any(|w| w[0].dtype() != w[1].dtype()) {
                return Ok(None);
            }
            return Ok(Some(Matrix::dense(stack_evaluated(&dense)?)?));
        }
        let mut quantized = Vec::with_capacity(parts.len());
        for m in parts {
            match m {
                Matrix::Quantized { weight, scales, biases, quant } => quantized.push((weight, scales, biases, *quant)),
                Matrix::Dense { .. } => return Ok(None),
            }
        }
        let quant = quantized[0].3;
        if quantized.iter().any(|q| q.3 != quant || q.1.dtype() != quantized[0].1.dtype()) {
            return Ok(None);
        }
        Ok(Some(Matrix::Quantized {
            weight: stack_evaluated(&quantized.iter().map(|q| q.0).collect::<Vec<_>>())?,
            scales: stack_evaluated(&quantized.iter().map(|q| q.1).collect::<Vec<_>>())?,
            biases: stack_evaluated(&quantized.iter().map(|q| q.2).collect::<Vec<_>>())?,
            quant,
        }))
    }

    /// Rows `start..end` as a matrix of their own: evaluated views of this one's buffers.
    fn row_view(&self, start: i32, end: i32) -> Result<Matrix> {
        Ok(match self {
            Matrix::Dense { weight, .. } => Matrix::dense(rows_evaluated(weight, start, end)?)?,
            Matrix::Quantized { weight, scales, biases, quant } => Matrix::Quantized {
                weight: rows_evaluated(weight, start, end)?,
                scales: rows_evaluated(scales, start, end)?,
                biases: rows_evaluated(biases, start, end)?,
                quant: *quant,
            },
        })
    }

    /// Rows `ids` of the matrix, dequantized: the embedding lookup.
    pub fn rows(&self, ids: &Array) -> Result<Array> {
        Ok(match self {
            Matrix::Dense { weight, .. } => weight.take_axis(ids, 0)?,
            Matrix::Quantized { weight, scales, biases, quant } => {
                let w = weight.take_axis(ids, 0)?;
                let s = scales.take_axis(ids, 0)?;
                let b = biases.take_axis(ids, 0)?;
                dequantize(&w, &s, &b, quant.group_size, quant.bits)?
            }
        })
    }
}

/// `arrays` one after another along the first axis, evaluated (so the inputs can be freed).
fn stack_evaluated(arrays: &[&Array]) -> Result<Array> {
    let a = ops::concatenate(arrays, 0)?;
    a.eval()?;
    Ok(a)
}

/// Rows `start..end` of `a` (first axis) as an evaluated view: no copy, and no Slice node in the
/// graphs that use it.
fn rows_evaluated(a: &Array, start: i32, end: i32) -> Result<Array> {
    let v = a.try_index(start..end)?;
    v.eval()?;
    Ok(v)
}

/// A linear layer with an optional bias.
#[derive(Debug)]
pub struct Linear {
    /// The weight matrix.
    pub weight: Matrix,
    /// The bias, when the checkpoint has one.
    pub bias: Option<Array>,
}

impl Linear {
    /// Loads `{prefix}.weight` and, if `bias`, `{prefix}.bias`.
    pub fn load(w: &mut Weights, prefix: &str, bias: bool, quant: Option<Quant>) -> Result<Self> {
        let weight = Matrix::load(w, prefix, quant)?;
        let bias = if bias { Some(w.take(&format!("{prefix}.bias"))?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to `x` (`[..., in]`).
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.weight.apply(x)?;
        Ok(match &self.bias {
            Some(b) => ops::add(&y, b)?,
            None => y,
        })
    }
}

/// Whether a stacked projection multiplies once and splits (default) or multiplies each part
/// on its own rows of the stacked matrix (`MLXD_STACKED=0`, for comparing the two on a device).
fn stacked_products() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLXD_STACKED").map_or(true, |v| v != "0"))
}

/// Projections of the same input stored as one matrix, their rows stacked (`q`/`k`/`v`, or
/// `gate`/`up`): a decode step multiplies once instead of once per projection, which on a GPU,
/// where a small model's decode is bound by kernel launches, is fewer launches per layer. Each
/// part is also kept as an evaluated view of its rows (no copy, no node per step) for callers
/// that want the projections apart. Parts that cannot share one matrix (a GGUF file may store
/// `attn_v` at 8 bits and `attn_q` at 4, or one of them dense) stay apart and are multiplied
/// one by one.
#[derive(Debug)]
pub struct Stacked<const N: usize> {
    /// The stacked projection, when the parts could be stacked.
    all: Option<Linear>,
    parts: [Linear; N],
    /// Where each part's output columns start in the stacked output (after the first).
    splits: Vec<i32>,
}

impl<const N: usize> Stacked<N> {
    /// Stacks `parts` (the same input width) when they are all dense, or all quantized alike,
    /// and all have a bias or none; the separate matrices are then released once the stacked
    /// one is evaluated. Otherwise keeps them apart.
    pub fn new(parts: [Linear; N]) -> Result<Self> {
        let biased = parts.iter().filter(|l| l.bias.is_some()).count();
        let matrices: Vec<&Matrix> = parts.iter().map(|l| &l.weight).collect();
        let weight = match Matrix::stack_rows(&matrices)? {
            Some(w) if biased == 0 || biased == N => w,
            _ => return Ok(Stacked { all: None, parts, splits: Vec::new() }),
        };
        let bias = if biased > 0 {
            Some(stack_evaluated(&parts.iter().filter_map(|l| l.bias.as_ref()).collect::<Vec<_>>())?)
        } else {
            None
        };
        let rows = parts.each_ref().map(|l| l.weight.out_features());
        drop(parts);
        let all = Linear { weight, bias };
        let mut views = Vec::with_capacity(N);
        let mut splits = Vec::with_capacity(N);
        let mut start = 0;
        for n in rows {
            if start > 0 {
                splits.push(start);
            }
            let bias = all.bias.as_ref().map(|b| rows_evaluated(b, start, start + n)).transpose()?;
            views.push(Linear { weight: all.weight.row_view(start, start + n)?, bias });
            start += n;
        }
        let parts = views.try_into().unwrap_or_else(|_| unreachable!("one view per part"));
        Ok(Stacked { all: Some(all), parts, splits })
    }

    /// The stacked projection, when the parts share one matrix.
    pub fn stacked(&self) -> Option<&Linear> {
        self.all.as_ref()
    }

    /// Whether the parts share one matrix.
    pub fn is_stacked(&self) -> bool {
        self.all.is_some()
    }

    /// All projections of `x` (`[..., in]`): with one multiplication, split along the last
    /// axis (views of one output; rows of a batch larger than 1 are then strided), or one by one
    /// when the parts are kept apart.
    pub fn forward(&self, x: &Array) -> Result<[Array; N]> {
        let outputs = match (self.kernel_parts(x)?, &self.all) {
            (Some(ys), _) => ys,
            (None, Some(all)) if stacked_products() => ops::split_at_indices(&all.forward(x)?, &self.splits, -1)?,
            (None, _) => self.each_part(x)?,
        };
        Ok(one_per_part(outputs))
    }

    /// For one row `x` (`[1, in]`), all projections as heads of `head_dim`: one
    /// multiplication, its output reshaped once to `[1, heads, 1, head_dim]` and split along the
    /// heads, part `i` `[1, out_i / head_dim, 1, head_dim]` (contiguous views). Two primitives
    /// where splitting first and reshaping each part takes one per part, and a decode step's
    /// host time is paid per primitive. `None` when the parts are kept apart, products are
    /// taken part by part (`MLXD_STACKED=0`), or a part is not a whole number of heads.
    pub fn forward_heads(&self, x: &Array, head_dim: i32) -> Result<Option<[Array; N]>> {
        let Some(heads) = self.heads(x, head_dim)? else { return Ok(None) };
        let at: Vec<i32> = self.splits.iter().map(|s| s / head_dim).collect();
        Ok(Some(one_per_part(ops::split_at_indices(&heads, &at, 1)?)))
    }

    /// [`Self::forward_heads`] before the split: the whole product as `[1, heads, 1, head_dim]`,
    /// part `i`'s heads after those of the parts before it.
    pub fn heads(&self, x: &Array, head_dim: i32) -> Result<Option<Array>> {
        let Some(all) = &self.all else { return Ok(None) };
        let whole = |n: i32| n % head_dim == 0;
        if !stacked_products() || x.ndim() != 2 || x.shape()[0] != 1 || !self.splits.iter().all(|&s| whole(s)) {
            return Ok(None);
        }
        let y = all.forward(x)?;
        let total = y.shape()[1];
        if !whole(total) {
            return Ok(None);
        }
        Ok(Some(y.reshape(&[1, total / head_dim, 1, head_dim])?))
    }

    /// All projections of a batch `x` (`[B, in]`, `B > 1`), each `[B, out_i]` and contiguous:
    /// on CUDA one kernel that writes each part to its own output ([`super::cuda::rows`]),
    /// otherwise part by part (slices of one several-row product would be strided, and the
    /// norm and RoPE kernels after them would copy).
    pub fn forward_batch(&self, x: &Array) -> Result<[Array; N]> {
        let outputs = match self.kernel_parts(x)? {
            Some(ys) => ys,
            None => self.each_part(x)?,
        };
        Ok(one_per_part(outputs))
    }

    /// Each part's projection of `x`, one multiplication per part.
    fn each_part(&self, x: &Array) -> Result<Vec<Array>> {
        self.parts.iter().map(|p| p.forward(x)).collect()
    }

    /// Part `i` alone.
    pub fn part(&self, i: usize) -> &Linear {
        &self.parts[i]
    }

    /// The parts of `x @ W^T` through [`super::cuda::rows`], when it takes `x` and the matrix.
    fn kernel_parts(&self, x: &Array) -> Result<Option<Vec<Array>>> {
        let Some(Linear { weight: Matrix::Dense { weight, .. }, bias }) = &self.all else { return Ok(None) };
        if N > 3 || !super::cuda::rows_apply(x, weight) {
            return Ok(None);
        }
        let widths: Vec<i32> = self.parts.iter().map(|p| p.weight.out_features()).collect();
        let ys = super::cuda::rows(x, weight, &widths)?;
        if bias.is_none() {
            return Ok(Some(ys));
        }
        let biased = ys.iter().zip(&self.parts).map(|(y, p)| match &p.bias {
            Some(b) => Ok(ops::add(y, b)?),
            None => Ok(y.clone()),
        });
        Ok(Some(biased.collect::<Result<Vec<_>>>()?))
    }

    /// Bytes of all the projections on the device (views share the stacked matrix's).
    pub fn nbytes(&self) -> usize {
        let bytes = |l: &Linear| l.weight.nbytes() + l.bias.as_ref().map_or(0, |b| b.nbytes());
        match &self.all {
            Some(all) => bytes(all),
            None => self.parts.iter().map(bytes).sum(),
        }
    }
}

/// The `N` outputs of a [`Stacked`] projection as an array.
pub(super) fn one_per_part<const N: usize>(outputs: Vec<Array>) -> [Array; N] {
    outputs.try_into().unwrap_or_else(|_| unreachable!("one output per part"))
}

/// RMS normalisation with a learned scale.
#[derive(Debug)]
pub struct RmsNorm {
    /// Per-channel scale.
    pub weight: Array,
    /// Added to the mean square before the root.
    pub eps: f32,
}

impl RmsNorm {
    /// Loads `{prefix}.weight`.
    pub fn load(w: &mut Weights, prefix: &str, eps: f32) -> Result<Self> {
        Ok(RmsNorm { weight: w.take(&format!("{prefix}.weight"))?, eps })
    }

    /// Normalises over the last axis.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// Overall stretch of the low frequencies.
    pub factor: f32,
    /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
    pub low_freq_factor: f32,
    /// Wavelengths shorter than `original / high_freq_factor` are left alone.
    pub high_freq_factor: f32,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: f32,
}

/// Rotary position embedding over the first `dims` channels of each head, in the split-halves
/// layout Hugging Face checkpoints use (channel `i` pairs with `i + dims / 2`).
#[derive(Debug)]
pub struct Rope {
    dims: i32,
    base: f32,
    scale: f32,
    /// Per-pair periods `base^(2i/dims)`, adjusted, when the scaling needs custom ones.
    periods: Option<Array>,
}

impl Rope {
    /// Plain RoPE; `linear_factor` divides positions (`rope_scaling.type == "linear"`).
    pub fn new(dims: i32, base: f32, linear_factor: f32) -> Self {
        Rope { dims, base, scale: 1.0 / linear_factor, periods: None }
    }

    /// Llama 3 scaled RoPE: long wavelengths stretched by `factor`, short ones kept, a smooth
    /// blend between.
    pub fn llama3(dims: i32, base: f32, s: Llama3Scaling) -> Self {
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        let periods: Vec<f32> = (0..dims / 2)
            .map(|i| {
                let period = base.powf(2.0 * i as f32 / dims as f32);
                let wavelen = 2.0 * std::f32::consts::PI * period;
                if wavelen > low_wavelen {
                    period * s.factor
                } else if wavelen < high_wavelen {
                    period
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    period / ((1.0 - smooth) / s.factor + smooth)
                }
            })
            .collect();
        let n = periods.len() as i32;
        Rope { dims, base, scale: 1.0, periods: Some(Array::from_slice(&periods, &[n])) }
    }

    /// What a kernel needs to rotate as [`Self::forward`] does: the rotated channels, each pair's
    /// period (channel `i` and `i + dims / 2` turn by `position * scale / periods[i]`), and the
    /// position scale.
    pub fn periods(&self) -> (i32, Vec<f32>, f32) {
        let periods = match &self.periods {
            Some(p) => p.as_slice::<f32>().to_vec(),
            None => (0..self.dims / 2).map(|i| self.base.powf(2.0 * i as f32 / self.dims as f32)).collect(),
        };
        (self.dims, periods, self.scale)
    }

    /// Rotates `x` (`[B, heads, T, head_dim]`) for positions `offset..offset + T`.
    pub fn forward(&self, x: &Array, offset: i32) -> Result<Array> {
        Ok(match &self.periods {
            Some(p) => fast::rope(x, self.dims, false, None, self.scale, offset, p)?,
            None => fast::rope(x, self.dims, false, self.base, self.scale, offset, None)?,
        })
    }
}

impl Rope {
    /// Rotates `x` (`[B, heads, 1, head_dim]`) with a different position per row: `offsets` is
    /// `[B]` int32 (a batch of sequences of different lengths decoding together).
    pub fn forward_dynamic(&self, x: &Array, offsets: &Array) -> Result<Array> {
        let base = mlx_sys::mlx_optional_float { value: self.base, has_value: self.periods.is_none() };
        // An empty array stands for "no frequencies", as mlx-c documents.
        // SAFETY: created here, freed below after the call that borrows it.
        let none = unsafe { mlx_sys::mlx_array_new() };
        let freqs = self.periods.as_ref().map_or(none, |p| p.as_ptr());
        let out = crate::ffi::array_op(|res, stream| {
            // SAFETY: mlx-c's dynamic RoPE with arrays that outlive the call.
            unsafe {
                mlx_sys::mlx_fast_rope_dynamic(
                    res,
                    x.as_ptr(),
                    self.dims,
                    false,
                    base,
                    self.scale,
                    offsets.as_ptr(),
                    freqs,
                    stream,
                )
            }
        });
        // SAFETY: `none` is not used after this.
        unsafe { mlx_sys::mlx_array_free(none) };
        out.ok_or_else(|| ModelError::Config(format!("RoPE with per-row offsets failed for {:?}", x.shape())))
    }
}

/// The last position of `[B, T, D]`, kept as `[B, 1, D]`.
pub fn last_position(h: &Array) -> Result<Array> {
    let t = h.shape()[1];
    Ok(h.try_index((.., t - 1..t, ..))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    fn dense(out: i32, inp: i32, seed: u64) -> Linear {
        let key = random::key(seed).unwrap();
        Linear {
            weight: Matrix::dense(random::normal::<f32>(&[out, inp], None, None, &key).unwrap()).unwrap(),
            bias: None,
        }
    }

    fn quantized(out: i32, inp: i32, seed: u64, bits: i32) -> Linear {
        let key = random::key(seed).unwrap();
        let w = random::normal::<f32>(&[out, inp], None, None, &key).unwrap();
        let (weight, scales, biases) = ops::quantize(&w, 32, bits).unwrap();
        Linear {
            weight: Matrix::Quantized { weight, scales, biases, quant: Quant { group_size: 32, bits } },
            bias: None,
        }
    }

    fn max_diff(a: &Array, b: &Array) -> f32 {
        ops::abs(ops::subtract(a, b).unwrap()).unwrap().max(None).unwrap().item_exact::<f32>()
    }

    /// Stacked (or kept apart) projections give what each projection gives alone, for one row
    /// and for a batch, through the stacked output and through the part views.
    fn check<const N: usize>(make: impl Fn() -> [Linear; N], stacked: bool) {
        let expected_parts = make();
        let s = Stacked::new(make()).unwrap();
        assert_eq!(s.is_stacked(), stacked);
        for rows in [1, 3] {
            let x = random::normal::<f32>(&[rows, 64], None, None, &random::key(9).unwrap()).unwrap();
            let together = s.forward(&x).unwrap();
            assert_eq!(together.len(), expected_parts.len());
            for (i, want) in expected_parts.iter().enumerate() {
                let want = want.forward(&x).unwrap();
                assert_eq!(together[i].shape(), want.shape());
                assert!(max_diff(&together[i], &want) < 1e-3, "part {i}, {rows} rows, stacked output");
                assert!(max_diff(&s.part(i).forward(&x).unwrap(), &want) < 1e-3, "part {i}, {rows} rows, view");
            }
        }
    }

    #[test]
    fn stacked_projections_equal_the_separate_ones() {
        check(|| [dense(48, 64, 1), dense(16, 64, 2), dense(16, 64, 3)], true);
        check(|| [quantized(64, 64, 4, 4), quantized(32, 64, 5, 4)], true);
    }

    fn row_contiguous(a: &Array) -> bool {
        a.eval().unwrap();
        let mut yes = false;
        // SAFETY: reads the flags of a live, evaluated array.
        let rc = unsafe { mlx_sys::_mlx_array_is_row_contiguous(&mut yes, a.as_ptr()) };
        rc == 0 && yes
    }

    #[test]
    fn one_row_as_heads_equals_the_parts_reshaped_and_copies_nothing() {
        // Heads of 16: q of 3 heads, k and v of 1 (dense and 4-bit), as a decode step takes them.
        let makes: [fn() -> [Linear; 3]; 2] = [
            || [dense(48, 64, 11), dense(16, 64, 12), dense(16, 64, 13)],
            || [quantized(64, 64, 14, 4), quantized(32, 64, 15, 4), quantized(32, 64, 16, 4)],
        ];
        for make in makes {
            let s = Stacked::new(make()).unwrap();
            let x = random::normal::<f32>(&[1, 64], None, None, &random::key(17).unwrap()).unwrap();
            let heads = s.forward_heads(&x, 16).unwrap().expect("stacked, whole heads");
            for (part, want) in heads.iter().zip(s.forward(&x).unwrap()) {
                let n = want.shape()[1] / 16;
                assert_eq!(part.shape(), &[1, n, 1, 16]);
                assert!(max_diff(part, &want.reshape(&[1, n, 1, 16]).unwrap()) < 1e-5);
                // A strided part would make the norm and RoPE kernels after it copy.
                assert!(row_contiguous(part), "a part of {:?} is strided", part.shape());
            }
            // Not whole heads, or more than one row: the caller reshapes parts itself.
            assert!(s.forward_heads(&x, 24).unwrap().is_none());
            let rows = random::normal::<f32>(&[2, 64], None, None, &random::key(18).unwrap()).unwrap();
            assert!(s.forward_heads(&rows, 16).unwrap().is_none());
        }
        let apart = Stacked::new([quantized(64, 64, 19, 4), dense(32, 64, 20)]).unwrap();
        let x = random::normal::<f32>(&[1, 64], None, None, &random::key(21).unwrap()).unwrap();
        assert!(apart.forward_heads(&x, 16).unwrap().is_none());
    }

    #[test]
    fn projections_that_cannot_share_a_matrix_stay_apart() {
        // As in GGUF files that keep `attn_v` at 8 bits beside 4-bit `attn_q` / `attn_k`.
        check(|| [quantized(64, 64, 6, 4), quantized(32, 64, 7, 4), quantized(32, 64, 8, 8)], false);
        check(|| [quantized(64, 64, 9, 4), dense(32, 64, 10)], false);
    }
}
