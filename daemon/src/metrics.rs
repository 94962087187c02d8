//! Server-wide counters, rendered for the `status` message and as Prometheus text on
//! `GET /metrics` of the same port.

use crate::registry::Registry;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters kept by the server (the model threads keep their own, read through the registry).
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Open WebSocket connections.
    pub connections: AtomicU64,
    /// Connections accepted in total.
    pub connections_total: AtomicU64,
    /// Connections refused at `max_connections`.
    pub refused_connections: AtomicU64,
    /// Handshakes refused (token or origin).
    pub refused_handshakes: AtomicU64,
    /// Requests received (all types).
    pub requests_total: AtomicU64,
    /// Error events sent.
    pub errors_total: AtomicU64,
    /// Generations answered `busy`.
    pub busy_total: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            refused_handshakes: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            busy_total: AtomicU64::new(0),
        }
    }
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    /// The `status` payload.
    pub fn status(&self, registry: &Registry) -> Value {
        let models: Vec<Value> = registry
            .resident()
            .into_iter()
            .map(|(name, h)| {
                let s = &h.stats;
                let steps = s.steps.load(Ordering::Relaxed);
                let requests = s.requests.load(Ordering::Relaxed);
                let p = *s.step_profile.lock().unwrap_or_else(|e| e.into_inner());
                let us = |d: std::time::Duration| d.as_micros() as u64;
                json!({
                    "name": name,
                    "running": s.running.load(Ordering::Relaxed),
                    "queued": s.queued.load(Ordering::Relaxed),
                    "requests": requests,
                    "tokens": s.tokens.load(Ordering::Relaxed),
                    "decode_steps": steps,
                    "mean_batch": if steps > 0 { s.batch_rows.load(Ordering::Relaxed) as f64 / steps as f64 } else { 0.0 },
                    "mean_ttft_ms": if requests > 0 { s.ttft_us.load(Ordering::Relaxed) as f64 / requests as f64 / 1e3 } else { 0.0 },
                    "kv_cache_bytes": s.kv_bytes.load(Ordering::Relaxed),
                    "prompt_cache_bytes": s.prompt_cache_bytes.load(Ordering::Relaxed),
                    "memory_plan_bytes": s.kv_reserved.load(Ordering::Relaxed),
                    "host_build_us_total": us(p.build),
                    "host_build_cpu_us_total": us(p.build_cpu),
                    "device_wait_us_total": us(p.wait),
                    "model_graph_us_total": us(p.graph),
                    "sampler_graph_us_total": us(p.sampler),
                    "batch_restacks_total": p.restacks,
                    "batch_regathers_total": p.regathers,
                    "prefill_passes_total": p.prefill_passes,
                    "token_joins_total": p.token_joins,
                    "memory_share_bytes": match s.kv_limit.load(Ordering::Relaxed) {
                        u64::MAX => Value::Null,
                        limit => json!(limit),
                    },
                    "slow_client_cancels": s.slow_client_cancels.load(Ordering::Relaxed),
                })
            })
            .collect();
        json!({
            "server": format!("mlxd {}", env!("CARGO_PKG_VERSION")),
            "uptime_s": self.started.elapsed().as_secs(),
            "connections": get(&self.connections),
            "requests_total": get(&self.requests_total),
            "errors_total": get(&self.errors_total),
            "busy_total": get(&self.busy_total),
            "memory": {
                "active_bytes": mlx_rs::memory::active_memory().unwrap_or(0),
                "peak_bytes": mlx_rs::memory::peak_memory().unwrap_or(0),
                "cache_bytes": mlx_rs::memory::cache_memory().unwrap_or(0),
                "budget_bytes": registry.budget(),
            },
            "resident_models": models,
            "stalled_models": registry.stalled_models(),
        })
    }

    /// Prometheus text exposition.
    pub fn render(&self, registry: &Registry) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(s, "# HELP mlxd_{name} {help}\n# TYPE mlxd_{name} {kind}\nmlxd_{name} {v}");
        };
        counter("uptime_seconds", "Seconds since start.", "gauge", self.started.elapsed().as_secs());
        counter("connections", "Open WebSocket connections.", "gauge", get(&self.connections));
        counter("connections_total", "Connections accepted.", "counter", get(&self.connections_total));
        counter(
            "refused_connections_total",
            "Connections refused at max_connections.",
            "counter",
            get(&self.refused_connections),
        );
        counter(
            "refused_handshakes_total",
            "Handshakes refused for a token or origin.",
            "counter",
            get(&self.refused_handshakes),
        );
        counter("requests_total", "Requests received.", "counter", get(&self.requests_total));
        counter("errors_total", "Error events sent.", "counter", get(&self.errors_total));
        counter("busy_total", "Requests refused with busy.", "counter", get(&self.busy_total));
        counter(
            "memory_active_bytes",
            "Device memory held by MLX arrays.",
            "gauge",
            mlx_rs::memory::active_memory().unwrap_or(0) as u64,
        );
        counter("memory_peak_bytes", "Peak device memory.", "gauge", mlx_rs::memory::peak_memory().unwrap_or(0) as u64);
        let per_model = [
            ("model_running", "Sequences generating.", "gauge"),
            ("model_queued", "Requests waiting for a batch slot.", "gauge"),
            ("model_requests_total", "Requests finished.", "counter"),
            ("model_tokens_total", "Tokens generated.", "counter"),
            ("model_decode_steps_total", "Decode steps.", "counter"),
            ("model_batch_rows_total", "Sum of batch sizes over decode steps.", "counter"),
            ("model_ttft_seconds_sum", "Sum of time to first token.", "counter"),
            ("model_kv_cache_bytes", "KV cache of running sequences.", "gauge"),
            ("model_prompt_cache_bytes", "KV state and logits kept for prompt reuse.", "gauge"),
            ("model_memory_plan_bytes", "Most the running requests' KV state and working memory can reach.", "gauge"),
        ];
        let resident = registry.resident();
        for (name, help, kind) in per_model {
            let _ = writeln!(s, "# HELP mlxd_{name} {help}\n# TYPE mlxd_{name} {kind}");
            for (model, h) in &resident {
                let st = &h.stats;
                let v = match name {
                    "model_running" => st.running.load(Ordering::Relaxed) as f64,
                    "model_queued" => st.queued.load(Ordering::Relaxed) as f64,
                    "model_requests_total" => st.requests.load(Ordering::Relaxed) as f64,
                    "model_tokens_total" => st.tokens.load(Ordering::Relaxed) as f64,
                    "model_decode_steps_total" => st.steps.load(Ordering::Relaxed) as f64,
                    "model_batch_rows_total" => st.batch_rows.load(Ordering::Relaxed) as f64,
                    "model_ttft_seconds_sum" => st.ttft_us.load(Ordering::Relaxed) as f64 / 1e6,
                    "model_prompt_cache_bytes" => st.prompt_cache_bytes.load(Ordering::Relaxed) as f64,
                    "model_memory_plan_bytes" => st.kv_reserved.load(Ordering::Relaxed) as f64,
                    _ => st.kv_bytes.load(Ordering::Relaxed) as f64,
                };
                let _ = writeln!(s, "mlxd_{name}{{model=\"{model}\"}} {v}");
            }
        }
        s
    }
}
