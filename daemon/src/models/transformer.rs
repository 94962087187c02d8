//! The decoder shared by the Llama, Mistral, Qwen2 and Qwen3 families: pre-norm blocks of
//! grouped-query attention with RoPE and a SwiGLU MLP. The families differ only in switches that
//! [`ModelArgs`] carries (q/k/v biases, per-head q/k norms, RoPE scaling, tied embeddings).
//! Field names follow the checkpoints' tensor names.

use super::config::{ModelArgs, RopeScaling};
use super::fused::FusedDecode;
use super::layers::{last_position, one_per_part, Linear, Matrix, RmsNorm, Rope, Stacked};
use super::weights::Weights;
use super::ModelError;
use crate::cache::{BatchCache, LayerCache, SequenceCache};
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::{nn, ops, Array};

type Result<T> = std::result::Result<T, ModelError>;

/// How a stacked step's attention keeps each row away from its left padding.
#[derive(Clone, Copy)]
enum Padding<'a> {
    /// No row is padded.
    None,
    /// A mask over the columns, `[B, 1, 1, columns]` (MLX's attention).
    Mask(&'a Array),
    /// The padded-attention kernel, which reads only live columns (CUDA).
    Kernel,
}
/// Multi-head attention with grouped key/value heads.
#[derive(Debug)]
pub struct Attention {
    /// `q_proj`, `k_proj` and `v_proj`, stacked.
    qkv: Stacked<3>,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    rope: Rope,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    scale: f32,
}

impl Attention {
    fn load(w: &mut Weights, p: &str, a: &ModelArgs) -> Result<Self> {
        let rope = match a.rope_scaling {
            RopeScaling::None => Rope::new(a.head_dim, a.rope_theta, 1.0),
            RopeScaling::Linear(f) => Rope::new(a.head_dim, a.rope_theta, f),
            RopeScaling::Llama3(s) => Rope::llama3(a.head_dim, a.rope_theta, s),
        };
        let norm = |w: &mut Weights, name: &str| -> Result<Option<RmsNorm>> {
            if a.qk_norm {
                Ok(Some(RmsNorm::load(w, &format!("{p}.{name}"), a.eps)?))
            } else {
                Ok(None)
            }
        };
        let proj = |w: &mut Weights, name: &str| Linear::load(w, &format!("{p}.{name}"), a.qkv_bias, a.quant);
        Ok(Attention {
            qkv: Stacked::new([proj(w, "q_proj")?, proj(w, "k_proj")?, proj(w, "v_proj")?])?,
            o_proj: Linear::load(w, &format!("{p}.o_proj"), a.o_bias, a.quant)?,
            q_norm: norm(w, "q_norm")?,
            k_norm: norm(w, "k_norm")?,
            rope,
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
            scale: (a.head_dim as f32).powf(-0.5),
        })
    }

    fn forward(&self, x: &Array, cache: &mut LayerCache) -> Result<Array> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let split = |y: Array, heads: i32, norm: &Option<RmsNorm>| -> Result<Array> {
            let y = y.reshape(&[b, t, heads, self.head_dim])?;
            let y = match norm {
                Some(n) => n.forward(&y)?,
                None => y,
            };
            Ok(ops::transpose_axes(&y, &[0, 2, 1, 3])?)
        };
        let q = split(self.qkv.part(0).forward(x)?, self.heads, &self.q_norm)?;
        let k = split(self.qkv.part(1).forward(x)?, self.kv_heads, &self.k_norm)?;
        let v = split(self.qkv.part(2).forward(x)?, self.kv_heads, &None)?;
        let offset = cache.offset();
        let q = self.rope.forward(&q, offset)?;
        let k = self.rope.forward(&k, offset)?;
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        // MLX aligns the causal mask to the end of the keys, which is what a cached prefix needs.
        let mask = (t > 1).then_some(ScaledDotProductAttentionMask::Causal);
        let o = fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask, None)?;
        let o = ops::transpose_axes(&o, &[0, 2, 1, 3])?.reshape(&[b, t, self.heads * self.head_dim])?;
        self.o_proj.forward(&o)
    }
}

impl Attention {
    /// q, k, v of a decode step (`x`: `[B, D]`, one position per sequence) as
    /// `[B, heads, 1, head_dim]`: with one position the hidden state stays two-dimensional, so
    /// the projections are plain 2-D matmuls and heads are a reshape away, with no transposes.
    /// One sequence multiplies by the stacked q/k/v matrix once (its three slices of the output
    /// are contiguous); a batch multiplies by each part, since slices of a batch's stacked output
    /// would be strided and the norm and RoPE kernels would copy them.
    fn project_heads(&self, x: &Array) -> Result<(Array, Array, Array)> {
        let b = x.shape()[0];
        // (Parts from `forward_heads` are already `[1, n, 1, head_dim]`.)
        let heads = |y: Array, n: i32, norm: &Option<RmsNorm>| -> Result<Array> {
            let y = if y.ndim() == 4 { y } else { y.reshape(&[b, n, 1, self.head_dim])? };
            match norm {
                Some(norm) => norm.forward(&y),
                None => Ok(y),
            }
        };
        let [q, k, v] = match b {
            1 => match self.qkv.forward_heads(x, self.head_dim)? {
                Some(parts) => parts,
                None => self.qkv.forward(x)?,
            },
            _ => self.qkv.forward_batch(x)?,
        };
        let q = heads(q, self.heads, &self.q_norm)?;
        let k = heads(k, self.kv_heads, &self.k_norm)?;
        let v = heads(v, self.kv_heads, &None)?;
        Ok((q, k, v))
    }

    /// One decode step of a single sequence with its own cache.
    fn decode_one(&self, x: &Array, cache: &mut LayerCache) -> Result<Array> {
        let offset = cache.offset();
        let (q, k, v) = match self.roped_together(x, offset)? {
            Some(qkv) => qkv,
            None => {
                let (q, k, v) = self.project_heads(x)?;
                (self.rope.forward(&q, offset)?, self.rope.forward(&k, offset)?, v)
            }
        };
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        let o = fast::scaled_dot_product_attention(&q, &k, &v, self.scale, None, None)?;
        self.o_proj.forward(&o.reshape(&[1, self.heads * self.head_dim])?)
    }

    /// One row's q, k and v (`[1, n, 1, head_dim]`) with q and k rotated by one RoPE over
    /// their heads together, a kernel fewer per layer than rotating each (the stacked product
    /// holds q's heads, then k's, then v's). `None` where q or k has its own norm (Qwen3) or the
    /// projections are not stacked.
    fn roped_together(&self, x: &Array, offset: i32) -> Result<Option<(Array, Array, Array)>> {
        if self.q_norm.is_some() || self.k_norm.is_some() {
            return Ok(None);
        }
        let Some(heads) = self.qkv.heads(x, self.head_dim)? else { return Ok(None) };
        let [qk, v] = one_per_part(ops::split_at_indices(&heads, &[self.heads + self.kv_heads], 1)?);
        let [q, k] = one_per_part(ops::split_at_indices(&self.rope.forward(&qk, offset)?, &[self.heads], 1)?);
        Ok(Some((q, k, v)))
    }

    /// Whether a padded stack of activations of `dtype` attends through the padded-attention
    /// kernel ([`super::cuda::attention`]).
    fn padded_kernel(&self, dtype: mlx_rs::Dtype) -> bool {
        super::cuda::attention_applies(dtype, self.heads, self.kv_heads, self.head_dim)
    }

    /// One decode step for a stacked batch ([`BatchCache`]): the same operations whatever the
    /// batch size, with per-row RoPE offsets, and each row's left padding handled as `padding`
    /// says.
    fn decode_batched(
        &self,
        x: &Array,
        batch: &mut BatchCache,
        layer: usize,
        offsets: &Array,
        padding: Padding<'_>,
    ) -> Result<Array> {
        let (q, k, v) = self.project_heads(x)?;
        let q = self.rope.forward_dynamic(&q, offsets)?;
        let k = self.rope.forward_dynamic(&k, offsets)?;
        let o = match padding {
            Padding::Kernel => {
                let (keys, values) = batch.update(layer, &k, &v)?;
                super::cuda::attention(&q, &keys, &values, batch.starts(), offsets, self.scale)?
            }
            Padding::Mask(_) | Padding::None => {
                let (k, v) = batch.update_and_fetch(layer, &k, &v)?;
                let mask =
                    if let Padding::Mask(m) = padding { Some(ScaledDotProductAttentionMask::Array(m)) } else { None };
                fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask, None)?
            }
        };
        self.o_proj.forward(&o.reshape(&[x.shape()[0], self.heads * self.head_dim])?)
    }
}

/// SwiGLU feed-forward.
#[derive(Debug)]
pub struct Mlp {
    /// `gate_proj` and `up_proj`, stacked: one multiplication, and the fused SwiGLU kernel reads
    /// the two halves of its output in place.
    gate_up: Stacked<2>,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &mut Weights, p: &str, a: &ModelArgs) -> Result<Self> {
        let proj = |w: &mut Weights, name: &str| Linear::load(w, &format!("{p}.{name}"), false, a.quant);
        Ok(Mlp {
            gate_up: Stacked::new([proj(w, "gate_proj")?, proj(w, "up_proj")?])?,
            down_proj: Linear::load(w, &format!("{p}.down_proj"), false, a.quant)?,
        })
    }

    fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up] = self.gate_up.forward(x)?;
        let h = swiglu(&gate, &up)?;
        self.down_proj.forward(&h)
    }
}

type Swiglu = Box<dyn for<'a> FnMut((&'a Array, &'a Array)) -> std::result::Result<Array, mlx_rs::error::Exception>>;

thread_local! {
    /// `silu(gate) * up` compiled into one fused kernel (shapeless: one compilation serves every
    /// batch and prompt length). Per thread, as compiled MLX closures are.
    static SWIGLU: std::cell::RefCell<Option<Swiglu>> = const { std::cell::RefCell::new(None) };
}

fn swiglu(gate: &Array, up: &Array) -> Result<Array> {
    static EAGER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *EAGER.get_or_init(|| std::env::var_os("MLXD_EAGER_SWIGLU").is_some()) {
        return Ok(ops::multiply(nn::silu(gate)?, up)?);
    }
    SWIGLU.with(|cell| {
        let mut cell = cell.borrow_mut();
        let f = cell.get_or_insert_with(|| {
            let f = |(g, u): (&Array, &Array)| -> std::result::Result<Array, mlx_rs::error::Exception> {
                ops::multiply(nn::silu(g)?, u)
            };
            Box::new(mlx_rs::transforms::compile::compile(f, true))
        });
        Ok(f((gate, up))?)
    })
}

/// A block's arrays as the fused decode kernel takes them ([`super::fused`]).
pub(super) struct FusedParts<'a> {
    pub input_norm: &'a RmsNorm,
    pub post_norm: &'a RmsNorm,
    pub q_norm: Option<&'a RmsNorm>,
    pub k_norm: Option<&'a RmsNorm>,
    pub qkv: &'a Matrix,
    pub o: &'a Matrix,
    pub gate_up: &'a Matrix,
    pub down: &'a Matrix,
}

/// One pre-norm decoder block.
#[derive(Debug)]
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// The block's arrays for the fused kernel: `None` where q/k/v or gate/up are not stacked
    /// or a projection has a bias.
    pub(super) fn fused_parts(&self) -> Option<FusedParts<'_>> {
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        let (qkv, gate_up) = (attn.qkv.stacked()?, mlp.gate_up.stacked()?);
        if qkv.bias.is_some() || gate_up.bias.is_some() || attn.o_proj.bias.is_some() || mlp.down_proj.bias.is_some() {
            return None;
        }
        Some(FusedParts {
            input_norm: &self.input_layernorm,
            post_norm: &self.post_attention_layernorm,
            q_norm: attn.q_norm.as_ref(),
            k_norm: attn.k_norm.as_ref(),
            qkv: &qkv.weight,
            o: &attn.o_proj.weight,
            gate_up: &gate_up.weight,
            down: &mlp.down_proj.weight,
        })
    }

    fn decode_batched(
        &self,
        x: &Array,
        batch: &mut BatchCache,
        layer: usize,
        offsets: &Array,
        padding: Padding<'_>,
    ) -> Result<Array> {
        let a = self.self_attn.decode_batched(&self.input_layernorm.forward(x)?, batch, layer, offsets, padding)?;
        let h = ops::add(x, a)?;
        Ok(ops::add(&h, self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }

    fn decode_one(&self, x: &Array, cache: &mut LayerCache) -> Result<Array> {
        let h = ops::add(x, self.self_attn.decode_one(&self.input_layernorm.forward(x)?, cache)?)?;
        Ok(ops::add(&h, self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }

    fn forward(&self, x: &Array, cache: &mut LayerCache) -> Result<Array> {
        let h = ops::add(x, self.self_attn.forward(&self.input_layernorm.forward(x)?, cache)?)?;
        Ok(ops::add(&h, self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

/// What the load-time check made of a kind of fused step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FusedVerdict {
    /// It agrees with MLX's operations (and, where timed, is faster): kept.
    Kept,
    /// It ran, but disagreed or was slower.
    TurnedDown,
    /// It did not run (a launch failed).
    Failed,
}

/// How far the fused decode kernel's logits may be from MLX's operations' at load (largest
/// difference over the largest logit): bfloat16 rounding in different places gives 1-3%.
const FUSED_TOLERANCE: f32 = 0.05;

/// The whole decoder with its embedding and LM head.
#[derive(Debug)]
pub struct Transformer {
    /// Checked hyper-parameters.
    pub args: ModelArgs,
    embed_tokens: Matrix,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    /// One-sequence decode with each block as one CUDA kernel, where the model takes it.
    fused: Option<FusedDecode>,
}

impl Transformer {
    /// Builds the model from `w`, consuming the tensors it uses; any tensor left over is an error
    /// (a checkpoint of another shape or architecture).
    pub fn load(args: ModelArgs, mut w: Weights) -> Result<Self> {
        let embed_tokens = Matrix::load(&mut w, "model.embed_tokens", args.quant)?;
        let layers = (0..args.layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    input_layernorm: RmsNorm::load(&mut w, &format!("{p}.input_layernorm"), args.eps)?,
                    self_attn: Attention::load(&mut w, &format!("{p}.self_attn"), &args)?,
                    post_attention_layernorm: RmsNorm::load(
                        &mut w,
                        &format!("{p}.post_attention_layernorm"),
                        args.eps,
                    )?,
                    mlp: Mlp::load(&mut w, &format!("{p}.mlp"), &args)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&mut w, "model.norm", args.eps)?;
        let lm_head = if !args.tie_embeddings || w.contains("lm_head.weight") {
            Some(Linear::load(&mut w, "lm_head", false, args.quant)?)
        } else {
            None
        };
        let left = w.leftovers();
        if !left.is_empty() {
            let shown: Vec<_> = left.iter().take(5).cloned().collect();
            return Err(ModelError::Weights(format!(
                "{} unused tensors, e.g. {} — is this checkpoint of another architecture?",
                left.len(),
                shown.join(", ")
            )));
        }
        let fused = layers.first().and_then(|b| FusedDecode::build(&layers, &b.self_attn.rope, &args));
        let mut model = Transformer { args, embed_tokens, layers, norm, lm_head, fused };
        model.prepare_fused_decode();
        model.prepare_batch_kernels();
        crate::sampling::prepare_kernels(model.args.vocab, model.norm.weight.dtype());
        Ok(model)
    }

    /// On CUDA, has MLX compile the batched-decode kernels ([`super::cuda`]) for this model's
    /// shapes now, with one step's worth of two-row calls on the first layer, so the first time
    /// two requests share a step does not wait for NVRTC. Kernels that fail here are switched
    /// off (the model then runs MLX's own operations), with a warning.
    fn prepare_batch_kernels(&self) {
        if !super::cuda::available() || self.layers.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        match self.batch_kernel_calls().and_then(|outs| Ok(mlx_rs::transforms::eval(outs.iter())?)) {
            Ok(()) => tracing::info!(ms = started.elapsed().as_millis() as u64, "batched-decode CUDA kernels ready"),
            Err(e) => {
                super::cuda::set_enabled(false);
                tracing::warn!(error = %e, "batched-decode CUDA kernels unavailable; using MLX's operations");
            }
        }
    }

    /// On CUDA, compiles the fused decode kernel now and checks it against MLX's operations:
    /// one sequence's first step and, unless batches are off (`MLXD_FUSED_BATCH=0`), a step of
    /// each batched variant (2, 4 and 8 rows, see [`FusedDecode::variant`]; three rows in the
    /// variant for four). Each kind of step keeps the kernel only where it agrees (within 5% of
    /// the largest value) and is the faster: one sequence's step is timed against MLX's
    /// operations, and batched steps follow its verdict (they are timed only where one
    /// sequence's step is not faster fused). Otherwise that kind decodes through MLX's
    /// operations, with a warning where it disagreed or failed.
    fn prepare_fused_decode(&mut self) {
        let Some(variants) = self.fused.as_ref().map(|f| f.variants()) else { return };
        let started = std::time::Instant::now();
        let mut verdict = self.fused_kind_verdict(&[1], "one-sequence", true);
        // A launch of every block passes the kernel all their arrays (18 pointers a block): a
        // device that fails such a launch (too many parameters, say) gets one launch per block,
        // as before session 20. A kernel that ran but disagreed or was slower is not retried.
        if let Some(f) = self.fused.as_mut().filter(|f| verdict == FusedVerdict::Failed && f.per_launch() > 1) {
            tracing::info!(per_launch = f.per_launch(), "fused decode kernel tried again with one block per launch");
            f.set_per_launch(1);
            verdict = self.fused_kind_verdict(&[1], "one-sequence", true);
        }
        let single = verdict == FusedVerdict::Kept;
        let batched = if super::fused::batches_enabled() {
            let mut sizes: Vec<i32> = variants.into_iter().filter(|&v| v > 1).collect();
            if sizes.contains(&4) {
                sizes.push(3);
            }
            // Where one sequence's step is faster fused, a batch's is too: MLX's operations build
            // as many nodes per step for a batch, and more launches. Timing batches at load was
            // unreliable (session 17: MLX's operations timed 60-97 ms for the same 24 four-row
            // steps in four loads, and 4.2-5.5 ms a step when serving, against 2.8 ms fused).
            let timed = !single && !super::fused::batches_forced();
            !sizes.is_empty() && self.fused_kind_ok(&sizes, "batched", timed)
        } else {
            false
        };
        tracing::info!(ms = started.elapsed().as_millis() as u64, single, batched, "fused decode kernel prepared");
        match &mut self.fused {
            Some(f) if single || batched => (f.single, f.batched) = (single, batched),
            _ => self.fused = None,
        }
    }

    /// Whether steps of `sizes` rows (all one, or all several) keep the fused kernel: each
    /// agrees with MLX's operations, and (where `timed`) the first size (or four rows) times
    /// faster. A size that disagrees is checked once more, since MLX's own operations, the
    /// reference, do not always give the same answer to the same 8-row step (session 17: once
    /// in 30-60 repeats, by 4-8% of the largest logit, where the fused kernel gave the same
    /// answer every time).
    fn fused_kind_ok(&self, sizes: &[i32], kind: &str, timed: bool) -> bool {
        self.fused_kind_verdict(sizes, kind, timed) == FusedVerdict::Kept
    }

    /// [`Self::fused_kind_ok`], telling a kernel that failed to run from one turned down.
    fn fused_kind_verdict(&self, sizes: &[i32], kind: &str, timed: bool) -> FusedVerdict {
        let check = |rows: i32| -> Result<f32> {
            let first = self.fused_error(rows as usize)?;
            if first <= FUSED_TOLERANCE {
                return Ok(first);
            }
            let again = self.fused_error(rows as usize)?;
            tracing::info!(
                kind,
                rows,
                first,
                again,
                "fused decode kernel disagreed with MLX's operations; checked again"
            );
            Ok(first.min(again))
        };
        let checked = sizes.iter().map(|&rows| check(rows)).collect::<Result<Vec<f32>>>();
        let err = match checked {
            Ok(errors) => errors.into_iter().fold(0.0f32, f32::max),
            Err(e) => {
                tracing::warn!(kind, error = %e, "fused decode kernel unavailable; using MLX's operations");
                return FusedVerdict::Failed;
            }
        };
        if err > FUSED_TOLERANCE {
            tracing::warn!(kind, err, "fused decode kernel disagrees with MLX's operations; not used");
            return FusedVerdict::TurnedDown;
        }
        let rows = if sizes.contains(&4) { 4 } else { sizes[0] };
        if !timed {
            tracing::info!(kind, err, "fused decode kernel checked; not timed (one sequence's step is faster fused, or MLXD_FUSED_BATCH=force)");
            return FusedVerdict::Kept;
        }
        match self.fused_is_faster(rows as usize) {
            Ok((faster, fused_ms, ops_ms)) => {
                tracing::info!(
                    kind,
                    rows,
                    err,
                    fused_ms,
                    ops_ms,
                    faster,
                    "fused decode kernel timed against MLX's operations"
                );
                if faster {
                    FusedVerdict::Kept
                } else {
                    FusedVerdict::TurnedDown
                }
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, "fused decode kernel failed its timing; using MLX's operations");
                FusedVerdict::Failed
            }
        }
    }

    /// Sequences of `base + 1 ..= base + rows` positions (token ids 0, 1, ...), prefilled: rows
    /// for a batch whose stack pads all but the longest.
    fn prefilled(&self, rows: usize, base: i32) -> Result<Vec<SequenceCache>> {
        (base + 1..=base + rows as i32)
            .map(|n| {
                let mut cache = SequenceCache::new(self.layers.len());
                self.prefill(&Array::from_slice(&(0..n).collect::<Vec<i32>>(), &[1, n]), &mut cache)?;
                Ok(cache)
            })
            .collect()
    }

    /// One decode step of `rows` rows (one: a fresh sequence; more: prefilled rows of different
    /// lengths, stacked), fused and through MLX's operations: the largest difference of the
    /// outputs, relative to the largest value.
    fn fused_error(&self, rows: usize) -> Result<f32> {
        let (got, want) = self.fused_step_pair(rows)?;
        let err = ops::abs(&ops::subtract(&got, &want)?)?.max(None)?;
        let top = ops::abs(&want)?.max(None)?;
        let value = |a: &Array| a.try_item_exact::<f32>().map_err(|e| ModelError::Config(e.to_string()));
        Ok(value(&err)? / value(&top)?.max(1e-6))
    }

    /// The outputs [`Self::fused_error`] compares (float32, fused first), on the host: for
    /// `mlxd-bench fused-check`, which repeats the check to tell a kernel that gives different
    /// answers to the same input from one that is merely imprecise.
    #[doc(hidden)]
    pub fn fused_check_outputs(&self, rows: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (got, want) = self.fused_step_pair(rows)?;
        let host = |a: &Array| -> Result<Vec<f32>> {
            a.eval()?;
            Ok(a.try_as_slice::<f32>().map_err(|e| ModelError::Config(e.to_string()))?.to_vec())
        };
        Ok((host(&got)?, host(&want)?))
    }

    fn fused_step_pair(&self, rows: usize) -> Result<(Array, Array)> {
        let tokens = Array::from_slice(&(0..rows as i32).collect::<Vec<i32>>(), &[rows as i32]);
        // Both steps stack the same prefilled rows (the stack is a copy of its own).
        let caches = if rows > 1 { self.prefilled(rows, 0)? } else { Vec::new() };
        let step = |fused: bool| -> Result<Array> {
            super::fused::set_enabled(fused);
            let out = if rows == 1 {
                self.forward_batch(&tokens, &mut [&mut SequenceCache::new(self.layers.len())])
            } else {
                let views: Vec<&SequenceCache> = caches.iter().collect();
                self.forward_batched(&tokens, &mut BatchCache::build((0..rows as u64).collect(), &views)?)
            };
            super::fused::set_enabled(true);
            Ok(out?.as_dtype(mlx_rs::Dtype::Float32)?)
        };
        Ok((step(true)?, step(false)?))
    }

    /// Times 24 decode steps of `rows` rows each way, three times, on a device (not when kernels are
    /// emulated or recorded): whether the fused block is the faster, and the better time of each
    /// in milliseconds. The fused block takes the host's time per node out of a step but runs the
    /// products at a fraction of the memory bandwidth MLX's own kernels reach, so it wins where a
    /// step is bound by the host (H100, 4-bit Qwen3-0.6B: 2x) and loses where a block's weights
    /// are large enough for the device to bind (4-bit Llama-3.2-1B, one row: 0.7x); timing it on
    /// the card at hand decides.
    fn fused_is_faster(&self, rows: usize) -> Result<(bool, f64, f64)> {
        /// Positions the timed batch's rows hold before their steps (plus 1 to `rows`).
        const TIMED_ROW_POSITIONS: i32 = 96;
        if crate::ffi::off_device() {
            return Ok((true, 0.0, 0.0));
        }
        // Every run starts from clones of the same prefilled rows (a fused step writes its own
        // copy of a cloned cache, and a batch stacks copies). Batched rows are about as long as
        // served ones: with rows of 1-4 positions, MLX's operations timed 2.5 ms a 4-row step
        // at load, against 3.6-4.2 ms in the engine's 4-row batches of 65-192 positions
        // (session 17, run 1), and turned the fused kernel down.
        let prefilled = self.prefilled(rows, if rows > 1 { TIMED_ROW_POSITIONS } else { 0 })?;
        let time = |fused: bool| -> Result<f64> {
            super::fused::set_enabled(fused);
            let run = || -> Result<f64> {
                let mut caches = prefilled.clone();
                let mut batch = if rows > 1 {
                    let views: Vec<&SequenceCache> = caches.iter().collect();
                    Some(BatchCache::build((0..rows as u64).collect(), &views)?)
                } else {
                    None
                };
                let mut tokens = Array::from_slice(&vec![0i32; rows], &[rows as i32]);
                let mut started = std::time::Instant::now();
                for i in 0..32 {
                    if i == 8 {
                        started = std::time::Instant::now();
                    }
                    // As the engine steps: queue the next step, then wait for the one before.
                    let logits = match &mut batch {
                        Some(batch) => self.forward_batched(&tokens, batch)?,
                        None => self.forward_batch(&tokens, &mut [&mut caches[0]])?,
                    };
                    let next = mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?;
                    mlx_rs::transforms::async_eval([&next])?;
                    tokens.eval()?;
                    tokens = next;
                }
                tokens.eval()?;
                Ok(started.elapsed().as_secs_f64() * 1e3)
            };
            let best = run().and_then(|a| Ok(a.min(run()?).min(run()?)));
            super::fused::set_enabled(true);
            best
        };
        let (fused, ops) = (time(true)?, time(false)?);
        Ok((fused < ops, fused, ops))
    }

    /// Whether one-sequence decode steps run the blocks as one fused kernel ([`super::fused`]).
    pub fn fused_decode(&self) -> bool {
        self.fused.as_ref().is_some_and(|f| f.single)
    }

    /// Decoder blocks per launch of the fused kernel (0: no fused kernel).
    pub fn fused_blocks_per_launch(&self) -> usize {
        self.fused.as_ref().map_or(0, |f| f.per_launch())
    }

    /// Runs `n` decoder blocks per launch of the fused kernel from now on (what a failed launch
    /// of all of them at load falls back to, `n` = 1; for tests and measurements).
    #[doc(hidden)]
    pub fn set_fused_blocks_per_launch(&mut self, n: usize) {
        if let Some(f) = self.fused.as_mut() {
            f.set_per_launch(n);
        }
    }

    /// The most rows a batched decode step runs through the fused kernel (0: none do).
    pub fn fused_batch_rows(&self) -> usize {
        self.fused.as_ref().filter(|f| f.batched).map_or(0, |f| f.batch_max() as usize)
    }

    /// The kernel calls of a two-row step's first layer and head, on zeros.
    fn batch_kernel_calls(&self) -> Result<Vec<Array>> {
        let (block, a) = (&self.layers[0], &self.args);
        let dtype = self.norm.weight.dtype();
        let zeros = |shape: &[i32]| ops::zeros_dtype(shape, dtype);
        let x = zeros(&[2, a.hidden])?;
        let attn = &block.self_attn;
        let mut outs: Vec<Array> = attn.qkv.forward_batch(&x)?.into();
        outs.extend(block.mlp.gate_up.forward(&x)?);
        outs.push(attn.o_proj.forward(&zeros(&[2, attn.heads * attn.head_dim])?)?);
        outs.push(block.mlp.down_proj.forward(&zeros(&[2, a.intermediate])?)?);
        outs.push(self.head(&x)?);
        if attn.padded_kernel(dtype) {
            let q = zeros(&[2, attn.heads, 1, attn.head_dim])?;
            let kv = zeros(&[2, attn.kv_heads, 1, attn.head_dim])?;
            let at = Array::from_slice(&[0i32, 0], &[2]);
            outs.push(super::cuda::attention(&q, &kv, &kv, &at, &at, attn.scale)?);
        }
        Ok(outs)
    }

    /// Device bytes one cached position takes across all layers (keys and values).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let elem = self.norm.weight.item_size() as u64;
        2 * self.layers.len() as u64 * self.args.kv_heads as u64 * self.args.head_dim as u64 * elem
    }

    /// Working memory of one decode step of `rows` sequences, an upper bound: the step's
    /// hidden states in float32 (whatever the weights' dtype), and the logits with the
    /// sampler's vocabulary-wide temporaries (filtered logits, candidates, noise, log-softmax).
    pub fn decode_activation_bytes(&self, rows: usize) -> u64 {
        rows as u64 * (self.position_activations() + 6 * self.args.vocab as u64) * 4
    }

    /// Values one position's hidden states take through a block: the residual stream and its
    /// norms, q/k/v, the MLP's gate and up halves and their product.
    fn position_activations(&self) -> u64 {
        let a = &self.args;
        (4 * a.hidden + 3 * a.intermediate + (a.heads + 2 * a.kv_heads) * a.head_dim) as u64
    }

    /// Working memory of prefilling a prompt of `prompt` tokens in chunks of `chunk`, an upper
    /// bound: a chunk's hidden states in float32 and the last position's logits, plus the
    /// chunk's attention scores and their softmax over the whole prompt where attention
    /// materializes them (MLX's CPU attention, and its GPU fallback for float32 or head widths
    /// above 128; the fused GPU kernels do not).
    pub fn prefill_activation_bytes(&self, chunk: usize, prompt: usize) -> u64 {
        let a = &self.args;
        let t = chunk.min(prompt).max(1) as u64;
        let on_cpu = !mlx_rs::Device::default().to_string().contains("gpu");
        let fused = !on_cpu && self.norm.weight.dtype() != mlx_rs::Dtype::Float32 && a.head_dim <= 128;
        let scores = if fused { 0 } else { 2 * a.heads as u64 * t * prompt as u64 };
        (t * self.position_activations() + scores + 6 * a.vocab as u64) * 4
    }

    /// Number of decoder blocks (one cache entry each).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Device bytes of the weights read per token (all of them, for a dense decoder).
    pub fn weight_bytes(&self) -> usize {
        // Embedding rows are gathered, not streamed; the LM head (tied or not) is read in full.
        let head = self.lm_head.as_ref().map_or(self.embed_tokens.nbytes(), |l| l.weight.nbytes());
        let blocks: usize = self
            .layers
            .iter()
            .map(|b| {
                b.self_attn.qkv.nbytes()
                    + b.self_attn.o_proj.weight.nbytes()
                    + b.mlp.gate_up.nbytes()
                    + b.mlp.down_proj.weight.nbytes()
            })
            .sum();
        head + blocks
    }

    /// Runs `tokens` (`[B, T]` int32) through the model, appending to `cache`. Returns logits
    /// `[B, V]` for the last position only (the LM head is the largest matmul of a step).
    pub fn forward_last(&self, tokens: &Array, cache: &mut SequenceCache) -> Result<Array> {
        let h = self.hidden(tokens, cache)?;
        let h = last_position(&h)?;
        let logits = self.head(&h)?;
        let (b, v) = (logits.shape()[0], logits.shape()[2]);
        Ok(logits.reshape(&[b, v])?)
    }

    /// Runs `tokens` only to fill `cache` (a prefill chunk that is not the prompt's last): the
    /// norm and LM head are never evaluated.
    pub fn prefill(&self, tokens: &Array, cache: &mut SequenceCache) -> Result<()> {
        self.hidden(tokens, cache)?;
        Ok(cache.eval()?)
    }

    /// Several prompts in one forward pass: `tokens` is `[B, T]`, row b's prompt in its first
    /// `lens[b]` columns and padding after it (causal attention keeps the padding out of every
    /// real position). Returns each row's logits at its last prompt token (`[B, V]`) and each
    /// row's own cache (views of the pass's).
    pub fn prefill_rows(&self, tokens: &Array, lens: &[i32]) -> Result<(Array, Vec<SequenceCache>)> {
        let mut cache = SequenceCache::new(self.layers.len());
        let h = self.hidden(tokens, &mut cache)?;
        let (b, d) = (lens.len() as i32, h.shape()[2]);
        let last: Vec<i32> = lens.iter().map(|&l| l - 1).collect();
        let at = ops::broadcast_to(Array::from_slice(&last, &[b, 1, 1]), &[b, 1, d])?;
        let logits = self.head(&h.take_along_axis(&at, 1)?.reshape(&[b, d])?)?;
        let rows =
            lens.iter().enumerate().map(|(r, &len)| cache.row(r as i32, len)).collect::<std::result::Result<_, _>>()?;
        Ok((logits, rows))
    }

    /// One decode step for several sequences, each with its own cache: `tokens` is `[B]` (the
    /// last sampled id of each row, still on the device). Returns logits `[B, V]`. Several rows
    /// are stacked for the step and handed back; a server keeps the stack across steps instead
    /// ([`Transformer::forward_batched`]).
    pub fn forward_batch(&self, tokens: &Array, caches: &mut [&mut SequenceCache]) -> Result<Array> {
        for c in caches.iter_mut() {
            if c.layers.len() != self.layers.len() {
                **c = SequenceCache::new(self.layers.len());
            }
        }
        if let [only] = caches {
            let h = self.decode_blocks(&self.embed_tokens.rows(tokens)?, only)?;
            return self.head(&self.norm.forward(&h)?);
        }
        let members: Vec<u64> = (0..caches.len() as u64).collect();
        let views: Vec<&SequenceCache> = caches.iter().map(|c| &**c).collect();
        let mut batch = BatchCache::build(members, &views)?;
        let logits = self.forward_batched(tokens, &mut batch)?;
        for (i, cache) in batch.split()? {
            *caches[i as usize] = cache;
        }
        Ok(logits)
    }

    /// Every decoder block on one sequence's embedded token `h` (`[1, D]`): the fused kernel
    /// where it takes the step, else block by block.
    fn decode_blocks(&self, h: &Array, cache: &mut SequenceCache) -> Result<Array> {
        if let Some(fused) = self.fused.as_ref().filter(|f| f.takes(h) && super::fused::enabled()) {
            return fused.decode(h, cache);
        }
        let mut h = h.clone();
        for (block, layer) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = block.decode_one(&h, layer)?;
        }
        Ok(h)
    }

    /// Where a one-sequence greedy decode step's time goes, for `mlxd-bench step-parts`: each
    /// part is queued `k` times and evaluated at once (the decoder blocks and whole steps
    /// chained, as decoding chains them; the embedding, the final norm with the head, and the
    /// greedy pick on one fixed input each), `repeats` times after a warm-up; the median wall
    /// time over `k`, microseconds. Queued together, a part's launches follow each other on the
    /// device, so this is its device time where the host keeps ahead. `cache` holds a
    /// prefilled sequence and moves on by `2 * k * (repeats + 1)` positions.
    #[doc(hidden)]
    pub fn step_part_times(
        &self,
        cache: &mut SequenceCache,
        k: usize,
        repeats: usize,
    ) -> Result<Vec<(&'static str, f64)>> {
        if cache.layers.len() != self.layers.len() {
            *cache = SequenceCache::new(self.layers.len());
        }
        let time = |part: &mut dyn FnMut() -> Result<Vec<Array>>| -> Result<f64> {
            let mut per_call = Vec::with_capacity(repeats);
            for round in 0..=repeats {
                let start = std::time::Instant::now();
                let outs = part()?;
                mlx_rs::transforms::eval(outs.iter())?;
                if round > 0 {
                    per_call.push(start.elapsed().as_secs_f64() * 1e6 / k.max(1) as f64);
                }
            }
            per_call.sort_by(f64::total_cmp);
            Ok(per_call.get(per_call.len() / 2).copied().unwrap_or(f64::NAN))
        };
        let token = Array::from_slice(&[1i32], &[1]);
        let h0 = self.embed_tokens.rows(&token)?;
        let logits = self.head(&self.norm.forward(&h0)?)?;
        mlx_rs::transforms::eval([&h0, &logits])?;
        let pick = |l: &Array| ops::indexing::argmax_axis(l, -1, false).map_err(ModelError::from);
        let embedding = time(&mut || (0..k).map(|_| Ok(self.embed_tokens.rows(&token)?)).collect())?;
        let blocks = time(&mut || {
            let mut h = h0.clone();
            for _ in 0..k {
                h = self.decode_blocks(&h, cache)?;
            }
            Ok(vec![h])
        })?;
        let head = time(&mut || (0..k).map(|_| self.head(&self.norm.forward(&h0)?)).collect())?;
        let greedy = time(&mut || (0..k).map(|_| pick(&logits)).collect())?;
        let step = time(&mut || {
            let mut t = token.clone();
            for _ in 0..k {
                t = pick(&self.forward_batch(&t, &mut [&mut *cache])?)?;
            }
            Ok(vec![t])
        })?;
        Ok(vec![
            ("embedding", embedding),
            ("decoder blocks", blocks),
            ("final norm + head", head),
            ("greedy pick", greedy),
            ("whole step (all of the above, chained)", step),
        ])
    }

    /// One decode step for a stacked batch of sequences: `tokens` is `[B]`, in the batch's row
    /// order. Returns logits `[B, V]` and moves the batch to its next column.
    pub fn forward_batched(&self, tokens: &Array, batch: &mut BatchCache) -> Result<Array> {
        let mut h = self.embed_tokens.rows(tokens)?;
        if let Some(fused) = self.fused.as_ref().filter(|f| f.takes_batch(&h) && super::fused::enabled()) {
            h = fused.decode_batch(&h, batch)?;
            batch.advance();
            return self.head(&self.norm.forward(&h)?);
        }
        let offsets = batch.offsets();
        let kernel = batch.padded() && self.layers.first().is_some_and(|b| b.self_attn.padded_kernel(h.dtype()));
        // The mask is built only where attention needs one.
        let mask = if kernel { None } else { batch.mask()? };
        let padding = if kernel { Padding::Kernel } else { mask.as_ref().map_or(Padding::None, Padding::Mask) };
        for (l, block) in self.layers.iter().enumerate() {
            h = block.decode_batched(&h, batch, l, &offsets, padding)?;
        }
        batch.advance();
        let h = self.norm.forward(&h)?;
        self.head(&h)
    }

    /// Logits for every position, `[B, T, V]` (tests, scoring).
    pub fn forward_all(&self, tokens: &Array, cache: &mut SequenceCache) -> Result<Array> {
        let h = self.hidden(tokens, cache)?;
        self.head(&h)
    }

    fn hidden(&self, tokens: &Array, cache: &mut SequenceCache) -> Result<Array> {
        if cache.layers.len() != self.layers.len() {
            *cache = SequenceCache::new(self.layers.len());
        }
        let mut h = self.embed_tokens.rows(tokens)?;
        for (block, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = block.forward(&h, c)?;
        }
        self.norm.forward(&h)
    }

    fn head(&self, h: &Array) -> Result<Array> {
        match &self.lm_head {
            Some(l) => l.forward(h),
            None => Ok(self.embed_tokens.apply(h)?),
        }
    }
}
