//! Token selection on the device: `[B, V]` logits in, `[B]` token ids out, one compiled MLX graph
//! per combination of active stages, nothing read back to the host but the ids (and, when a
//! request asks, its top-n logprobs) through [`read_ids`] / [`read_logprobs`].
//!
//! # Pipeline
//! Each row of a batch has its own [`SamplingParams`]; a row whose stage is off carries the
//! stage's neutral value, so one graph serves the whole batch.
//!
//! 1. **Logit bias** — `logit += bias[token]`, one scatter-add for the batch.
//! 2. **Repetition penalty** (CTRL) — for tokens in the last `repetition_context_size` tokens of
//!    prompt + output: positive logits divided by the penalty, negative ones multiplied. One
//!    scatter-add marks each row's window.
//! 3. **Presence / frequency penalties** (OpenAI) —
//!    `logit -= presence * (count > 0) + frequency * count`, counts of generated tokens kept on
//!    the device (`[V]` per request, one scatter-add per step).
//! 4. **Temperature** — logits / T; T = 0 means argmax of the logits after step 3.
//! 5. **Top-k** — the k highest tempered logits survive.
//! 6. **Top-p** — of the survivors (renormalized), the smallest most-likely prefix whose
//!    probability reaches p.
//! 7. **Min-p** — drop tokens with probability below `min_p` times the best one's (the best
//!    token always survives, so renormalizing first would not change this cut).
//! 8. **Typical-p** — of the survivors (renormalized), keep the tokens whose surprisal is
//!    closest to the entropy, smallest such set holding mass p (Meister et al. 2022).
//! 9. **Pick** — Gumbel-max draw (`argmax(logit + Gumbel noise)`, which samples the softmax
//!    exactly), the noise of each candidate a counter-based hash of the request's key and the
//!    token id, the key advanced every step; or argmax for greedy rows.
//!
//! **Sampler plugins** (see [`crate::plugins`]) join the pipeline per row: *processor* plugins
//! run after step 3 and before step 4, in the order the request lists them; a *final sampler*
//! plugin (at most one) replaces steps 4-9 for its row, receiving the logits after the
//! processors divided by the temperature (when > 0). Logprobs are then taken after the
//! processors. A batch without plugin rows runs the single compiled graph as before; with them,
//! the graph is split around the plugins (`plugin`).
//!
//! Steps 1-3 follow mlx-lm's `make_logits_processors` order (bias, repetition, presence,
//! frequency). Presence and frequency count generated tokens only, over the whole output, as
//! OpenAI defines them (mlx-lm counts the last 20 tokens of prompt + output instead).
//! Steps 4-8 differ from mlx-lm (and llama.cpp), which filter the *untempered* distribution
//! and apply the temperature only in the final draw; mlxd follows Hugging Face transformers'
//! warper order (temperature, top-k, top-p, min-p, typical). Filtering after the temperature
//! means the thresholds cut the distribution that is actually sampled: with `top_p = 0.9` the
//! draw comes from the smallest set holding 90% of the probability it is drawn with, and the
//! chi-square test checks exactly that. Top-k is unaffected by the order (temperature is
//! monotone); top-p, min-p and typical-p are not.
//!
//! The filters sort the candidates once and work on ranks; when every drawing row has a top-k,
//! only the best `max k` (rounded up to a power of two, at least 16) are sorted. Those are found
//! without partitioning the whole vocabulary: the `K` chunks (of up to 4096 / K logits) with the
//! highest maxima hold the `K` best logits, so one max-reduction and two small sorts do it
//! (`MLXD_TOPK=sort` partitions the whole row instead). Logprobs are the log-softmax of the
//! logits after step 3 (before temperature and filters), as mlx-lm reports them.
//!
//! # One compiled call per step
//! A decode step on a GPU is bound by how many primitives the host builds and launches, so the
//! whole step is one compiled graph: the rows' state goes in (random keys `[B, 2]`, repetition
//! windows `[B, C]`, generated-token counts `[B, V]`) and comes out advanced: the key advances
//! and the Gumbel noise is computed for the candidates only (a hash of key and token id, fused
//! with the ops around it) inside the graph, and the window and counts take the picked token
//! inside the graph. Per-row parameters are `[B, 1]` columns built once per batch composition
//! and reused while the batch stays the same, so a steady step copies nothing from the host.
//! On MLX's CUDA backend, steps 2 and 4-9 and the state's advance run as two custom kernels
//! inside that graph when every row draws with a top-k of at most 256 (`cuda`; the same draws
//! as the MLX ops; `MLXD_SAMPLER_KERNEL=0` keeps the ops).
//!
//! # Layout
//! - [`params`]: [`SamplingParams`], their validation and [`SamplingError`].
//! - `pipeline`: the graph itself and the cache of compiled closures.
//! - `cuda`: steps 2 and 4-9 as two CUDA kernels.
//! - `sequence`: [`SequenceSampler`] (one request's device state) and [`sample_batch`].
//! - `plugin`: sampler plugins inside the step (one plugin chain per sequence).
//! - `read`: the host-read gate and its counters; a unit test there fails if any other code of
//!   `sampling/`, `engine/` or `plugins/` reads an array to the host.

mod cuda;
pub mod params;
mod pipeline;
mod plugin;
mod read;
mod sequence;

pub use cuda::{
    append_history, pick_and_append, prepare as prepare_kernels, set_enabled as set_sampler_kernel,
    set_fused as set_sampler_fused,
};
pub use params::{SamplingError, SamplingParams, MAX_LOGPROBS, MAX_REPETITION_CONTEXT};
pub use pipeline::{set_chunked_top_k, set_compiled};
pub(crate) use read::is_integer;
pub use read::{
    host_read_stats, read_ids, read_logprobs, thread_host_read_stats, HostReadStats, MAX_HOST_READ_ELEMENTS,
};
pub use sequence::{
    sample_batch, sample_batch_inspect, sample_batch_with_logprobs, Inspection, Logprobs, Sampled, SequenceSampler,
};

impl From<SamplingError> for crate::models::ModelError {
    fn from(e: SamplingError) -> Self {
        match e {
            SamplingError::Mlx(e) => crate::models::ModelError::Mlx(e),
            e => crate::models::ModelError::Sampling(e),
        }
    }
}
