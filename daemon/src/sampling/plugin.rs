//! Sampler plugins inside the sampling step. A batch with no plugin rows runs the one compiled
//! graph of `pipeline`; otherwise the graph runs in two parts around the plugins:
//!
//! 1. steps 1-3 (bias, repetition, presence/frequency), compiled, for the whole batch;
//! 2. each row's processor plugins, in request order, on its own `[1, V]` row;
//! 3. steps 4-9 (temperature, filters, pick, logprobs), compiled, for the whole batch;
//! 4. rows with a final sampler plugin take its token instead of the built-in one; the plugin
//!    gets the row's logits after step 2, divided by the temperature when that is > 0.
//!
//! All of it is lazy: plugins only add operations to the step's graph, evaluated with the rest
//! by the engine's `async_eval`. (The plugin part is not wrapped in `mx.compile`: plugins keep
//! device state across calls, which a traced function must not capture.)
//!
//! A plugin failure is recorded on its row (`SequenceSampler::failure`): the row's logits or
//! token fall back to the built-in ones for this step so the batch completes, and the engine
//! ends that request with `plugin_error`. Other rows are untouched.

use super::params::SamplingError;
use super::pipeline::{self, Named, Outputs, Slot, Stages};
use super::sequence::SequenceSampler;
use crate::plugins::instance::StepInfo;
use crate::plugins::{Kind, PluginError, PluginInstance, PluginRequest};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

/// One sequence's plugin instances and the device state they share.
#[derive(Debug)]
pub(crate) struct PluginChain {
    processors: Vec<PluginInstance>,
    sampler: Option<PluginInstance>,
    /// `[1, T]` int32 prompt + output, kept when some plugin reads it.
    history: Option<Array>,
    /// This step's history with its token already appended, when the greedy pick did that in
    /// the same kernel ([`super::cuda::pick_and_append`]); `accept` takes it.
    appended: Option<Array>,
    info: StepInfo,
}

impl PluginChain {
    /// Creates every plugin of the request for one sequence. `seed` seeds the random keys
    /// (each plugin gets its own stream).
    pub(crate) fn new(
        requests: &[PluginRequest],
        vocab: usize,
        prompt: &[u32],
        seed: u64,
        temperature: f32,
    ) -> Result<Self, SamplingError> {
        let mut processors = Vec::new();
        let mut sampler = None;
        for (i, r) in requests.iter().enumerate() {
            let stream_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let instance = PluginInstance::create(r.plugin.clone(), &r.params, vocab, stream_seed)?;
            match r.plugin.kind {
                Kind::Processor => processors.push(instance),
                Kind::Sampler => sampler = Some(instance),
            }
        }
        let history = requests.iter().any(|r| r.plugin.wants_history()).then(|| {
            let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
            Array::from_slice(&ids, &[1, ids.len() as i32])
        });
        let info = StepInfo { prompt_tokens: prompt.len(), generated_tokens: 0, temperature };
        Ok(PluginChain { processors, sampler, history, appended: None, info })
    }

    fn has_processors(&self) -> bool {
        !self.processors.is_empty()
    }

    fn has_sampler(&self) -> bool {
        self.sampler.is_some()
    }

    /// The processors, in order, on one row's `[1, V]` logits.
    fn process(&mut self, logits: &Array) -> Result<Array, PluginError> {
        let mut x = logits.clone();
        for p in &mut self.processors {
            x = p.apply(&x, self.history.as_ref(), self.info)?;
        }
        Ok(x)
    }

    /// The final sampler's `[1]` uint32 token for one row's (tempered) logits.
    fn pick(&mut self, logits: &Array) -> Result<Option<Array>, PluginError> {
        match self.sampler.as_mut() {
            None => Ok(None),
            Some(s) => s.apply(logits, self.history.as_ref(), self.info).map(Some),
        }
    }

    /// Shows every plugin the chosen token (`[1]`, any integer dtype) and extends the history.
    pub(crate) fn accept(&mut self, token: &Array) -> Result<(), SamplingError> {
        let token = token.reshape(&[1])?.as_type::<u32>()?;
        for p in self.processors.iter_mut().chain(self.sampler.iter_mut()) {
            p.accept(&token)?;
        }
        if let Some(h) = self.history.as_mut() {
            if let Some(appended) = self.appended.take() {
                *h = appended;
            } else {
                *h = match super::cuda::append_history(h, &token) {
                    Some(appended) => appended?,
                    None => ops::concatenate(&[h.clone(), token.reshape(&[1, 1])?.as_type::<i32>()?], 1)?,
                };
            }
        }
        self.info.generated_tokens += 1;
        Ok(())
    }
}

/// Step 3 for a lone greedy row whose plugins read the history, on CUDA: the argmax and the
/// history append of `accept` as one kernel (two nodes per step otherwise). `None` where that
/// does not apply: the built-in step 3 runs, and `accept` appends.
fn fused_greedy_pick(
    post: Stages,
    rows: &mut [&mut SequenceSampler],
    processed: &Array,
) -> Result<Option<Outputs>, SamplingError> {
    let [row] = rows else { return Ok(None) };
    if post.random || post.logprobs.is_some() || post.inspect || row.failure.is_some() {
        return Ok(None);
    }
    let Some(chain) = row.plugins.as_mut().filter(|c| !c.has_sampler()) else { return Ok(None) };
    chain.appended = None;
    let Some(history) = chain.history.as_ref() else { return Ok(None) };
    let Some(fused) = super::cuda::pick_and_append(processed, history) else { return Ok(None) };
    let (token, appended) = fused?;
    chain.appended = Some(appended);
    Ok(Some(Outputs { tokens: Some(token), ..Outputs::default() }))
}

/// Row `i` of a `[B, ...]` array, keeping the axis.
fn row(a: &Array, i: usize, b: usize) -> Result<Array, SamplingError> {
    if b == 1 {
        return Ok(a.clone());
    }
    Ok(a.try_index(i as i32..i as i32 + 1)?)
}

/// The step with plugins, on the inputs `sequence::step` built for the one-graph path. Returns
/// what `pipeline::run` would.
pub(super) fn run(st: Stages, named: &Named, rows: &mut [&mut SequenceSampler]) -> Result<Outputs, SamplingError> {
    let b = rows.len();
    // 1. Built-in processors.
    let pre = Stages {
        bias: st.bias,
        repetition: st.repetition,
        presence_frequency: st.presence_frequency,
        process_only: true,
        ..Stages::default()
    };
    // Without those stages the logits stay in the model's dtype: a processor gets a float32
    // conversion unless it takes them as they are (`CAP_MODEL_DTYPE`, see `PluginInstance`).
    let logits = if st.bias || st.repetition || st.presence_frequency {
        pipeline::run(pre, named)?.processed.ok_or_else(|| SamplingError::Shape("no processed logits".into()))?
    } else {
        named.head()?.clone()
    };

    // 2. Plugin processors, row by row.
    let mut rows_out: Option<Vec<Array>> = None;
    for (i, r) in rows.iter_mut().enumerate() {
        let Some(chain) = r.plugins.as_mut().filter(|c| c.has_processors()) else {
            continue;
        };
        if r.failure.is_some() {
            continue;
        }
        let out = rows_out.get_or_insert_with(Vec::new);
        if out.is_empty() {
            for k in 0..b {
                out.push(row(&logits, k, b)?);
            }
        }
        match chain.process(&out[i]) {
            Ok(x) => out[i] = x,
            Err(e) => r.failure = Some(e.into()),
        }
    }
    let processed = match rows_out {
        None => logits,
        Some(mut out) if b == 1 => out.remove(0),
        // Rows of different dtypes (a processor's float32 beside the model's bfloat16) join
        // in float32.
        Some(out) if out.iter().all(|x| x.dtype() == out[0].dtype()) => ops::concatenate(&out, 0)?,
        Some(out) => ops::concatenate(&out.iter().map(|x| x.as_type::<f32>()).collect::<Result<Vec<_>, _>>()?, 0)?,
    };

    // 3. Built-in temperature, filters and pick.
    let any_sampler = rows.iter().any(|r| r.plugins.as_ref().is_some_and(PluginChain::has_sampler));
    let post = Stages {
        bias: false,
        repetition: false,
        presence_frequency: false,
        advance: false,
        logprobs: if any_sampler { None } else { st.logprobs },
        kernel_penalty: false,
        ..st
    };
    let mut out = match fused_greedy_pick(post, rows, &processed)? {
        Some(out) => out,
        None => {
            let mut post_inputs = named.clone();
            post_inputs.set(Slot::Head, processed.clone());
            pipeline::run(post, &post_inputs)?
        }
    };

    // 4. Final sampler plugins replace the built-in pick of their rows.
    if any_sampler {
        let builtin_tokens = out.tokens.clone().ok_or_else(|| SamplingError::Shape("no tokens".into()))?;
        let mut picks = Vec::with_capacity(b);
        for (i, r) in rows.iter_mut().enumerate() {
            let builtin = row(&builtin_tokens, i, b)?;
            let temperature = r.params().temperature;
            let pick = match r.plugins.as_mut().filter(|c| c.has_sampler() && r.failure.is_none()) {
                None => None,
                Some(chain) => {
                    let x = row(&processed, i, b)?.as_type::<f32>()?;
                    let x = if temperature > 0.0 { x.multiply(Array::from_f32(1.0 / temperature))? } else { x };
                    match chain.pick(&x) {
                        Ok(t) => t,
                        Err(e) => {
                            r.failure = Some(e.into());
                            None
                        }
                    }
                }
            };
            picks.push(pick.unwrap_or(builtin));
        }
        let tokens = if b == 1 { picks.remove(0) } else { ops::concatenate(&picks, 0)? };
        if let Some(n) = st.logprobs {
            out.logprobs = Some(pipeline::logprobs(&processed, &tokens, n)?);
        }
        out.tokens = Some(tokens);
    }

    // 5. The window and counts advance with the final tokens.
    if st.repetition || st.presence_frequency {
        let advance = Stages {
            repetition: st.repetition,
            presence_frequency: st.presence_frequency,
            advance_only: true,
            ..Stages::default()
        };
        let mut inputs = named.clone();
        inputs.set(Slot::Head, out.tokens.clone().ok_or_else(|| SamplingError::Shape("no tokens".into()))?);
        let advanced = pipeline::run(advance, &inputs)?;
        out.window = advanced.window;
        out.counts = advanced.counts;
    }
    Ok(out)
}
