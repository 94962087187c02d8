//! One plugin instance of one sequence: `create` with the request's params, `apply` every step,
//! `accept` with the chosen token, `destroy` when dropped.
//!
//! Every call enters the instance's host context (so the plugin's operations resolve to its
//! handle table), lends the borrowed arrays as handles and takes them back afterwards, and turns
//! the plugin's status code and message into a [`PluginError`]. Outputs are checked before the
//! pipeline sees them: a processor must return `[B, V]` floats, a sampler `[B]` integers (ids
//! are clamped into the vocabulary, so a bad id cannot index past the embedding table).

use super::host::HostCtx;
use super::{Kind, Plugin, PluginError};
use mlx_rs::{ops, random, Array, Dtype};
use mlxd_plugin_api::sys;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;

/// Bytes of the message buffer handed to plugins.
const MESSAGE_BYTES: usize = 1024;

/// What `apply` knows about the sequence besides its logits.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepInfo {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated so far.
    pub generated_tokens: usize,
    /// The request's temperature.
    pub temperature: f32,
}

/// A live plugin instance. Not `Send`: it lives on its model's thread, like the arrays it holds.
pub struct PluginInstance {
    plugin: Arc<Plugin>,
    host: Box<HostCtx>,
    state: *mut c_void,
    /// Split every call, for plugins that draw at random.
    key: Option<Array>,
    vocab: i32,
    message: Box<[c_char; MESSAGE_BYTES]>,
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PluginInstance({})", self.plugin.name)
    }
}

impl PluginInstance {
    /// Creates an instance for a sequence of a `vocab`-token model; `seed` seeds its random key.
    pub fn create(plugin: Arc<Plugin>, params_json: &str, vocab: usize, seed: u64) -> Result<Self, PluginError> {
        let err = |message: String| PluginError { plugin: plugin.name.clone(), message };
        let key =
            if plugin.wants_random() { Some(random::key(seed).map_err(|e| err(e.what().to_string()))?) } else { None };
        let params = CString::new(params_json).map_err(|_| err("params contain a NUL byte".into()))?;
        let (vocab, batch) = (vocab as i32, 1);
        let args = sys::CreateArgs {
            struct_size: std::mem::size_of::<sys::CreateArgs>(),
            params_json: params.as_ptr(),
            params_len: params_json.len(),
            vocab_size: vocab,
            batch,
        };
        let host = HostCtx::new();
        let mut message = Box::new([0 as c_char; MESSAGE_BYTES]);
        let mut buf = sys::ErrorBuf { message: message.as_mut_ptr(), capacity: MESSAGE_BYTES - 1 };
        let mut state = std::ptr::null_mut();
        let status = {
            let _entered = host.enter();
            // SAFETY: the plugin's create, with the header's arguments.
            unsafe { (plugin.create)(host.table(), &args, &mut state, &mut buf) }
        };
        if status != sys::OK {
            // No state exists, so no destroy; handles it made go with `host`.
            return Err(err(failure(&message, &host, "create", status)));
        }
        Ok(PluginInstance { plugin, host, state, key, vocab, message })
    }

    /// The plugin.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Handles the instance holds right now (for tests of the host's bookkeeping).
    pub fn live_handles(&self) -> usize {
        self.host.live_handles()
    }

    fn message_buf(&mut self) -> sys::ErrorBuf {
        self.message[0] = 0;
        sys::ErrorBuf { message: self.message.as_mut_ptr(), capacity: MESSAGE_BYTES - 1 }
    }

    fn error(&self, message: String) -> PluginError {
        PluginError { plugin: self.plugin.name.clone(), message }
    }

    /// Runs `apply` on `logits` (`[B, V]`). `history` is the sequence's `[B, T]` int32 tokens
    /// (given when the plugin asks for it). Returns checked logits (processor) or ids (sampler).
    pub fn apply(&mut self, logits: &Array, history: Option<&Array>, info: StepInfo) -> Result<Array, PluginError> {
        let key = match self.key.as_mut() {
            None => None,
            Some(k) => {
                let (keep, now) = random::split(&*k, 2)
                    .map_err(|e| PluginError { plugin: self.plugin.name.clone(), message: e.what().to_string() })?;
                *k = keep;
                Some(now)
            }
        };
        // Float32 unless the processor takes the logits as they come (`CAP_MODEL_DTYPE`).
        let converted;
        let logits = if logits.dtype() != Dtype::Float32
            && !(self.plugin.kind == Kind::Processor && self.plugin.takes_model_dtype())
        {
            converted = logits.as_type::<f32>().map_err(|e| self.error(e.what().to_string()))?;
            &converted
        } else {
            logits
        };
        let mut buf = self.message_buf();
        let mut out: sys::ArrayHandle = std::ptr::null_mut();
        let (status, output) = {
            let _entered = self.host.enter();
            let lent_logits = self.host.insert(logits.clone());
            let lent_history = match history {
                Some(h) if self.plugin.wants_history() => self.host.insert(h.clone()),
                _ => std::ptr::null_mut(),
            };
            let lent_key = key.map_or(std::ptr::null_mut(), |k| self.host.insert(k));
            let ctx = sys::Context {
                struct_size: std::mem::size_of::<sys::Context>(),
                tokens: lent_history,
                prompt_tokens: info.prompt_tokens as i64,
                generated_tokens: info.generated_tokens as i64,
                key: lent_key,
                temperature: info.temperature,
                vocab_size: self.vocab,
            };
            // SAFETY: the plugin's apply, with its state and the header's arguments.
            let status =
                unsafe { (self.plugin.apply)(self.state, self.host.table(), lent_logits, &ctx, &mut out, &mut buf) };
            // The output first: a plugin that returns a lent handle itself gets away with it.
            let output = if status == sys::OK { self.host.take(out) } else { None };
            for lent in [lent_logits, lent_history, lent_key] {
                if !lent.is_null() {
                    self.host.take(lent);
                }
            }
            (status, output)
        };
        if status != sys::OK {
            return Err(self.error(failure(&self.message, &self.host, "apply", status)));
        }
        let output = output.ok_or_else(|| self.error("apply returned no array (a null or invalid handle)".into()))?;
        self.check_output(logits, output)
    }

    fn check_output(&self, logits: &Array, out: Array) -> Result<Array, PluginError> {
        let (b, v) = (logits.shape()[0], logits.shape()[1]);
        let bad = |want: &str| {
            self.error(format!(
                "apply returned a {:?} {:?} array; a {:?} must return {want}",
                out.shape(),
                out.dtype(),
                self.plugin.kind
            ))
        };
        let mlx = |e: mlx_rs::error::Exception| self.error(e.what().to_string());
        match self.plugin.kind {
            Kind::Processor => {
                let float = matches!(out.dtype(), Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16);
                if out.shape() != [b, v] || !float {
                    return Err(bad(&format!("[{b}, {v}] float logits")));
                }
                // Kept in its dtype: what runs next converts if it computes on it.
                Ok(out)
            }
            Kind::Sampler => {
                let integer = matches!(
                    out.dtype(),
                    Dtype::Uint32
                        | Dtype::Int32
                        | Dtype::Int64
                        | Dtype::Uint64
                        | Dtype::Uint8
                        | Dtype::Int16
                        | Dtype::Uint16
                        | Dtype::Int8
                );
                if !(out.shape() == [b] || out.shape() == [b, 1]) || !integer {
                    return Err(bad(&format!("[{b}] integer token ids")));
                }
                let ids = out.reshape(&[b]).and_then(|x| x.as_type::<i32>()).map_err(mlx)?;
                ops::clip(&ids, (0, v - 1)).and_then(|x| x.as_type::<u32>()).map_err(mlx)
            }
        }
    }

    /// Runs `accept` (if the plugin has one) with this step's tokens, `[B]` uint32.
    pub fn accept(&mut self, token: &Array) -> Result<(), PluginError> {
        let Some(accept) = self.plugin.accept else { return Ok(()) };
        let mut buf = self.message_buf();
        let status = {
            let _entered = self.host.enter();
            let lent = self.host.insert(token.clone());
            // SAFETY: the plugin's accept, with its state and a borrowed handle.
            let status = unsafe { accept(self.state, self.host.table(), lent, &mut buf) };
            self.host.take(lent);
            status
        };
        if status != sys::OK {
            return Err(self.error(failure(&self.message, &self.host, "accept", status)));
        }
        Ok(())
    }
}

/// The plugin's message (or the host's last error) with the status code in words.
fn failure(message: &[c_char; MESSAGE_BYTES], host: &HostCtx, call: &str, status: sys::Status) -> String {
    // SAFETY: the buffer is NUL-terminated: zeroed before the call, and the last byte is never
    // within the capacity a plugin may write a message into without its terminator.
    let mut text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy().into_owned();
    if text.is_empty() {
        text = host.last_error();
    }
    let code = match status {
        sys::ERR_PARAMS => "invalid params",
        sys::ERR_SHAPE => "bad input shape",
        sys::ERR_HOST => "host operation failed",
        sys::ERR_PANIC => "panic",
        _ => "error",
    };
    if text.is_empty() {
        format!("{call} failed ({code}, status {status})")
    } else {
        format!("{call} failed ({code}): {text}")
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        if let Some(destroy) = self.plugin.destroy {
            let _entered = self.host.enter();
            // SAFETY: once, after a successful create.
            unsafe { destroy(self.state, self.host.table()) };
        }
        // Whatever the plugin still owned goes with the sequence.
        self.host.clear();
    }
}
