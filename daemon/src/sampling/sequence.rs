//! Per-request sampling state on the device, and the batched entry point that turns a batch of
//! such states into the inputs of one compiled graph.

use super::params::{SamplingError, SamplingParams};
use super::pipeline::{self, Named, Outputs, Slot, Stages};
use super::plugin::PluginChain;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::ops::{self};
use mlx_rs::{random, Array};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A `[B, 1]` array of per-row values from the host.
macro_rules! column {
    ($values:expr $(,)?) => {{
        let values: Vec<_> = $values;
        let b = values.len() as i32;
        Array::from_slice(&values, &[b, 1])
    }};
}

/// Log-probabilities of one step, still on the device. Rows asked for different `n` share the
/// batch's widest `n`; a row keeps the first `n` columns of its own row.
#[derive(Debug, Clone)]
pub struct Logprobs {
    /// `[B]` float32: the chosen token's log-probability.
    pub chosen: Array,
    /// `[B, n]` uint32: the most likely tokens, best first.
    pub top_ids: Array,
    /// `[B, n]` float32: their log-probabilities.
    pub top_logprobs: Array,
}

/// A step's result, on the device.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// `[B]` uint32 token ids.
    pub tokens: Array,
    /// Present when some row asked for logprobs.
    pub logprobs: Option<Logprobs>,
}

/// What the graph saw and kept, for tests and debugging (nothing is read to the host here).
#[derive(Debug, Clone)]
pub struct Inspection {
    /// `[B]` uint32 token ids.
    pub tokens: Array,
    /// `[B, V]` logits after logit bias and the penalties.
    pub processed: Array,
    /// `[B, V]` tempered logits the draw chose from, -inf where a filter removed the token
    /// (greedy rows: `processed`).
    pub candidates: Array,
}

/// The last tokens of prompt + output on the device: `[1, C]` uint32, right-aligned, C = `size`
/// rounded up to a power of two (see [`bucket`]); slots before `C - size` and those not yet
/// filled repeat a live token (penalizing a token twice is penalizing it once). The graph
/// shifts it by one token per step.
#[derive(Debug)]
struct Window {
    ids: Array,
    size: usize,
}

impl Window {
    fn capacity(&self) -> i32 {
        self.ids.shape()[1]
    }

    /// The first slot that can hold a token.
    fn start(&self) -> i32 {
        self.capacity() - self.size as i32
    }
}

/// Sizes that become array shapes (window length, number of biased tokens, truncation width)
/// are rounded up to a power of two: every distinct shape or width costs a trace of the
/// compiled graph, and clients choose these numbers freely.
fn bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// The rows' next state as a batched step left it, still stacked `[B, ...]`. Rows keep a place
/// in it instead of a row of their own each ([`InStack`]): a batch whose rows stay the same
/// steps on from the stack as it is, instead of joining B rows before every step and slicing
/// them apart after it (two primitives per row and kind of state, host time on a GPU).
#[derive(Debug)]
struct Stacked {
    keys: Option<Array>,
    window: Option<Array>,
    counts: Option<Array>,
    rows: usize,
}

/// A row's place in a [`Stacked`] state: its index, and how many slots its window was padded
/// with on the left to the batch's width.
#[derive(Debug)]
struct InStack {
    stack: Arc<Stacked>,
    index: usize,
    pad: i32,
}

/// One request's sampler: its parameters and its device state (random key, repetition window,
/// generated-token counts). Nothing it holds is ever read back to the host.
#[derive(Debug)]
pub struct SequenceSampler {
    /// Names this sampler in the per-batch column cache (its parameters never change).
    uid: u64,
    params: SamplingParams,
    vocab: usize,
    /// `[1, 2]` uint32, split in the graph every step; `None` for greedy requests.
    key: Option<Array>,
    window: Option<Window>,
    /// `[1, V]` float32 counts of generated tokens, for presence/frequency penalties.
    counts: Option<Array>,
    /// The request's sampler plugins, when it names any.
    pub(super) plugins: Option<PluginChain>,
    /// Set when a plugin of this row failed; the row's request must end with this error.
    pub(super) failure: Option<SamplingError>,
    /// Where this row's key, window and counts are while they sit in a batched step's output
    /// (then `key`, `window.ids` and `counts` are stale; [`SequenceSampler::unstack`]).
    stacked: Option<InStack>,
}

impl SequenceSampler {
    /// Validates `params` for a `vocab_size`-token model and prepares the device state; `prompt`
    /// seeds the repetition window.
    pub fn new(params: &SamplingParams, vocab_size: usize, prompt: &[u32]) -> Result<Self, SamplingError> {
        params.validate(vocab_size)?;
        let v = vocab_size as i32;
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        let key = if params.is_random() { Some(random::key(seed)?.reshape(&[1, 2])?) } else { None };
        let window = (params.repetition_penalty != 1.0).then(|| {
            let size = params.repetition_context_size;
            let capacity = bucket(size);
            let tail = &prompt[prompt.len().saturating_sub(size)..];
            let mut ids = vec![tail[0]; capacity]; // the prompt is never empty
            ids[capacity - tail.len()..].copy_from_slice(tail);
            Window { ids: Array::from_slice(&ids, &[1, capacity as i32]), size }
        });
        let counts = if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            Some(Array::zeros::<f32>(&[1, v])?)
        } else {
            None
        };
        let plugins = if params.plugins.is_empty() {
            None
        } else {
            Some(PluginChain::new(&params.plugins, vocab_size, prompt, seed, params.temperature)?)
        };
        let uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        Ok(SequenceSampler {
            uid,
            params: params.clone(),
            vocab: vocab_size,
            key,
            window,
            counts,
            plugins,
            failure: None,
            stacked: None,
        })
    }

    /// The error of a plugin of this row that failed during a batched step (the batch went on;
    /// this row's request must end with it).
    pub fn failure(&self) -> Option<&SamplingError> {
        self.failure.as_ref()
    }

    /// Takes the failure out, see [`SequenceSampler::failure`].
    pub fn take_failure(&mut self) -> Option<SamplingError> {
        self.failure.take()
    }

    fn fail_if_failed<T>(&mut self, v: T) -> Result<T, SamplingError> {
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(v),
        }
    }

    /// The request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (`[1, V]`), lazily, and records it; returns `[1]`
    /// uint32.
    pub fn sample(&mut self, logits: &Array) -> Result<Array, SamplingError> {
        let tokens = sample_batch(logits, &mut [&mut *self])?;
        self.fail_if_failed(tokens)
    }

    /// As [`SequenceSampler::sample`], with the logprobs the request asked for.
    pub fn sample_with_logprobs(&mut self, logits: &Array) -> Result<Sampled, SamplingError> {
        let sampled = sample_batch_with_logprobs(logits, &mut [&mut *self])?;
        self.fail_if_failed(sampled)
    }

    /// Records a token of this sequence (`[1]` or `[1, 1]`, any integer dtype) in the repetition
    /// window, the generated-token counts and the plugins' state. The sampling functions do
    /// this for the tokens they pick (inside their graph); call it yourself only for tokens the
    /// sampler did not choose (forced tokens).
    pub fn accept(&mut self, token: &Array) -> Result<(), SamplingError> {
        self.unstack()?;
        if self.window.is_some() || self.counts.is_some() {
            let st = Stages {
                repetition: self.window.is_some(),
                presence_frequency: self.counts.is_some(),
                advance_only: true,
                ..Stages::default()
            };
            let mut named = Named::default();
            named.set(Slot::Head, token.reshape(&[1])?.as_type::<u32>()?);
            if let Some(w) = &self.window {
                named.set(Slot::Window, w.ids.clone());
                named.set(Slot::WindowStart, column!(vec![w.start()]));
                named.set(Slot::Positions, range(w.capacity(), &[1, w.capacity()]));
            }
            if let Some(c) = &self.counts {
                named.set(Slot::Counts, c.clone());
            }
            let out = pipeline::run(st, &named)?;
            self.store(&out);
        }
        match self.plugins.as_mut() {
            Some(chain) => chain.accept(token),
            None => Ok(()),
        }
    }

    /// Takes this row's next state from a one-row step's outputs.
    fn store(&mut self, out: &Outputs) {
        self.stacked = None;
        if let (Some(key), Some(keys)) = (self.key.as_mut(), &out.keys) {
            *key = keys.clone();
        }
        if let (Some(w), Some(ids)) = (self.window.as_mut(), &out.window) {
            w.ids = ids.clone();
        }
        if let (Some(c), Some(counts)) = (self.counts.as_mut(), &out.counts) {
            *c = counts.clone();
        }
    }

    /// Whether every kind of state this row keeps is in `stack`.
    fn fits(&self, stack: &Stacked) -> bool {
        (self.key.is_none() || stack.keys.is_some())
            && (self.window.is_none() || stack.window.is_some())
            && (self.counts.is_none() || stack.counts.is_some())
    }

    /// Takes this row's state out of the batched step's output it sits in, as a row of its
    /// own (when the batch it stepped with changes).
    fn unstack(&mut self) -> Result<(), SamplingError> {
        let Some(InStack { stack, index, pad }) = self.stacked.take() else {
            return Ok(());
        };
        let i = index as i32;
        let row = |a: &Array| -> Result<Array, SamplingError> { Ok(a.try_index(i..i + 1)?) };
        if let (Some(key), Some(keys)) = (self.key.as_mut(), &stack.keys) {
            *key = row(keys)?;
        }
        if let (Some(w), Some(ids)) = (self.window.as_mut(), &stack.window) {
            let ids = row(ids)?;
            w.ids = if pad > 0 { ids.try_index((.., pad..))? } else { ids };
        }
        if let (Some(c), Some(counts)) = (self.counts.as_mut(), &stack.counts) {
            *c = row(counts)?;
        }
        Ok(())
    }
}

/// Picks one token per row of `logits` (`[B, V]`), row `i` with `rows[i]`'s parameters and
/// state, in one graph; records each pick in its row; returns `[B]` uint32, lazily. A row whose
/// plugin fails gets a built-in token and its [`SequenceSampler::failure`] set; the batch
/// itself succeeds.
pub fn sample_batch(logits: &Array, rows: &mut [&mut SequenceSampler]) -> Result<Array, SamplingError> {
    Ok(step(logits, rows, false, false)?.0.tokens)
}

/// As [`sample_batch`], with the logprobs the rows asked for.
pub fn sample_batch_with_logprobs(logits: &Array, rows: &mut [&mut SequenceSampler]) -> Result<Sampled, SamplingError> {
    Ok(step(logits, rows, true, false)?.0)
}

/// As [`sample_batch`] (state advances the same way), also returning the intermediate logits:
/// the tests check every stage against definitions through it.
pub fn sample_batch_inspect(logits: &Array, rows: &mut [&mut SequenceSampler]) -> Result<Inspection, SamplingError> {
    let (sampled, inspection) = step(logits, rows, false, true)?;
    let (processed, candidates) = inspection.ok_or_else(|| SamplingError::Shape("no inspection output".into()))?;
    Ok(Inspection { tokens: sampled.tokens, processed, candidates })
}

type StepResult = (Sampled, Option<(Array, Array)>);

/// The per-row parameter columns of the last batch, by the batch's sampler ids and stages:
/// they only change when the batch does, so a steady batch builds no host arrays per step.
struct ColumnCache {
    rows: Vec<u64>,
    stages: Stages,
    columns: Vec<(Slot, Array)>,
}

thread_local! {
    static COLUMNS: RefCell<Option<ColumnCache>> = const { RefCell::new(None) };
}

fn step(
    logits: &Array,
    rows: &mut [&mut SequenceSampler],
    want_logprobs: bool,
    inspect: bool,
) -> Result<StepResult, SamplingError> {
    let shape = logits.shape();
    let b = rows.len();
    if shape.len() != 2 || shape[0] as usize != b || rows.iter().any(|r| r.vocab != shape[1] as usize) {
        let vocabs: Vec<usize> = rows.iter().map(|r| r.vocab).collect();
        return Err(SamplingError::Shape(format!(
            "logits of shape {shape:?} for {b} rows with vocabularies {vocabs:?}; want [B, V]"
        )));
    }
    let v = shape[1];
    let st = stages(rows, v, want_logprobs, inspect);

    let mut named = Named::default();
    named.set(Slot::Head, logits.clone());
    // The rows' device state, stacked: as the last step left it when this is the same batch,
    // else joined from the rows' own (no copy for a single row).
    let capacity = rows.iter().filter_map(|r| r.window.as_ref().map(Window::capacity)).max().unwrap_or(1);
    let pads: Vec<i32> = rows.iter().map(|r| r.window.as_ref().map_or(0, |w| capacity - w.capacity())).collect();
    let stacked = same_stack(rows);
    if stacked.is_none() {
        for r in rows.iter_mut() {
            r.unstack()?;
        }
    }
    if let Some(s) = &stacked {
        for (slot, a) in [(Slot::Window, &s.window), (Slot::Counts, &s.counts), (Slot::Keys, &s.keys)] {
            if let Some(a) = a {
                named.set(slot, a.clone());
            }
        }
    }
    if st.repetition && stacked.is_none() {
        let mut ids = Vec::with_capacity(b);
        for (r, &pad) in rows.iter().zip(&pads) {
            ids.push(match &r.window {
                Some(w) if pad == 0 => w.ids.clone(),
                Some(w) => {
                    let fill = ops::broadcast_to(w.ids.try_index((.., ..1))?, &[1, pad])?;
                    ops::concatenate(&[fill, w.ids.clone()], 1)?
                }
                None => Array::zeros::<u32>(&[1, capacity])?,
            });
        }
        named.set(Slot::Window, rows_of(ids)?);
    }
    if st.presence_frequency && stacked.is_none() {
        let counts = rows.iter().map(|r| r.counts.clone().map_or_else(|| Array::zeros::<f32>(&[1, v]), Ok));
        named.set(Slot::Counts, rows_of(counts.collect::<Result<_, _>>()?)?);
    }
    if st.random && stacked.is_none() {
        let keys = rows.iter().map(|r| r.key.clone().map_or_else(|| Array::zeros::<u32>(&[1, 2]), Ok));
        named.set(Slot::Keys, rows_of(keys.collect::<Result<_, _>>()?)?);
    }
    if st.fused {
        named.set(Slot::Counter, super::cuda::counter(b as i32)?);
    }
    let uids: Vec<u64> = rows.iter().map(|r| r.uid).collect();
    COLUMNS.with(|cache| -> Result<(), SamplingError> {
        let mut cache = cache.borrow_mut();
        if !cache.as_ref().is_some_and(|c| c.rows == uids && c.stages == st) {
            let columns = columns(st, rows, v, capacity)?;
            *cache = Some(ColumnCache { rows: uids, stages: st, columns });
        }
        for (slot, a) in &cache.as_ref().expect("filled above").columns {
            named.set(*slot, a.clone());
        }
        Ok(())
    })?;

    let out = if rows.iter().any(|r| r.plugins.is_some()) {
        super::plugin::run(st, &named, rows)?
    } else {
        pipeline::run(st, &named)?
    };
    let tokens =
        out.tokens.clone().ok_or_else(|| SamplingError::Shape("the sampling graph returned no tokens".into()))?;
    let next = (b > 1).then(|| {
        Arc::new(Stacked { keys: out.keys.clone(), window: out.window.clone(), counts: out.counts.clone(), rows: b })
    });
    for (i, r) in rows.iter_mut().enumerate() {
        match &next {
            Some(stack) => r.stacked = Some(InStack { stack: stack.clone(), index: i, pad: pads[i] }),
            None => r.store(&out),
        }
        if r.failure.is_none() {
            if let Some(chain) = r.plugins.as_mut() {
                let token = if b == 1 { tokens.clone() } else { tokens.try_index(i as i32..i as i32 + 1)? };
                if let Err(e) = chain.accept(&token) {
                    r.failure = Some(e);
                }
            }
        }
    }
    let logprobs = out.logprobs.map(|(chosen, top_ids, top_logprobs)| Logprobs { chosen, top_ids, top_logprobs });
    Ok((Sampled { tokens, logprobs }, out.inspection))
}

/// The stacked state every one of `rows` sits in, row `i` at index `i`, when it is the same
/// batch as the step that made it and the stack holds every kind of state the rows keep.
fn same_stack(rows: &[&mut SequenceSampler]) -> Option<Arc<Stacked>> {
    let stack = rows.first()?.stacked.as_ref()?.stack.clone();
    let same = stack.rows == rows.len()
        && rows.iter().enumerate().all(|(i, r)| {
            r.stacked.as_ref().is_some_and(|s| Arc::ptr_eq(&s.stack, &stack) && s.index == i) && r.fits(&stack)
        });
    same.then_some(stack)
}

/// The stages a batch of `rows` needs.
fn stages(rows: &[&mut SequenceSampler], v: i32, want_logprobs: bool, inspect: bool) -> Stages {
    let b = rows.len();
    let p = |i: usize| &rows[i].params;
    let random: Vec<bool> = (0..b).map(|i| p(i).is_random()).collect();
    let drawing = || (0..b).filter(|&i| random[i]);
    let mut st = Stages {
        bias: (0..b).any(|i| !p(i).logit_bias.is_empty()),
        repetition: rows.iter().any(|r| r.window.is_some()),
        presence_frequency: rows.iter().any(|r| r.counts.is_some()),
        random: random.iter().any(|&r| r),
        mixed_greedy: random.iter().any(|&r| r) && random.iter().any(|&r| !r),
        top_k: drawing().any(|i| p(i).top_k > 0 && (p(i).top_k as i32) < v),
        top_p: drawing().any(|i| p(i).top_p < 1.0),
        min_p: drawing().any(|i| p(i).min_p > 0.0),
        typical: drawing().any(|i| p(i).typical_p < 1.0),
        inspect,
        advance: true,
        ..Stages::default()
    };
    if st.top_k && drawing().all(|i| p(i).top_k > 0) {
        let widest = drawing().map(|i| p(i).top_k as usize).max().unwrap_or(0);
        st.truncate = Some(bucket(widest).max(16) as i32).filter(|&k| k < v);
        if pipeline::chunked_top_k() {
            st.chunk = st.truncate.and_then(|k| pipeline::chunk_width(k, v));
        }
    }
    if want_logprobs {
        st.logprobs = (0..b).filter_map(|i| p(i).logprobs).max().map(|n| n as i32);
    }
    st.kernel = super::cuda::available()
        && st.top_k
        && st.truncate.is_some_and(|k| k <= super::cuda::MAX_K)
        && !st.typical
        && !st.mixed_greedy
        && !inspect;
    st.kernel_penalty = st.kernel && st.repetition && !st.bias && !st.presence_frequency && st.logprobs.is_none();
    st.fused = st.kernel && super::cuda::fused();
    st
}

/// The per-row parameter columns of `st` (see [`pipeline::Stages`] for each one's meaning),
/// for a batch whose windows are `capacity` slots wide.
fn columns(
    st: Stages,
    rows: &[&mut SequenceSampler],
    v: i32,
    capacity: i32,
) -> Result<Vec<(Slot, Array)>, SamplingError> {
    let b = rows.len();
    let p = |i: usize| &rows[i].params;
    let random: Vec<bool> = (0..b).map(|i| p(i).is_random()).collect();
    let mut out = Vec::new();
    if st.bias {
        let mut index = Vec::new();
        let mut values = Vec::new();
        for i in 0..b {
            for (&t, &x) in &p(i).logit_bias {
                index.push(i as i32 * v + t as i32);
                values.push(x);
            }
        }
        // Padding adds 0 to token 0 of row 0.
        index.resize(bucket(index.len()), 0);
        values.resize(index.len(), 0.0);
        let m = index.len() as i32;
        out.push((Slot::BiasIndex, Array::from_slice(&index, &[m])));
        out.push((Slot::BiasValues, Array::from_slice(&values, &[m, 1])));
    }
    let start = |r: &SequenceSampler| r.window.as_ref().map_or(capacity, |w| capacity - w.size as i32);
    if st.repetition {
        out.push((Slot::Penalty, column!((0..b).map(|i| p(i).repetition_penalty).collect())));
        out.push((Slot::WindowStart, column!(rows.iter().map(|r| start(r)).collect())));
        out.push((Slot::Positions, range(capacity, &[1, capacity])));
    }
    if st.presence_frequency {
        out.push((Slot::Presence, column!((0..b).map(|i| p(i).presence_penalty).collect())));
        out.push((Slot::Frequency, column!((0..b).map(|i| p(i).frequency_penalty).collect())));
    }
    if st.random {
        let width = st.truncate.unwrap_or(v);
        let on = |i: usize, f: &dyn Fn(&SamplingParams) -> bool| random[i] && f(p(i));
        // Each row's value, or the stage's neutral one where the row does not use it.
        let inv_temperature = |i: usize| if random[i] { 1.0 / p(i).temperature } else { 1.0 };
        let top_k = |i: usize| if on(i, &|q| q.top_k > 0) { (p(i).top_k as i32).min(width) } else { width };
        let top_p = |i: usize| if on(i, &|q| q.top_p < 1.0) { p(i).top_p } else { f32::INFINITY };
        let ln_min_p = |i: usize| if on(i, &|q| q.min_p > 0.0) { p(i).min_p.ln() } else { f32::NEG_INFINITY };
        if st.kernel {
            // The kernels take them as one array (every row draws here), no graph column.
            let row = |i: usize| super::cuda::RowParams {
                inv_temperature: inv_temperature(i),
                top_k: top_k(i),
                top_p: top_p(i),
                ln_min_p: ln_min_p(i),
                penalty: p(i).repetition_penalty,
                window_start: start(rows[i]),
            };
            out.push((Slot::KernelParams, super::cuda::params(&(0..b).map(row).collect::<Vec<_>>())));
        } else {
            out.push((Slot::InvTemperature, column!((0..b).map(inv_temperature).collect())));
            if st.mixed_greedy {
                out.push((Slot::Greedy, column!(random.iter().map(|&r| !r).collect())));
            }
            if st.top_k {
                out.push((Slot::TopK, column!((0..b).map(top_k).collect())));
                out.push((Slot::Ranks, range(width, &[1, width])));
            }
            if let (Some(_), Some(c)) = (st.truncate, st.chunk) {
                out.push((Slot::ChunkOffsets, range(c, &[1, 1, c])));
            }
            if st.top_p {
                out.push((Slot::TopP, column!((0..b).map(top_p).collect())));
            }
            if st.min_p {
                out.push((Slot::LnMinP, column!((0..b).map(ln_min_p).collect())));
            }
            if st.typical {
                let x = (0..b).map(|i| if on(i, &|q| q.typical_p < 1.0) { p(i).typical_p } else { f32::INFINITY });
                out.push((Slot::Typical, column!(x.collect())));
            }
        }
    }
    Ok(out)
}

/// `0..n` as an int32 array of `shape` (`n` elements), a constant input of the graph.
fn range(n: i32, shape: &[i32]) -> Array {
    Array::from_slice(&(0..n).collect::<Vec<i32>>(), shape)
}

/// Stacks `[1, X]` rows into `[B, X]` (no copy for a single row).
fn rows_of(rows: Vec<Array>) -> Result<Array, SamplingError> {
    if rows.len() == 1 {
        return Ok(rows.into_iter().next().expect("one row"));
    }
    Ok(ops::concatenate(&rows, 0)?)
}
