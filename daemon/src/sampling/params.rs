//! What a request may ask of the sampler, and the checks that run before any of it reaches the
//! device. Every knob defaults to "off", so `SamplingParams::default()` is greedy decoding.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The most top-n alternatives a request may ask for (OpenAI's `top_logprobs` bound).
pub const MAX_LOGPROBS: u32 = 20;

/// The longest repetition-penalty window a request may ask for.
pub const MAX_REPETITION_CONTEXT: usize = 4096;

/// Per-request sampling parameters, as a client sends them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 is off.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability sums to at least `top_p`;
    /// 1 is off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 is off.
    pub min_p: f32,
    /// Locally typical sampling mass; 1 is off.
    pub typical_p: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in the last
    /// `repetition_context_size` tokens of prompt + output; 1 is off.
    pub repetition_penalty: f32,
    /// Window of the repetition penalty, in tokens.
    pub repetition_context_size: usize,
    /// Subtracted once from the logit of every token generated so far (OpenAI semantics); 0 is off.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated so far; 0 is off.
    pub frequency_penalty: f32,
    /// Added to the logit of the given token ids.
    pub logit_bias: BTreeMap<u32, f32>,
    /// Seed of the request's random key; `None` takes one from the clock.
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability and the `n` most likely alternatives
    /// (`Some(0)`: the chosen one only).
    pub logprobs: Option<u32>,
    /// Sampler plugins, resolved from the request's top-level `plugins` list (never from the
    /// `sampling` object): processors in order, at most one final sampler.
    #[serde(skip)]
    pub plugins: Vec<crate::plugins::PluginRequest>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            repetition_context_size: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: BTreeMap::new(),
            seed: None,
            logprobs: None,
            plugins: Vec::new(),
        }
    }
}

/// Why a request's sampling parameters (or a host read) were refused.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A parameter outside its range.
    #[error("`{field}` must be in {bound}, got {got}")]
    OutOfRange {
        /// The parameter's name as the client spells it.
        field: &'static str,
        /// The allowed range, in interval notation.
        bound: String,
        /// What the client sent.
        got: String,
    },
    /// A token id (of `logit_bias`) that the model does not have.
    #[error("`{field}` token {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocabulary {
        /// The parameter's name.
        field: &'static str,
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// Logits (or any array too large to be a step's output) were about to be read to the host.
    #[error("refused to read a {shape:?} {dtype} array to the host: {why}")]
    HostReadRefused {
        /// Shape of the array.
        shape: Vec<i32>,
        /// Its dtype, as MLX names it.
        dtype: String,
        /// Which rule it broke.
        why: &'static str,
    },
    /// Logits that do not match the batch (`[B, V]` for B rows of a V-token vocabulary).
    #[error("sampling: {0}")]
    Shape(String),
    /// A sampler plugin refused its parameters, failed, or returned a bad output.
    #[error(transparent)]
    Plugin(#[from] crate::plugins::PluginError),
    /// MLX failed while building or running the sampling graph.
    #[error("mlx: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
}

impl SamplingError {
    /// A stable machine-readable code, for clients to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            SamplingError::OutOfRange { .. } => "invalid_parameter",
            SamplingError::TokenOutOfVocabulary { .. } => "token_out_of_vocabulary",
            SamplingError::HostReadRefused { .. } => "host_read_refused",
            SamplingError::Shape(_) => "shape_mismatch",
            SamplingError::Plugin(_) => "plugin_error",
            SamplingError::Mlx(_) => "backend_error",
        }
    }

    /// The parameter at fault, for validation errors.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            SamplingError::OutOfRange { field, .. } | SamplingError::TokenOutOfVocabulary { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn out_of_range(field: &'static str, bound: impl Into<String>, got: impl std::fmt::Display) -> SamplingError {
    SamplingError::OutOfRange { field, bound: bound.into(), got: got.to_string() }
}

/// `lo <= x <= hi`, false for NaN.
fn within(x: f32, lo: f32, hi: f32) -> bool {
    x >= lo && x <= hi
}

impl SamplingParams {
    /// Checks every parameter against its range for a model with `vocab_size` tokens.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(out_of_range("temperature", "[0, inf)", self.temperature));
        }
        if self.top_k as usize > vocab_size {
            return Err(out_of_range("top_k", format!("[0, {vocab_size}]"), self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(out_of_range("top_p", "(0, 1]", self.top_p));
        }
        if !within(self.min_p, 0.0, 1.0) {
            return Err(out_of_range("min_p", "[0, 1]", self.min_p));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(out_of_range("typical_p", "(0, 1]", self.typical_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(out_of_range("repetition_penalty", "(0, inf)", self.repetition_penalty));
        }
        if !(1..=MAX_REPETITION_CONTEXT).contains(&self.repetition_context_size) {
            return Err(out_of_range(
                "repetition_context_size",
                format!("[1, {MAX_REPETITION_CONTEXT}]"),
                self.repetition_context_size,
            ));
        }
        if !within(self.presence_penalty, -2.0, 2.0) {
            return Err(out_of_range("presence_penalty", "[-2, 2]", self.presence_penalty));
        }
        if !within(self.frequency_penalty, -2.0, 2.0) {
            return Err(out_of_range("frequency_penalty", "[-2, 2]", self.frequency_penalty));
        }
        for (&token, &bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(SamplingError::TokenOutOfVocabulary { field: "logit_bias", token, vocab: vocab_size });
            }
            if !within(bias, -100.0, 100.0) {
                return Err(out_of_range("logit_bias", "[-100, 100]", format!("{bias} for token {token}")));
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(out_of_range("logprobs", format!("[0, {MAX_LOGPROBS}]"), n));
            }
        }
        crate::plugins::registry::check_combination(&self.plugins, self)?;
        Ok(())
    }

    /// Whether the final pick is a random draw (otherwise argmax).
    pub fn is_random(&self) -> bool {
        self.temperature > 0.0
    }
}
