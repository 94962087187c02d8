//! `passthrough`: a processor that returns the logits it is given. It exists to measure what the
//! plugin path itself costs per decode step (`mlxd-bench engine --plugin passthrough`).

use mlxd_plugin_api::{export_plugin, sys, Array, Context, CreateArgs, Error, Host, Kind, Plugin};
use std::ffi::CStr;

/// No state.
pub struct Passthrough;

impl Plugin for Passthrough {
    const NAME: &'static CStr = c"passthrough";
    const VERSION: &'static CStr = c"0.1.0";
    const KIND: Kind = Kind::Processor;
    // Whatever dtype comes in goes out: no float32 conversion needed.
    const CAPABILITIES: u64 = sys::CAP_MODEL_DTYPE;
    const PARAMS_SCHEMA: Option<&'static CStr> = Some(c"{\"type\":\"object\",\"additionalProperties\":false}");
    const DESCRIPTION: Option<&'static CStr> = Some(c"returns the logits unchanged (overhead measurement)");

    fn create(_host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
        match args.params_json.trim() {
            "{}" | "null" => Ok(Passthrough),
            other => Err(Error::params(format!("passthrough takes no parameters, got {other}"))),
        }
    }

    fn apply(&mut self, _host: &Host, logits: &Array, _ctx: &Context) -> Result<Array, Error> {
        logits.retain()
    }
}

export_plugin!(Passthrough);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_names_a_processor_that_takes_the_model_dtype() {
        let d = unsafe { &*mlxd_sampler_plugin_v1() };
        assert_eq!(unsafe { CStr::from_ptr(d.name) }, c"passthrough");
        assert_eq!(d.kind, mlxd_plugin_api::sys::KIND_PROCESSOR);
        assert_eq!(d.capabilities, mlxd_plugin_api::sys::CAP_MODEL_DTYPE);
        assert!(unsafe { (*d.vtable).accept.is_none() });
    }
}
