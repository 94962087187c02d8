//! `token-filter`: ban and allow lists. Banned tokens get -inf; with an allow list, every token
//! not on it gets -inf too (a banned token stays banned even if allowed). The mask is built
//! once per sequence on the device; each step is one `where`.

use mlxd_plugin_api::{export_plugin, Array, Context, CreateArgs, Error, Host, Kind, Plugin};
use serde::Deserialize;
use std::ffi::CStr;

/// The request's parameters.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Token ids that are never chosen.
    pub ban: Vec<u32>,
    /// When non-empty, the only token ids that may be chosen.
    pub allow: Vec<u32>,
}

impl Params {
    /// Parses and checks the params JSON for a vocabulary of `vocab` tokens; returns which
    /// tokens survive.
    pub fn keep_mask(json: &str, vocab: usize) -> Result<Vec<bool>, String> {
        let p: Params = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json))
            .map_err(|e| format!("token-filter params: `{}`: {}", e.path(), e.inner()))?;
        if p.ban.is_empty() && p.allow.is_empty() {
            return Err("give `ban` or `allow` (token ids)".into());
        }
        for (field, list) in [("ban", &p.ban), ("allow", &p.allow)] {
            if let Some(t) = list.iter().find(|&&t| t as usize >= vocab) {
                return Err(format!("`{field}` token {t} is outside the vocabulary (size {vocab})"));
            }
        }
        let mut keep = vec![p.allow.is_empty(); vocab];
        for &t in &p.allow {
            keep[t as usize] = true;
        }
        for &t in &p.ban {
            keep[t as usize] = false;
        }
        if !keep.contains(&true) {
            return Err("`ban` and `allow` leave no token to choose".into());
        }
        Ok(keep)
    }
}

/// One sequence's state: the `[1, V]` keep mask and -inf, on the device.
pub struct TokenFilter {
    keep: Array,
    neg_inf: Array,
}

impl Plugin for TokenFilter {
    const NAME: &'static CStr = c"token-filter";
    const VERSION: &'static CStr = c"0.1.0";
    const KIND: Kind = Kind::Processor;
    const DESCRIPTION: Option<&'static CStr> = Some(c"token ban and allow lists");
    const PARAMS_SCHEMA: Option<&'static CStr> = Some(
        cr#"{"type":"object","additionalProperties":false,"properties":{
"ban":{"type":"array","items":{"type":"integer","minimum":0},"description":"token ids never chosen"},
"allow":{"type":"array","items":{"type":"integer","minimum":0},"description":"when non-empty, the only token ids chosen"}}}"#,
    );

    fn create(host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
        let keep = Params::keep_mask(args.params_json, args.vocab_size as usize).map_err(Error::params)?;
        Ok(TokenFilter { keep: host.from_slice(&keep, &[1, args.vocab_size])?, neg_inf: host.f32(f32::NEG_INFINITY)? })
    }

    fn apply(&mut self, host: &Host, logits: &Array, _ctx: &Context) -> Result<Array, Error> {
        host.select(&self.keep, logits, &self.neg_inf)
    }
}

export_plugin!(TokenFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_ban_and_allow() {
        assert_eq!(Params::keep_mask(r#"{"ban": [1, 3]}"#, 5).unwrap(), [true, false, true, false, true]);
        assert_eq!(Params::keep_mask(r#"{"allow": [0, 2]}"#, 4).unwrap(), [true, false, true, false]);
        assert_eq!(Params::keep_mask(r#"{"allow": [0, 2], "ban": [2]}"#, 4).unwrap(), [true, false, false, false]);
    }

    #[test]
    fn bad_lists_are_refused() {
        for (json, needle) in [
            ("{}", "`ban` or `allow`"),
            (r#"{"ban": [9]}"#, "`ban` token 9"),
            (r#"{"allow": [1], "ban": [1]}"#, "no token"),
            (r#"{"deny": [1]}"#, "deny"),
        ] {
            let e = Params::keep_mask(json, 4).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
