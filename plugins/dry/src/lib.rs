//! `dry`: the "don't repeat yourself" sequence penalty (introduced in text-generation-webui,
//! also in llama.cpp and kobold.cpp), computed on the device.
//!
//! # Definition
//! Take the last `N = min(T, penalty_last_n)` tokens `w` of the history (prompt + output;
//! `penalty_last_n = -1` means all of it). For every earlier position `p < N - 1`, let `L(p)` be
//! the length of the longest common suffix of `w[..=p]` and `w` (how many tokens before and
//! including `p` repeat the end of the text), capped at `rep_limit`, the number of tokens after
//! the last sequence breaker in the window (all `N` if none). Emitting `w[p + 1]` next would
//! extend that repetition, so each token `t` gets `M(t) = max { L(p) : w[p + 1] = t }`, and if
//! `M(t) >= allowed_length` and `t` is not itself a breaker:
//!
//! `logit[t] -= multiplier * base ^ min(M(t) - allowed_length, max_exponent)`
//!
//! where `max_exponent = floor(88 / ln base)` (in double precision) keeps the power below
//! `e^88`, finite in float32 with room for rounding (no
//! cap when `base <= 1.000001`). Nothing happens when `N <= allowed_length` or `rep_limit <
//! allowed_length`. This is llama.cpp's definition with one difference: sequence breakers are
//! token ids, not strings (a plugin sees ids; clients can get them from the `tokenize` message).
//!
//! # On the device
//! The first step computes `L(p)` for all `p` at once: compare `w[p - l]` with `w[N - 1 - l]`
//! for `l < K` in a `[B, K, N - 1]` array and count the leading matches with a cumulative
//! product. Lengths beyond `K = allowed_length + max_exponent` all give the largest penalty, so
//! `K` caps that work at `O(N · K)`. Every later step updates the lengths with the one new token
//! `x` instead: a suffix match that reached `p - 1` reaches `p` when `w[p] = x`, so
//! `L'(p) = w[p] = x ? L(p - 1) + 1 : 0` (capped at `p + 1` when the window slides), a handful of
//! `O(N)` operations. The distance to the last breaker updates the same way. `M(t)` is one
//! scatter-max into `[B, V]`, and the penalty is computed over `[B, V]` from it and subtracted
//! (a handful of elementwise operations, fewer launches than gathering and putting back).
//!
//! # As one CUDA kernel
//! Where the host compiles kernels (ABI 1.1, MLX on CUDA) all of the above is one kernel
//! instead of about twenty operations, each of which is a launch the host prepares on the CPU:
//! a block per (4,096 tokens of the vocabulary, row) finds the last breaker, computes `L(p)`
//! for the positions whose next token falls in its chunk (counting matches back from `p`,
//! at most `K`), takes the maximum per token in shared memory, and writes its chunk of
//! penalized logits. Every block reads the whole window, which is small next to the
//! vocabulary, so the kernel needs no state between steps. `mlxd-bench kernel-check` compares
//! it with the operations on the device.

use mlxd_plugin_api::{
    export_plugin, sys, Array, Context, CreateArgs, Dtype, Error, Host, Kernel, KernelLanguage, Kind, Plugin,
    ScatterMode,
};
use serde::Deserialize;
use std::ffi::CStr;

/// The request's parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Strength; 0 disables the penalty.
    pub multiplier: f32,
    /// Growth per extra repeated token, at least 1.
    pub base: f32,
    /// Longest repetition left unpenalized, at least 1.
    pub allowed_length: i32,
    /// Window of history searched: -1 for all of it, 0 disables.
    pub penalty_last_n: i32,
    /// Token ids that break repetitions (never penalized themselves).
    pub sequence_breakers: Vec<u32>,
}

impl Default for Params {
    fn default() -> Self {
        Params { multiplier: 0.8, base: 1.75, allowed_length: 2, penalty_last_n: -1, sequence_breakers: Vec::new() }
    }
}

/// Largest `allowed_length` (longer repetitions than any context mlxd keeps are never
/// penalized anyway; the bound keeps `allowed_length + max_exponent` far from overflowing).
pub const MAX_LENGTH: i32 = 1 << 24;

/// Largest exponent whose power of `base` stays finite in float32 (0: no cap).
pub fn max_exponent(base: f32) -> i32 {
    if base > 1.000_001 {
        // e^88 is half of float32's largest value: the float32 power the device computes stays
        // finite even where ln(base) rounds (ln(f32::MAX) itself overflowed for base 1.00001).
        (88.0 / (base as f64).ln()).floor() as i32
    } else {
        0
    }
}

impl Params {
    /// Parses and checks the params JSON for a vocabulary of `vocab` tokens.
    pub fn parse(json: &str, vocab: i32) -> Result<Params, String> {
        let p: Params = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json))
            .map_err(|e| format!("dry params: `{}`: {}", e.path(), e.inner()))?;
        if !(p.multiplier.is_finite() && p.multiplier >= 0.0) {
            return Err(format!("`multiplier` must be >= 0, got {}", p.multiplier));
        }
        if !(p.base.is_finite() && p.base >= 1.0) {
            return Err(format!("`base` must be >= 1, got {}", p.base));
        }
        if !(1..=MAX_LENGTH).contains(&p.allowed_length) {
            return Err(format!("`allowed_length` must be in [1, {MAX_LENGTH}], got {}", p.allowed_length));
        }
        if p.penalty_last_n < -1 {
            return Err(format!(
                "`penalty_last_n` must be -1 (whole history), 0 (off) or positive, got {}",
                p.penalty_last_n
            ));
        }
        if p.sequence_breakers.len() > 256 {
            return Err(format!("`sequence_breakers` holds at most 256 ids, got {}", p.sequence_breakers.len()));
        }
        if let Some(&t) = p.sequence_breakers.iter().find(|&&t| t as i64 >= vocab as i64) {
            return Err(format!("`sequence_breakers` token {t} is outside the vocabulary (size {vocab})"));
        }
        Ok(p)
    }

    /// Whether the penalty can ever change a logit.
    pub fn enabled(&self) -> bool {
        self.multiplier != 0.0 && self.penalty_last_n != 0
    }
}

/// One sequence's DRY state: its parameters and, on the device, the breaker ids.
pub struct Dry {
    params: Params,
    /// `[1, 1, nb]` int32 breaker ids (absent without breakers).
    breakers: Option<Array>,
    /// `[1, V]` bool: which tokens are not breakers (absent without breakers).
    not_breaker: Option<Array>,
    /// The parameters as device scalars, made once: `allowed_length` and the exponent cap
    /// (int32; no cap when `base` is 1), `base`, `multiplier` and 0 (float32).
    allowed: Array,
    max_exp: Option<Array>,
    base: Array,
    multiplier: Array,
    zero: Array,
    /// The match lengths of the last step, updated with each new token.
    state: Option<State>,
    /// The kernel's parameter arrays, where the host compiles CUDA kernels.
    kernel: Option<KernelParams>,
}

/// Inputs of [`KERNEL`] besides the logits and the history, made once per sequence.
struct KernelParams {
    /// `[V]` bool: which tokens are not breakers (`[1]` when there are none).
    allow: Array,
    /// `[4]` int32: allowed_length, the exponent cap (0: none), penalty_last_n, whether there
    /// are breakers.
    ints: Array,
    /// `[2]` float32: multiplier, base.
    floats: Array,
}

/// Logits per block of [`KERNEL`].
const CHUNK: i32 = 4096;

/// The whole penalty as one CUDA kernel (see the crate's documentation); grid `(chunks, B)`.
const KERNEL: Kernel = Kernel {
    name: c"dry_penalty",
    header: None,
    source: cr#"
    constexpr int CHUNK = 4096;
    const int V = logits_shape[1];
    const int T = tokens_shape[1];
    const int row = blockIdx.y;
    const int c0 = blockIdx.x * CHUNK;
    const int allowed = ints[0];
    const int max_exp = ints[1];
    const int last_n = ints[2];
    const bool breakers = ints[3] != 0;
    const float multiplier = floats[0];
    const float base = floats[1];
    const int n = last_n < 0 ? T : min(T, last_n);
    const int32_t* w = tokens + (size_t)row * T + (T - n);
    __shared__ int best[CHUNK];
    __shared__ int last_breaker;
    for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) best[i] = -1;
    if (threadIdx.x == 0) last_breaker = -1;
    __syncthreads();
    if (breakers) {
        int mine = -1;
        for (int p = threadIdx.x; p < n; p += blockDim.x) {
            if (!allow[w[p]]) mine = p;
        }
        if (mine >= 0) atomicMax(&last_breaker, mine);
        __syncthreads();
    }
    // L(p) stops at K (longer ones all get the largest penalty) and at the last breaker.
    const int k_cap = max_exp > 0 ? min(allowed + max_exp, n - 1) : n - 1;
    const int cap = min(k_cap, n - 1 - last_breaker);
    for (int p = threadIdx.x; p < n - 1; p += blockDim.x) {
        const int t = w[p + 1];
        if (t < c0 || t >= c0 + CHUNK) continue;
        int l = 0;
        while (l < cap && l <= p && w[p - l] == w[n - 1 - l]) ++l;
        if (l >= allowed) atomicMax(&best[t - c0], l);
    }
    __syncthreads();
    const size_t at = (size_t)row * V;
    for (int i = threadIdx.x; i < CHUNK && c0 + i < V; i += blockDim.x) {
        float v = static_cast<float>(logits[at + c0 + i]);
        const int m = best[i];
        if (m >= allowed && (!breakers || allow[c0 + i])) {
            const int e = max_exp > 0 ? min(m - allowed, max_exp) : m - allowed;
            v -= powf(base, static_cast<float>(e)) * multiplier;
        }
        out[at + c0 + i] = v;
    }
"#,
    inputs: &[c"logits", c"tokens", c"allow", c"ints", c"floats"],
    outputs: &[c"out"],
};

/// What the last `apply` computed, for a history of `t` tokens and a window of `n`.
struct State {
    t: i32,
    n: i32,
    /// `[B, N - 1]` int32: `L(p)` before the breaker cap (capped at `K`).
    lengths: Array,
    /// `[B, 1]` int32: tokens since the last breaker (absent without breakers).
    since_breaker: Option<Array>,
}

impl Plugin for Dry {
    const NAME: &'static CStr = c"dry";
    const VERSION: &'static CStr = c"0.1.0";
    const KIND: Kind = Kind::Processor;
    // The kernel and the operations read the logits in any float dtype.
    const CAPABILITIES: u64 = sys::CAP_HISTORY | sys::CAP_MODEL_DTYPE;
    const DESCRIPTION: Option<&'static CStr> =
        Some(c"DRY (don't repeat yourself) sequence penalty, llama.cpp's definition with token-id breakers");
    const PARAMS_SCHEMA: Option<&'static CStr> = Some(
        cr#"{"type":"object","additionalProperties":false,"properties":{
"multiplier":{"type":"number","minimum":0,"default":0.8},
"base":{"type":"number","minimum":1,"default":1.75},
"allowed_length":{"type":"integer","minimum":1,"maximum":16777216,"default":2},
"penalty_last_n":{"type":"integer","minimum":-1,"default":-1,"description":"-1: the whole history; 0: off"},
"sequence_breakers":{"type":"array","items":{"type":"integer","minimum":0},"maxItems":256,"default":[]}}}"#,
    );

    fn create(host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
        let params = Params::parse(args.params_json, args.vocab_size).map_err(Error::params)?;
        let (breakers, not_breaker) = if params.sequence_breakers.is_empty() {
            (None, None)
        } else {
            let ids: Vec<i32> = params.sequence_breakers.iter().map(|&t| t as i32).collect();
            let mut mask = vec![true; args.vocab_size as usize];
            for &t in &params.sequence_breakers {
                mask[t as usize] = false;
            }
            (
                Some(host.from_slice(&ids, &[1, 1, ids.len() as i32])?),
                Some(host.from_slice(&mask, &[1, args.vocab_size])?),
            )
        };
        let kernel = match host.kernel_language() {
            KernelLanguage::Cuda => Some(KernelParams {
                allow: match &not_breaker {
                    Some(mask) => mask.reshape(&[args.vocab_size])?,
                    None => host.from_slice(&[true], &[1])?,
                },
                ints: host.from_slice(
                    &[
                        params.allowed_length,
                        max_exponent(params.base),
                        params.penalty_last_n,
                        not_breaker.is_some() as i32,
                    ],
                    &[4],
                )?,
                floats: host.from_slice(&[params.multiplier, params.base], &[2])?,
            }),
            KernelLanguage::None => None,
        };
        Ok(Dry {
            kernel,
            allowed: host.i32(params.allowed_length)?,
            max_exp: Some(max_exponent(params.base)).filter(|&m| m > 0).map(|m| host.i32(m)).transpose()?,
            base: host.f32(params.base)?,
            multiplier: host.f32(params.multiplier)?,
            zero: host.f32(0.0)?,
            params,
            breakers,
            not_breaker,
            state: None,
        })
    }

    fn apply(&mut self, host: &Host, logits: &Array, ctx: &Context) -> Result<Array, Error> {
        let p = &self.params;
        let tokens = ctx.tokens.as_ref().ok_or_else(|| Error::internal("dry: the host gave no token history"))?;
        let t = tokens.dim(1);
        let n = if p.penalty_last_n < 0 { t } else { t.min(p.penalty_last_n) };
        if !p.enabled() || n <= p.allowed_length {
            self.state = None;
            return logits.retain();
        }
        let (b, v) = (logits.dim(0), logits.dim(1));
        if let Some(k) = &self.kernel {
            let grid = [(v + CHUNK - 1) / CHUNK * 1024, b, 1];
            let inputs = [logits, tokens, &k.allow, &k.ints, &k.floats];
            let mut out = host.kernel(&KERNEL, &inputs, &[(&[b, v], Dtype::Float32)], grid, [1024, 1, 1])?;
            return Ok(out.pop().expect("one output"));
        }
        // One token more than last time: update; otherwise (first step) compute from scratch.
        let state = match self.state.take() {
            Some(old) if old.t + 1 == t && old.lengths.dim(0) == b && n - old.n <= 1 && old.n > p.allowed_length => {
                self.advance(host, tokens, old, n)?
            }
            _ => self.from_scratch(host, tokens, n)?,
        };
        let lengths = match &state.since_breaker {
            None => state.lengths.retain()?,
            Some(d) => state.lengths.minimum(d)?,
        };

        // M(t) for every token of the vocabulary: the longest repetition emitting it would
        // extend (one scatter-max of the lengths at the token after each position; -1 for a
        // token that follows no position, as for one whose repetitions are all too short, is
        // below `allowed_length`), then the penalty elementwise over `[B, V]` and one
        // subtraction: fewer operations per step than reading `M` back at the history's tokens
        // and putting the penalties there, and each operation is a kernel launch on a GPU.
        let next = tokens.slice(1, t - n + 1, t, 1)?; // [B, N-1]: the token after each position
        let longest = host.full(&[b, v], -1.0, Dtype::Int32)?.scatter(ScatterMode::Max, &next, &lengths, 1)?;
        let mut hit = longest.ge(&self.allowed)?;
        if let Some(mask) = &self.not_breaker {
            hit = hit.logical_and(mask)?;
        }
        let mut exponent = longest.sub(&self.allowed)?;
        if let Some(cap) = &self.max_exp {
            exponent = exponent.minimum(cap)?;
        }
        let penalty = self.base.pow(&exponent.astype(Dtype::Float32)?)?.mul(&self.multiplier)?;
        let out = logits.sub(&host.select(&hit, &penalty, &self.zero)?);
        self.state = Some(state);
        out
    }
}

impl Dry {
    /// `K`: lengths beyond it all give the largest penalty.
    fn length_cap(&self, n: i32) -> i32 {
        let max_exp = max_exponent(self.params.base);
        if max_exp > 0 {
            (self.params.allowed_length + max_exp).min(n - 1)
        } else {
            n - 1
        }
    }

    /// `L(p)` for the window of the last `n` of `tokens` (`[B, T]`), all positions at once.
    fn from_scratch(&self, host: &Host, tokens: &Array, n: i32) -> Result<State, Error> {
        let (b, t) = (tokens.dim(0), tokens.dim(1));
        let w = tokens.slice(1, t - n, t, 1)?; // [B, N]
        let since_breaker = match &self.breakers {
            None => None,
            Some(br) => {
                let is_breaker = w.expand_dims(-1)?.eq(br)?.any(-1, false)?; // [B, N]
                let pos = host.arange(0.0, n as f64, 1.0, Dtype::Int32)?.reshape(&[1, n])?;
                let last = host.select(&is_breaker, &pos, &host.i32(-1)?)?.max(1, true)?;
                Some(host.i32(n - 1)?.sub(&last)?) // N when there is none
            }
        };
        // L(p): leading matches of w[p - l] == w[N - 1 - l], l < K.
        let k = self.length_cap(n);
        let positions = host.arange(0.0, (n - 1) as f64, 1.0, Dtype::Int32)?.reshape(&[1, n - 1])?;
        let offsets = host.arange(0.0, k as f64, 1.0, Dtype::Int32)?.reshape(&[k, 1])?;
        let left_index = positions.sub(&offsets)?; // [K, N-1], p - l
        let inside = left_index.ge(&host.i32(0)?)?;
        let left = w.take(&left_index.maximum(&host.i32(0)?)?.reshape(&[-1])?, 1)?.reshape(&[b, k, n - 1])?;
        let right_index = host.arange((n - 1) as f64, (n - 1 - k) as f64, -1.0, Dtype::Int32)?;
        let right = w.take(&right_index, 1)?.reshape(&[b, k, 1])?;
        let matches = left.eq(&right)?.logical_and(&inside)?.astype(Dtype::Int32)?;
        let lengths = matches.cumprod(1, false, true)?.sum(1, false)?; // [B, N-1]
        Ok(State { t, n, lengths, since_breaker })
    }

    /// The state one token later: `x = tokens[T - 1]` extends every match that ended just
    /// before a position holding `x`.
    fn advance(&self, host: &Host, tokens: &Array, old: State, n: i32) -> Result<State, Error> {
        let t = tokens.dim(1);
        let x = tokens.slice(1, t - 1, t, 1)?; // [B, 1]
        let here = tokens.slice(1, t - n, t - 1, 1)?; // [B, N-1]: w[p]
                                                      // L(p - 1) for each new position: the old lengths, with a 0 in front while the window
                                                      // still grows (its first position has no predecessor).
        let before = if n == old.n {
            old.lengths
        } else {
            let zero = host.full(&[old.lengths.dim(0), 1], 0.0, Dtype::Int32)?;
            host.concatenate(&[&zero, &old.lengths], 1)?
        };
        let mut lengths = host.select(&here.eq(&x)?, &before.add(&host.i32(1)?)?, &host.i32(0)?)?;
        lengths = lengths.minimum(&host.i32(self.length_cap(n))?)?;
        if n == old.n {
            // The window slid: a match cannot reach before its first position.
            let room = host.arange(1.0, n as f64, 1.0, Dtype::Int32)?.reshape(&[1, n - 1])?;
            lengths = lengths.minimum(&room)?;
        }
        let since_breaker = match (&self.breakers, old.since_breaker) {
            (Some(br), Some(d)) => {
                let is_breaker = x.expand_dims(-1)?.eq(br)?.any(-1, false)?; // [B, 1]
                Some(host.select(&is_breaker, &host.i32(0)?, &d.add(&host.i32(1)?)?.minimum(&host.i32(n)?)?)?)
            }
            _ => None,
        };
        Ok(State { t, n, lengths, since_breaker })
    }
}

export_plugin!(Dry);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_common_settings() {
        let p = Params::parse("{}", 100).unwrap();
        assert_eq!(p, Params::default());
        assert_eq!((p.multiplier, p.base, p.allowed_length, p.penalty_last_n), (0.8, 1.75, 2, -1));
        assert!(p.enabled());
        assert!(!Params::parse(r#"{"multiplier": 0}"#, 100).unwrap().enabled());
        assert!(!Params::parse(r#"{"penalty_last_n": 0}"#, 100).unwrap().enabled());
    }

    #[test]
    fn invalid_params_are_named() {
        for (json, field) in [
            (r#"{"multiplier": -1}"#, "multiplier"),
            (r#"{"base": 0.5}"#, "base"),
            (r#"{"allowed_length": 0}"#, "allowed_length"),
            (r#"{"allowed_length": 2147483647}"#, "allowed_length"),
            (r#"{"penalty_last_n": -2}"#, "penalty_last_n"),
            (r#"{"sequence_breakers": [100]}"#, "sequence_breakers"),
            (r#"{"sequence_breakers": "x"}"#, "sequence_breakers"),
            (r#"{"multplier": 1}"#, "multplier"),
        ] {
            let e = Params::parse(json, 100).unwrap_err();
            assert!(e.contains(field), "{json}: {e}");
        }
    }

    #[test]
    fn the_exponent_cap_keeps_the_penalty_finite() {
        for base in [1.000_01_f32, 1.1, 1.75, 3.0, 100.0] {
            let m = max_exponent(base);
            // As the device computes it: a float32 power with a float exponent.
            assert!(m > 0 && base.powf(m as f32).is_finite(), "{base}: {m}");
        }
        assert_eq!(max_exponent(1.0), 0);
        assert_eq!(max_exponent(1.75), 157);
    }

    #[test]
    fn descriptor_asks_for_the_history() {
        let d = unsafe { &*mlxd_sampler_plugin_v1() };
        assert_eq!(d.capabilities, sys::CAP_HISTORY | sys::CAP_MODEL_DTYPE);
        assert_eq!(d.kind, sys::KIND_PROCESSOR);
        let schema = unsafe { CStr::from_ptr(d.params_schema) }.to_str().unwrap();
        let v: serde_json::Value = serde_json::from_str(schema).unwrap();
        assert_eq!(v["properties"]["base"]["default"], 1.75);
    }
}
