//! The sampling graph: one pure function from `[B, V]` logits, the rows' device state and
//! per-row parameter arrays to `[B]` token ids (and, when asked, log-probabilities) plus the
//! rows' next state, built from MLX ops and compiled once per combination of active stages.
//! The stage order is documented in the parent module.
//!
//! Every per-row parameter arrives as a `[B, 1]` array. A row whose filter is off carries that
//! filter's neutral value (top-k = the candidate width, top-p and typical-p = infinity,
//! ln min-p = -infinity, penalty 1 or 0), so a batch of different requests runs one graph.
//!
//! Everything a step needs happens inside the one compiled call: the random key advances and
//! the Gumbel noise is hashed from key and token id in the graph, and the repetition window and
//! the generated-token counts are advanced with the picked tokens in the graph. On a GPU each
//! primitive outside a compiled graph is one more kernel launch per token, and decode is bound
//! by launches, not by math.

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
    /// Logit bias. Columns: flat indices `[M]` int32 (`row * V + token`), values `[M, 1]`.
    pub bias: bool,
    /// Repetition penalty. State: the window `[B, C]` uint32 (the last tokens, right-aligned;
    /// slots before the first live one repeat a live token, so they change nothing). Columns:
    /// penalty `[B, 1]`; first live slot `[B, 1]` int32.
    pub repetition: bool,
    /// Presence / frequency penalties. State: generated-token counts `[B, V]`. Columns:
    /// presence `[B, 1]`, frequency `[B, 1]`.
    pub presence_frequency: bool,
    /// Some row draws at random. State: keys `[B, 2]` uint32. Column: 1 / temperature `[B, 1]`.
    pub random: bool,
    /// Some rows are greedy while others draw. Column: `[B, 1]` bool, true for greedy rows.
    pub mixed_greedy: bool,
    /// Column: k `[B, 1]` int32.
    pub top_k: bool,
    /// Column: top-p `[B, 1]`.
    pub top_p: bool,
    /// Column: ln(min-p) `[B, 1]`.
    pub min_p: bool,
    /// Column: typical mass `[B, 1]`.
    pub typical: bool,
    /// When every drawing row has a top-k, only the `K = max k` best candidates are sorted.
    pub truncate: Option<i32>,
    /// Find those `K` candidates among the `K` best chunks of this many logits (see
    /// [`top_candidates`]) instead of partitioning the whole vocabulary.
    pub chunk: Option<i32>,
    /// Width of the top-n logprobs output (0: the chosen token's only); `None`: no logprobs.
    pub logprobs: Option<i32>,
    /// Also return the logits after the penalties and the final candidates (tests, debugging).
    pub inspect: bool,
    /// Advance the repetition window and the counts with the picked tokens, in the graph.
    pub advance: bool,
    /// Steps 4-9 run as CUDA kernels ([`super::cuda`]), which also advance the keys: every
    /// row draws, with a top-k of at most [`super::cuda::MAX_K`], no typical-p, nothing
    /// inspected.
    pub kernel: bool,
    /// The kernels also apply the repetition penalty and advance the window (step 2 and the
    /// window's advance are skipped in the graph): no bias, presence or frequency penalty,
    /// logprobs or plugins.
    pub kernel_penalty: bool,
    /// The kernels run fused ([`super::cuda::fused`]; takes the `Counter` input).
    pub fused: bool,
    /// Stop after step 3 and return the processed logits (plugins run next; see `plugin`).
    pub process_only: bool,
    /// Only advance the window and counts with given tokens (the head input is `[B]` ids):
    /// the plugin path, whose final tokens are known only after the plugins ran.
    pub advance_only: bool,
}

impl Stages {
    fn any_filter(&self) -> bool {
        self.top_k || self.top_p || self.min_p || self.typical
    }

    /// Steps 1-3 run.
    fn pre(&self) -> bool {
        !self.advance_only
    }

    /// Steps 4-9 run.
    fn post(&self) -> bool {
        !self.advance_only && !self.process_only
    }

    /// The kernel applies the repetition penalty; the graph's step 2 does not run.
    fn penalty_in_kernel(&self) -> bool {
        self.kernel && self.kernel_penalty && self.repetition && self.post()
    }

    /// The window and counts are advanced.
    fn advances(&self) -> bool {
        self.advance_only || (self.advance && self.post())
    }
}

/// The graph's inputs, by name. The compiled closure takes them as one list whose order
/// [`plan`] fixes for each [`Stages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// `[B, V]` logits, or `[B]` token ids when only advancing.
    Head,
    Window,
    Counts,
    Keys,
    BiasIndex,
    BiasValues,
    Penalty,
    WindowStart,
    Presence,
    Frequency,
    InvTemperature,
    Greedy,
    TopK,
    TopP,
    LnMinP,
    Typical,
    /// Constants, passed in so the compiled graph launches no kernel to make them:
    /// `0..K` as `[1, K]` int32 (candidate ranks).
    Ranks,
    /// `0..c` as `[1, 1, c]` int32 (offsets inside a chunk).
    ChunkOffsets,
    /// `0..C` as `[1, C]` int32 (window slots).
    Positions,
    /// The CUDA sampling kernel's arrival counters ([`super::cuda::counter`]).
    Counter,
    /// The kernels' per-row parameters, `[B, 8]` float32 ([`super::cuda::params`]): they take
    /// this one array in place of the columns from `Penalty` to `LnMinP`.
    KernelParams,
}

const SLOTS: usize = Slot::KernelParams as usize + 1;

/// Named inputs of one call.
#[derive(Default, Clone)]
pub(crate) struct Named([Option<Array>; SLOTS]);

impl Named {
    pub(crate) fn set(&mut self, slot: Slot, a: Array) {
        self.0[slot as usize] = Some(a);
    }

    /// The head input (logits, or ids when only advancing).
    pub(crate) fn head(&self) -> Result<&Array, Exception> {
        self.get(Slot::Head)
    }

    fn get(&self, slot: Slot) -> Result<&Array, Exception> {
        self.0[slot as usize]
            .as_ref()
            .ok_or_else(|| Exception::custom(format!("sampling graph: missing input {slot:?}")))
    }
}

/// The inputs a graph of `st` takes, in order: the head, the rows' state, then the columns.
pub(crate) fn plan(st: Stages) -> Vec<Slot> {
    use Slot::*;
    let mut p = vec![Head];
    if st.repetition && (st.pre() || st.advances()) {
        p.push(Window);
    }
    if st.presence_frequency && (st.pre() || st.advances()) {
        p.push(Counts);
    }
    if st.random && st.post() {
        p.push(Keys);
    }
    if st.pre() {
        if st.bias {
            p.extend([BiasIndex, BiasValues]);
        }
        if st.repetition && !st.penalty_in_kernel() {
            p.push(Penalty);
        }
        if st.presence_frequency {
            p.extend([Presence, Frequency]);
        }
    }
    // Where the kernel applies the penalty it also advances the window.
    if st.repetition && st.advances() && !st.penalty_in_kernel() {
        p.extend([WindowStart, Positions]);
    }
    if st.random && st.post() {
        if st.kernel {
            // One array for the kernels (each input of the compiled step is host time at every
            // step), and none of the graph filters' constants.
            p.push(KernelParams);
        } else {
            p.push(InvTemperature);
            if st.mixed_greedy {
                p.push(Greedy);
            }
            for (on, slot) in [(st.top_k, TopK), (st.top_p, TopP), (st.min_p, LnMinP), (st.typical, Typical)] {
                if on {
                    p.push(slot);
                }
            }
            if st.top_k {
                p.push(Ranks);
            }
            if st.truncate.is_some() && st.chunk.is_some() {
                p.push(ChunkOffsets);
            }
        }
        if st.fused {
            p.push(Counter);
        }
    }
    p
}

/// What the graph returns.
#[derive(Default)]
pub(crate) struct Outputs {
    /// `[B]` uint32 (empty when only advancing).
    pub tokens: Option<Array>,
    /// `[B]` chosen log-probability, `[B, n]` uint32 ids, `[B, n]` log-probabilities.
    pub logprobs: Option<(Array, Array, Array)>,
    /// `[B, V]` logits after step 3, and the tempered logits the draw chose from (-inf where a
    /// filter removed the token; the step-3 logits for greedy rows).
    pub inspection: Option<(Array, Array)>,
    /// The rows' next keys `[B, 2]`.
    pub keys: Option<Array>,
    /// The advanced window `[B, C]`.
    pub window: Option<Array>,
    /// The advanced counts `[B, V]`.
    pub counts: Option<Array>,
    /// Step 3's logits, when `process_only`.
    pub processed: Option<Array>,
}

type Pipeline = Box<dyn for<'a> FnMut(&'a [Array]) -> Result<Vec<Array>, Exception>>;

thread_local! {
    // Compiled closures hold MLX state of this thread (and are not `Send`); the engine keeps a
    // model's MLX work on one thread, so a per-thread cache is the natural scope.
    static COMPILED: RefCell<HashMap<Stages, Pipeline>> = RefCell::new(HashMap::new());
    static USE_COMPILE: Cell<bool> = const { Cell::new(true) };
    static USE_CHUNKS: Cell<bool> = Cell::new(std::env::var("MLXD_TOPK").map_or(true, |v| v != "sort"));
}

/// Turns compilation of the sampling graph on or off for this thread (on by default). Tests
/// and benchmarks compare the two; results are the same up to floating-point rounding.
pub fn set_compiled(enabled: bool) {
    USE_COMPILE.with(|c| c.set(enabled));
}

/// Chooses how this thread finds top-k candidates: the best chunks first (default), or one
/// partition of the whole vocabulary (`MLXD_TOPK=sort` sets that at start). Both give the same
/// candidate set up to ties; tests and benchmarks compare them.
pub fn set_chunked_top_k(enabled: bool) {
    USE_CHUNKS.with(|c| c.set(enabled));
}

pub(crate) fn chunked_top_k() -> bool {
    USE_CHUNKS.with(Cell::get)
}

/// Runs the graph for `stages` on `inputs`.
pub(crate) fn run(st: Stages, inputs: &Named) -> Result<Outputs, Exception> {
    let list = plan(st).into_iter().map(|s| inputs.get(s).cloned()).collect::<Result<Vec<_>, _>>()?;
    let out = if USE_COMPILE.with(Cell::get) {
        COMPILED.with(|cache| {
            let mut cache = cache.borrow_mut();
            let f = cache.entry(st).or_insert_with(|| Box::new(compile(move |xs: &[Array]| graph(st, xs), None)));
            f(&list)
        })?
    } else {
        graph(st, &list)?
    };
    let mut out = out.into_iter();
    let mut next = || out.next().ok_or_else(|| Exception::custom("sampling graph: missing output"));
    let mut o = Outputs::default();
    if st.process_only && !st.advance_only {
        o.processed = Some(next()?);
        return Ok(o);
    }
    if st.post() {
        o.tokens = Some(next()?);
        if st.logprobs.is_some() {
            o.logprobs = Some((next()?, next()?, next()?));
        }
        if st.inspect {
            o.inspection = Some((next()?, next()?));
        }
        if st.random {
            o.keys = Some(next()?);
        }
    }
    if st.advances() {
        if st.repetition {
            o.window = Some(next()?);
        }
        if st.presence_frequency {
            o.counts = Some(next()?);
        }
    }
    Ok(o)
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

fn u32_scalar(v: u32) -> Array {
    Array::from_slice(&[v], &[1])
}

fn binary_u32(
    name: &str,
    a: &Array,
    b: &Array,
    op: unsafe extern "C" fn(
        *mut mlx_sys::mlx_array,
        mlx_sys::mlx_array,
        mlx_sys::mlx_array,
        mlx_sys::mlx_stream,
    ) -> i32,
) -> Result<Array, Exception> {
    crate::ffi::array_op(|res, stream| {
        // SAFETY: an mlx-c binary op on arrays that outlive the call.
        unsafe { op(res, a.as_ptr(), b.as_ptr(), stream) }
    })
    .ok_or_else(|| Exception::custom(format!("{name} of {:?} and {:?} failed", a.shape(), b.shape())))
}

fn xor(a: &Array, b: &Array) -> Result<Array, Exception> {
    binary_u32("bitwise xor", a, b, mlx_sys::mlx_bitwise_xor)
}

/// Counter-based random words: for each row's key `(k0, k1)` (`keys`: `[B, 2]` uint32) and
/// each counter `x` (`[B or 1, n]` uint32), MurmurHash3's 32-bit finalizer applied to
/// `(x ^ k0) * 0x9e3779b1` with `k1` mixed in after its first round. Every step is a bijection
/// for a fixed key (xor, odd multiplier, xorshift), so the words of one row never collide, and
/// every output bit depends on every input bit; a row's words depend on its key and counters
/// only, never on the other rows. Eleven elementwise operations (uint32 products wrap): inside
/// the compiled step they fuse with the ops around them instead of launching a generator kernel
/// over the whole vocabulary.
fn hash_words(keys: &Array, x: &Array) -> Result<Array, Exception> {
    let (k0, k1) = (keys.try_index((.., ..1))?, keys.try_index((.., 1..))?);
    let shifted = |x: &Array, n: u32| binary_u32("right shift", x, &u32_scalar(n), mlx_sys::mlx_right_shift);
    let h = xor(x, &k0)?.multiply(u32_scalar(0x9e37_79b1))?;
    let h = xor(&h, &shifted(&h, 16)?)?.multiply(u32_scalar(0x85eb_ca6b))?;
    let h = xor(&h, &k1)?;
    let h = xor(&h, &shifted(&h, 13)?)?.multiply(u32_scalar(0xc2b2_ae35))?;
    xor(&h, &shifted(&h, 16)?)
}

/// `ln(-ln u)` for the token ids `ids` (`[B, n]`) of each row, `u` uniform in (0, 1): minus a
/// standard Gumbel variable, so `argmax(logit - noise)` draws from the softmax. A token's noise
/// depends on the row's key and the token's id only (not on where the token sits among the
/// candidates, nor on the batch), so a row draws the same token alone or batched.
fn neg_gumbel_for(keys: &Array, ids: &Array) -> Result<Array, Exception> {
    let words = hash_words(keys, &ids.as_type::<u32>()?)?;
    // The top 24 bits, centred in their bucket so neither end of (0, 1) is hit.
    let u = binary_u32("right shift", &words, &u32_scalar(8), mlx_sys::mlx_right_shift)?.as_type::<f32>()?;
    let u = u.multiply(Array::from_f32(1.0 / 16_777_216.0))?.add(Array::from_f32(0.5 / 16_777_216.0))?;
    u.log()?.negative()?.log()
}

/// Each row's next key: the words of two counters no token id reaches.
fn next_keys(keys: &Array) -> Result<Array, Exception> {
    hash_words(keys, &Array::from_slice(&[u32::MAX, u32::MAX - 1], &[1, 2]))
}

/// The whole pipeline; see the parent module for the order and the reasons behind it.
fn graph(st: Stages, inputs: &[Array]) -> Result<Vec<Array>, Exception> {
    let mut named = Named::default();
    for (slot, a) in plan(st).into_iter().zip(inputs) {
        named.set(slot, a.clone());
    }
    let head = named.get(Slot::Head)?;
    if st.advance_only {
        let b = head.shape()[0];
        return advance(st, &named, &head.reshape(&[b, 1])?);
    }
    // Steps that compute on the logits do it in float32. Where none does (greedy, or the
    // sampling kernel with at most the repetition penalty, which it applies itself), the logits
    // stay in the model's dtype: the argmax and the kernel read bfloat16 as it is, without a
    // conversion node per step.
    let in_float32 = st.bias
        || (st.repetition && !st.penalty_in_kernel())
        || st.presence_frequency
        || st.process_only
        || st.logprobs.is_some()
        || st.inspect
        || (st.random && !st.kernel);
    let mut logits = if in_float32 { head.as_type::<f32>()? } else { head.clone() };
    let (b, v) = (logits.shape()[0], logits.shape()[1]);

    // 1. Logit bias: one scatter-add of every row's (token, bias) pairs.
    if st.bias {
        let (index, values) = (named.get(Slot::BiasIndex)?, named.get(Slot::BiasValues)?);
        logits = scatter_add_single(logits.reshape(&[-1])?, index, values, 0)?.reshape(&[b, v])?;
    }
    // 2. Repetition penalty: gather the window's logits, penalize them, put them back. A token
    // that appears twice gets the same value written twice.
    if st.repetition && !st.penalty_in_kernel() {
        let (window, penalty) = (named.get(Slot::Window)?, named.get(Slot::Penalty)?);
        let seen = logits.take_along_axis(window, -1)?;
        let penalized = ops::select(seen.lt(Array::from_f32(0.0))?, seen.multiply(penalty)?, seen.divide(penalty)?)?;
        logits = logits.put_along_axis(window, &penalized, -1)?;
    }
    // 3. Presence and frequency penalties over generated-token counts.
    if st.presence_frequency {
        let (counts, presence, frequency) =
            (named.get(Slot::Counts)?, named.get(Slot::Presence)?, named.get(Slot::Frequency)?);
        let present = counts.gt(Array::from_f32(0.0))?.as_type::<f32>()?;
        let penalty = present.multiply(presence)?.add(counts.multiply(frequency)?)?;
        logits = logits.subtract(&penalty)?;
    }
    if st.process_only {
        return Ok(vec![logits]);
    }

    let mut next_keys = None;
    // The window the kernels advanced (with the penalty in the kernels).
    let mut kernel_window = None;
    let (tokens, candidates) = if st.random {
        let keys = named.get(Slot::Keys)?;
        let is_greedy = if st.mixed_greedy { Some(named.get(Slot::Greedy)?.reshape(&[b])?) } else { None };
        let (drawn, candidates) = if st.kernel {
            let drawn = super::cuda::sample(&super::cuda::Inputs {
                logits: &logits,
                params: named.get(Slot::KernelParams)?,
                keys,
                window: if st.penalty_in_kernel() { Some(named.get(Slot::Window)?) } else { None },
                counter: if st.fused { Some(named.get(Slot::Counter)?) } else { None },
            })?;
            next_keys = Some(drawn.keys);
            kernel_window = drawn.window;
            // Candidates are only returned when inspected, which the kernel never is.
            (drawn.tokens, logits.clone())
        } else {
            next_keys = Some(self::next_keys(keys)?);
            // 4. Temperature.
            let scaled = logits.multiply(named.get(Slot::InvTemperature)?)?;
            if st.any_filter() {
                filtered_draw(st, &scaled, keys, &named)?
            } else {
                let ids = Array::arange::<u32, u32>(0, v as u32, 1)?.reshape(&[1, v])?;
                (argmax_axis(scaled.subtract(neg_gumbel_for(keys, &ids)?)?, -1, false)?, scaled)
            }
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
    let tokens = tokens.as_type::<u32>()?;

    let mut out = vec![tokens.clone()];
    if let Some(n) = st.logprobs {
        let (chosen, ids, values) = logprobs(&logits, &tokens, n)?;
        out.extend([chosen, ids, values]);
    }
    if st.inspect {
        out.extend([logits, candidates]);
    }
    out.extend(next_keys);
    if st.advances() {
        match kernel_window {
            // The kernel advanced the window; only the window is kept with its penalty there.
            Some(window) => out.push(window),
            None => out.extend(advance(st, &named, &tokens.reshape(&[b, 1])?)?),
        }
    }
    Ok(out)
}

/// The rows' window and counts after `tokens` (`[B, 1]`): the window shifts left by one and
/// takes the token at its end (slots before the row's first live slot repeat it); the token's
/// count goes up by one.
fn advance(st: Stages, named: &Named, tokens: &Array) -> Result<Vec<Array>, Exception> {
    let mut out = Vec::new();
    let b = tokens.shape()[0];
    if st.repetition {
        let (window, start) = (named.get(Slot::Window)?, named.get(Slot::WindowStart)?);
        let token = tokens.as_type::<u32>()?;
        let shifted = ops::concatenate(&[window.try_index((.., 1..))?, token.clone()], 1)?;
        let position = named.get(Slot::Positions)?;
        out.push(ops::select(position.lt(start)?, &token, &shifted)?);
    }
    if st.presence_frequency {
        let counts = named.get(Slot::Counts)?;
        let v = counts.shape()[1];
        let rows = Array::arange::<i32, i32>(0, b * v, v)?.reshape(&[b, 1])?;
        let flat = tokens.as_type::<i32>()?.add(&rows)?.reshape(&[-1])?;
        let one = Array::ones::<f32>(&[b, 1])?;
        out.push(scatter_add_single(counts.reshape(&[-1])?, &flat, &one, 0)?.reshape(&[b, v])?);
    }
    Ok(out)
}

/// The `k` best candidates of each row, best first, from `neg` (`[B, V]`, the tempered logits
/// negated, so the best come first in ascending order and no separate negation kernel is
/// launched): their negated values and token ids (`[B, k]`). With `chunk = Some(c)`, the row
/// is cut into chunks of `c` logits, the `k` chunks with the highest maxima are kept, and the
/// `k * c` logits of those are sorted (one single-block sort on the GPU: `k * c <= 4096`).
/// That finds the same set: each of the `k` best logits lies in a chunk whose maximum is at
/// least the k-th best logit, and at most `k` chunks have such a maximum. It replaces sorting
/// the whole vocabulary with a reduction and two small sorts.
fn top_candidates(neg: &Array, k: i32, chunk: Option<i32>, named: &Named) -> Result<(Array, Array), Exception> {
    let (b, v) = (neg.shape()[0], neg.shape()[1]);
    match chunk {
        Some(c) => {
            let n = v / c;
            let grouped = neg.reshape(&[b, n, c])?;
            let best = argpartition_axis(grouped.min_axis(-1, false)?, k - 1, -1)?.try_index((.., ..k))?;
            let values = grouped.take_along_axis(best.reshape(&[b, k, 1])?, 1)?.reshape(&[b, k * c])?;
            let offsets = named.get(Slot::ChunkOffsets)?;
            let ids = best
                .as_type::<i32>()?
                .multiply(Array::from_int(c))?
                .reshape(&[b, k, 1])?
                .add(offsets)?
                .reshape(&[b, k * c])?;
            let order = argsort_axis(&values, -1)?.try_index((.., ..k))?;
            Ok((values.take_along_axis(&order, -1)?, ids.take_along_axis(&order, -1)?))
        }
        None => {
            let part = argpartition_axis(neg, k - 1, -1)?.try_index((.., ..k))?;
            let values = neg.take_along_axis(&part, -1)?;
            let order = argsort_axis(&values, -1)?;
            Ok((values.take_along_axis(&order, -1)?, part.take_along_axis(&order, -1)?))
        }
    }
}

/// The chunk width [`top_candidates`] uses for `k` candidates of a `v`-token vocabulary, if
/// chunking pays: the widest power of two up to `4096 / k` (so the second partition has at
/// most 4,096 entries) that divides `v` and leaves more than `4 k` chunks.
pub(crate) fn chunk_width(k: i32, v: i32) -> Option<i32> {
    let mut c = (4096 / k.max(1)).max(1);
    c = 1 << (31 - (c as u32).leading_zeros()); // round down to a power of two
    while c >= 16 {
        if v % c == 0 && v / c > 4 * k {
            return Some(c);
        }
        c /= 2;
    }
    None
}

/// 5-8. Top-k, top-p, min-p and typical-p on the tempered logits, then the Gumbel-max draw.
/// Filters work on candidates sorted by descending logit; each sees the distribution the
/// previous ones left (renormalized), so the last draw samples exactly from what survived.
/// Returns the drawn ids and, for inspection, the surviving logits in vocabulary order.
fn filtered_draw(st: Stages, scaled: &Array, keys: &Array, named: &Named) -> Result<(Array, Array), Exception> {
    let b = scaled.shape()[0];
    // Candidates, best first: `sorted` holds their logits, `ids` their token ids.
    // Sorting the negated logits ascending puts the best first; the negation fuses into the
    // temperature's kernel.
    let neg = scaled.negative()?;
    let (sorted, ids) = match st.truncate {
        Some(k) => {
            let (values, ids) = top_candidates(&neg, k, st.chunk, named)?;
            (values.negative()?, ids)
        }
        None => {
            let order = argsort_axis(&neg, -1)?;
            (scaled.take_along_axis(&order, -1)?, order)
        }
    };
    let mut keep: Option<Array> = None;

    if st.top_k {
        let k = named.get(Slot::TopK)?;
        keep = Some(named.get(Slot::Ranks)?.lt(k)?);
    }
    if st.top_p {
        let top_p = named.get(Slot::TopP)?;
        let probs = softmax_axis(masked(&sorted, keep.as_ref())?, -1, true)?;
        // Mass strictly before each candidate: keeps the smallest prefix reaching `top_p`.
        let before = cumsum(&probs, -1, false, false)?;
        keep = Some(and(keep, before.lt(top_p)?)?);
    }
    if st.min_p {
        let log_min_p = named.get(Slot::LnMinP)?;
        let best = sorted.try_index((.., ..1))?;
        keep = Some(and(keep, sorted.ge(best.add(log_min_p)?)?)?);
    }
    if st.typical {
        let mass = named.get(Slot::Typical)?;
        keep = Some(and(keep.clone(), typical_keep(&sorted, keep.as_ref(), mass)?)?);
    }

    let candidates = masked(&sorted, keep.as_ref())?;
    // Noise is a function of the token id, not of the rank, so a row draws the same token
    // whatever the batch around it (and whatever truncation width the batch chose).
    let pick = argmax_axis(candidates.subtract(neg_gumbel_for(keys, &ids)?)?, -1, true)?;
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
    // In float32 whatever the logits came in (plugins may return another float dtype).
    let logits = &logits.as_type::<f32>()?;
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

#[cfg(test)]
mod tests {
    use super::chunk_width;

    #[test]
    fn chunk_width_divides_the_vocabulary_and_bounds_the_second_partition() {
        // Qwen3 (151,936), Llama 3 (128,256), SmolLM2 (49,152) with the usual top-k buckets.
        for v in [151_936, 128_256, 49_152] {
            for k in [16, 32, 64, 128] {
                let c = chunk_width(k, v).unwrap_or_else(|| panic!("no chunk width for k {k}, V {v}"));
                assert_eq!(v % c, 0, "k {k} V {v}: {c}");
                assert!(k * c <= 4096 && v / c > 4 * k, "k {k} V {v}: {c}");
            }
        }
        // Too few chunks to pay, or no power-of-two width that divides V.
        assert_eq!(chunk_width(64, 1024), None);
        assert_eq!(chunk_width(16, 151_937), None);
    }
}
