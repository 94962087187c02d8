//! Per-request sampling state on the device, and the batched entry point that turns a batch of
//! such states into the inputs of one compiled graph.

use super::params::{SamplingError, SamplingParams};
use super::pipeline::{self, Stages};
use super::plugin::PluginChain;
use mlx_rs::ops::indexing::{scatter_add_single, TryIndexOp};
use mlx_rs::ops::{self};
use mlx_rs::{random, Array};

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

/// The last tokens of prompt + output, as a ring on the device.
#[derive(Debug)]
struct Window {
    /// `[1, C]` uint32, C = `size` rounded up to a power of two (see [`bucket`]).
    ids: Array,
    /// `[1, C]` float32: 1 for filled slots, 0 for empty ones and for the rounding slots.
    weights: Array,
    size: usize,
    filled: usize,
    next_slot: usize,
}

impl Window {
    fn capacity(&self) -> i32 {
        self.ids.shape()[1]
    }
}

/// Sizes that become array shapes (window length, number of biased tokens, truncation width)
/// are rounded up to a power of two: every distinct shape or width costs a trace of the
/// compiled graph, and clients choose these numbers freely.
fn bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// One request's sampler: its parameters and its device state (random key, repetition window,
/// generated-token counts). Nothing it holds is ever read back to the host.
#[derive(Debug)]
pub struct SequenceSampler {
    params: SamplingParams,
    vocab: usize,
    /// Split every step; `None` for greedy requests.
    key: Option<Array>,
    window: Option<Window>,
    /// `[1, V]` float32 counts of generated tokens, for presence/frequency penalties.
    counts: Option<Array>,
    /// The request's sampler plugins, when it names any.
    pub(super) plugins: Option<PluginChain>,
    /// Set when a plugin of this row failed; the row's request must end with this error.
    pub(super) failure: Option<SamplingError>,
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
        let key = if params.is_random() { Some(random::key(seed)?) } else { None };
        let window = (params.repetition_penalty != 1.0).then(|| {
            let size = params.repetition_context_size;
            let capacity = bucket(size);
            let tail = &prompt[prompt.len().saturating_sub(size)..];
            let mut ids = vec![0u32; capacity];
            ids[..tail.len()].copy_from_slice(tail);
            let mut weights = vec![0f32; capacity];
            weights[..tail.len()].fill(1.0);
            Window {
                ids: Array::from_slice(&ids, &[1, capacity as i32]),
                weights: Array::from_slice(&weights, &[1, capacity as i32]),
                size,
                filled: tail.len(),
                next_slot: tail.len() % size,
            }
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
        Ok(SequenceSampler { params: params.clone(), vocab: vocab_size, key, window, counts, plugins, failure: None })
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
    /// window, the generated-token counts and the plugins' state. The sampling functions call
    /// it for the tokens they pick; call it yourself only for tokens the sampler did not choose
    /// (forced tokens).
    pub fn accept(&mut self, token: &Array) -> Result<(), SamplingError> {
        self.accept_builtin(token)?;
        match self.plugins.as_mut() {
            Some(chain) => chain.accept(token),
            None => Ok(()),
        }
    }

    fn accept_builtin(&mut self, token: &Array) -> Result<(), SamplingError> {
        let token = token.reshape(&[1, 1])?;
        if let Some(w) = self.window.as_mut() {
            let slot = Array::from_slice(&[w.next_slot as i32], &[1, 1]);
            w.ids = w.ids.put_along_axis(&slot, token.as_type::<u32>()?, -1)?;
            if w.filled < w.size {
                w.weights = w.weights.put_along_axis(&slot, Array::from_f32(1.0).reshape(&[1, 1])?, -1)?;
                w.filled += 1;
            }
            w.next_slot = (w.next_slot + 1) % w.size;
        }
        if let Some(c) = self.counts.as_mut() {
            let one = Array::from_f32(1.0).reshape(&[1, 1])?;
            *c = scatter_add_single(c.reshape(&[-1])?, token.reshape(&[1])?.as_type::<i32>()?, &one, 0)?
                .reshape(&[1, self.vocab as i32])?;
        }
        Ok(())
    }

    /// The key for this step's draw; the request keeps the other half.
    fn next_key(&mut self) -> Result<Option<Array>, SamplingError> {
        match self.key.as_mut() {
            None => Ok(None),
            Some(key) => {
                let (keep, use_now) = random::split(&*key, 2)?;
                *key = keep;
                Ok(Some(use_now))
            }
        }
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
    let keys = rows.iter_mut().map(|r| r.next_key()).collect::<Result<Vec<_>, _>>()?;
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
        truncate: None,
        logprobs: None,
        inspect,
        process_only: false,
    };
    if st.top_k && drawing().all(|i| p(i).top_k > 0) {
        let widest = drawing().map(|i| p(i).top_k as usize).max().unwrap_or(0);
        st.truncate = Some(bucket(widest).max(16) as i32).filter(|&k| k < v);
    }
    if want_logprobs {
        st.logprobs = (0..b).filter_map(|i| p(i).logprobs).max().map(|n| n as i32);
    }

    let mut inputs = vec![logits.clone()];
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
        inputs.push(Array::from_slice(&index, &[m]));
        inputs.push(Array::from_slice(&values, &[m, 1]));
    }
    if st.repetition {
        let n = rows.iter().filter_map(|r| r.window.as_ref().map(Window::capacity)).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(b);
        let mut weights = Vec::with_capacity(b);
        for r in rows.iter() {
            match &r.window {
                Some(w) if w.capacity() == n => {
                    ids.push(w.ids.clone());
                    weights.push(w.weights.clone());
                }
                Some(w) => {
                    let pad = n - w.capacity();
                    ids.push(ops::concatenate(&[w.ids.clone(), Array::zeros::<u32>(&[1, pad])?], 1)?);
                    weights.push(ops::concatenate(&[w.weights.clone(), Array::zeros::<f32>(&[1, pad])?], 1)?);
                }
                None => {
                    ids.push(Array::zeros::<u32>(&[1, n])?);
                    weights.push(Array::zeros::<f32>(&[1, n])?);
                }
            }
        }
        inputs.push(rows_of(ids)?);
        inputs.push(rows_of(weights)?);
        inputs.push(column!((0..b).map(|i| p(i).repetition_penalty).collect()));
    }
    if st.presence_frequency {
        let mut counts = Vec::with_capacity(b);
        for r in rows.iter() {
            counts.push(match &r.counts {
                Some(c) => c.clone(),
                None => Array::zeros::<f32>(&[1, v])?,
            });
        }
        inputs.push(rows_of(counts)?);
        inputs.push(column!((0..b).map(|i| p(i).presence_penalty).collect()));
        inputs.push(column!((0..b).map(|i| p(i).frequency_penalty).collect()));
    }
    // Inputs of steps 1-3 end here (the plugin path splits the graph at this point).
    let pre_inputs = inputs.len();
    if st.random {
        inputs.push(column!((0..b).map(|i| if random[i] { 1.0 / p(i).temperature } else { 1.0 }).collect()));
        let mut noise = Vec::with_capacity(b);
        for key in keys {
            noise.push(match key {
                Some(key) => random::gumbel::<f32>(&[1, v], &key)?,
                None => Array::zeros::<f32>(&[1, v])?,
            });
        }
        inputs.push(rows_of(noise)?);
        if st.mixed_greedy {
            inputs.push(column!(random.iter().map(|&r| !r).collect()));
        }
        let width = st.truncate.unwrap_or(v);
        let on = |i: usize, f: &dyn Fn(&SamplingParams) -> bool| random[i] && f(p(i));
        if st.top_k {
            inputs.push(column!((0..b)
                .map(|i| if on(i, &|q| q.top_k > 0) { (p(i).top_k as i32).min(width) } else { width })
                .collect(),));
        }
        if st.top_p {
            inputs.push(column!((0..b)
                .map(|i| if on(i, &|q| q.top_p < 1.0) { p(i).top_p } else { f32::INFINITY })
                .collect()));
        }
        if st.min_p {
            inputs.push(column!((0..b)
                .map(|i| if on(i, &|q| q.min_p > 0.0) { p(i).min_p.ln() } else { f32::NEG_INFINITY })
                .collect(),));
        }
        if st.typical {
            inputs.push(column!((0..b)
                .map(|i| if on(i, &|q| q.typical_p < 1.0) { p(i).typical_p } else { f32::INFINITY })
                .collect(),));
        }
    }

    let out = if rows.iter().any(|r| r.plugins.is_some()) {
        super::plugin::run(st, &inputs, pre_inputs, rows)?
    } else {
        pipeline::run(st, &inputs)?
    };
    for (i, r) in rows.iter_mut().enumerate() {
        if r.window.is_some() || r.counts.is_some() || r.plugins.is_some() {
            let token = if b == 1 { out.tokens.clone() } else { out.tokens.try_index(i as i32..i as i32 + 1)? };
            r.accept_builtin(&token)?;
            if r.failure.is_none() {
                if let Some(Err(e)) = r.plugins.as_mut().map(|c| c.accept(&token)) {
                    r.failure = Some(e);
                }
            }
        }
    }
    let logprobs = out.logprobs.map(|(chosen, top_ids, top_logprobs)| Logprobs { chosen, top_ids, top_logprobs });
    Ok((Sampled { tokens: out.tokens, logprobs }, out.inspection))
}

/// Stacks `[1, X]` rows into `[B, X]` (no copy for a single row).
fn rows_of(rows: Vec<Array>) -> Result<Array, SamplingError> {
    if rows.len() == 1 {
        return Ok(rows.into_iter().next().expect("one row"));
    }
    Ok(ops::concatenate(&rows, 0)?)
}
