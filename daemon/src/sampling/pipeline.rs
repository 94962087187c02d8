//! The sampling graph: one pure function from `[B, V]` logits and per-row parameter arrays to
//! `[B]` token ids (and, when asked, log-probabilities), built from MLX ops and compiled once per
//! combination of active stages. The stage order is documented in the parent module.
//!
//! Every per-row parameter arrives as a `[B, 1]` array. A row whose filter is off carries that
//! filter's neutral value (top-k = the candidate width, top-p and typical-p = infinity,
//! ln min-p = -infinity, penalty 1 or 0), so a batch of different requests runs one graph.

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{argmax_axis, scatter_add_single, TryIndexOp};
use mlx_rs::ops::{self, argpartition_axis, argsort_axis, cumsum, logsumexp_axis, softmax_axis};
use mlx_rs::transforms::compile::compile;
use mlx_rs::Array;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Which stages a batch needs. It is the key of the compiled-closure cache, so it holds
/// everything that changes the graph's structure (sizes that are not array shapes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Stages {
    /// Inputs: flat indices `[M]` int32 (`row * V + token`), values `[M, 1]`.
    pub bias: bool,
    /// Inputs: window ids `[B, N]` uint32, window weights `[B, N]` (0 = empty slot), penalty `[B, 1]`.
    pub repetition: bool,
    /// Inputs: generated-token counts `[B, V]`, presence `[B, 1]`, frequency `[B, 1]`.
    pub presence_frequency: bool,
    /// Some row draws at random. Inputs: 1 / temperature `[B, 1]`, Gumbel noise `[B, V]`.
    pub random: bool,
    /// Some rows are greedy while others draw. Input: `[B, 1]` bool, true for greedy rows.
    pub mixed_greedy: bool,
    /// Input: k `[B, 1]` int32.
    pub top_k: bool,
    /// Input: top-p `[B, 1]`.
    pub top_p: bool,
    /// Input: ln(min-p) `[B, 1]`.
    pub min_p: bool,
    /// Input: typical mass `[B, 1]`.
    pub typical: bool,
    /// When every drawing row has a top-k, only the `K = max k` best candidates are sorted.
    pub truncate: Option<i32>,
    /// Width of the top-n logprobs output (0: the chosen token's only); `None`: no logprobs.
    pub logprobs: Option<i32>,
    /// Also return the logits after the penalties and the final candidates (tests, debugging).
    pub inspect: bool,
    /// Stop after step 3 and return the processed logits (plugins run next; see `plugin`).
    pub process_only: bool,
}

impl Stages {
    fn any_filter(&self) -> bool {
        self.top_k || self.top_p || self.min_p || self.typical
    }
}

/// What the graph returns.
pub(crate) struct Outputs {
    /// `[B]` uint32.
    pub tokens: Array,
    /// `[B]` chosen log-probability, `[B, n]` uint32 ids, `[B, n]` log-probabilities.
    pub logprobs: Option<(Array, Array, Array)>,
    /// `[B, V]` logits after step 3, and the tempered logits the draw chose from (-inf where a
    /// filter removed the token; the step-3 logits for greedy rows).
    pub inspection: Option<(Array, Array)>,
}

type Pipeline = Box<dyn for<'a> FnMut(&'a [Array]) -> Result<Vec<Array>, Exception>>;

thread_local! {
    // Compiled closures hold MLX state of this thread (and are not `Send`); the engine keeps a
    // model's MLX work on one thread, so a per-thread cache is the natural scope.
    static COMPILED: RefCell<HashMap<Stages, Pipeline>> = RefCell::new(HashMap::new());
    static USE_COMPILE: Cell<bool> = const { Cell::new(true) };
}

/// Turns compilation of the sampling graph on or off for this thread (on by default). Tests
/// and benchmarks compare the two; results are the same up to floating-point rounding.
pub fn set_compiled(enabled: bool) {
    USE_COMPILE.with(|c| c.set(enabled));
}

/// Runs steps 1-3 only (`stages.process_only` set): the processed `[B, V]` logits.
pub(crate) fn process(stages: Stages, inputs: &[Array]) -> Result<Array, Exception> {
    let stages = Stages { process_only: true, ..stages };
    execute(stages, inputs)?.into_iter().next().ok_or_else(|| Exception::custom("sampling graph: missing output"))
}

fn execute(stages: Stages, inputs: &[Array]) -> Result<Vec<Array>, Exception> {
    if USE_COMPILE.with(Cell::get) {
        COMPILED.with(|cache| {
            let mut cache = cache.borrow_mut();
            let f =
                cache.entry(stages).or_insert_with(|| Box::new(compile(move |xs: &[Array]| graph(stages, xs), None)));
            f(inputs)
        })
    } else {
        graph(stages, inputs)
    }
}

/// Runs the graph for `stages` on `inputs` (in the order [`Stages`] documents).
pub(crate) fn run(stages: Stages, inputs: &[Array]) -> Result<Outputs, Exception> {
    let out = execute(stages, inputs)?;
    let mut out = out.into_iter();
    let mut next = || out.next().ok_or_else(|| Exception::custom("sampling graph: missing output"));
    let tokens = next()?;
    let logprobs = match stages.logprobs {
        Some(_) => Some((next()?, next()?, next()?)),
        None => None,
    };
    let inspection = if stages.inspect { Some((next()?, next()?)) } else { None };
    Ok(Outputs { tokens, logprobs, inspection })
}

/// The graph's inputs, consumed in the order [`Stages`] documents.
struct Inputs<'a>(std::slice::Iter<'a, Array>);

impl<'a> Inputs<'a> {
    fn next(&mut self) -> Result<&'a Array, Exception> {
        self.0.next().ok_or_else(|| Exception::custom("sampling graph: missing input"))
    }
}

fn neg_inf() -> Array {
    Array::from_f32(f32::NEG_INFINITY)
}

/// `values` where `keep` holds, -inf elsewhere.
fn masked(values: &Array, keep: Option<&Array>) -> Result<Array, Exception> {
    match keep {
        Some(k) => ops::select(k, values, neg_inf()),
        None => Ok(values.clone()),
    }
}

fn and(keep: Option<Array>, more: Array) -> Result<Array, Exception> {
    match keep {
        Some(k) => k.logical_and(&more),
        None => Ok(more),
    }
}

/// `flat[row * width + index[row, j]] += update[row, j]` for a `[B, width]` array, as one scatter.
fn scatter_add_rows(target: &Array, index: &Array, update: &Array) -> Result<Array, Exception> {
    let (b, width) = (target.shape()[0], target.shape()[1]);
    let rows = Array::arange::<i32, i32>(0, b * width, width)?.reshape(&[b, 1])?;
    let flat = index.as_type::<i32>()?.add(&rows)?.reshape(&[-1])?;
    let update = update.reshape(&[-1, 1])?;
    scatter_add_single(target.reshape(&[-1])?, &flat, &update, 0)?.reshape(&[b, width])
}

/// The whole pipeline; see the parent module for the order and the reasons behind it.
fn graph(st: Stages, inputs: &[Array]) -> Result<Vec<Array>, Exception> {
    let mut inputs = Inputs(inputs.iter());
    let mut logits = inputs.next()?.as_type::<f32>()?;
    let (b, v) = (logits.shape()[0], logits.shape()[1]);

    // 1. Logit bias: one scatter-add of every row's (token, bias) pairs.
    if st.bias {
        let (index, values) = (inputs.next()?, inputs.next()?);
        logits = scatter_add_single(logits.reshape(&[-1])?, index, values, 0)?.reshape(&[b, v])?;
    }
    // 2. Repetition penalty: one scatter-add marks the tokens in each row's window.
    if st.repetition {
        let (window, weights, penalty) = (inputs.next()?, inputs.next()?, inputs.next()?);
        let seen = scatter_add_rows(&Array::zeros::<f32>(&[b, v])?, window, weights)?.gt(Array::from_f32(0.0))?;
        let penalized =
            ops::select(logits.lt(Array::from_f32(0.0))?, logits.multiply(penalty)?, logits.divide(penalty)?)?;
        logits = ops::select(&seen, &penalized, &logits)?;
    }
    // 3. Presence and frequency penalties over generated-token counts.
    if st.presence_frequency {
        let (counts, presence, frequency) = (inputs.next()?, inputs.next()?, inputs.next()?);
        let present = counts.gt(Array::from_f32(0.0))?.as_type::<f32>()?;
        let penalty = present.multiply(presence)?.add(counts.multiply(frequency)?)?;
        logits = logits.subtract(&penalty)?;
    }
    if st.process_only {
        return Ok(vec![logits]);
    }

    let (tokens, candidates) = if st.random {
        let inv_temperature = inputs.next()?;
        let noise = inputs.next()?;
        let is_greedy = if st.mixed_greedy { Some(inputs.next()?.reshape(&[b])?) } else { None };
        // 4. Temperature.
        let scaled = logits.multiply(inv_temperature)?;
        let (drawn, candidates) = if st.any_filter() {
            filtered_draw(st, &scaled, noise, &mut inputs)?
        } else {
            (argmax_axis(scaled.add(noise)?, -1, false)?, scaled)
        };
        match is_greedy {
            Some(g) => {
                let tokens = ops::select(&g, argmax_axis(&logits, -1, false)?, &drawn)?;
                // Candidates are in vocabulary order only when inspected.
                let candidates =
                    if st.inspect { ops::select(g.reshape(&[b, 1])?, &logits, &candidates)? } else { candidates };
                (tokens, candidates)
            }
            None => (drawn, candidates),
        }
    } else {
        (argmax_axis(&logits, -1, false)?, logits.clone())
    };

    let mut out = vec![tokens.clone()];
    if let Some(n) = st.logprobs {
        let (chosen, ids, values) = logprobs(&logits, &tokens, n)?;
        out.extend([chosen, ids, values]);
    }
    if st.inspect {
        out.extend([logits, candidates]);
    }
    Ok(out)
}

/// 5-8. Top-k, top-p, min-p and typical-p on the tempered logits, then the Gumbel-max draw.
/// Filters work on candidates sorted by descending logit; each sees the distribution the
/// previous ones left (renormalized), so the last draw samples exactly from what survived.
/// Returns the drawn ids and, for inspection, the surviving logits in vocabulary order.
fn filtered_draw(
    st: Stages,
    scaled: &Array,
    noise: &Array,
    inputs: &mut Inputs<'_>,
) -> Result<(Array, Array), Exception> {
    let b = scaled.shape()[0];
    // Candidates, best first: `sorted` holds their logits, `ids` their token ids.
    let (sorted, ids) = match st.truncate {
        Some(k) => {
            let part = argpartition_axis(scaled.negative()?, k - 1, -1)?.try_index((.., ..k))?;
            let values = scaled.take_along_axis(&part, -1)?;
            let order = argsort_axis(values.negative()?, -1)?;
            (values.take_along_axis(&order, -1)?, part.take_along_axis(&order, -1)?)
        }
        None => {
            let order = argsort_axis(scaled.negative()?, -1)?;
            (scaled.take_along_axis(&order, -1)?, order)
        }
    };
    let width = sorted.shape()[1];
    let mut keep: Option<Array> = None;

    if st.top_k {
        let k = inputs.next()?;
        let rank = Array::arange::<i32, i32>(0, width, 1)?.reshape(&[1, width])?;
        keep = Some(rank.lt(k)?);
    }
    if st.top_p {
        let top_p = inputs.next()?;
        let probs = softmax_axis(masked(&sorted, keep.as_ref())?, -1, true)?;
        // Mass strictly before each candidate: keeps the smallest prefix reaching `top_p`.
        let before = cumsum(&probs, -1, false, false)?;
        keep = Some(and(keep, before.lt(top_p)?)?);
    }
    if st.min_p {
        let log_min_p = inputs.next()?;
        let best = sorted.try_index((.., ..1))?;
        keep = Some(and(keep, sorted.ge(best.add(log_min_p)?)?)?);
    }
    if st.typical {
        let mass = inputs.next()?;
        keep = Some(and(keep.clone(), typical_keep(&sorted, keep.as_ref(), mass)?)?);
    }

    let candidates = masked(&sorted, keep.as_ref())?;
    // Noise is indexed by token id, not by rank, so a row draws the same token whatever the
    // batch around it (and whatever truncation width the batch chose).
    let noise = noise.take_along_axis(&ids, -1)?;
    let pick = argmax_axis(candidates.add(&noise)?, -1, true)?;
    let drawn = ids.take_along_axis(&pick, -1)?.reshape(&[b])?;
    let in_vocab_order = if st.inspect {
        Array::full::<f32>(scaled.shape(), neg_inf())?.put_along_axis(&ids, &candidates, -1)?
    } else {
        candidates
    };
    Ok((drawn, in_vocab_order))
}

/// Locally typical sampling (Meister et al. 2022): order candidates by how far their surprisal
/// is from the distribution's entropy, keep the smallest such prefix holding `mass`.
fn typical_keep(sorted: &Array, keep: Option<&Array>, mass: &Array) -> Result<Array, Exception> {
    let logp = masked(sorted, keep)?;
    let logp = logp.subtract(logsumexp_axis(&logp, -1, true)?)?;
    let p = logp.exp()?;
    // 0 * -inf is NaN; removed candidates contribute nothing to the entropy.
    let plogp = ops::select(p.gt(Array::from_f32(0.0))?, p.multiply(&logp)?, Array::from_f32(0.0))?;
    let entropy = plogp.sum_axis(-1, true)?.negative()?;
    let distance = logp.negative()?.subtract(&entropy)?.abs()?; // +inf for removed candidates
    let order = argsort_axis(&distance, -1)?;
    let before = cumsum(p.take_along_axis(&order, -1)?, -1, false, false)?;
    let inside = before.lt(mass)?;
    let ordered = distance.take_along_axis(&order, -1)?;
    let threshold = ops::select(&inside, &ordered, neg_inf())?.max_axis(-1, true)?;
    distance.le(&threshold)
}

/// Log-softmax of the processed logits (after biases and penalties, before temperature and
/// filters, as mlx-lm reports them): the chosen token's value and the `n` best.
pub(crate) fn logprobs(logits: &Array, tokens: &Array, n: i32) -> Result<(Array, Array, Array), Exception> {
    let (b, v) = (logits.shape()[0], logits.shape()[1]);
    let logp = logits.subtract(logsumexp_axis(logits, -1, true)?)?;
    let chosen = logp.take_along_axis(tokens.reshape(&[b, 1])?, -1)?.reshape(&[b])?;
    let n = n.min(v);
    if n == 0 {
        let empty_ids = Array::zeros::<u32>(&[b, 0])?;
        let empty = Array::zeros::<f32>(&[b, 0])?;
        return Ok((chosen, empty_ids, empty));
    }
    let part = if n < v {
        argpartition_axis(logp.negative()?, n - 1, -1)?.try_index((.., ..n))?
    } else {
        argsort_axis(logp.negative()?, -1)?
    };
    let values = logp.take_along_axis(&part, -1)?;
    let order = argsort_axis(values.negative()?, -1)?;
    Ok((chosen, part.take_along_axis(&order, -1)?.as_type::<u32>()?, values.take_along_axis(&order, -1)?))
}
