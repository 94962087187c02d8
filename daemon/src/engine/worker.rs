//! The thread that owns one resident model. Async code talks to it through a [`WorkerHandle`]
//! (a channel sender and a few counters); the thread admits requests between decode steps and
//! advances all running sequences together.
//!
//! Fairness and back-pressure: every running sequence advances one token per step; a sequence
//! whose client reads too slowly (its bounded event channel is full) sits out steps until the
//! client catches up, so it never stalls the others; a closed channel cancels it. Requests beyond
//! `max_batch` wait in arrival order; beyond `max_queue` they are refused at once.
//!
//! Two faults are bounded here. A sequence whose client has read nothing for
//! `server.slow_client_timeout_s` while its buffer stayed full is cancelled (it ends with `done` /
//! `cancelled`, which the client sees if it ever reads again). And the thread publishes a
//! heartbeat ([`WorkerStats::stalled_for`]) every time it comes back to its loop: a decode step
//! or an admission that never returns (a sampler plugin stuck in a call) cannot be interrupted,
//! but the registry's watchdog sees the silence, sets the model aside and fails its requests
//! (see `Registry::watchdog`).

use super::{Engine, GenerateRequest, Outcome, Row, TokenEvent};
use crate::chat::{ChatTemplate, Message};
use crate::models::ModelError;
use crate::protocol::ErrorCode;
use crate::sampling::SamplingParams;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Raw text, tokenized as is.
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Messages(Vec<Message>),
}

/// A validated generation request on its way to the model thread.
pub struct Job {
    /// The client's request id (for logs).
    pub id: String,
    /// Prompt.
    pub input: PromptInput,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Longest accepted prompt, tokens.
    pub max_prompt_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling parameters (already checked against the protocol's bounds; the vocabulary
    /// bounds are checked here).
    pub sampling: SamplingParams,
    /// Where events go; bounded, so a slow reader pauses only its own sequence.
    pub events: mpsc::Sender<JobEvent>,
    /// Set by the connection on `cancel` or disconnect.
    pub cancel: Arc<AtomicBool>,
}

/// Events of one job, in order: `Started`, any number of `Token`, then `Done`; or one `Error`.
#[derive(Debug)]
pub enum JobEvent {
    /// The prompt was processed up to the first token.
    Started {
        /// Prompt length in tokens.
        prompt_tokens: usize,
    },
    /// A token.
    Token(TokenEvent),
    /// The end.
    Done(Outcome),
    /// The request failed before or while generating.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// What went wrong.
        message: String,
    },
}

/// Requests to the model thread.
pub enum Command {
    /// Generate.
    Generate(Job),
    /// Text to ids.
    Tokenize {
        /// Text.
        text: String,
        /// Add BOS where the model uses one.
        add_special: bool,
        /// Answer.
        reply: oneshot::Sender<Result<Vec<u32>, String>>,
    },
    /// Ids to text.
    Detokenize {
        /// Ids.
        tokens: Vec<u32>,
        /// Answer.
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Counters the worker publishes for status and metrics.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Jobs waiting for a batch slot.
    pub queued: AtomicUsize,
    /// Sequences generating.
    pub running: AtomicUsize,
    /// Requests finished.
    pub requests: AtomicU64,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Sum of batch sizes over steps (mean batch = this / steps).
    pub batch_rows: AtomicU64,
    /// Sum of time to first token, microseconds.
    pub ttft_us: AtomicU64,
    /// Device bytes of the running sequences' KV caches.
    pub kv_bytes: AtomicU64,
    /// KV bytes this model's sequences may reserve (set by the registry from the memory budget
    /// minus the resident weights); `u64::MAX` when unlimited.
    pub kv_limit: AtomicU64,
    /// The memory plan of the running sequences: the most their KV state and a step's working
    /// memory can come to (see `Worker::memory_plan`), which with the prompt cache stays within
    /// `kv_limit`.
    pub kv_reserved: AtomicU64,
    /// Device bytes of the loaded weights (known once the model is loaded).
    pub weight_bytes: AtomicU64,
    /// Sequences cancelled because their client read nothing for `slow_client_timeout_s`.
    pub slow_client_cancels: AtomicU64,
    /// Device bytes of the prompt cache (KV state and logits of finished prompts).
    pub prompt_cache_bytes: AtomicU64,
    /// The engine's step profile as of its last decode step, summed since the model loaded:
    /// where steps' time went (building and launching on the host, the thread's CPU time for
    /// that, waiting for the device) and how often the batch was restacked or gathered (see
    /// [`crate::engine::StepProfile`]).
    pub step_profile: std::sync::Mutex<super::StepProfile>,
    /// When the thread last came back to its loop, milliseconds since [`epoch`].
    heartbeat_ms: AtomicU64,
    /// The thread is waiting for a command (nothing to do, so no heartbeat is due).
    idle: AtomicBool,
    /// The watchdog gave up on this thread: its requests were failed and the model set aside.
    stalled: AtomicBool,
    /// Wakes the connections waiting on a stalled thread.
    stall: tokio::sync::Notify,
    /// The thread has ended.
    exited: AtomicBool,
}

/// The process-wide origin of heartbeat times.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl WorkerStats {
    fn new() -> Self {
        epoch();
        WorkerStats { kv_limit: AtomicU64::new(u64::MAX), idle: AtomicBool::new(true), ..Default::default() }
    }

    fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::SeqCst);
        self.idle.store(false, Ordering::SeqCst);
    }

    /// How long the thread has been inside one admission or decode step without coming back to
    /// its loop (zero while it waits for work, or once it has ended).
    pub fn stalled_for(&self) -> Duration {
        if self.idle.load(Ordering::SeqCst) || self.exited.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::SeqCst)))
    }

    /// Marks the thread as given up on and wakes everyone waiting for its events.
    pub fn mark_stalled(&self) {
        self.stalled.store(true, Ordering::SeqCst);
        self.stall.notify_waiters();
    }

    /// Whether the watchdog gave up on the thread.
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Whether the thread has ended (a stalled thread may still come back and end).
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Resolves once the watchdog gives up on the thread.
    pub async fn stalled(&self) {
        loop {
            let notified = self.stall.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_stalled() {
                return;
            }
            notified.await;
        }
    }
}

/// The clonable handle async code holds.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: std_mpsc::Sender<Command>,
    /// Live counters.
    pub stats: Arc<WorkerStats>,
    max_queue: usize,
}

/// Limits the worker enforces.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Jobs waiting before new ones are refused.
    pub max_queue: usize,
    /// A sequence whose client has taken no event for this long is cancelled (`None`: never).
    pub slow_client_timeout: Option<Duration>,
}

impl WorkerHandle {
    /// Submits a job, or gives it back when the queue is full (the caller answers `busy`).
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let waiting = self.stats.queued.load(Ordering::SeqCst);
        if waiting >= self.max_queue {
            return Err(job);
        }
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(Command::Generate(job)).map_err(|e| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            match e.0 {
                Command::Generate(job) => job,
                _ => unreachable!("sent a Generate"),
            }
        })
    }

    /// Sends a non-generating command.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Running plus queued requests.
    pub fn in_flight(&self) -> usize {
        self.stats.queued.load(Ordering::SeqCst) + self.stats.running.load(Ordering::SeqCst)
    }
}

/// Starts the model thread around an engine built by `load` (which runs on that thread, so all
/// of the model's MLX state lives there). Returns once loading has finished.
pub fn spawn(
    name: &str,
    limits: WorkerLimits,
    load: impl FnOnce() -> Result<Engine, ModelError> + Send + 'static,
) -> Result<(WorkerHandle, std::thread::JoinHandle<()>), ModelError> {
    let (tx, rx) = std_mpsc::channel();
    let stats = Arc::new(WorkerStats::new());
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let thread_stats = stats.clone();
    let join = std::thread::Builder::new()
        .name(format!("model:{name}"))
        .spawn(move || match load() {
            Ok(engine) => {
                thread_stats.weight_bytes.store(engine.model.model.weight_bytes() as u64, Ordering::SeqCst);
                let _ = ready_tx.send(Ok(()));
                Worker::new(engine, limits, thread_stats.clone()).run(rx);
                thread_stats.exited.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                thread_stats.exited.store(true, Ordering::SeqCst);
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| ModelError::Config(format!("cannot start the model thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((WorkerHandle { tx, stats, max_queue: limits.max_queue }, join)),
        Ok(Err(e)) => {
            let _ = join.join();
            Err(e)
        }
        Err(_) => {
            let _ = join.join();
            Err(ModelError::Config("the model thread ended while loading (see the log)".into()))
        }
    }
}

struct Active {
    job: Job,
    row: Row,
    /// Positions this sequence can come to: prompt plus `max_tokens`.
    positions: usize,
    /// An error event was sent; no Done follows.
    failed: bool,
    /// Since when the client's buffer has been too full for the row to step.
    paused_since: Option<Instant>,
}

enum Admission {
    /// The request to start and the KV positions reserved for it.
    Ready(GenerateRequest, usize),
    Wait,
}

/// The error a client gets for a request the engine could not start.
fn start_error(e: ModelError) -> (ErrorCode, String) {
    match e {
        ModelError::Sampling(s @ crate::sampling::SamplingError::Plugin(_)) => (ErrorCode::PluginError, s.to_string()),
        ModelError::Sampling(s) => {
            (ErrorCode::InvalidRequest, format!("`sampling.{}", s.to_string().trim_start_matches('`')))
        }
        ModelError::Config(m) => (ErrorCode::InvalidRequest, m),
        other => (ErrorCode::Internal, other.to_string()),
    }
}

struct Worker {
    engine: Engine,
    limits: WorkerLimits,
    stats: Arc<WorkerStats>,
    template: Option<Result<ChatTemplate, String>>,
    /// Jobs waiting for a batch slot (or for KV memory), with their prompt once tokenized.
    waiting: VecDeque<(Job, Option<Vec<u32>>)>,
    active: Vec<Active>,
    /// Positions of sequences that ended since the last decode step: the stacked batch still
    /// holds their rows until the next step restacks it, so they still count in the memory plan.
    retired: Vec<usize>,
    /// Positions of the jobs admitted in this round and not yet started (they start together).
    admitting: Vec<usize>,
}

impl Worker {
    fn new(engine: Engine, limits: WorkerLimits, stats: Arc<WorkerStats>) -> Self {
        Worker {
            engine,
            limits,
            stats,
            template: None,
            waiting: VecDeque::new(),
            active: Vec::new(),
            retired: Vec::new(),
            admitting: Vec::new(),
        }
    }

    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                self.stats.idle.store(true, Ordering::SeqCst);
                let cmd = rx.recv();
                self.stats.beat();
                match cmd {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            self.stats.beat();
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.admit();
            self.reap();
            self.step();
            self.reap();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate(job) => self.waiting.push_back((job, None)),
            Command::Tokenize { text, add_special, reply } => {
                let _ = reply.send(self.engine.model.tokenizer.encode(&text, add_special).map_err(|e| e.to_string()));
            }
            Command::Detokenize { tokens, reply } => {
                let _ = reply.send(self.engine.model.tokenizer.decode(&tokens, false).map_err(|e| e.to_string()));
            }
        }
    }

    /// Admits waiting jobs while the batch has room and their KV memory fits, then starts them
    /// together ([`Engine::start_many`]: a burst's prompts share prefill passes).
    fn admit(&mut self) {
        let mut starting: Vec<(Job, GenerateRequest)> = Vec::new();
        while self.active.len() + starting.len() < self.limits.max_batch {
            let Some((job, mut prompt)) = self.waiting.pop_front() else { break };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
                // Cancelled while it waited: it still gets its one final event.
                let _ = job.events.try_send(JobEvent::Done(Outcome {
                    finish: super::FinishReason::Cancelled,
                    ids: Vec::new(),
                    text: String::new(),
                    prompt_tokens: prompt.as_ref().map_or(0, Vec::len),
                    cached_tokens: 0,
                    time_to_first_token: Duration::ZERO,
                    decode_time: Duration::ZERO,
                }));
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self.prepare(&job, &mut prompt) {
                Ok(Admission::Ready(req, positions)) => {
                    self.admitting.push(positions);
                    starting.push((job, req));
                }
                Ok(Admission::Wait) => {
                    // Not enough KV memory until running sequences finish: first in line waits.
                    self.stats.queued.fetch_add(1, Ordering::SeqCst);
                    // Its prompt stays tokenized: the next attempt only re-checks the memory.
                    self.waiting.push_front((job, prompt));
                    break;
                }
                Err((code, message)) => {
                    let _ = job.events.try_send(JobEvent::Error { code, message });
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !starting.is_empty() {
            let (jobs, reqs): (Vec<Job>, Vec<GenerateRequest>) = starting.into_iter().unzip();
            let started = self.engine.start_many(reqs);
            let reserved = std::mem::take(&mut self.admitting);
            for ((job, row), positions) in jobs.into_iter().zip(started).zip(reserved) {
                match row.map_err(start_error) {
                    Ok(row) => {
                        let _ = job.events.try_send(JobEvent::Started { prompt_tokens: row.prompt_tokens() });
                        self.active.push(Active { job, row, positions, failed: false, paused_since: None });
                    }
                    Err((code, message)) => {
                        let _ = job.events.try_send(JobEvent::Error { code, message });
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.fit_prompt_cache();
        }
        self.stats.running.store(self.active.len(), Ordering::SeqCst);
    }

    /// Device bytes the model's KV state can come to if the admitted sequences (and those that
    /// ended since the last step, whose rows the stacked batch still holds) plus one of
    /// `extra` positions decode together: every row of a stacked batch is as long as its
    /// longest, rounded up to the cache's allocation step.
    fn kv_plan(&self, extra: Option<usize>) -> u64 {
        let lens = self
            .active
            .iter()
            .map(|a| a.positions)
            .chain(self.retired.iter().copied())
            .chain(self.admitting.iter().copied())
            .chain(extra);
        let (n, longest) = lens.fold((0u64, 0usize), |(n, m), l| (n + 1, m.max(l)));
        if n == 0 {
            return 0;
        }
        let step = crate::cache::STEP as usize;
        let capacity = (longest / step + 1) * step;
        n * capacity as u64 * self.engine.model.model.kv_bytes_per_token()
    }

    /// KV bytes held now (running sequences and the stacked batch), without the prompt cache.
    fn kv_held(&self) -> u64 {
        self.active.iter().map(|a| a.row.cache_bytes() as u64).sum::<u64>() + self.engine.held_kv_bytes() as u64
    }

    /// The most the model's thread may hold besides its weights and prompt cache while the
    /// admitted sequences (plus `extra` positions, prefilled now with a prompt of
    /// `prompt` tokens) run: the KV state now or at its largest, whichever is more, plus the
    /// largest stacked batch again (growing it or restacking it copies into new arrays while
    /// the old ones are still held), plus the activations of a decode step or of a prefill
    /// chunk.
    fn memory_plan(&self, extra: Option<(usize, usize)>) -> u64 {
        let plan = self.kv_plan(extra.map(|(positions, _)| positions));
        let rows = self.active.len() + self.retired.len() + self.admitting.len() + usize::from(extra.is_some());
        let model = &self.engine.model.model;
        let decode = model.decode_activation_bytes(rows.max(1));
        let prefill =
            extra.map_or(0, |(_, prompt)| model.prefill_activation_bytes(self.engine.options().prefill_chunk, prompt));
        self.kv_held().max(plan) + plan + decode.max(prefill)
    }

    /// Holds the prompt cache to what the model's memory share leaves after the memory plan of
    /// the running sequences (evicting its least recently used entries; never above its
    /// configured size), and publishes both.
    fn fit_prompt_cache(&mut self) {
        let limit = self.stats.kv_limit.load(Ordering::SeqCst);
        let plan = self.memory_plan(None);
        self.engine.limit_prompt_cache(usize::try_from(limit.saturating_sub(plan)).unwrap_or(usize::MAX));
        self.stats.kv_reserved.store(plan, Ordering::Relaxed);
    }

    /// Checks the memory plan with one more sequence of `positions` positions (a prompt of
    /// `prompt` tokens) against the model's share of the memory budget: it is admitted when the
    /// plan fits (cached prompts give way to it first), waits when it would fit once running
    /// sequences end, and is refused when it could never fit.
    fn reserve(&mut self, positions: usize, prompt: usize) -> Result<bool, (ErrorCode, String)> {
        let limit = self.stats.kv_limit.load(Ordering::SeqCst);
        if limit == u64::MAX {
            return Ok(true);
        }
        let plan = self.memory_plan(Some((positions, prompt)));
        let cached = self.engine.prompt_cache_stats().bytes as u64;
        if plan + cached <= limit {
            return Ok(true);
        }
        if plan <= limit {
            // Cached prompts give way to live requests, least recently used first.
            self.engine.limit_prompt_cache((limit - plan) as usize);
            return Ok(true);
        }
        if self.active.is_empty() && self.retired.is_empty() && self.admitting.is_empty() {
            return Err((
                ErrorCode::OutOfMemory,
                format!(
                    "this request needs about {} MiB of KV cache and working memory ({positions} positions: {} MiB of \
                     KV state, counted twice since growing it copies), more than the {} MiB the memory budget \
                     (engine.memory_budget_mb) leaves this model after the resident weights; lower max_tokens or \
                     raise the budget",
                    plan >> 20,
                    self.kv_plan(Some(positions)) >> 20,
                    limit >> 20
                ),
            ));
        }
        Ok(false)
    }

    /// Tokenizes the job's prompt (once: `prompt` keeps it across waits) and reserves its KV
    /// memory: the request to start with the positions reserved, or `Wait`.
    fn prepare(&mut self, job: &Job, prompt: &mut Option<Vec<u32>>) -> Result<Admission, (ErrorCode, String)> {
        let invalid = |m: String| (ErrorCode::InvalidRequest, m);
        let prompt = match prompt {
            Some(p) => p,
            None => {
                let text = match &job.input {
                    PromptInput::Text(t) => t.clone(),
                    PromptInput::Messages(m) => self.render(m).map_err(invalid)?,
                };
                let ids =
                    self.engine.model.tokenizer.encode(&text, true).map_err(|e| invalid(format!("`prompt`: {e}")))?;
                prompt.insert(ids)
            }
        };
        if prompt.len() > job.max_prompt_tokens {
            return Err(invalid(format!(
                "the prompt has {} tokens; `limits.max_prompt_tokens` is {}",
                prompt.len(),
                job.max_prompt_tokens
            )));
        }
        if prompt.is_empty() {
            return Err(invalid("the prompt is empty".into()));
        }
        let positions = prompt.len() + job.max_tokens;
        if !self.reserve(positions, prompt.len())? {
            return Ok(Admission::Wait);
        }
        Ok(Admission::Ready(
            GenerateRequest {
                prompt: std::mem::take(prompt),
                max_tokens: job.max_tokens,
                stop: job.stop.clone(),
                sampler: job.sampling.clone(),
            },
            positions,
        ))
    }

    fn render(&mut self, messages: &[Message]) -> Result<String, String> {
        let model = &self.engine.model;
        let template = self.template.get_or_insert_with(|| {
            let source =
                model.chat_template.as_deref().ok_or_else(|| crate::chat::ChatError::NoTemplate.to_string())?;
            let token = |id: Option<u32>| id.and_then(|i| model.tokenizer.id_to_token(i)).unwrap_or_default();
            ChatTemplate::new(source, &token(model.tokenizer.bos_id()), &token(model.eos_ids.first().copied()))
                .map_err(|e| e.to_string())
        });
        match template {
            Ok(t) => t.render(messages, true).map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Sends `Done` for finished sequences and releases them.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let a = &mut self.active[i];
            if a.row.finished().is_none() && (a.job.cancel.load(Ordering::SeqCst) || a.job.events.is_closed()) {
                a.row.cancel();
            }
            let too_slow = match (a.paused_since, self.limits.slow_client_timeout) {
                (Some(since), Some(limit)) => since.elapsed() >= limit,
                _ => false,
            };
            if a.row.finished().is_none() && too_slow {
                // Room for the final event was kept when the row last stepped.
                tracing::warn!(request = %a.job.id, "client read nothing for server.slow_client_timeout_s; request cancelled");
                self.stats.slow_client_cancels.fetch_add(1, Ordering::Relaxed);
                a.row.cancel();
            }
            if a.row.finished().is_some() {
                let Active { job, row, failed, positions, .. } = self.active.swap_remove(i);
                self.retired.push(positions);
                // Counters first: a client that asks for `status` right after `done` sees it ended.
                self.stats.running.store(self.active.len(), Ordering::SeqCst);
                let outcome = self.engine.finish(row);
                if failed {
                    continue;
                }
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                self.stats.ttft_us.fetch_add(outcome.time_to_first_token.as_micros() as u64, Ordering::Relaxed);
                // Capacity for Done was reserved when the row last stepped (see `step`).
                let _ = job.events.try_send(JobEvent::Done(outcome));
            } else {
                i += 1;
            }
        }
        self.stats.running.store(self.active.len(), Ordering::SeqCst);
        self.stats.kv_bytes.store(self.kv_held(), Ordering::Relaxed);
        if self.active.is_empty() {
            // Nothing left to restack: what the ended rows held is released with them.
            self.retired.clear();
        }
        self.fit_prompt_cache();
        self.stats.prompt_cache_bytes.store(self.engine.prompt_cache_stats().bytes as u64, Ordering::Relaxed);
    }

    fn step(&mut self) {
        // A row steps only when its client can take a token and the final Done.
        let ready: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].row.finished().is_none() && self.active[i].job.events.capacity() >= 2)
            .collect();
        for (i, a) in self.active.iter_mut().enumerate() {
            if ready.contains(&i) {
                a.paused_since = None;
            } else if a.row.finished().is_none() {
                a.paused_since.get_or_insert_with(Instant::now);
            }
        }
        if ready.is_empty() {
            if !self.active.is_empty() {
                std::thread::sleep(Duration::from_millis(2)); // everyone is waiting on slow readers
            }
            return;
        }
        let mut selected: Vec<&mut Active> = Vec::with_capacity(ready.len());
        for (i, a) in self.active.iter_mut().enumerate() {
            if ready.contains(&i) {
                selected.push(a);
            }
        }
        let (jobs, mut rows): (Vec<&Job>, Vec<&mut Row>) = selected.into_iter().map(|a| (&a.job, &mut a.row)).unzip();
        let batch = rows.len() as u64;
        let started = Instant::now();
        let result = self.engine.step(&mut rows, |i, ev| jobs[i].events.try_send(JobEvent::Token(ev.clone())).is_ok());
        let profile = self.engine.profile();
        *self.stats.step_profile.lock().unwrap_or_else(|e| e.into_inner()) = profile;
        // The step restacked or gathered the batch without the rows that had ended.
        self.retired.clear();
        match result {
            Ok(()) => {
                self.stats.steps.fetch_add(1, Ordering::Relaxed);
                self.stats.batch_rows.fetch_add(batch, Ordering::Relaxed);
                self.stats.tokens.fetch_add(batch, Ordering::Relaxed);
                // A failed plugin ends only its own request; the others stepped normally.
                for &i in &ready {
                    let a = &mut self.active[i];
                    if let Some(e) = a.row.failure() {
                        tracing::warn!(request = %a.job.id, error = %e, "sampler plugin failed");
                        let _ = a
                            .job
                            .events
                            .try_send(JobEvent::Error { code: ErrorCode::PluginError, message: e.to_string() });
                        a.failed = true;
                    }
                }
            }
            Err(e) => {
                // A failed step fails only the sequences in it; the model stays up.
                tracing::error!(error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "decode step failed");
                for &i in &ready {
                    let a = &mut self.active[i];
                    let _ =
                        a.job.events.try_send(JobEvent::Error { code: ErrorCode::Internal, message: e.to_string() });
                    a.row.cancel();
                    a.failed = true;
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        for a in self.active.drain(..) {
            let _ = a.job.events.try_send(JobEvent::Error {
                code: ErrorCode::ShuttingDown,
                message: "the model was unloaded or the server is shutting down".into(),
            });
        }
    }
}
