//! Generation for one resident model: prompt-cache lookup, chunked prefill, and a decode step
//! that advances any number of sequences together (continuous batching).
//!
//! All MLX work of a model happens on the thread that owns its [`Engine`] and on the engine's own
//! stream. A step builds the next tokens of every running sequence and hands them to MLX
//! (`async_eval`) *before* it reads the previous tokens, so the device never waits for the host;
//! each step moves one token id per sequence to the host (plus the top-n logprobs a request asked
//! for) and nothing else. The exception is a sequence's first token: it is read and reported
//! before the step builds anything, so time to first token never pays for building a decode step
//! (and a first token that ends its sequence costs no step at all). [`Engine::generate`] is the
//! same machinery with a batch of one.
//!
//! The prompt cache keeps, with each finished sequence's KV state, the logits of its last prompt
//! position: a request that repeats a cached prompt exactly samples its first token from those and
//! runs no forward pass before it (see [`prompt_cache`]).

pub mod prompt_cache;
pub mod stop;
pub mod worker;

use crate::cache::{BatchCache, SequenceCache};
use crate::models::{LoadedModel, ModelError};
use crate::sampling::{
    read_ids, read_logprobs, sample_batch_with_logprobs, SamplingError, SamplingParams, SequenceSampler,
};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::transforms::async_eval;
use mlx_rs::{ops, Array, Stream};
use prompt_cache::PromptCache;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use stop::{StopMatcher, StopOutcome};

/// Engine tuning.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Prompt tokens per prefill chunk: bounds the attention scratch memory of long prompts.
    pub prefill_chunk: usize,
    /// Device bytes the prompt cache may hold (0 disables it).
    pub prompt_cache_bytes: usize,
    /// Release MLX's buffer cache every this many decode steps.
    pub clear_cache_every: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { prefill_chunk: 512, prompt_cache_bytes: 1 << 30, clear_cache_every: 256 }
    }
}

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (chat template applied by the caller).
    pub prompt: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Strings that end the generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Token selection (including how many logprobs to report).
    pub sampler: SamplingParams,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller asked to stop (client cancel or disconnect).
    Cancelled,
}

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The most likely alternatives, best first: `(token id, log-probability)`.
    pub top: Vec<(u32, f32)>,
    /// The chosen token's own text (special tokens as written; a piece of a character decodes
    /// lossily), set when the token is accepted.
    pub text: String,
    /// Each alternative's own text, in the order of `top`.
    pub top_text: Vec<String>,
}

/// A piece of output, as it is produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The sampled token id.
    pub id: u32,
    /// Text completed by this token (may be empty while a character or a possible stop string
    /// is incomplete).
    pub text: String,
    /// Present when the request asked for logprobs.
    pub logprobs: Option<TokenLogprobs>,
}

/// Summary of a finished generation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why it ended.
    pub finish: FinishReason,
    /// Generated token ids (including a final end-of-sequence id, if any).
    pub ids: Vec<u32>,
    /// Generated text (without the stop string or end-of-sequence token).
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prompt cache.
    pub cached_tokens: usize,
    /// From the start of the request to the first token on the host.
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
}

impl Outcome {
    /// Decode speed after the first token, tokens per second.
    pub fn decode_tps(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1) as f64;
        if self.decode_time.is_zero() {
            0.0
        } else {
            n / self.decode_time.as_secs_f64()
        }
    }

    /// Prefill speed, prompt tokens (not served from cache) per second until the first token.
    pub fn prefill_tps(&self) -> f64 {
        let n = (self.prompt_tokens - self.cached_tokens) as f64;
        n / self.time_to_first_token.as_secs_f64().max(1e-9)
    }
}

/// A sampled token (and its logprobs) still on the device.
struct Pending {
    /// `[1]` uint32: the input of the row's next step (a view of the step's tokens).
    token: Array,
    /// What the host reads: the arrays `async_eval` queued for the whole step, and this row's
    /// place in them.
    step: Arc<StepOutput>,
    index: usize,
}

/// The arrays one step queued (`[B]` tokens; with logprobs `[B]` chosen, `[B, n]` top ids and
/// values), read to the host once for all its rows. Reading these waits for that step alone;
/// reading anything made after the queueing (a row's view, a copy, a join) would wait for
/// everything queued since, the next step included, because MLX runs the new operation behind
/// it: that cost every decode step its next step's tail (0.4-0.8 ms on an H100, docs/
/// benchmarks.md, session 6).
struct StepOutput {
    tokens: Array,
    logprobs: Option<(Array, Array, Array)>,
    ids: OnceLock<Vec<u32>>,
    /// Chosen, top ids and their values, as read.
    read_logprobs: OnceLock<(Vec<f32>, Vec<u32>, Vec<f32>)>,
}

impl StepOutput {
    fn id(&self, index: usize) -> Result<u32, ModelError> {
        if self.ids.get().is_none() {
            let _ = self.ids.set(read_ids(&self.tokens)?);
        }
        let ids = self.ids.get().expect("set above");
        ids.get(index).copied().ok_or_else(|| {
            ModelError::Sampling(SamplingError::Shape(format!("no token for row {index} of {}", ids.len())))
        })
    }

    /// Row `index`'s logprobs, the `n` most likely first; `None` when the step made none.
    fn logprobs(&self, index: usize, n: u32) -> Result<Option<TokenLogprobs>, ModelError> {
        let Some((chosen, top_ids, top_values)) = &self.logprobs else { return Ok(None) };
        if self.read_logprobs.get().is_none() {
            let _ = self.read_logprobs.set((read_logprobs(chosen)?, read_ids(top_ids)?, read_logprobs(top_values)?));
        }
        let (chosen, ids, values) = self.read_logprobs.get().expect("set above");
        let width = top_ids.shape().get(1).copied().unwrap_or(0).max(0) as usize;
        let span = index * width..(index + 1) * width;
        let (ids, values) = (ids.get(span.clone()).unwrap_or_default(), values.get(span).unwrap_or_default());
        let top = ids.iter().copied().zip(values.iter().copied()).take(n as usize).collect();
        Ok(Some(TokenLogprobs {
            logprob: chosen.get(index).copied().unwrap_or(f32::NAN),
            top,
            text: String::new(),
            top_text: Vec::new(),
        }))
    }
}

/// One sequence in flight: its cache, sampler state and the text produced so far.
pub struct Row {
    /// Identity within the engine (membership of the stacked batch).
    id: u64,
    req: GenerateRequest,
    /// Empty while the sequence's cache lives in the engine's stacked batch.
    cache: SequenceCache,
    sampler: SequenceSampler,
    decoder: StreamDecoder<Arc<Tokenizer>>,
    stops: StopMatcher,
    /// Exactly the tokens `cache` covers: the prompt, then each generated token once a step
    /// has fed it to the model.
    fed: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    pending: Option<Pending>,
    /// The logits of the last prompt position, `[1, V]`, kept (while the prompt cache is on) to
    /// be stored with the row's KV state when it finishes.
    prompt_logits: Option<Array>,
    started: Instant,
    first_token_at: Option<Instant>,
    cached_tokens: usize,
    finished: Option<FinishReason>,
    /// A sampler plugin of this row failed; the row is finished and its request must fail.
    failure: Option<SamplingError>,
}

impl Row {
    /// The plugin failure that ended this row, if one did (its request fails with
    /// `plugin_error`; the other rows of the batch are unaffected).
    pub fn failure(&self) -> Option<&SamplingError> {
        self.failure.as_ref()
    }

    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Ends the generation at the next step boundary (client cancel or disconnect).
    pub fn cancel(&mut self) {
        self.finished.get_or_insert(FinishReason::Cancelled);
    }

    /// Prompt length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.req.prompt.len()
    }

    /// Device bytes of its KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }
}

/// What starting a row produced, for [`Engine::new_row`].
struct Started {
    sampler: SequenceSampler,
    cache: SequenceCache,
    fed: Vec<u32>,
    cached: usize,
    logits: Array,
    pending: Option<Pending>,
    started: Instant,
}

/// A resident model and the state that serves it.
pub struct Engine {
    /// The model, tokenizer and template.
    pub model: LoadedModel,
    options: EngineOptions,
    prompt_cache: PromptCache,
    stream: Stream,
    host_reads: u64,
    steps: u64,
    profile: StepProfile,
    next_row: u64,
    /// The caches of the sequences decoding together, stacked (see [`BatchCache`]).
    batch: Option<BatchCache>,
    /// Caches handed back by a split batch, until their rows step or finish again.
    returned: std::collections::HashMap<u64, SequenceCache>,
}

/// Where a decode step's time goes, summed over steps: building the next step's graph on the
/// host, and waiting for the device to produce the current token. If `build` per step exceeds
/// the device time, decode is host-bound.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepProfile {
    /// Decode steps measured (calls of [`Engine::step`] that had a token to report).
    pub steps: u64,
    /// Of those, the steps that built and queued a next token: a step that only reports first
    /// tokens which end their rows builds none.
    pub built: u64,
    /// Host time spent building and queueing graphs.
    pub build: Duration,
    /// CPU time the engine's thread spent on that (`build` without the time it was not
    /// running: on a shared or virtual host the steadier measure of what building costs).
    pub build_cpu: Duration,
    /// Host time blocked reading sampled ids.
    pub wait: Duration,
    /// Part of `wait`, with `MLXD_POLL_TOKENS=1` only: time until MLX reported the ids
    /// available (polled), before the read itself. Tells a device that finishes late from a
    /// read that costs time of its own.
    pub poll: Duration,
    /// Part of `build`: constructing the model's graph (no evaluation).
    pub graph: Duration,
    /// Part of `build`: constructing the sampler's graph (no evaluation); the rest of `build`
    /// is queueing the step (`async_eval`: on a GPU, encoding and launching every primitive).
    pub sampler: Duration,
    /// Requests started.
    pub starts: u64,
    /// Host time inside `start` (prompt-cache lookup, prefill graph building and chunk
    /// evaluation, first sample queued).
    pub start: Duration,
    /// Steps that stacked their rows' caches anew (sequences joined): each copies every row's
    /// KV state into one batch.
    pub restacks: u64,
    /// Steps that kept part of the batch (sequences left): one gather per layer's keys and
    /// values.
    pub regathers: u64,
    /// Forward passes that prefilled several prompts together ([`Engine::start_many`]).
    pub prefill_passes: u64,
    /// Steps whose input tokens were joined from several earlier steps' outputs (rows that
    /// joined or sat out), rather than taken whole from the last step.
    pub token_joins: u64,
}

impl Drop for Engine {
    /// Waits for what is still queued on the engine's stream. Decoding queues one step ahead,
    /// so a finished generation leaves a step in flight on MLX's stream thread; a thread that
    /// drops its engine and then ends the process (a test binary returning from its last test)
    /// would otherwise tear MLX down under that step: tests/generation.rs died of SIGSEGV at
    /// exit in about one run in five, inside a matmul of the smollm2 test's last step.
    fn drop(&mut self) {
        // SAFETY: an mlx-c call on a stream this engine owns; errors have nowhere to go here.
        unsafe { mlx_sys::mlx_synchronize(self.stream.as_ptr()) };
    }
}

impl Engine {
    /// Takes ownership of a loaded model. Call on the thread that will run it.
    pub fn new(model: LoadedModel, options: EngineOptions) -> Self {
        let prompt_cache = PromptCache::new(options.prompt_cache_bytes);
        Engine {
            model,
            options,
            prompt_cache,
            stream: Stream::new(),
            host_reads: 0,
            steps: 0,
            profile: StepProfile::default(),
            next_row: 0,
            batch: None,
            returned: std::collections::HashMap::new(),
        }
    }

    /// Number of host reads of sampled ids so far: one per decode step for the whole batch, plus
    /// one in a step that also reports rows' first tokens (read together, before the step is
    /// built). A sequence decoded alone costs exactly one read per token.
    pub fn host_reads(&self) -> u64 {
        self.host_reads
    }

    /// Host-side timing of the decode loop since the last [`Engine::reset_profile`].
    pub fn profile(&self) -> StepProfile {
        self.profile
    }

    /// Zeroes the timing counters.
    pub fn reset_profile(&mut self) {
        self.profile = StepProfile::default();
    }

    /// The prompt cache's counters.
    pub fn prompt_cache_stats(&self) -> prompt_cache::PromptCacheStats {
        self.prompt_cache.stats()
    }

    /// Changes the prompt cache's byte budget; 0 disables it and drops what it held.
    pub fn set_prompt_cache_budget(&mut self, bytes: usize) {
        self.options.prompt_cache_bytes = bytes;
        self.prompt_cache = PromptCache::new(bytes);
    }

    /// Holds the prompt cache to at most `bytes` (evicting its least recently used entries) until
    /// the next call; never above the configured size.
    pub fn limit_prompt_cache(&mut self, bytes: usize) {
        self.prompt_cache.set_budget(bytes.min(self.options.prompt_cache_bytes));
    }

    /// The options the engine was made with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Drops all cached prompt state.
    pub fn clear_prompt_cache(&mut self) {
        self.prompt_cache.clear();
    }

    /// Runs one generation to its end. `on_token` sees every token as it is produced and
    /// returns `false` to cancel; the generation then ends with [`FinishReason::Cancelled`].
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        mut on_token: impl FnMut(&TokenEvent) -> bool,
    ) -> Result<Outcome, ModelError> {
        let mut row = self.start(req.clone())?;
        while row.finished.is_none() {
            self.step(&mut [&mut row], |_, ev| on_token(ev))?;
        }
        if let Some(e) = row.failure.take() {
            self.finish(row);
            return Err(e.into());
        }
        Ok(self.finish(row))
    }

    /// Admits a request: checks it, reuses the longest cached prefix, prefills the rest in
    /// chunks and queues the first token. The row then advances with [`Engine::step`], whose
    /// first call reports that token. An exact repeat of a cached prompt prefills nothing: its
    /// first token is sampled from the cached logits of the last prompt position.
    pub fn start(&mut self, req: GenerateRequest) -> Result<Row, ModelError> {
        let stream = self.stream.clone();
        let t = Instant::now();
        let row = mlx_rs::with_stream(&stream, || self.start_on_stream(req));
        self.profile.starts += 1;
        self.profile.start += t.elapsed();
        row
    }

    fn start_on_stream(&mut self, req: GenerateRequest) -> Result<Row, ModelError> {
        let started = Instant::now();
        let prompt = &req.prompt;
        if prompt.is_empty() {
            return Err(ModelError::Config("the prompt is empty".into()));
        }
        let vocab = self.model.model.args.vocab as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Config(format!("prompt token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let mut sampler = SequenceSampler::new(&req.sampler, vocab as usize, prompt)?;
        let model = &self.model.model;
        let (mut cache, cached, cached_logits) = match self.prompt_cache.lookup(prompt) {
            Some(hit) => (hit.cache, hit.tokens, hit.logits),
            None => (SequenceCache::new(model.num_layers()), 0, None),
        };
        let mut fed: Vec<u32> = prompt[..cached].to_vec();
        let logits = match cached_logits {
            // An exact repeat: the whole prompt is cached, and so are its last logits.
            Some(logits) => logits,
            None => {
                // All but the last prompt token fill the cache; the last one produces the logits.
                let body = &prompt[cached..prompt.len() - 1];
                for chunk in body.chunks(self.options.prefill_chunk.max(1)) {
                    model.prefill(&tokens_array(chunk), &mut cache)?;
                    fed.extend_from_slice(chunk);
                }
                let last = &prompt[prompt.len() - 1..];
                // The last prompt token takes the decode path: one position, the leanest graph.
                let logits = model.forward_batch(&Array::from_slice(&[last[0] as i32], &[1]), &mut [&mut cache])?;
                fed.extend_from_slice(last);
                logits
            }
        };
        let pending = match sample(&logits, &mut [&mut sampler], req.sampler.logprobs.unwrap_or(0) > 0, false)?.0.pop()
        {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(e.into()),
            None => None,
        };
        Ok(self.new_row(req, Started { sampler, cache, fed, cached, logits, pending, started }))
    }

    /// A started row: its prompt is in `cache` and its first token queued.
    fn new_row(&mut self, req: GenerateRequest, s: Started) -> Row {
        self.next_row += 1;
        Row {
            id: self.next_row,
            decoder: StreamDecoder::new(self.model.tokenizer.clone()),
            stops: StopMatcher::new(&req.stop),
            cache: s.cache,
            sampler: s.sampler,
            fed: s.fed,
            ids: Vec::new(),
            text: String::new(),
            pending: s.pending,
            prompt_logits: self.prompt_cache.enabled().then_some(s.logits),
            started: s.started,
            first_token_at: None,
            cached_tokens: s.cached,
            finished: (req.max_tokens == 0).then_some(FinishReason::Length),
            failure: None,
            req,
        }
    }

    /// Starts several requests, results in their order. Those the prompt cache has nothing for
    /// are prefilled together, in forward passes of at most `prefill_chunk` tokens (padding
    /// included: every row of a pass is as long as its longest prompt), so a burst of clients
    /// pays for about one prefill instead of one each; the others start one by one
    /// ([`Engine::start`]). A pass that fails is retried one request at a time.
    pub fn start_many(&mut self, reqs: Vec<GenerateRequest>) -> Vec<Result<Row, ModelError>> {
        let stream = self.stream.clone();
        let t = Instant::now();
        let n = reqs.len() as u64;
        let rows = mlx_rs::with_stream(&stream, || self.start_many_on_stream(reqs));
        self.profile.starts += n;
        self.profile.start += t.elapsed();
        tracing::trace!(requests = n, us = t.elapsed().as_micros() as u64, "started");
        rows
    }

    fn start_many_on_stream(&mut self, reqs: Vec<GenerateRequest>) -> Vec<Result<Row, ModelError>> {
        let chunk = self.options.prefill_chunk.max(1);
        let vocab = self.model.model.args.vocab as u32;
        let mut passes: Vec<Vec<usize>> = Vec::new();
        let mut alone: Vec<usize> = Vec::new();
        let mut pass: Vec<usize> = Vec::new();
        let mut longest = 0;
        for (i, req) in reqs.iter().enumerate() {
            let p = &req.prompt;
            let together = shared_prefill()
                && !p.is_empty()
                && p.len() <= chunk
                && p.iter().all(|&t| t < vocab)
                && self.prompt_cache.serves(p) == 0;
            if !together {
                alone.push(i);
                continue;
            }
            if !pass.is_empty() && (pass.len() + 1) * longest.max(p.len()) > chunk {
                passes.push(std::mem::take(&mut pass));
                longest = 0;
            }
            longest = longest.max(p.len());
            pass.push(i);
        }
        passes.push(pass);
        let mut out: Vec<Option<Result<Row, ModelError>>> = (0..reqs.len()).map(|_| None).collect();
        for pass in passes {
            if pass.len() < 2 {
                alone.extend(pass);
                continue;
            }
            match self.prefill_pass(pass.iter().map(|&i| reqs[i].clone()).collect()) {
                Ok(rows) => {
                    self.profile.prefill_passes += 1;
                    for (&i, row) in pass.iter().zip(rows) {
                        out[i] = Some(row);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = pass.len(), "prefilling prompts together failed; one at a time");
                    alone.extend(pass);
                }
            }
        }
        for i in alone {
            out[i] = Some(self.start_on_stream(reqs[i].clone()));
        }
        out.into_iter().map(|r| r.expect("every request placed")).collect()
    }

    /// One forward pass over several prompts (none cached, each within a chunk), then their
    /// first tokens sampled together. A request whose sampler cannot be made fails alone.
    fn prefill_pass(&mut self, reqs: Vec<GenerateRequest>) -> Result<Vec<Result<Row, ModelError>>, ModelError> {
        let started = Instant::now();
        let vocab = self.model.model.args.vocab as usize;
        let mut results: Vec<Option<Result<Row, ModelError>>> = (0..reqs.len()).map(|_| None).collect();
        let (mut members, mut samplers) = (Vec::new(), Vec::new());
        for (i, r) in reqs.iter().enumerate() {
            match SequenceSampler::new(&r.sampler, vocab, &r.prompt) {
                Ok(s) => {
                    members.push(i);
                    samplers.push(s);
                }
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        if !members.is_empty() {
            let longest = members.iter().map(|&i| reqs[i].prompt.len()).max().unwrap_or(1);
            let mut ids = vec![0i32; members.len() * longest];
            for (r, &i) in members.iter().enumerate() {
                for (c, &t) in reqs[i].prompt.iter().enumerate() {
                    ids[r * longest + c] = t as i32;
                }
            }
            let lens: Vec<i32> = members.iter().map(|&i| reqs[i].prompt.len() as i32).collect();
            let tokens = Array::from_slice(&ids, &[members.len() as i32, longest as i32]);
            let (logits, caches) = self.model.model.prefill_rows(&tokens, &lens)?;
            let want_logprobs = members.iter().any(|&i| reqs[i].sampler.logprobs.unwrap_or(0) > 0);
            let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
            let (pending, _) = sample(&logits, &mut refs, want_logprobs, false)?;
            for (((r, &i), (sampler, cache)), pending) in
                members.iter().enumerate().zip(samplers.into_iter().zip(caches)).zip(pending)
            {
                let req = reqs[i].clone();
                results[i] = Some(match pending {
                    Ok(p) => {
                        let logits = logits.try_index(r as i32..r as i32 + 1)?;
                        let fed = req.prompt.clone();
                        Ok(self.new_row(
                            req,
                            Started { sampler, cache, fed, cached: 0, logits, pending: Some(p), started },
                        ))
                    }
                    Err(e) => Err(e.into()),
                });
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every request is a member or failed its sampler")).collect())
    }

    /// Advances every unfinished row by one token. Rows that have just started first get their
    /// first token read (one host read for all of them) and reported; then the next step of the
    /// rows that go on is queued, and only then are the other rows' tokens read (one more host
    /// read) and reported, so the device works on the next step while the host waits.
    /// `on_token(i, event)` returning `false` cancels row `i`.
    pub fn step(
        &mut self,
        rows: &mut [&mut Row],
        mut on_token: impl FnMut(usize, &TokenEvent) -> bool,
    ) -> Result<(), ModelError> {
        let stream = self.stream.clone();
        mlx_rs::with_stream(&stream, || self.step_on_stream(rows, &mut on_token))
    }

    fn step_on_stream(
        &mut self,
        rows: &mut [&mut Row],
        on_token: &mut dyn FnMut(usize, &TokenEvent) -> bool,
    ) -> Result<(), ModelError> {
        for row in rows.iter_mut() {
            self.reclaim(row);
        }
        let live: Vec<usize> =
            (0..rows.len()).filter(|&i| rows[i].finished.is_none() && rows[i].pending.is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        self.profile.steps += 1;
        self.steps += 1;
        if self.steps % self.options.clear_cache_every.max(1) as u64 == 0 {
            let _ = mlx_rs::memory::clear_cache();
        }
        // First tokens go out before anything is built: building a decode step takes host time
        // that time to first token should not pay, and a first token may end its row.
        let (fresh, running): (Vec<usize>, Vec<usize>) = live.iter().partition(|&&i| rows[i].ids.is_empty());
        if !fresh.is_empty() {
            self.report(rows, &fresh, on_token)?;
        }

        let build_started = Instant::now();
        let build_cpu_started = thread_cpu_time();
        // Rows that may need another token after their pending one get their next step queued,
        // fed with that pending token (already read for fresh rows, still unread for the others).
        let going_on: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| {
                let known_after_this_step = rows[i].ids.len() + usize::from(running.contains(&i));
                rows[i].finished.is_none() && known_after_this_step < rows[i].req.max_tokens
            })
            .collect();
        let mut next: Vec<Option<Pending>> = (0..rows.len()).map(|_| None).collect();
        let mut failed: Vec<Option<SamplingError>> = (0..rows.len()).map(|_| None).collect();
        if !going_on.is_empty() {
            let pending: Vec<&Pending> =
                going_on.iter().map(|&i| rows[i].pending.as_ref().expect("live rows have a token")).collect();
            let tokens = match whole_step(&pending) {
                // The same rows in the same order as the step that made them: its `[B]` array
                // as it is, instead of joining a view of it per row (B + 1 more primitives).
                Some(step) => step.tokens.clone(),
                None => {
                    self.profile.token_joins += u64::from(pending.len() > 1);
                    stack(pending.iter().map(|p| p.token.clone()).collect())?
                }
            };
            let want_logprobs = going_on.iter().any(|&i| rows[i].req.sampler.logprobs.unwrap_or(0) > 0);
            let logits = if going_on.len() == 1 {
                self.unstack()?;
                let row = &mut *rows[going_on[0]];
                self.reclaim(row);
                self.model.model.forward_batch(&tokens, &mut [&mut row.cache])?
            } else {
                let members: Vec<u64> = going_on.iter().map(|&i| rows[i].id).collect();
                if let Some(batch) = self.batch.as_mut().filter(|b| b.members != members) {
                    // Sequences left (ended, or sat out a step): the others' rows are gathered
                    // from the stack as they are; those sitting out take their caches along.
                    if let Some(leaving) = batch.retain(&members)? {
                        self.profile.regathers += 1;
                        self.returned.extend(leaving);
                    }
                }
                if self.batch.as_ref().is_none_or(|b| b.members != members) {
                    // Sequences joined: hand every cache back, stack the new set.
                    self.unstack()?;
                    for &i in &going_on {
                        self.reclaim(rows[i]);
                    }
                    let caches: Vec<&SequenceCache> = going_on.iter().map(|&i| &rows[i].cache).collect();
                    let batch = BatchCache::build(members, &caches)?;
                    self.profile.restacks += 1;
                    for &i in &going_on {
                        rows[i].cache = SequenceCache::default();
                    }
                    self.batch = Some(batch);
                }
                self.model.model.forward_batched(&tokens, self.batch.as_mut().expect("stacked above"))?
            };
            let mut samplers: Vec<&mut SequenceSampler> = rows
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| going_on.contains(i))
                .map(|(_, r)| &mut r.sampler)
                .collect();
            let graph_started = Instant::now();
            let dump = step_graph_wanted(self.steps);
            let (sampled, sampler_built) = sample(&logits, &mut samplers, want_logprobs, dump)?;
            self.profile.graph += graph_started - build_started;
            self.profile.sampler += sampler_built;
            self.profile.built += 1;
            for (slot, p) in going_on.iter().zip(sampled) {
                match p {
                    Ok(p) => next[*slot] = Some(p),
                    Err(e) => failed[*slot] = Some(e),
                }
            }
        }
        let built = build_started.elapsed();
        self.profile.build += built;
        self.profile.build_cpu += thread_cpu_time().saturating_sub(build_cpu_started);

        let waited_before = self.profile.wait;
        if !running.is_empty() {
            self.report(rows, &running, on_token)?;
        }
        tracing::trace!(
            step = self.steps,
            rows = going_on.len(),
            build_us = built.as_micros() as u64,
            wait_us = (self.profile.wait - waited_before).as_micros() as u64,
            "decode step"
        );
        for &i in &live {
            let row = &mut *rows[i];
            if going_on.contains(&i) {
                // Its pending token, now read, went into the step just built: that position's KV
                // is in the row's cache (`fed` is exactly what the cache covers).
                row.fed.push(*row.ids.last().expect("reported above"));
            }
            if let Some(e) = failed[i].take() {
                // This step's token was sound and went out; the next one cannot be trusted.
                row.failure = Some(e);
                row.finished.get_or_insert(FinishReason::Cancelled);
            }
            row.pending = if row.finished.is_none() { next[i].take() } else { None };
            if row.finished.is_none() && row.pending.is_none() {
                row.finished = Some(FinishReason::Length);
            }
        }
        Ok(())
    }

    /// Reads the pending tokens of rows `which` to the host (one read for all of them), books each
    /// into its row and reports it; `on_token` returning `false` cancels the row. The token array
    /// stays in `row.pending`, as the input of the row's next step.
    fn report(
        &mut self,
        rows: &mut [&mut Row],
        which: &[usize],
        on_token: &mut dyn FnMut(usize, &TokenEvent) -> bool,
    ) -> Result<(), ModelError> {
        let read_started = Instant::now();
        let steps: Vec<(Arc<StepOutput>, usize)> = which
            .iter()
            .map(|&i| {
                let p = rows[i].pending.as_ref().expect("live rows have a token");
                (p.step.clone(), p.index)
            })
            .collect();
        if poll_tokens() {
            for (step, _) in &steps {
                wait_available(&step.tokens);
            }
            self.profile.poll += read_started.elapsed();
        }
        let ids = steps.iter().map(|(step, index)| step.id(*index)).collect::<Result<Vec<u32>, _>>()?;
        self.profile.wait += read_started.elapsed();
        self.host_reads += 1;
        for ((&i, id), (step, index)) in which.iter().zip(ids).zip(&steps) {
            let row = &mut *rows[i];
            let logprobs = step.logprobs(*index, row.req.sampler.logprobs.unwrap_or(0))?;
            let event = self.accept(row, id, logprobs)?;
            if !on_token(i, &event) {
                row.finished.get_or_insert(FinishReason::Cancelled);
            }
        }
        Ok(())
    }

    /// Books a sampled token into its row: end-of-sequence, detokenization, stop strings, length.
    /// (Whether the token is fed to the model is the step's business: see `Row::fed`.)
    fn accept(&self, row: &mut Row, id: u32, logprobs: Option<TokenLogprobs>) -> Result<TokenEvent, ModelError> {
        row.first_token_at.get_or_insert_with(Instant::now);
        // Each token's own text, for clients that show the alternatives: one decode per id on
        // the host, only for requests that asked for logprobs.
        let alone = |t: u32| self.model.tokenizer.decode(&[t], false).unwrap_or_default();
        let logprobs = logprobs.map(|mut l| {
            l.text = alone(id);
            l.top_text = l.top.iter().map(|&(t, _)| alone(t)).collect();
            l
        });
        row.ids.push(id);
        let tok_err = |e: crate::tokenizer::TokenizerError| ModelError::Tokenizer(e.to_string());
        if self.model.eos_ids.contains(&id) {
            row.finished = Some(FinishReason::Stop);
            let rest = row.stops.flush();
            row.text.push_str(&rest);
            return Ok(TokenEvent { id, text: rest, logprobs });
        }
        let piece = row.decoder.push(id).map_err(tok_err)?;
        let mut shown = match row.stops.push(&piece) {
            StopOutcome::Continue(t) => t,
            StopOutcome::Stopped(t) => {
                row.finished = Some(FinishReason::Stop);
                t
            }
        };
        if row.finished.is_none() && row.ids.len() >= row.req.max_tokens {
            row.finished = Some(FinishReason::Length);
            let tail = row.decoder.finish().map_err(tok_err)?;
            match row.stops.push(&tail) {
                StopOutcome::Continue(t) => shown.push_str(&(t + &row.stops.flush())),
                StopOutcome::Stopped(t) => {
                    shown.push_str(&t);
                    row.finished = Some(FinishReason::Stop);
                }
            }
        }
        row.text.push_str(&shown);
        Ok(TokenEvent { id, text: shown, logprobs })
    }

    /// Device bytes of the KV caches the engine holds for rows (the stacked batch and caches
    /// waiting to be reclaimed); rows report their own through [`Row::cache_bytes`].
    pub fn held_kv_bytes(&self) -> usize {
        self.batch.as_ref().map_or(0, BatchCache::nbytes)
            + self.returned.values().map(SequenceCache::nbytes).sum::<usize>()
    }

    /// Splits the stacked batch back into per-sequence caches, kept until their rows return.
    fn unstack(&mut self) -> Result<(), ModelError> {
        if let Some(batch) = self.batch.take() {
            for (id, cache) in batch.split()? {
                self.returned.insert(id, cache);
            }
        }
        Ok(())
    }

    /// Gives a row back its own cache if a split batch holds it.
    fn reclaim(&mut self, row: &mut Row) {
        if let Some(cache) = self.returned.remove(&row.id) {
            row.cache = cache;
        }
    }

    /// Ends a row: its KV state goes to the prompt cache, its summary to the caller.
    pub fn finish(&mut self, mut row: Row) -> Outcome {
        if let Some(batch) = self.batch.as_mut() {
            // The ended sequence takes its cache (views of the stack); the others stay stacked
            // and their next step gathers their rows (see `step`).
            match batch.detach(row.id) {
                Ok(Some(cache)) => row.cache = cache,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "the finished sequence's KV state is dropped"),
            }
            if batch.deserted() {
                self.batch = None;
            }
        }
        self.reclaim(&mut row);
        let first = row.first_token_at.unwrap_or_else(Instant::now);
        let outcome = Outcome {
            finish: row.finished.unwrap_or(FinishReason::Cancelled),
            prompt_tokens: row.req.prompt.len(),
            cached_tokens: row.cached_tokens,
            time_to_first_token: first - row.started,
            decode_time: first.elapsed(),
            ids: row.ids,
            text: row.text,
        };
        if let Some(logits) = row.prompt_logits.filter(|_| row.cache.offset() as usize == row.fed.len()) {
            self.prompt_cache.insert(row.fed, row.cache, row.req.prompt.len(), logits);
        }
        outcome
    }
}

/// Samples every row of `logits` and queues the result on the device; a row whose plugin
/// failed gets its error instead of a token. Also returns the time building the sampler's
/// graph took (before the step was queued).
fn sample(
    logits: &Array,
    samplers: &mut [&mut SequenceSampler],
    want_logprobs: bool,
    dump_graph: bool,
) -> Result<(Vec<Result<Pending, SamplingError>>, Duration), ModelError> {
    let started = Instant::now();
    let sampled = sample_batch_with_logprobs(logits, samplers)?;
    let built = started.elapsed();
    if dump_graph {
        // Before the step is queued: once it runs, MLX detaches the graph it printed from.
        match crate::runtime::graph_kinds(&sampled.tokens) {
            Ok(kinds) => tracing::info!(
                rows = samplers.len(),
                primitives = kinds.values().sum::<usize>(),
                kinds = ?kinds,
                "decode step graph (MLXD_STEP_GRAPH)"
            ),
            Err(e) => tracing::warn!(error = %e, "MLXD_STEP_GRAPH: cannot print the step's graph"),
        }
    }
    let lp = if want_logprobs { sampled.logprobs } else { None };
    let mut queue: Vec<&Array> = vec![&sampled.tokens];
    if let Some(l) = &lp {
        queue.extend([&l.chosen, &l.top_ids, &l.top_logprobs]);
    }
    async_eval(queue)?;
    let single = samplers.len() == 1;
    let step = Arc::new(StepOutput {
        tokens: sampled.tokens.clone(),
        logprobs: lp.map(|l| (l.chosen, l.top_ids, l.top_logprobs)),
        ids: OnceLock::new(),
        read_logprobs: OnceLock::new(),
    });
    (0..samplers.len() as i32)
        .map(|i| {
            if let Some(e) = samplers[i as usize].take_failure() {
                return Ok(Err(e));
            }
            let token = if single { sampled.tokens.clone() } else { sampled.tokens.try_index(i..i + 1)? };
            Ok(Ok(Pending { token, step: step.clone(), index: i as usize }))
        })
        .collect::<Result<_, ModelError>>()
        .map(|pending| (pending, built))
}

/// The step every one of `pending` comes from, when they are all of its rows in its order.
fn whole_step(pending: &[&Pending]) -> Option<Arc<StepOutput>> {
    let first = pending.first()?;
    let rows = first.step.tokens.shape().first().copied().unwrap_or(0).max(0) as usize;
    let whole = pending.len() == rows
        && pending.iter().enumerate().all(|(i, p)| p.index == i && Arc::ptr_eq(&p.step, &first.step));
    whole.then(|| first.step.clone())
}

/// Joins `[1]`-shaped arrays into `[B]`; a single one is passed through (no copy kernel).
fn stack(mut arrays: Vec<Array>) -> Result<Array, ModelError> {
    if arrays.len() == 1 {
        return Ok(arrays.pop().expect("one"));
    }
    Ok(ops::concatenate(&arrays, 0)?)
}

fn tokens_array(ids: &[u32]) -> Array {
    let v: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Array::from_slice(&v, &[1, v.len() as i32])
}

/// Whether a burst's prompts share prefill passes (`MLXD_SHARED_PREFILL=0`: one at a time, to
/// compare).
fn shared_prefill() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLXD_SHARED_PREFILL").map_or(true, |v| v != "0"))
}

/// `MLXD_STEP_GRAPH=N[,M...]`: log the primitives of the engine's decode steps N, M, ... by
/// kind (counted from 1 since the engine started; a measurement aid: printing a graph costs
/// milliseconds).
fn step_graph_wanted(step: u64) -> bool {
    static STEPS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    STEPS
        .get_or_init(|| {
            std::env::var("MLXD_STEP_GRAPH")
                .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
                .unwrap_or_default()
        })
        .contains(&step)
}

/// `MLXD_POLL_TOKENS=1`: poll each token for availability before reading it (measurement).
fn poll_tokens() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLXD_POLL_TOKENS").is_ok_and(|v| v == "1"))
}

/// Spins until MLX reports `a` computed (an array queued by `async_eval`), for at most 100 ms.
fn wait_available(a: &Array) {
    let until = Instant::now() + Duration::from_millis(100);
    loop {
        let mut ready = false;
        // SAFETY: reads the status of a live array.
        let rc = unsafe { mlx_sys::_mlx_array_is_available(&mut ready, a.as_ptr()) };
        if rc != 0 || ready || Instant::now() > until {
            return;
        }
        std::hint::spin_loop();
    }
}

/// CPU time this thread has run (Linux and macOS; zero where unavailable).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
