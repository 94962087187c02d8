//! `faulty`: a plugin that fails when and how a test asks, for the host's failure-isolation
//! tests; and, built by `build.rs` with `cc`, C libraries the loader must refuse (no entry
//! symbol; a future ABI minor; another ABI major). Not for production use.
//!
//! Params: `{"fail": "create" | "apply" | "accept" | "never", "how": "error" | "panic" |
//! "shape" | "dtype" | "hang", "after": N, "hang_ms": MS}`: fail in that entry point on its
//! `N+1`-th call (default 0). `shape` returns `[B, V - 1]` logits, `dtype` returns int32 logits
//! (apply only); `hang` does not return for `hang_ms` milliseconds (default one hour), then
//! carries on as if nothing happened.

use mlxd_plugin_api::{export_plugin, Array, Context, CreateArgs, Dtype, Error, Host, Kind, Plugin};
use serde::Deserialize;
use std::ffi::CStr;

/// A shared library without `mlxd_sampler_plugin_v1`.
pub const NO_ENTRY_LIB: &str = env!("MLXD_FIXTURE_NO_ENTRY");
/// A plugin built for ABI 1.99 (newer than any host).
pub const ABI_FUTURE_MINOR_LIB: &str = env!("MLXD_FIXTURE_ABI_FUTURE_MINOR");
/// A plugin built for ABI 2.0.
pub const ABI_MAJOR_2_LIB: &str = env!("MLXD_FIXTURE_ABI_MAJOR_2");
/// A working processor built for ABI 1.0 (`abi-one-zero`: adds 1), which a 1.1 host loads.
pub const ABI_1_0_LIB: &str = env!("MLXD_FIXTURE_ABI_1_0");

/// Where and how to fail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// `create`, `apply`, `accept` or `never`.
    pub fail: String,
    /// `error`, `panic`, `shape` or `dtype`.
    #[serde(default = "default_how")]
    pub how: String,
    /// Calls that succeed first.
    #[serde(default)]
    pub after: u32,
    /// How long `hang` blocks, milliseconds.
    #[serde(default = "default_hang_ms")]
    pub hang_ms: u64,
}

fn default_how() -> String {
    "error".into()
}

fn default_hang_ms() -> u64 {
    3_600_000
}

/// Counts calls and fails on schedule.
pub struct Faulty {
    params: Params,
    applies: u32,
    accepts: u32,
}

fn fail(how: &str, place: &str, logits: Option<&Array>, hang_ms: u64) -> Result<Array, Error> {
    match (how, logits) {
        ("panic", _) => panic!("faulty: panicking in {place} on purpose"),
        ("hang", Some(l)) => {
            std::thread::sleep(std::time::Duration::from_millis(hang_ms));
            l.retain()
        }
        ("hang", None) => {
            std::thread::sleep(std::time::Duration::from_millis(hang_ms));
            Err(Error::internal(format!("faulty: hung in {place} for {hang_ms} ms on purpose")))
        }
        ("shape", Some(l)) => l.slice(1, 0, l.dim(1) - 1, 1),
        ("dtype", Some(l)) => l.astype(Dtype::Int32),
        _ => Err(Error::internal(format!("faulty: failing in {place} on purpose"))),
    }
}

impl Plugin for Faulty {
    const NAME: &'static CStr = c"faulty";
    const VERSION: &'static CStr = c"0.1.0";
    const KIND: Kind = Kind::Processor;
    const WANTS_ACCEPT: bool = true;
    const DESCRIPTION: Option<&'static CStr> = Some(c"test fixture: fails on request");

    fn create(_host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
        let params: Params = serde_json::from_str(args.params_json).map_err(|e| Error::params(format!("faulty params: {e}")))?;
        if params.fail == "create" && params.after == 0 {
            fail(&params.how, "create", None, params.hang_ms)?;
        }
        Ok(Faulty { params, applies: 0, accepts: 0 })
    }

    fn apply(&mut self, _host: &Host, logits: &Array, _ctx: &Context) -> Result<Array, Error> {
        self.applies += 1;
        if self.params.fail == "apply" && self.applies > self.params.after {
            return fail(&self.params.how, "apply", Some(logits), self.params.hang_ms);
        }
        logits.retain()
    }

    fn accept(&mut self, _host: &Host, _token: &Array) -> Result<(), Error> {
        self.accepts += 1;
        if self.params.fail == "accept" && self.accepts > self.params.after {
            fail(&self.params.how, "accept", None, self.params.hang_ms)?;
        }
        Ok(())
    }
}

export_plugin!(Faulty);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures_were_built() {
        for lib in [super::NO_ENTRY_LIB, super::ABI_FUTURE_MINOR_LIB, super::ABI_MAJOR_2_LIB, super::ABI_1_0_LIB] {
            assert!(std::path::Path::new(lib).is_file(), "{lib}");
        }
    }
}
