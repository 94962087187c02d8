//! `mlxd-bench suite`: every comparison of the benchmark report in one run, on this machine.
//!
//! For each model (random-weight public shapes in bf16 and MLX 4-bit, and the real default
//! model when it is in the cache or can be fetched): the engine against mlx-lm with greedy and
//! full sampling, the pass-through and DRY plugin rows, prefill, TTFT cold and from the prompt
//! cache. Then 1/2/4/8/16 concurrent WebSocket clients against `mlx_lm.server` on one model,
//! and the device's measured memory bandwidth, so the report can state the batch-1 limit. The
//! JSON is rewritten after every model, so a run cut short still leaves what it measured.
//! `bench/report.py` turns it into tables and plots.

use super::{engine_compare, make_model, plugin_variants, serve_load, Args};
use anyhow::{Context, Result};
use mlx_rs::Array;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Models of a default suite: `shape:dtype` for random-weight checkpoints, `smollm2` for the
/// real default model.
pub const DEFAULT_MODELS: &[&str] =
    &["qwen3-0.6b:bf16", "qwen3-0.6b:q4", "llama-3.2-1b:bf16", "llama-3.2-1b:q4", "smollm2"];

pub fn run(args: &Args) -> Result<()> {
    let out_path = args.json.clone().context("suite needs --json FILE (results are written as they come)")?;
    if args.serve_model.is_some() {
        serve_load::daemon_binary()?;
    }
    let models = args.suite.clone().unwrap_or_default();
    let plugin_runs = match plugin_variants(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("suite: plugin rows skipped: {e:#}");
            Vec::new()
        }
    };
    let mut summary = json!({
        "stamp": stamp(),
        "bandwidth": bandwidth().unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
        "models": [],
        "serve": null,
        "skipped": [],
    });
    let save = |s: &Value| -> Result<()> { Ok(std::fs::write(&out_path, serde_json::to_string_pretty(s)?)?) };
    save(&summary)?;

    for spec in &models {
        let started = Instant::now();
        let (name, dtype, dir, mlx_lm) = match resolve(spec, args) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("suite: {spec} skipped: {e:#}");
                summary["skipped"].as_array_mut().expect("array").push(json!({"model": spec, "why": format!("{e:#}")}));
                save(&summary)?;
                continue;
            }
        };
        let mut run_args = args.clone();
        run_args.mlx_lm &= mlx_lm;
        let engine = engine_compare(&run_args, &dir, &plugin_runs)?;
        eprintln!("suite: {spec} done in {:.0} s", started.elapsed().as_secs_f64());
        summary["models"].as_array_mut().expect("array").push(json!({"name": name, "dtype": dtype, "engine": engine}));
        save(&summary)?;
    }

    if let Some(spec) = &args.serve_model {
        let (name, dtype, dir, mlx_lm) = resolve(spec, args)?;
        let mut levels = serve_load::run(serve_load::LoadArgs {
            dir: &dir,
            clients: args.clients.clone(),
            prompt: args.prompt,
            gen: args.gen,
            mlx_lm: args.mlx_lm && mlx_lm,
            python: args.python.clone(),
        })?;
        levels["model"] = json!(format!("{name} {dtype}"));
        summary["serve"] = levels;
        save(&summary)?;
    }
    eprintln!("suite: results in {}", out_path.display());
    Ok(())
}

/// (name, dtype, directory or file, whether mlx-lm can load it) for a model spec.
fn resolve(spec: &str, args: &Args) -> Result<(String, String, PathBuf, bool)> {
    if spec == "smollm2" {
        let path = mlxd::default_model::ensure().context("the default model (SmolLM2 GGUF) is not available")?;
        // mlx-lm reads no GGUF: this model has mlxd rows only.
        return Ok((mlxd::default_model::NAME.into(), "gguf-q4_1".into(), path, false));
    }
    if let Some((name, path)) = spec.split_once('=') {
        let path = PathBuf::from(path);
        let gguf = path.extension().is_some_and(|e| e == "gguf");
        return Ok((name.into(), if gguf { "gguf" } else { "checkpoint" }.into(), path, !gguf));
    }
    let (shape, dtype) = spec.split_once(':').unwrap_or((spec, "bf16"));
    Ok((shape.into(), dtype.into(), make_model(shape, dtype, &args.dir)?, true))
}

/// What the numbers were measured on.
pub(crate) fn stamp() -> Value {
    let report = mlxd::runtime::Report::gather();
    let command = |program: &str, args: &[&str]| -> Option<String> {
        let out = std::process::Command::new(program).args(args).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let commit = std::env::var("MLXD_COMMIT").ok().or_else(|| command("git", &["rev-parse", "--short", "HEAD"]));
    let driver = command("nvidia-smi", &["--query-gpu=driver_version", "--format=csv,noheader"]);
    let pinned = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:").map(|v| v.trim().to_string())));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({
        "date": chrono_like_now(),
        "commit": commit,
        "device": report.device_name,
        "driver": driver,
        "backend": report.backend,
        "mlx": report.mlx_version,
        "pinned_cpus": pinned,
        "host": format!("{cpus} CPUs available to the benchmark"),
    })
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ`.
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = mlxd::chat::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The device's read bandwidth: the best of ten reductions over 1 GiB of float32 (a sum reads
/// every byte once and writes one number), after a warm-up.
fn bandwidth() -> Result<Value> {
    let n: i32 = 1 << 28;
    let bytes = n as f64 * 4.0;
    let a = Array::ones::<f32>(&[n])?;
    a.eval()?;
    let mut runs = Vec::new();
    for i in 0..11 {
        let t = Instant::now();
        a.sum(None)?.eval()?;
        let s = t.elapsed().as_secs_f64();
        if i > 0 {
            runs.push(bytes / s / 1e9);
        }
    }
    let best = runs.iter().cloned().fold(0.0, f64::max);
    Ok(json!({"bytes": bytes as u64, "runs_gbs": runs, "best_gbs": best,
              "method": "sum over 1 GiB of float32, best of 10 after a warm-up (read bandwidth)"}))
}
