//! Generation for one resident model: prompt-cache lookup, chunked prefill, pipelined decode,
//! stop conditions and incremental detokenization.
//!
//! All MLX work of a model happens on the thread that owns its [`Engine`] and on the engine's own
//! stream. The decode loop builds step n+1 and hands it to MLX (`async_eval`) before it reads
//! step n's token, so the device never waits for the host; each step moves one token id per
//! sequence to the host and nothing else.

pub mod prompt_cache;
pub mod stop;

use crate::cache::SequenceCache;
use crate::models::{LoadedModel, ModelError};
use crate::sampling::{read_ids, SamplerSpec, SequenceSampler};
use crate::tokenizer::StreamDecoder;
use mlx_rs::transforms::async_eval;
use mlx_rs::{Array, Stream};
use prompt_cache::PromptCache;
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
    /// Token selection.
    pub sampler: SamplerSpec,
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

/// A piece of output, as it is produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The sampled token id.
    pub id: u32,
    /// Text completed by this token (may be empty while a character or a possible stop string
    /// is incomplete).
    pub text: String,
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
        if self.decode_time.is_zero() { 0.0 } else { n / self.decode_time.as_secs_f64() }
    }

    /// Prefill speed, prompt tokens (not served from cache) per second until the first token.
    pub fn prefill_tps(&self) -> f64 {
        let n = (self.prompt_tokens - self.cached_tokens) as f64;
        n / self.time_to_first_token.as_secs_f64().max(1e-9)
    }
}

/// A resident model and the state that serves it.
pub struct Engine {
    /// The model, tokenizer and template.
    pub model: LoadedModel,
    options: EngineOptions,
    prompt_cache: PromptCache,
    stream: Stream,
    host_reads: u64,
}

impl Engine {
    /// Takes ownership of a loaded model. Call on the thread that will run it.
    pub fn new(model: LoadedModel, options: EngineOptions) -> Self {
        let prompt_cache = PromptCache::new(options.prompt_cache_bytes);
        Engine { model, options, prompt_cache, stream: Stream::new(), host_reads: 0 }
    }

    /// Number of arrays read back to the host so far (one per decode step per sequence);
    /// tests use it to prove logits never leave the device.
    pub fn host_reads(&self) -> u64 {
        self.host_reads
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

    /// Drops all cached prompt state.
    pub fn clear_prompt_cache(&mut self) {
        self.prompt_cache.clear();
    }

    /// Runs one generation. `on_token` sees every token as it is produced and returns `false`
    /// to cancel; the generation then ends within that step with [`FinishReason::Cancelled`].
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        mut on_token: impl FnMut(&TokenEvent) -> bool,
    ) -> Result<Outcome, ModelError> {
        let stream = self.stream.clone();
        mlx_rs::with_stream(&stream, || self.generate_on_stream(req, &mut on_token))
    }

    fn generate_on_stream(
        &mut self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Outcome, ModelError> {
        let start = Instant::now();
        let prompt = &req.prompt;
        if prompt.is_empty() {
            return Err(ModelError::Config("the prompt is empty".into()));
        }
        let vocab = self.model.model.args.vocab as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Config(format!("prompt token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let model = &self.model.model;
        let (mut cache, cached) = match self.prompt_cache.lookup(prompt) {
            Some((c, n)) => (c, n),
            None => (SequenceCache::new(model.num_layers()), 0),
        };
        let mut fed: Vec<u32> = prompt[..cached].to_vec();

        // Prefill all but the last prompt token in chunks; the last one produces the logits.
        let body = &prompt[cached..prompt.len() - 1];
        for chunk in body.chunks(self.options.prefill_chunk.max(1)) {
            model.prefill(&tokens_array(chunk), &mut cache)?;
            fed.extend_from_slice(chunk);
        }
        let last = &prompt[prompt.len() - 1..];
        let mut sampler = SequenceSampler::new(&req.sampler.clone().into(), vocab as usize, prompt)?;
        let mut y = sampler.sample(&model.forward_last(&tokens_array(last), &mut cache)?)?;
        fed.extend_from_slice(last);
        async_eval([&y])?;

        let mut decoder = StreamDecoder::new(&self.model.tokenizer);
        let mut stops = StopMatcher::new(&req.stop);
        let mut ids = Vec::new();
        let mut text = String::new();
        let mut first_token_at = None;
        let finish = loop {
            if ids.len() >= req.max_tokens {
                break FinishReason::Length;
            }
            // Queue the next step before reading this one, unless this is the last allowed.
            let next = if ids.len() + 1 < req.max_tokens {
                let logits = model.forward_last(&y.reshape(&[1, 1])?, &mut cache)?;
                let n = sampler.sample(&logits)?;
                async_eval([&n])?;
                Some(n)
            } else {
                None
            };
            let id = read_ids(&y)?[0];
            self.host_reads += 1;
            first_token_at.get_or_insert_with(Instant::now);
            if next.is_some() {
                fed.push(id);
            }
            ids.push(id);
            if ids.len() % self.options.clear_cache_every.max(1) == 0 {
                let _ = mlx_rs::memory::clear_cache();
            }
            if self.model.eos_ids.contains(&id) {
                let rest = stops.flush();
                text.push_str(&rest);
                if !rest.is_empty() {
                    on_token(&TokenEvent { id, text: rest });
                }
                break FinishReason::Stop;
            }
            let piece = decoder.push(id).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            let (shown, stopped) = match stops.push(&piece) {
                StopOutcome::Continue(t) => (t, false),
                StopOutcome::Stopped(t) => (t, true),
            };
            text.push_str(&shown);
            let keep_going = on_token(&TokenEvent { id, text: shown });
            if stopped {
                break FinishReason::Stop;
            }
            if !keep_going {
                break FinishReason::Cancelled;
            }
            match next {
                Some(n) => y = n,
                None => {
                    let tail = decoder.finish().map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                    let tail = match stops.push(&tail) {
                        StopOutcome::Continue(t) | StopOutcome::Stopped(t) => t + &stops.flush(),
                    };
                    if !tail.is_empty() {
                        text.push_str(&tail);
                        on_token(&TokenEvent { id, text: tail });
                    }
                    break FinishReason::Length;
                }
            }
        };
        let first = first_token_at.unwrap_or_else(Instant::now);
        if cache.offset() as usize == fed.len() {
            self.prompt_cache.insert(fed, cache);
        }
        Ok(Outcome {
            finish,
            ids,
            text,
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            time_to_first_token: first - start,
            decode_time: first.elapsed(),
        })
    }
}

fn tokens_array(ids: &[u32]) -> Array {
    let v: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Array::from_slice(&v, &[1, v.len() as i32])
}
