//! `mlxd-bench serve`: N concurrent clients against the real daemon over WebSocket, and against
//! `mlx_lm.server` over HTTP (OpenAI completions, streamed) on the same model, prompt and token
//! counts. Reports aggregate and per-client tok/s and time to first token p50 / p99, and, for
//! mlxd, the decode speed a client observes next to the one the engine reports.

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// One client's measurements.
#[derive(Debug, Clone, Copy)]
struct ClientRun {
    ttft: f64,
    tokens: usize,
    /// From the first token to the last, as the client saw them.
    decode_s: f64,
    /// Decode tok/s the engine reported in `done` (mlxd only).
    engine_tps: f64,
    end: f64,
}

/// Options of the load test.
pub struct LoadArgs<'a> {
    /// The model directory both servers load.
    pub dir: &'a Path,
    /// Concurrency levels.
    pub clients: Vec<usize>,
    /// Prompt length in tokens (word-level tokenizer of the random models: one word, one token).
    pub prompt: usize,
    /// Tokens per request.
    pub gen: usize,
    /// Also run mlx_lm.server.
    pub mlx_lm: bool,
    /// Python for mlx_lm.server.
    pub python: String,
}

fn prompt_text(n: usize, seed: usize) -> String {
    (0..n).map(|i| format!("t{}", (i * 7919 + seed * 104_729) % 30_000 + 10)).collect::<Vec<_>>().join(" ")
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The daemon the load test starts: `mlxd` beside this executable, with the `mlxd-engine` it
/// runs models in. Checked before anything is measured, so a suite copied somewhere without
/// them fails at once instead of after its single-stream rows.
pub fn daemon_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the directory of mlxd-bench")?;
    for name in ["mlxd", "mlxd-engine"] {
        let path = dir.join(name);
        if !path.is_file() {
            bail!(
                "the WebSocket load test needs {} beside mlxd-bench (cargo build --release -p mlxd builds \
                 mlxd, mlxd-engine and mlxd-bench together; or pass --serve-model none)",
                path.display()
            );
        }
    }
    Ok(dir.join("mlxd"))
}

fn start_mlxd(dir: &Path) -> Result<(Server, String)> {
    let bin = daemon_binary()?;
    let tmp = std::env::temp_dir().join(format!("mlxd-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let config = tmp.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = false\nstate_dir = {:?}\nmax_connections = 256\n\
             [limits]\nmax_batch = 16\nmax_queue = 256\n[engine]\nprompt_cache_mb = 0\n\
             [models.bench]\npath = {:?}\npreload = true\n",
            tmp.join("state").display().to_string(),
            dir.display().to_string()
        ),
    )?;
    let mut child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config)
        // Warnings unless the bench's own MLXD_LOG asks for more (e.g. `warn,mlxd::engine=trace`:
        // every decode step's rows and times).
        .env("MLXD_LOG", std::env::var("MLXD_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().context("stdout")?), &mut line)?;
    let addr =
        line.trim().strip_prefix("mlxd listening on ws://").context("daemon did not report its address")?.to_string();
    Ok((Server(child), addr))
}

async fn mlxd_client(addr: String, prompt: String, gen: usize, t0: Instant) -> Result<ClientRun> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await?;
    ws.next().await.context("hello")??;
    ws.send(Message::text(
        json!({"type": "generate", "id": "r", "model": "bench", "prompt": prompt, "max_tokens": gen}).to_string(),
    ))
    .await?;
    let sent = Instant::now();
    let (mut first, mut last, mut tokens) = (None, sent, 0);
    loop {
        let Some(m) = ws.next().await else { bail!("connection closed") };
        let Message::Text(t) = m? else { continue };
        let v: Value = serde_json::from_str(t.as_str())?;
        match v["type"].as_str() {
            Some("token") => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += v["tokens"].as_array().map_or(0, Vec::len);
            }
            Some("done") => {
                let first = first.unwrap_or(last);
                return Ok(ClientRun {
                    ttft: (first - sent).as_secs_f64(),
                    tokens,
                    decode_s: (last - first).as_secs_f64(),
                    engine_tps: v["timings"]["tokens_per_second"].as_f64().unwrap_or(0.0),
                    end: t0.elapsed().as_secs_f64(),
                });
            }
            Some("error") => bail!("mlxd error: {v}"),
            _ => {}
        }
    }
}

async fn mlx_lm_client(port: u16, prompt: String, gen: usize, t0: Instant) -> Result<ClientRun> {
    let body = json!({"prompt": prompt, "max_tokens": gen, "stream": true, "temperature": 0.0}).to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
            .as_bytes(),
    )
    .await?;
    let sent = Instant::now();
    let mut lines = BufReader::new(s).lines();
    let (mut first, mut last, mut chunks) = (None, sent, 0);
    while let Some(line) = lines.next_line().await? {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data.trim() == "[DONE]" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
        if v["choices"][0]["text"].as_str().is_some() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            chunks += 1;
        }
    }
    let first = first.context("mlx_lm.server streamed nothing")?;
    // The random-weight model has no end-of-sequence token: every request runs to max_tokens.
    let _ = chunks;
    Ok(ClientRun {
        ttft: (first - sent).as_secs_f64(),
        tokens: gen,
        decode_s: (last - first).as_secs_f64(),
        engine_tps: 0.0,
        end: t0.elapsed().as_secs_f64(),
    })
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn summarize(runs: &[ClientRun], wall: f64) -> Value {
    let total: usize = runs.iter().map(|r| r.tokens).sum();
    let mut ttft: Vec<f64> = runs.iter().map(|r| r.ttft * 1e3).collect();
    let per_client: Vec<f64> =
        runs.iter().map(|r| (r.tokens.saturating_sub(1)) as f64 / r.decode_s.max(1e-9)).collect();
    let engine: Vec<f64> = runs.iter().map(|r| r.engine_tps).collect();
    json!({
        "aggregate_tps": total as f64 / wall,
        "per_client_tps_mean": per_client.iter().sum::<f64>() / per_client.len() as f64,
        "engine_tps_mean": engine.iter().sum::<f64>() / engine.len() as f64,
        "ttft_p50_ms": percentile(&mut ttft.clone(), 0.5),
        "ttft_p99_ms": percentile(&mut ttft, 0.99),
        "wall_s": wall,
    })
}

/// The model's step counters from the daemon's `status`, summed since the model loaded (see
/// [`COUNTERS`]).
async fn step_counters(addr: &str) -> Result<[f64; COUNTERS.len()]> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await?;
    ws.next().await.context("hello")??;
    ws.send(Message::text(json!({"type": "status", "id": "s"}).to_string())).await?;
    loop {
        let Some(m) = ws.next().await else { bail!("connection closed") };
        let Message::Text(t) = m? else { continue };
        let v: Value = serde_json::from_str(t.as_str())?;
        if v["id"] == "s" {
            let m = &v["data"]["resident_models"][0];
            return Ok(COUNTERS.map(|(k, _)| m[k].as_f64().unwrap_or(0.0)));
        }
    }
}

/// CPU seconds a process has used (user + system; `/proc`, so Linux only), for the cores the
/// server and the benchmark's own clients keep busy at each level: a host whose daemon steps
/// grow with the client count while the engine alone does not shows it there first.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command name (which may hold spaces): state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hz > 0.0).then(|| ticks / hz)
}

/// Cores busy in `server` and in this process over a measured level.
struct CpuMeter {
    server: String,
    started: Instant,
    server_s: Option<f64>,
    self_s: Option<f64>,
}

impl CpuMeter {
    fn start(server_pid: u32) -> Self {
        let server = server_pid.to_string();
        CpuMeter { server_s: cpu_seconds(&server), self_s: cpu_seconds("self"), started: Instant::now(), server }
    }

    fn stop(&self) -> Value {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let cores = |before: Option<f64>, now: Option<f64>| before.zip(now).map(|(b, n)| (n - b) / wall);
        json!({
            "server_cpu_cores": cores(self.server_s, cpu_seconds(&self.server)),
            "client_cpu_cores": cores(self.self_s, cpu_seconds("self")),
        })
    }
}

/// The `status` counters a level is measured by (the first is the step count), and the name of
/// each one's per-step figure (milliseconds for times, a count per step otherwise).
const COUNTERS: [(&str, &str); 11] = [
    ("decode_steps", "steps"),
    ("host_build_us_total", "host_build_ms_per_step"),
    ("host_build_cpu_us_total", "host_build_cpu_ms_per_step"),
    ("device_wait_us_total", "device_wait_ms_per_step"),
    ("model_graph_us_total", "model_graph_ms_per_step"),
    ("sampler_graph_us_total", "sampler_graph_ms_per_step"),
    ("batch_restacks_total", "restacks"),
    ("batch_regathers_total", "regathers"),
    ("prefill_passes_total", "prefill_passes"),
    ("token_joins_total", "token_joins"),
    ("requests", "requests"),
];

/// What one level's decode steps cost inside the daemon, per step: to compare with
/// `mlxd-bench engine`'s split of the same model (a gap between the two is the daemon's own).
/// Counts (steps, restacks, regathers, shared prefill passes, token joins, requests) are the
/// level's totals.
fn step_split(before: [f64; COUNTERS.len()], after: [f64; COUNTERS.len()]) -> Value {
    let steps = (after[0] - before[0]).max(1.0);
    let mut out = serde_json::Map::new();
    for (i, (counter, name)) in COUNTERS.iter().enumerate() {
        let delta = after[i] - before[i];
        let per_step = if counter.ends_with("_us_total") { delta / steps / 1e3 } else { delta };
        out.insert(name.to_string(), json!(per_step));
    }
    Value::Object(out)
}

async fn level<F, Fut>(n: usize, prompt: usize, gen: usize, client: F) -> Result<Value>
where
    F: Fn(String, usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Result<ClientRun>> + Send + 'static,
{
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(client(prompt_text(prompt, i), gen, t0))).collect();
    let mut runs = Vec::new();
    for h in handles {
        runs.push(h.await??);
    }
    let wall = runs.iter().map(|r| r.end).fold(0.0, f64::max);
    Ok(summarize(&runs, wall))
}

/// Runs the load test and prints a table; returns the JSON summary.
pub fn run(a: LoadArgs) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (server, addr) = start_mlxd(a.dir)?;
    let mut ours = serde_json::Map::new();
    rt.block_on(async {
        // Warm-up: loads the model and compiles the kernels of every batch size and cache size
        // the measured levels will meet (the full token count, so caches grow as they will).
        for &n in &a.clients {
            let addr = addr.clone();
            level(n, a.prompt, a.gen, move |p, g, t| mlxd_client(addr.clone(), p, g, t)).await?;
        }
        for &n in &a.clients {
            let before = step_counters(&addr).await?;
            let level_addr = addr.clone();
            let cpu = CpuMeter::start(server.0.id());
            let mut s = level(n, a.prompt, a.gen, move |p, g, t| mlxd_client(level_addr.clone(), p, g, t)).await?;
            s["cpu"] = cpu.stop();
            s["daemon_steps"] = step_split(before, step_counters(&addr).await?);
            eprintln!("mlxd {n} clients: {s}");
            ours.insert(n.to_string(), s);
        }
        anyhow::Ok(())
    })?;
    drop(server);
    let mut theirs = serde_json::Map::new();
    if a.mlx_lm {
        let port = free_port()?;
        let child = Command::new(&a.python)
            .args(["-m", "mlx_lm.server", "--model"])
            .arg(a.dir)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mlx_lm.server")?;
        let server = Server(child);
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(120);
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                if Instant::now() > deadline {
                    bail!("mlx_lm.server did not start");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            for &n in &a.clients {
                level(n, a.prompt, a.gen, move |p, g, t| mlx_lm_client(port, p, g, t)).await?;
            }
            for &n in &a.clients {
                let cpu = CpuMeter::start(server.0.id());
                let mut s = level(n, a.prompt, a.gen, move |p, g, t| mlx_lm_client(port, p, g, t)).await?;
                s["cpu"] = cpu.stop();
                eprintln!("mlx_lm.server {n} clients: {s}");
                theirs.insert(n.to_string(), s);
            }
            anyhow::Ok(())
        })?;
    }
    println!("\n| clients | mlxd agg tok/s | per client | TTFT p50 / p99 ms | client/engine decode | mlx_lm.server agg tok/s | per client | TTFT p50 / p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    for n in &a.clients {
        let o = &ours[&n.to_string()];
        let t = theirs.get(&n.to_string()).cloned().unwrap_or(Value::Null);
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} / {:.1} | {:.3} | {:.1} | {:.1} | {:.1} / {:.1} |",
            f(o, "aggregate_tps"),
            f(o, "per_client_tps_mean"),
            f(o, "ttft_p50_ms"),
            f(o, "ttft_p99_ms"),
            f(o, "per_client_tps_mean") / f(o, "engine_tps_mean"),
            f(&t, "aggregate_tps"),
            f(&t, "per_client_tps_mean"),
            f(&t, "ttft_p50_ms"),
            f(&t, "ttft_p99_ms"),
        );
    }
    let cores = |v: &Value, k: &str| v["cpu"][k].as_f64().map_or("-".to_string(), |c| format!("{c:.2}"));
    println!("\n| clients | mlxd process, cores busy | its clients | mlx_lm.server process | its clients |");
    println!("| --- | --- | --- | --- | --- |");
    for n in &a.clients {
        let o = &ours[&n.to_string()];
        let t = theirs.get(&n.to_string()).cloned().unwrap_or(Value::Null);
        println!(
            "| {n} | {} | {} | {} | {} |",
            cores(o, "server_cpu_cores"),
            cores(o, "client_cpu_cores"),
            cores(&t, "server_cpu_cores"),
            cores(&t, "client_cpu_cores")
        );
    }
    if let (Some(one), Some(eight)) = (ours.get("1"), ours.get("8")) {
        println!(
            "\nmlxd: 8 clients reach {:.2}x the single-client aggregate",
            f(eight, "aggregate_tps") / f(one, "aggregate_tps")
        );
    }
    Ok(json!({"mlxd": ours, "mlx_lm_server": theirs, "prompt_tokens": a.prompt, "gen_tokens": a.gen}))
}
