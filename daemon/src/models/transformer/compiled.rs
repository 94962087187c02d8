//! One sequence's decode step as compiled pieces.
//!
//! On a GPU, a small model's decode step is bound by the host: every node of the step's graph
//! is built through mlx-rs and mlx-c (shape checks, type promotion, an allocation per array)
//! before MLX encodes it, about a fifth of the step's host time on an H100 (docs/benchmarks.md).
//! Between two attention calls, the nodes of a decode step have the same shapes at every
//! position: the hidden state is `[1, D]`, the heads `[1, n, 1, head_dim]`, and RoPE can read the
//! position from a `[1]` array on the device instead of taking it as a number. So each stretch
//! from one block's attention output to the next block's q, k and v is compiled once (MLX traces
//! it at its first call) and every later step replays the traced nodes instead of building them
//! again. The cache write and the attention itself, whose shapes grow with the position, are
//! built per step as before, as are the embedding, the final norm and the LM head.
//!
//! The pieces of a model live in a per-thread table (compiled MLX functions belong to the
//! thread that made them; a model's decode steps run on its engine's thread), keyed by the
//! model's id. A dropped model's pieces hold its blocks' weights until that thread's next
//! decode step removes them, or until the thread ends.
//!
//! `MLXD_COMPILED_DECODE=0` builds every node per step instead (the two draw the same tokens;
//! `tests` compare their logits).

use super::{Block, Result, SequenceCache, Transformer};
use mlx_rs::error::Exception;
use mlx_rs::transforms::compile::compile;
use mlx_rs::Array;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Piece = Box<dyn for<'a> FnMut(&'a [Array]) -> std::result::Result<Vec<Array>, Exception>>;

/// A model's compiled pieces.
struct Pieces {
    /// Block 0 up to attention: `[x, position]` to `[q, k, v]`.
    first: Piece,
    /// Piece `l`: block `l` after attention and, but for the last block, block `l + 1` up to
    /// attention: `[x, o, position]` to `[x', q, k, v]`; the last `[x, o]` to `[x']`.
    joins: Vec<Piece>,
}

thread_local! {
    static PIECES: RefCell<HashMap<u64, Pieces>> = RefCell::new(HashMap::new());
    /// This thread's choice, where [`set_enabled`] made one.
    static CHOSEN: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Ids of dropped models, whose pieces each thread removes at its next decode step.
static DROPPED: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new model's id.
pub(super) fn model_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Marks a model's pieces for removal (from `Drop`, on whichever thread drops the model).
pub(super) fn forget(id: u64) {
    if let Ok(mut dropped) = DROPPED.lock() {
        dropped.push(id);
    }
}

/// Turns compiled decode steps on or off for models stepped on this thread (by default on,
/// unless `MLXD_COMPILED_DECODE=0`); tests compare the two.
pub fn set_enabled(on: bool) {
    CHOSEN.with(|c| c.set(Some(on)));
}

/// Whether one sequence's decode steps on this thread run through the compiled pieces.
pub fn enabled() -> bool {
    static DEFAULT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    CHOSEN
        .with(|c| c.get())
        .unwrap_or_else(|| *DEFAULT.get_or_init(|| std::env::var("MLXD_COMPILED_DECODE").map_or(true, |v| v != "0")))
}

fn to_exception(e: super::ModelError) -> Exception {
    Exception::custom(e.to_string())
}

/// Block `block` up to attention at the position in `position` (`[1]` int32).
fn before(block: &Block, x: &Array, position: &Array) -> Result<Vec<Array>> {
    let rope = |a: &Array| block.self_attn.rope.forward_dynamic(a, position);
    let (q, k, v) = block.before_attention(x, &rope)?;
    Ok(vec![q, k, v])
}

fn make_pieces(blocks: &[Arc<Block>]) -> Pieces {
    let b0 = blocks[0].clone();
    let first: Piece = Box::new(compile(move |xs: &[Array]| before(&b0, &xs[0], &xs[1]).map_err(to_exception), false));
    let joins = (0..blocks.len())
        .map(|l| -> Piece {
            let this = blocks[l].clone();
            match blocks.get(l + 1).cloned() {
                Some(next) => Box::new(compile(
                    move |xs: &[Array]| -> std::result::Result<Vec<Array>, Exception> {
                        let x = this.after_attention(&xs[0], &xs[1]).map_err(to_exception)?;
                        let mut out = vec![x.clone()];
                        out.extend(before(&next, &x, &xs[2]).map_err(to_exception)?);
                        Ok(out)
                    },
                    false,
                )),
                None => Box::new(compile(
                    move |xs: &[Array]| Ok(vec![this.after_attention(&xs[0], &xs[1]).map_err(to_exception)?]),
                    false,
                )),
            }
        })
        .collect();
    Pieces { first, joins }
}

/// Removes this thread's pieces of dropped models.
fn purge(table: &mut HashMap<u64, Pieces>) {
    let Ok(dropped) = DROPPED.lock() else { return };
    if !dropped.is_empty() {
        table.retain(|id, _| !dropped.contains(id));
    }
}

/// `[q, k, v]` from a piece's outputs, after the first `skip`.
fn heads(out: Vec<Array>, skip: usize) -> Result<(Array, Array, Array)> {
    let mut it = out.into_iter().skip(skip);
    match (it.next(), it.next(), it.next()) {
        (Some(q), Some(k), Some(v)) => Ok((q, k, v)),
        _ => Err(super::ModelError::Config("a compiled decode piece returned too few outputs".into())),
    }
}

/// One decode step of one sequence (`tokens`: `[1]`, its last token): logits `[1, V]`, as
/// [`Transformer::forward_batch`] returns them.
pub(super) fn decode(model: &Transformer, tokens: &Array, cache: &mut SequenceCache) -> Result<Array> {
    if model.layers.is_empty() {
        return model.head(&model.norm.forward(&model.embed_tokens.rows(tokens)?)?);
    }
    let position = Array::from_slice(&[cache.layers[0].offset()], &[1]);
    let mut x = model.embed_tokens.rows(tokens)?;
    PIECES.with(|cell| -> Result<()> {
        let mut table = cell.borrow_mut();
        purge(&mut table);
        let pieces = table.entry(model.id).or_insert_with(|| make_pieces(&model.layers));
        let (mut q, mut k, mut v) = heads((pieces.first)(&[x.clone(), position.clone()])?, 0)?;
        let last = model.layers.len() - 1;
        for (l, (block, layer)) in model.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let o = block.self_attn.attend_one(&q, &k, &v, layer)?;
            let join = &mut pieces.joins[l];
            if l == last {
                let out = join(&[x.clone(), o])?;
                x = out.into_iter().next().ok_or_else(|| {
                    super::ModelError::Config("the last compiled decode piece returned nothing".into())
                })?;
            } else {
                let out = join(&[x.clone(), o, position.clone()])?;
                x = out[0].clone();
                (q, k, v) = heads(out, 1)?;
            }
        }
        Ok(())
    })?;
    model.head(&model.norm.forward(&x)?)
}
