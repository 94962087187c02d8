//! Soak test: many WebSocket clients on loopback against the real daemon with two models (the
//! default SmolLM2-135M and a tiny random-weight Llama) and three plugins, for a bounded time,
//! doing a seeded mix of streaming generations (raw prompts and chat), several requests at once
//! on one connection, cancels mid-stream, abrupt disconnects, malformed and invalid frames,
//! plugin requests (passthrough, DRY, and `faulty` failing on purpose), tokenize/status/models.
//!
//! Checks: the daemon stays up and answers `status` at the end; every generation a client saw
//! through ends with exactly one `done` or `error` and nothing after it; every completed greedy
//! generation (alone, multiplexed, or through `passthrough`) streams exactly the text and token
//! ids of the same request run alone before the load; a cancelled one streams a prefix of it;
//! every malformed frame gets its named error; when the load stops, nothing is left running and
//! memory is back near its baseline (see `MEMORY TOLERANCE`).
//!
//! CI runs a short version (16 clients, 25 s). The long run (docs/reliability.md):
//!
//! ```sh
//! MLXD_SOAK_SECS=600 MLXD_SOAK_CLIENTS=64 nice -n 5 cargo test --release -p mlxd --test soak -- --nocapture
//! ```
//!
//! `MLXD_SOAK_SEED` changes the mix; `MLXD_SOAK_ONLY=greedy,cancel,...` runs only those actions
//! (see `Client::run`); `MLXD_SOAK_REPORT=FILE` also writes the summary as JSON.

mod common;

use common::daemon::{connect_with, proc_status_bytes, rss_bytes, start, Daemon, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// How long a client waits for the next event before calling it a hang.
const EVENT_TIMEOUT: Duration = Duration::from_secs(180);

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn lib_name(stem: &str) -> String {
    if cfg!(target_os = "macos") {
        format!("lib{stem}.dylib")
    } else {
        format!("lib{stem}.so")
    }
}

/// A request whose greedy answer is known from a run alone.
#[derive(Debug, Clone)]
struct Case {
    model: &'static str,
    prompt: Option<&'static str>,
    chat: Option<&'static str>,
    max_tokens: u32,
}

impl Case {
    fn request(&self, id: &str) -> Value {
        let mut v = json!({"type": "generate", "id": id, "model": self.model, "max_tokens": self.max_tokens});
        match (self.prompt, self.chat) {
            (Some(p), _) => v["prompt"] = json!(p),
            (_, Some(c)) => v["messages"] = json!([{"role": "user", "content": c}]),
            _ => unreachable!(),
        }
        v
    }
}

fn cases() -> Vec<Case> {
    let raw = |model, p, n| Case { model, prompt: Some(p), chat: None, max_tokens: n };
    let chat = |model, c, n| Case { model, prompt: None, chat: Some(c), max_tokens: n };
    vec![
        raw("smol", "The capital of France is", 24),
        raw("smol", "Once upon a time", 32),
        raw("smol", "def fibonacci(n):", 32),
        raw("smol", "The three primary colors are", 20),
        chat("smol", "What is the capital of France?", 32),
        chat("smol", "Name a fruit.", 16),
        chat("smol", "Say hello in French.", 24),
        chat("smol", "What is 2+2?", 16),
        raw("tiny", "abc", 48),
        raw("tiny", "Hello there", 64),
        raw("tiny", "The sea, the sea", 40),
        chat("tiny", "hi", 48),
        chat("tiny", "Name a planet.", 32),
    ]
}

/// What a request run alone produced.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    ids: Vec<u64>,
    text: String,
    finish: String,
}

/// Counters and findings, shared by the clients.
#[derive(Debug, Default)]
struct Tally {
    generates: u64,
    done: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    greedy_checked: u64,
    cancels: u64,
    cancel_prefix_checked: u64,
    disconnects: u64,
    malformed: u64,
    other_messages: u64,
    reconnects_refused: u64,
    tokens: u64,
    /// Broken rules: a second final event, an event after the final one, a wrong error code,
    /// a hang, a greedy mismatch.
    violations: Vec<String>,
}

impl Tally {
    fn violation(&mut self, what: String) {
        eprintln!("soak violation: {what}");
        if self.violations.len() < 200 {
            self.violations.push(what);
        }
    }
}

type Shared = Arc<Mutex<Tally>>;

/// A seeded xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Ev {
    Msg(Value),
    Closed,
    Timeout,
}

async fn next_event(ws: &mut Ws, wait: Duration) -> Ev {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Ev::Timeout,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return Ev::Closed,
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(t.as_str()) {
                Ok(v) => return Ev::Msg(v),
                Err(e) => return Ev::Msg(json!({"type": "unparseable", "error": e.to_string()})),
            },
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// One generation as seen by its client.
#[derive(Debug, Default)]
struct Gen {
    started: u32,
    ids: Vec<u64>,
    text: String,
    last: Option<Value>,
}

/// Reads until every id in `gens` has its final event. `on_token(id, count)` may ask to stop
/// reading early (for cancels and disconnects) by returning true. Every rule broken is recorded.
async fn drive(
    ws: &mut Ws,
    gens: &mut HashMap<String, Gen>,
    tally: &Shared,
    mut on_token: impl FnMut(&str, usize) -> bool,
) -> Result<(), &'static str> {
    loop {
        if gens.values().all(|g| g.last.is_some()) {
            return Ok(());
        }
        let m = match next_event(ws, EVENT_TIMEOUT).await {
            Ev::Msg(m) => m,
            Ev::Closed => {
                tally.lock().unwrap().violation(format!("connection closed with {:?} unfinished", open_ids(gens)));
                return Err("closed");
            }
            Ev::Timeout => {
                tally
                    .lock()
                    .unwrap()
                    .violation(format!("no event for {EVENT_TIMEOUT:?} while {:?} ran", open_ids(gens)));
                return Err("timeout");
            }
        };
        let id = m["id"].as_str().unwrap_or_default().to_string();
        let Some(g) = gens.get_mut(&id) else {
            tally.lock().unwrap().violation(format!("event for an id not running on this connection: {m}"));
            continue;
        };
        if let Some(last) = &g.last {
            tally.lock().unwrap().violation(format!("event after the final one ({last}): {m}"));
            continue;
        }
        match m["type"].as_str().unwrap_or_default() {
            "started" => {
                g.started += 1;
                if g.started > 1 || !g.ids.is_empty() {
                    tally.lock().unwrap().violation(format!("`started` out of place: {m}"));
                }
            }
            "token" => {
                g.text.push_str(m["text"].as_str().unwrap_or_default());
                g.ids.extend(m["tokens"].as_array().into_iter().flatten().filter_map(Value::as_u64));
                if on_token(&id, g.ids.len()) {
                    return Ok(());
                }
            }
            "done" | "error" => {
                let mut t = tally.lock().unwrap();
                if m["type"] == "done" {
                    *t.done.entry(m["finish_reason"].as_str().unwrap_or("?").to_string()).or_default() += 1;
                    let n = m["usage"]["completion_tokens"].as_u64().unwrap_or(u64::MAX);
                    if n != g.ids.len() as u64 {
                        t.violation(format!("{id}: usage says {n} tokens, {} streamed", g.ids.len()));
                    }
                    t.tokens += n;
                } else {
                    *t.errors.entry(m["code"].as_str().unwrap_or("?").to_string()).or_default() += 1;
                }
                g.last = Some(m);
            }
            other => tally.lock().unwrap().violation(format!("unexpected event type {other}: {m}")),
        }
    }
}

fn open_ids(gens: &HashMap<String, Gen>) -> Vec<String> {
    gens.iter().filter(|(_, g)| g.last.is_none()).map(|(i, _)| i.clone()).collect()
}

fn outcome(g: &Gen) -> String {
    match &g.last {
        Some(m) if m["type"] == "done" => format!("done:{}", m["finish_reason"].as_str().unwrap_or("?")),
        Some(m) => format!("error:{}", m["code"].as_str().unwrap_or("?")),
        None => "unfinished".into(),
    }
}

fn answer(g: &Gen) -> Answer {
    Answer { ids: g.ids.clone(), text: g.text.clone(), finish: outcome(g) }
}

async fn send(ws: &mut Ws, v: &Value) -> bool {
    ws.send(Message::text(v.to_string())).await.is_ok()
}

/// Connects, retrying while the daemon is at `max_connections` (a dropped connection is counted
/// until the server has noticed it).
async fn reconnect(d: &Daemon, tally: &Shared) -> Ws {
    for _ in 0..600 {
        match connect_with(d, Some(&d.token), None).await {
            Ok((ws, _)) => return ws,
            Err(_) => {
                tally.lock().unwrap().reconnects_refused += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot connect for 60 s");
}

/// A malformed or invalid message and the error code it must get.
fn malformed(i: u64, id: &str) -> (Message, &'static str) {
    match i % 13 {
        0 => (Message::text("{not json"), "invalid_message"),
        1 => (Message::binary(vec![0u8, 159, 146, 150]), "invalid_message"),
        2 => (Message::text(json!({"type": "teleport", "id": id}).to_string()), "invalid_message"),
        3 => (Message::text(json!({"id": id, "prompt": "x"}).to_string()), "invalid_message"),
        4 => (Message::text("[1, 2, 3]"), "invalid_message"),
        5 => (Message::text(json!({"type": "generate", "id": id, "prompt": "x", "max_tokens": "ten"}).to_string()), "invalid_request"),
        6 => (Message::text(json!({"type": "generate", "id": id, "prompt": "x", "colour": 1}).to_string()), "invalid_request"),
        7 => (Message::text(json!({"type": "generate", "id": id, "prompt": "x", "sampling": {"top_p": 7}}).to_string()), "invalid_request"),
        8 => (Message::text(json!({"type": "cancel", "id": id}).to_string()), "invalid_request"),
        9 => (Message::text(json!({"type": "generate", "id": id, "model": "nope", "prompt": "x"}).to_string()), "unknown_model"),
        10 => (
            Message::text(json!({"type": "generate", "id": id, "prompt": "x", "plugins": [{"name": "dry", "params": {"base": -1}}]}).to_string()),
            "plugin_error",
        ),
        11 => (
            Message::text(json!({"type": "generate", "id": id, "prompt": "x", "plugins": [{"name": "/tmp/libevil.so"}]}).to_string()),
            "invalid_request",
        ),
        _ => (Message::text(json!({"type": "generate", "id": id, "prompt": ""}).to_string()), "invalid_request"),
    }
}

struct Client {
    n: usize,
    d: Arc<Daemon>,
    ws: Ws,
    rng: Rng,
    cases: Arc<Vec<Case>>,
    answers: Arc<Vec<Answer>>,
    tally: Shared,
    seq: u64,
}

impl Client {
    fn id(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("c{}-{what}-{}", self.n, self.seq)
    }

    fn pick(&mut self) -> usize {
        self.rng.below(self.cases.len() as u64) as usize
    }

    async fn fresh_connection(&mut self) {
        self.ws = reconnect(&self.d, &self.tally).await;
    }

    /// Greedy requests (one, or several at once on this connection, optionally through
    /// `passthrough`) must stream exactly what they streamed alone.
    async fn greedy(&mut self, how_many: usize, passthrough: bool) {
        let mut gens = HashMap::new();
        let mut which = HashMap::new();
        for _ in 0..how_many {
            let c = self.pick();
            let id = self.id(if passthrough { "pass" } else { "greedy" });
            let mut req = self.cases[c].request(&id);
            if passthrough {
                req["plugins"] = json!([{"name": "passthrough"}]);
            }
            self.tally.lock().unwrap().generates += 1;
            if !send(&mut self.ws, &req).await {
                return self.fresh_connection().await;
            }
            gens.insert(id.clone(), Gen::default());
            which.insert(id, c);
        }
        if drive(&mut self.ws, &mut gens, &self.tally, |_, _| false).await.is_err() {
            return self.fresh_connection().await;
        }
        let mut t = self.tally.lock().unwrap();
        for (id, g) in &gens {
            let want = &self.answers[which[id]];
            if outcome(g) == "error:busy" {
                continue;
            }
            if answer(g) != *want {
                t.violation(format!(
                    "{id} ({:?}) differs from the same request alone:\n got {:?}\nwant {want:?}",
                    self.cases[which[id]],
                    answer(g)
                ));
            } else {
                t.greedy_checked += 1;
            }
        }
    }

    /// Starts a greedy request, cancels it after a few tokens: it ends with `done` (cancelled,
    /// or finished if it got there first) and what it streamed is a prefix of its answer alone.
    async fn cancel(&mut self) {
        let c = self.pick();
        let id = self.id("cancel");
        let after = 1 + self.rng.below(5) as usize;
        self.tally.lock().unwrap().generates += 1;
        if !send(&mut self.ws, &self.cases[c].request(&id)).await {
            return self.fresh_connection().await;
        }
        let mut gens = HashMap::from([(id.clone(), Gen::default())]);
        if drive(&mut self.ws, &mut gens, &self.tally, |_, n| n >= after).await.is_err() {
            return self.fresh_connection().await;
        }
        if gens[&id].last.is_none() {
            self.tally.lock().unwrap().cancels += 1;
            if !send(&mut self.ws, &json!({"type": "cancel", "id": id})).await {
                return self.fresh_connection().await;
            }
            if drive(&mut self.ws, &mut gens, &self.tally, |_, _| false).await.is_err() {
                return self.fresh_connection().await;
            }
        }
        let g = &gens[&id];
        let want = &self.answers[c];
        let mut t = self.tally.lock().unwrap();
        match outcome(g).as_str() {
            "done:cancelled" => {
                if !(want.ids.starts_with(&g.ids) && want.text.starts_with(&g.text)) {
                    t.violation(format!(
                        "{id}: cancelled output is not a prefix of the answer alone: {:?} vs {want:?}",
                        answer(g)
                    ));
                } else {
                    t.cancel_prefix_checked += 1;
                }
            }
            "error:busy" => {}
            _ if answer(g) == *want => t.greedy_checked += 1,
            other => t.violation(format!("{id}: cancel ended with {other}: {:?} vs {want:?}", answer(g))),
        }
    }

    /// Starts one or two requests and drops the connection after a few tokens (or none),
    /// sometimes with a close frame, sometimes without.
    async fn disconnect(&mut self) {
        let after = self.rng.below(4) as usize;
        let polite = self.rng.below(2) == 0;
        let mut gens = HashMap::new();
        for _ in 0..1 + self.rng.below(2) {
            let c = self.pick();
            let id = self.id("drop");
            self.tally.lock().unwrap().generates += 1;
            if !send(&mut self.ws, &self.cases[c].request(&id)).await {
                return self.fresh_connection().await;
            }
            gens.insert(id, Gen::default());
        }
        if after > 0 {
            let _ = drive(&mut self.ws, &mut gens, &self.tally, |_, n| n >= after).await;
        }
        self.tally.lock().unwrap().disconnects += 1;
        if polite {
            let _ = self.ws.close(None).await;
        }
        self.fresh_connection().await;
    }

    /// A malformed or invalid frame gets exactly its error, and the connection goes on.
    async fn malformed(&mut self) {
        let id = self.id("bad");
        let (msg, code) = malformed(self.rng.next(), &id);
        self.tally.lock().unwrap().malformed += 1;
        if self.ws.send(msg).await.is_err() {
            return self.fresh_connection().await;
        }
        match next_event(&mut self.ws, EVENT_TIMEOUT).await {
            Ev::Msg(m) => {
                let mut t = self.tally.lock().unwrap();
                if m["type"] != "error" || m["code"] != code {
                    t.violation(format!("malformed frame answered {m}, expected {code}"));
                } else {
                    *t.errors.entry(code.to_string()).or_default() += 1;
                }
            }
            _ => {
                self.tally.lock().unwrap().violation(format!("no answer to a malformed frame ({code})"));
                self.fresh_connection().await;
            }
        }
    }

    /// An oversize frame: `frame_too_large`, then the server closes the connection.
    async fn oversize(&mut self) {
        self.tally.lock().unwrap().malformed += 1;
        let big = json!({"type": "generate", "id": "big", "prompt": "x".repeat((1 << 20) + 10)}).to_string();
        if self.ws.send(Message::text(big)).await.is_ok() {
            match next_event(&mut self.ws, EVENT_TIMEOUT).await {
                Ev::Msg(m) if m["code"] == "frame_too_large" => {
                    *self.tally.lock().unwrap().errors.entry("frame_too_large".into()).or_default() += 1;
                }
                Ev::Msg(m) => self.tally.lock().unwrap().violation(format!("oversize frame answered {m}")),
                _ => {}
            }
        }
        self.fresh_connection().await;
    }

    /// Plugins that sample (DRY with a temperature and seed) or fail on purpose (`faulty`).
    async fn plugins(&mut self) {
        let c = self.pick();
        let id = self.id("plugin");
        let mut req = self.cases[c].request(&id);
        let fail = self.rng.below(3) == 0;
        if fail {
            let how = ["error", "panic", "shape"][self.rng.below(3) as usize];
            req["plugins"] =
                json!([{"name": "faulty", "params": {"fail": "apply", "how": how, "after": self.rng.below(4)}}]);
        } else if self.rng.below(4) == 0 {
            // Sampling without a plugin.
            req["sampling"] = json!({"temperature": 0.8, "top_p": 0.9, "seed": self.rng.below(1000)});
        } else {
            req["plugins"] = json!([{"name": "dry", "params": {"multiplier": 0.8}}]);
            req["sampling"] = json!({"temperature": 0.7, "seed": self.rng.below(1000)});
        }
        self.tally.lock().unwrap().generates += 1;
        if !send(&mut self.ws, &req).await {
            return self.fresh_connection().await;
        }
        let mut gens = HashMap::from([(id.clone(), Gen::default())]);
        if drive(&mut self.ws, &mut gens, &self.tally, |_, _| false).await.is_err() {
            return self.fresh_connection().await;
        }
        let o = outcome(&gens[&id]);
        let fine = match (fail, o.as_str()) {
            (_, "error:busy") => true,
            // Ended before the failing call came (end of sequence), or failed as asked.
            (true, "done:stop" | "done:length" | "error:plugin_error") => true,
            (false, "done:stop" | "done:length") => true,
            _ => false,
        };
        if !fine {
            self.tally
                .lock()
                .unwrap()
                .violation(format!("{id} with plugins {} ended {o}: {:?}", req["plugins"], gens[&id].last));
        }
    }

    /// Tokenize, status or models: one `result` each.
    async fn misc(&mut self) {
        let id = self.id("misc");
        let req = match self.rng.below(3) {
            0 => {
                json!({"type": "tokenize", "id": id, "model": (["smol", "tiny"][self.rng.below(2) as usize]), "text": "Hello, soak"})
            }
            1 => json!({"type": "status", "id": id}),
            _ => json!({"type": "models", "id": id}),
        };
        self.tally.lock().unwrap().other_messages += 1;
        if !send(&mut self.ws, &req).await {
            return self.fresh_connection().await;
        }
        match next_event(&mut self.ws, EVENT_TIMEOUT).await {
            Ev::Msg(m) if m["type"] == "result" && m["id"] == id.as_str() => {}
            Ev::Msg(m) => self.tally.lock().unwrap().violation(format!("{req} answered {m}")),
            _ => {
                self.tally.lock().unwrap().violation(format!("{req} got no answer"));
                self.fresh_connection().await;
            }
        }
    }

    async fn run(mut self, until: Instant, only: Vec<String>) {
        const ACTIONS: [(&str, u64); 9] = [
            ("greedy", 30),
            ("multi", 42),
            ("pass", 50),
            ("cancel", 62),
            ("disconnect", 69),
            ("malformed", 81),
            ("oversize", 82),
            ("plugins", 93),
            ("misc", 100),
        ];
        while Instant::now() < until {
            let mut roll = self.rng.below(100);
            if !only.is_empty() {
                // Only the named actions, equally often.
                let name = &only[roll as usize % only.len()];
                let i = ACTIONS
                    .iter()
                    .position(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("MLXD_SOAK_ONLY: no action {name}"));
                roll = if i == 0 { 0 } else { ACTIONS[i - 1].1 };
            }
            match roll {
                0..=29 => self.greedy(1, false).await,
                30..=41 => {
                    let n = 2 + self.rng.below(2) as usize;
                    self.greedy(n, false).await
                }
                42..=49 => self.greedy(1, true).await,
                50..=61 => self.cancel().await,
                62..=68 => self.disconnect().await,
                69..=80 => self.malformed().await,
                81 => self.oversize().await,
                82..=92 => self.plugins().await,
                _ => self.misc().await,
            }
        }
    }
}

/// Runs `clients` clients for `secs` from fresh connections; returns the panics of client tasks.
#[allow(clippy::too_many_arguments)]
async fn load(
    d: &Arc<Daemon>,
    clients: usize,
    secs: Duration,
    seed: u64,
    only: &[String],
    cases: &Arc<Vec<Case>>,
    answers: &Arc<Vec<Answer>>,
    tally: &Shared,
) -> Vec<String> {
    let until = Instant::now() + secs;
    let mut handles = Vec::new();
    for n in 0..clients {
        let ws = reconnect(d, tally).await;
        let client = Client {
            n,
            d: d.clone(),
            ws,
            rng: Rng((seed << 32) ^ (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            cases: cases.clone(),
            answers: answers.clone(),
            tally: tally.clone(),
            seq: 0,
        };
        handles.push(tokio::spawn(client.run(until, only.to_vec())));
    }
    let mut panics = Vec::new();
    for h in handles {
        if let Err(e) = h.await {
            panics.push(e.to_string());
        }
    }
    panics
}

async fn status(ws: &mut Ws) -> Value {
    send(ws, &json!({"type": "status", "id": "soak-status"})).await;
    loop {
        match next_event(ws, EVENT_TIMEOUT).await {
            Ev::Msg(m) if m["id"] == "soak-status" => return m["data"].clone(),
            Ev::Msg(_) => continue,
            _ => panic!("the daemon stopped answering status"),
        }
    }
}

/// Memory as the daemon and the kernel report it.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    active: u64,
    cache: u64,
    kv: u64,
}

async fn memory(d: &Daemon, ws: &mut Ws) -> Mem {
    let s = status(ws).await;
    let kv = s["resident_models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kv_cache_bytes"].as_u64().unwrap_or(0) + m["prompt_cache_bytes"].as_u64().unwrap_or(0))
        .sum();
    Mem {
        rss: rss_bytes(d.child.id()),
        active: s["memory"]["active_bytes"].as_u64().unwrap_or(0),
        cache: s["memory"]["cache_bytes"].as_u64().unwrap_or(0),
        kv,
    }
}

/// Waits until no model runs or queues anything.
async fn idle(ws: &mut Ws) -> bool {
    for _ in 0..600 {
        let s = status(ws).await;
        if s["resident_models"].as_array().unwrap().iter().all(|m| m["running"] == 0 && m["queued"] == 0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs = env_or("MLXD_SOAK_SECS", 25);
    let clients = env_or("MLXD_SOAK_CLIENTS", 16) as usize;
    let seed = env_or("MLXD_SOAK_SEED", 1);
    let only: Vec<String> = std::env::var("MLXD_SOAK_ONLY")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();

    let plugins = tempfile::tempdir().unwrap();
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    for p in ["passthrough", "dry", "faulty"] {
        let name = lib_name(&format!("mlxd_plugin_{p}"));
        std::fs::copy(deps.join(&name), plugins.path().join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let tiny = tempfile::tempdir().unwrap();
    common::tiny::write_tiny_model(tiny.path());
    // The prompt cache is bounded (64 MiB per model) so that memory after the load is comparable
    // with the baseline; the queue is deep enough that `busy` stays rare.
    let d = Arc::new(start(&format!(
        "max_connections = {}\n[limits]\nmax_queue = 512\n[engine]\nprompt_cache_mb = 64\n[plugins]\ndirs = [{:?}]\n\
         [models.smol]\npath = \"default\"\npreload = true\nkeep_alive_s = 0\n\
         [models.tiny]\npath = {:?}\npreload = true\nkeep_alive_s = 0\n",
        clients + 32,
        plugins.path().display().to_string(),
        tiny.path().display().to_string()
    )));
    let tally: Shared = Arc::default();
    let mut monitor = reconnect(&d, &tally).await;

    // Every case alone, one at a time; in runs of two minutes or more twice (the second run
    // goes through the prompt cache and must not differ either).
    let cases = Arc::new(cases());
    let mut answers = Vec::new();
    let started = Instant::now();
    for (i, c) in cases.iter().enumerate() {
        let mut runs = Vec::new();
        for r in 0..if secs >= 120 { 2 } else { 1 } {
            let id = format!("ref{i}-{r}");
            send(&mut monitor, &c.request(&id)).await;
            let mut gens = HashMap::from([(id.clone(), Gen::default())]);
            drive(&mut monitor, &mut gens, &tally, |_, _| false).await.expect("reference run");
            runs.push(answer(&gens[&id]));
        }
        assert!(runs[0].finish.starts_with("done:"), "{c:?}: {:?}", runs[0]);
        if runs.len() == 2 {
            assert_eq!(runs[0], runs[1], "{c:?}: a repeat differs");
        }
        answers.push(runs.remove(0));
    }
    let answers = Arc::new(answers);
    // Each way a plugin fails, once, before any memory is measured: the first plugin panic costs
    // memory once (with RUST_BACKTRACE set, the plugin's own std parses and keeps the debug info
    // of every loaded object to print the backtrace; ~250 MiB for a debug build of the engine).
    // That is a bounded one-time cost, not growth under load, so it belongs in the baseline.
    for how in ["error", "panic", "shape"] {
        let id = format!("ref-faulty-{how}");
        let mut req = cases[0].request(&id);
        req["plugins"] = json!([{"name": "faulty", "params": {"fail": "apply", "how": how, "after": 0}}]);
        send(&mut monitor, &req).await;
        let mut gens = HashMap::from([(id.clone(), Gen::default())]);
        drive(&mut monitor, &mut gens, &tally, |_, _| false).await.expect("faulty reference run");
        assert_eq!(outcome(&gens[&id]), "error:plugin_error", "faulty plugin failing by {how}");
    }
    assert!(idle(&mut monitor).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cold = memory(&d, &mut monitor).await;
    eprintln!("soak: references in {:.1} s; memory after them {cold:?}", started.elapsed().as_secs_f64());

    // A warm-up of the same mix (a fifth of the time, at most a minute): the allocator's pools,
    // the compiled sampling graphs of every batch size and the prompt cache fill up. The
    // baseline is taken after it, once the daemon is idle; then the load proper.
    let rss_peak = Arc::new(std::sync::atomic::AtomicU64::new(cold.rss));
    let sampler = {
        let (peak, pid) = (rss_peak.clone(), d.child.id());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let warmup = (secs / 5).min(60);
    let mut panics =
        load(&d, clients, Duration::from_secs(warmup), seed ^ 0xABCD, &only, &cases, &answers, &tally).await;
    let mut warm_tally = std::mem::take(&mut *tally.lock().unwrap());
    assert!(idle(&mut monitor).await, "the warm-up drained");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = memory(&d, &mut monitor).await;
    eprintln!(
        "soak: warm-up {warmup} s ({} generations, {} violations); baseline {before:?}",
        warm_tally.generates,
        warm_tally.violations.len()
    );
    let load_started = Instant::now();
    panics.extend(load(&d, clients, Duration::from_secs(secs - warmup), seed, &only, &cases, &answers, &tally).await);
    let load_secs = load_started.elapsed().as_secs_f64();
    sampler.abort();
    {
        // The warm-up's findings count too.
        let mut t = tally.lock().unwrap();
        for v in std::mem::take(&mut warm_tally.violations) {
            t.violation(format!("(warm-up) {v}"));
        }
    }

    // After the load: still up, nothing left running, memory back near the baseline.
    let mut d = Arc::try_unwrap(d).unwrap_or_else(|_| panic!("clients hold the daemon"));
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon is still running");
    let mut monitor = reconnect(&d, &tally).await;
    let drained = idle(&mut monitor).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = memory(&d, &mut monitor).await;
    let peak = rss_peak.load(std::sync::atomic::Ordering::Relaxed).max(after.rss);
    let hwm = proc_status_bytes(d.child.id(), "VmHWM");
    let s = status(&mut monitor).await;
    let t = std::mem::take(&mut *tally.lock().unwrap());

    // MEMORY TOLERANCE. The baseline is taken idle after the warm-up, 7 s after the last request
    // ended, so that the daemon's idle heap trim (every 5 s) has run, as it has for `after`.
    // MLX's active memory is exact: after the load it may exceed the baseline only by the growth
    // of the KV state the models report holding (running sequences and prompt-cache entries, at
    // most 64 MiB per model here) plus 8 MiB. RSS also holds MLX's buffer cache (reported as
    // cache_bytes, emptied every 256 steps) and what the C allocator still keeps after the trim:
    // it may exceed the baseline by the growth of cache_bytes and of the KV state, plus 64 MiB
    // + 5%. A leak of one token's KV per request, or of one request's events, exceeds that in
    // minutes.
    let kv_growth = after.kv.saturating_sub(before.kv);
    let active_limit = before.active + kv_growth + (8 << 20);
    let rss_limit = before.rss + after.cache.saturating_sub(before.cache) + kv_growth + (64 << 20) + before.rss / 20;

    let requests = t.generates + t.malformed + t.other_messages;
    let summary = json!({
        "clients": clients,
        "seconds": secs,
        "warmup_seconds": warmup,
        "warmup_generates": warm_tally.generates,
        "load_seconds": (load_secs * 10.0).round() / 10.0,
        "seed": seed,
        "requests": requests,
        "generates": t.generates,
        "done": t.done,
        "errors_by_code": t.errors,
        "tokens_streamed": t.tokens,
        "greedy_outputs_checked_equal": t.greedy_checked,
        "cancels_sent": t.cancels,
        "cancelled_prefixes_checked": t.cancel_prefix_checked,
        "disconnects": t.disconnects,
        "malformed_frames": t.malformed,
        "other_messages": t.other_messages,
        "connects_refused_and_retried": t.reconnects_refused,
        "violations": t.violations.len(),
        "client_panics": panics.len(),
        "drained": drained,
        "daemon_requests_total": s["requests_total"],
        "daemon_errors_total": s["errors_total"],
        "models": s["resident_models"],
        "memory_mib": {
            "rss_cold": mib(cold.rss), "mlx_active_cold": mib(cold.active),
            "rss_before": mib(before.rss), "rss_after": mib(after.rss), "rss_peak": mib(peak), "rss_hwm": mib(hwm),
            "rss_limit": mib(rss_limit),
            "mlx_active_before": mib(before.active), "mlx_active_after": mib(after.active), "mlx_active_limit": mib(active_limit),
            "mlx_cache_before": mib(before.cache), "mlx_cache_after": mib(after.cache),
            "kv_before": mib(before.kv), "kv_after": mib(after.kv),
        },
    });
    eprintln!("soak summary: {}", serde_json::to_string_pretty(&summary).unwrap());
    if let Ok(path) = std::env::var("MLXD_SOAK_REPORT") {
        std::fs::write(path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
    assert!(panics.is_empty(), "client tasks panicked: {panics:?}");
    assert!(
        t.violations.is_empty(),
        "{} violations, first: {:#?}",
        t.violations.len(),
        &t.violations[..t.violations.len().min(10)]
    );
    assert!(drained, "requests were still running or queued after the load");
    assert!(
        t.greedy_checked > 0
            && t.done.get("cancelled").copied().unwrap_or(0) > 0
            && t.disconnects > 0
            && t.malformed > 0,
        "{summary}"
    );
    assert!(
        after.active <= active_limit,
        "MLX active memory {} MiB after the load, limit {} MiB",
        mib(after.active),
        mib(active_limit)
    );
    assert!(after.rss <= rss_limit, "RSS {} MiB after the load, limit {} MiB", mib(after.rss), mib(rss_limit));
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon is still running");
}
