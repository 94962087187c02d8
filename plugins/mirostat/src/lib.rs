//! `mirostat-v2`: a final sampler that steers the surprise of the text towards a target `tau`
//! (Basu et al. 2021, "Mirostat: a neural text decoding algorithm that directly controls
//! perplexity", algorithm 2), with llama.cpp's definition:
//!
//! 1. `p = softmax(logits)`; keep the tokens whose surprise `-log2 p` is at most `mu` (the most
//!    likely token always stays);
//! 2. draw from the kept tokens, renormalized;
//! 3. `mu <- mu - eta * (s - tau)`, where `s = -log2` of the drawn token's renormalized
//!    probability (in `accept`, so `mu` follows the token that was really chosen).
//!
//! `mu` starts at `2 tau` and lives on the device as a `[B, 1]` array: nothing is read back.
//! The draw is a Gumbel-max over the host's per-step key, so a request's `seed` makes it
//! reproducible. As a final sampler it receives the logits divided by the request's
//! temperature (when > 0) and replaces the built-in filters and pick.

use mlxd_plugin_api::{export_plugin, sys, Array, Context, CreateArgs, Dtype, Error, Host, Kind, Plugin};
use serde::Deserialize;
use std::ffi::CStr;

/// The request's parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Target surprise, bits per token.
    pub tau: f32,
    /// Learning rate of `mu`.
    pub eta: f32,
}

impl Default for Params {
    fn default() -> Self {
        Params { tau: 5.0, eta: 0.1 }
    }
}

impl Params {
    /// Parses and checks the params JSON.
    pub fn parse(json: &str) -> Result<Params, String> {
        let p: Params = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json))
            .map_err(|e| format!("mirostat-v2 params: `{}`: {}", e.path(), e.inner()))?;
        if !(p.tau.is_finite() && p.tau >= 0.0) {
            return Err(format!("`tau` must be >= 0, got {}", p.tau));
        }
        if !(p.eta.is_finite() && (0.0..=1.0).contains(&p.eta)) {
            return Err(format!("`eta` must be in [0, 1], got {}", p.eta));
        }
        Ok(p)
    }
}

/// One sequence's state, on the device.
pub struct Mirostat {
    tau: Array,
    eta: Array,
    /// `[B, 1]` float32.
    mu: Array,
    /// `[B, V]` renormalized log-probabilities (natural log) of the last apply, for `accept`.
    last: Option<Array>,
}

impl Plugin for Mirostat {
    const NAME: &'static CStr = c"mirostat-v2";
    const VERSION: &'static CStr = c"0.1.0";
    const KIND: Kind = Kind::Sampler;
    const CAPABILITIES: u64 = sys::CAP_RANDOM;
    const WANTS_ACCEPT: bool = true;
    const DESCRIPTION: Option<&'static CStr> = Some(c"mirostat v2: truncates at surprise mu, steers mu towards tau bits per token");
    const PARAMS_SCHEMA: Option<&'static CStr> = Some(
        cr#"{"type":"object","additionalProperties":false,"properties":{
"tau":{"type":"number","minimum":0,"default":5.0,"description":"target surprise, bits per token"},
"eta":{"type":"number","minimum":0,"maximum":1,"default":0.1,"description":"learning rate of mu"}}}"#,
    );

    fn create(host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
        let p = Params::parse(args.params_json).map_err(Error::params)?;
        Ok(Mirostat {
            tau: host.f32(p.tau)?,
            eta: host.f32(p.eta)?,
            mu: host.full(&[args.batch, 1], 2.0 * p.tau as f64, Dtype::Float32)?,
            last: None,
        })
    }

    fn apply(&mut self, host: &Host, logits: &Array, ctx: &Context) -> Result<Array, Error> {
        let key = ctx.key.as_ref().ok_or_else(|| Error::internal("mirostat-v2: the host gave no random key"))?;
        let x = logits.astype(Dtype::Float32)?;
        let logp = x.sub(&x.logsumexp(-1, true)?)?;
        let bits = logp.neg()?.div(&host.f32(std::f32::consts::LN_2)?)?;
        let best = x.ge(&x.max(-1, true)?)?;
        let keep = bits.le(&self.mu)?.logical_or(&best)?;
        let kept = host.select(&keep, &x, &host.f32(f32::NEG_INFINITY)?)?;
        let renormalized = kept.sub(&kept.logsumexp(-1, true)?)?;
        let noise = host.random_gumbel(key, &x.shape(), Dtype::Float32)?;
        let token = kept.add(&noise)?.argmax(-1, false)?;
        self.last = Some(renormalized);
        Ok(token)
    }

    fn accept(&mut self, host: &Host, token: &Array) -> Result<(), Error> {
        // A token the sampler did not see (none so far) leaves mu as it is.
        let Some(logp) = self.last.take() else { return Ok(()) };
        let index = token.astype(Dtype::Int32)?.reshape(&[-1, 1])?;
        let surprise = logp.take_along_axis(&index, -1)?.neg()?.div(&host.f32(std::f32::consts::LN_2)?)?;
        self.mu = self.mu.sub(&self.eta.mul(&surprise.sub(&self.tau)?)?)?;
        Ok(())
    }
}

export_plugin!(Mirostat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_default_and_bounds() {
        assert_eq!(Params::parse("{}").unwrap(), Params { tau: 5.0, eta: 0.1 });
        for (bad, field) in [(r#"{"tau": -1}"#, "tau"), (r#"{"eta": 2}"#, "eta"), (r#"{"mu": 1}"#, "mu")] {
            let e = Params::parse(bad).unwrap_err();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn descriptor_is_a_random_sampler_with_accept() {
        let d = unsafe { &*mlxd_sampler_plugin_v1() };
        assert_eq!(d.kind, sys::KIND_SAMPLER);
        assert_eq!(d.capabilities, sys::CAP_RANDOM);
        assert!(unsafe { (*d.vtable).accept.is_some() });
    }
}
