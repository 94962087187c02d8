//! `top-n-sigma`: keeps the tokens whose logit is within `n` standard deviations of the best
//! one (Tang et al. 2024, "Top-nσ: Not All Logits Are You Need").
//!
//! Definition (as llama.cpp computes it): over the logits that are not -inf, the mean `μ` and
//! the population standard deviation `σ`; every token with `logit < max - n·σ` becomes -inf.
//! The statistic is on raw logits, so the kept set does not depend on the temperature that
//! comes after this processor.

use mlxd_plugin_api::{export_plugin, Array, Context, CreateArgs, Dtype, Error, Host, Kind, Plugin};
use serde::Deserialize;
use std::ffi::CStr;

/// The request's parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// How many standard deviations below the best logit a token may be; > 0.
    pub n: f32,
}

impl Default for Params {
    fn default() -> Self {
        Params { n: 1.0 }
    }
}

impl Params {
    /// Parses and checks the params JSON.
    pub fn parse(json: &str) -> Result<Params, String> {
        let p: Params = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json))
            .map_err(|e| format!("top-n-sigma params: `{}`: {}", e.path(), e.inner()))?;
        if !(p.n.is_finite() && p.n > 0.0) {
            return Err(format!("`n` must be > 0, got {}", p.n));
        }
        Ok(p)
    }
}

/// One sequence's state: just `n`, on the device.
pub struct TopNSigma {
    n: Array,
}

impl Plugin for TopNSigma {
    const NAME: &'static CStr = c"top-n-sigma";
    const VERSION: &'static CStr = c"0.1.0";
    const KIND: Kind = Kind::Processor;
    const DESCRIPTION: Option<&'static CStr> = Some(c"keeps tokens within n standard deviations of the best logit");
    const PARAMS_SCHEMA: Option<&'static CStr> = Some(
        cr#"{"type":"object","additionalProperties":false,"properties":{"n":{"type":"number","exclusiveMinimum":0,"default":1.0}}}"#,
    );

    fn create(host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
        let p = Params::parse(args.params_json).map_err(Error::params)?;
        Ok(TopNSigma { n: host.f32(p.n)? })
    }

    fn apply(&mut self, host: &Host, logits: &Array, _ctx: &Context) -> Result<Array, Error> {
        let x = logits.astype(Dtype::Float32)?;
        let zero = host.f32(0.0)?;
        let valid = x.gt(&host.f32(f32::NEG_INFINITY)?)?;
        let count = valid.astype(Dtype::Float32)?.sum(-1, true)?.maximum(&host.f32(1.0)?)?;
        let mean = host.select(&valid, &x, &zero)?.sum(-1, true)?.div(&count)?;
        let centered = host.select(&valid, &x.sub(&mean)?.square()?, &zero)?;
        let sigma = centered.sum(-1, true)?.div(&count)?.sqrt()?;
        let best = x.max(-1, true)?;
        let threshold = best.sub(&self.n.mul(&sigma)?)?;
        host.select(&x.ge(&threshold)?, &x, &host.f32(f32::NEG_INFINITY)?)
    }
}

export_plugin!(TopNSigma);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_must_be_positive() {
        assert_eq!(Params::parse("{}").unwrap().n, 1.0);
        assert_eq!(Params::parse(r#"{"n": 2.5}"#).unwrap().n, 2.5);
        for bad in [r#"{"n": 0}"#, r#"{"n": -1}"#, r#"{"n": "x"}"#, r#"{"m": 1}"#] {
            assert!(Params::parse(bad).is_err(), "{bad}");
        }
        assert!(Params::parse(r#"{"n": 0}"#).unwrap_err().contains("`n`"));
    }

    #[test]
    fn descriptor() {
        let d = unsafe { &*mlxd_sampler_plugin_v1() };
        assert_eq!(unsafe { CStr::from_ptr(d.name) }, c"top-n-sigma");
        assert_eq!(d.capabilities, 0);
    }
}
