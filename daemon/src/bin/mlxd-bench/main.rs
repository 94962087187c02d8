//! `mlxd-bench`: the engine against mlx-lm on the same model, prompt and token counts, in one
//! run. Prints a table of medians (and min–max) and optionally writes JSON.
//!
//! Usage: [`USAGE`] (`mlxd-bench --help` prints it).
//!
//! `--shape` writes a random-weight checkpoint of a public architecture's shape (no download);
//! the prompt-cache row times a repeated 2,000-token prompt cold and warm.
//!
//! `--plugin` (repeatable) adds a row decoding greedily through a sampler plugin, e.g.
//! `--plugin passthrough --plugin 'dry:{"multiplier":0.8}'`, to compare with the greedy row
//! (the plugin path's overhead). Plugins load from `--plugin-dir`, by default the directory of
//! this executable, where `cargo build [--release] -p mlxd-plugin-passthrough -p mlxd-plugin-dry`
//! puts them. mlx-lm has no counterpart, so plugin rows are mlxd only.

mod alternate;
mod batch;
mod fused_check;
mod fused_timing;
mod step_parts;
mod kernel_check;
mod kernel_sources;
mod profile;
mod sampler_cost;
mod serve_load;
mod suite;

use anyhow::{bail, Context, Result};
use mlx_rs::{random, Array, Dtype};
use mlxd::engine::{Engine, EngineOptions, GenerateRequest, Outcome};
use mlxd::runtime::graph_kinds;
use mlxd::sampling::SamplingParams;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `mlxd-bench --help` prints.
const USAGE: &str = "\
mlxd-bench engine --shape qwen3-0.6b --dtype bf16 [--prompt 128] [--gen 256] [--repeats 5]
                  [--samplers greedy,full] [--no-mlx-lm] [--python python3] [--json out.json]
                  [--dir /tmp/models] [--plugin NAME[:JSON-PARAMS]]... [--plugin-dir DIR]
                  [--profile DIR]   (each variant's host stacks; needs --features profile)
                  [--fused-twins]   (each variant but greedy again as NAME+fused, with the
                                     fused sampling kernels, MLXD_SAMPLER_FUSED)
mlxd-bench engine --model /path/to/hf-dir ...
mlxd-bench serve --shape qwen3-0.6b [--clients 1,2,4,8,16] [--prompt 64] [--gen 128]
                                     concurrent WebSocket clients vs mlx_lm.server
mlxd-bench graph --shape ... [--clients N]
                                     primitives in one decode step (N > 1: N stacked rows vs one)
mlxd-bench sampler-check           the CUDA sampling kernels (two, and fused) against the
                                     MLX-op graph (same draws expected), on random logits
mlxd-bench sampler-cost [--shape NAME] [--dtype bf16|f32] [--samplers greedy,full] [--plugin ...]
                         [--gen STEPS] [--repeats ROUNDS] [--clients ROWS] [--fused-twins]
                         [--profile DIR]
                                     host time of one sampling step alone, per variant
                                     (build / submit / read), on fixed device logits
mlxd-bench alternate --shape ... [--samplers greedy,full] [--plugin ...] [--gen 8] [--repeats 150]
                                     one sequence decoding on, the sampler changing every --gen
                                     steps (variants in turn): each variant's cost against
                                     greedy in the same host state, with its parts per step
mlxd-bench kernel-check            mlxd's CUDA kernels for batched decode against MLX ops
mlxd-bench kernel-sources --out DIR [--plugin-dir DIR] [--plugin NAME[:JSON]]...
                                     every CUDA kernel's source as MLX would compile it (or
                                     only the named plugins'), on any machine, for
                                     tests/nvrtc/check.py (see kernel_sources.rs)
mlxd-bench batch --shape ... [--clients 1,2,4,8,16] [--model-kernels on|off|both|fused] [--stagger N]
                                     the engine stepping B sequences together (no daemon)
mlxd-bench fused-check --shape ... [--clients 1,2,3,4,8] [--repeats 20]
                                     the fused block's load-time check repeated: its error,
                                     and whether the kernel answers the same input the same
MLXD_FUSED_TIMING=1 mlxd-bench fused-timing --shape ... [--clients 1,2,4,8] [--stagger N]
                                     the fused decode block's time per phase and barrier
mlxd-bench step-parts --shape ... [--prompt 128] [--gen 16] [--repeats 10]
                                     a one-sequence step's parts (embedding, decoder blocks,
                                     head, greedy pick) queued --gen at a time: device time each
mlxd-bench suite --json out.json [--models qwen3-0.6b:bf16,qwen3-0.6b:q4,...|NAME=PATH|smollm2]
                 [--serve-model SHAPE:DTYPE|none] [--no-plugins] [engine and serve options]
                                     everything the report needs, in one run (see `suite`)
";

struct Shape {
    name: &'static str,
    model_type: &'static str,
    hidden: i32,
    layers: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    intermediate: i32,
    vocab: i32,
    tie: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "qwen3-0.6b",
        model_type: "qwen3",
        hidden: 1024,
        layers: 28,
        heads: 16,
        kv_heads: 8,
        head_dim: 128,
        intermediate: 3072,
        vocab: 151_936,
        tie: true,
    },
    Shape {
        name: "llama-3.2-1b",
        model_type: "llama",
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        intermediate: 8192,
        vocab: 128_256,
        tie: true,
    },
    // Qwen3-0.6B's 28 layers and graph at a width where the arithmetic is negligible: a step
    // costs what building and launching it costs, so per-step overheads (sampler, plugins, the
    // daemon's loop) show on any machine, the CPU included.
    Shape {
        name: "qwen3-28l-tiny",
        model_type: "qwen3",
        hidden: 64,
        layers: 28,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        intermediate: 128,
        vocab: 2048,
        tie: true,
    },
    Shape {
        name: "smollm2-135m",
        model_type: "llama",
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        intermediate: 1536,
        vocab: 49_152,
        tie: true,
    },
];

#[derive(Clone)]
struct Args {
    model: Option<PathBuf>,
    shape: Option<String>,
    dtype: String,
    prompt: usize,
    gen: usize,
    repeats: usize,
    mlx_lm: bool,
    graph: bool,
    serve: bool,
    batch: bool,
    fused_timing: bool,
    step_parts: bool,
    /// `fused-check`: the fused block's load-time check, repeated.
    fused_check: bool,
    /// `sampler-check`: the CUDA sampling kernel against the MLX-op graph.
    sampler_check: bool,
    /// `sampler-cost`: the host time of a sampling step alone.
    sampler_cost: bool,
    /// `alternate`: sampler variants taking turns in one decode.
    alternate: bool,
    /// `batch`: mlxd's CUDA kernels for several-row products and padded attention, MLX's ops, or both.
    model_kernels: String,
    /// `batch`: row `i`'s prompt is this many tokens longer per `i` (a padded stack).
    stagger: usize,
    clients: Vec<usize>,
    samplers: Vec<String>,
    /// `--fused-twins`: every variant but greedy runs twice, the second time (`NAME+fused`) with
    /// the fused sampling kernels (`MLXD_SAMPLER_FUSED`).
    fused_twins: bool,
    /// `--plugin NAME[:JSON]`: name and params.
    plugins: Vec<(String, String)>,
    plugin_dir: Option<PathBuf>,
    python: String,
    json: Option<PathBuf>,
    dir: PathBuf,
    /// `suite`: models as `shape:dtype` or `name=path`.
    suite: Option<Vec<String>>,
    /// `suite`: the model of the load test (`shape:dtype`), or none.
    serve_model: Option<String>,
    /// Prompt length of the prompt-cache row (0: skip it).
    cache_prompt: usize,
    /// `engine --profile DIR`: each variant's stacks, see `profile`.
    profile: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: None,
        shape: None,
        dtype: "bf16".into(),
        prompt: 128,
        gen: 256,
        repeats: 5,
        mlx_lm: true,
        graph: false,
        serve: false,
        batch: false,
        fused_timing: false,
        step_parts: false,
        fused_check: false,
        sampler_check: false,
        sampler_cost: false,
        alternate: false,
        model_kernels: "on".into(),
        stagger: 0,
        clients: vec![1, 2, 4, 8, 16],
        samplers: vec!["greedy".into()],
        fused_twins: false,
        plugins: Vec::new(),
        plugin_dir: None,
        python: "python3".into(),
        json: None,
        dir: std::env::temp_dir().join("mlxd-bench-models"),
        suite: None,
        serve_model: Some("qwen3-0.6b:bf16".into()),
        cache_prompt: 2000,
        profile: None,
    };
    let mut it = std::env::args().skip(1);
    match it.next().as_deref() {
        Some("engine") => {}
        Some("graph") => a.graph = true,
        Some("serve") => a.serve = true,
        Some("batch") => a.batch = true,
        Some("fused-timing") => a.fused_timing = true,
        Some("step-parts") => a.step_parts = true,
        Some("fused-check") => a.fused_check = true,
        Some("sampler-check") => a.sampler_check = true,
        Some("sampler-cost") => a.sampler_cost = true,
        Some("alternate") => a.alternate = true,
        Some("suite") => {
            a.suite = Some(suite::DEFAULT_MODELS.iter().map(|m| m.to_string()).collect());
            a.samplers = vec!["greedy".into(), "full".into()];
            a.plugins = vec![("passthrough".into(), "{}".into()), ("dry".into(), r#"{"multiplier":0.8}"#.into())];
        }
        _ => bail!(
            "usage: mlxd-bench engine|serve|graph|batch|suite|alternate|sampler-check|sampler-cost|kernel-check|kernel-sources (--shape NAME | --model DIR) [options]; mlxd-bench --help lists them"
        ),
    }
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(val()?.into()),
            "--shape" => a.shape = Some(val()?),
            "--dtype" => a.dtype = val()?,
            "--prompt" => a.prompt = val()?.parse().context("--prompt")?,
            "--gen" => a.gen = val()?.parse().context("--gen")?,
            "--repeats" => a.repeats = val()?.parse().context("--repeats")?,
            "--python" => a.python = val()?,
            "--json" => a.json = Some(val()?.into()),
            "--dir" => a.dir = val()?.into(),
            "--no-mlx-lm" => a.mlx_lm = false,
            "--fused-twins" => a.fused_twins = true,
            "--clients" => {
                a.clients = val()?.split(',').map(|c| c.parse().context("--clients")).collect::<Result<_>>()?
            }
            "--samplers" => a.samplers = val()?.split(',').map(String::from).collect(),
            "--plugin" => {
                let spec = val()?;
                let (name, params) = spec.split_once(':').unwrap_or((spec.as_str(), "{}"));
                a.plugins.push((name.to_string(), params.to_string()));
            }
            "--plugin-dir" => a.plugin_dir = Some(val()?.into()),
            "--models" => a.suite = Some(val()?.split(',').filter(|m| !m.is_empty()).map(String::from).collect()),
            "--serve-model" => a.serve_model = Some(val()?).filter(|m| m != "none"),
            "--no-plugins" => a.plugins.clear(),
            "--model-kernels" => a.model_kernels = val()?,
            "--stagger" => a.stagger = val()?.parse().context("--stagger")?,
            "--cache-prompt" => a.cache_prompt = val()?.parse().context("--cache-prompt")?,
            "--profile" => a.profile = Some(val()?.into()),
            other => bail!("unknown flag {other} (mlxd-bench --help lists them)"),
        }
    }
    Ok(a)
}

fn main() {
    mlxd::runtime::prepare_mlx_environment();
    mlxd::spin_guard::install();
    // Each benchmark holds one model at a time (the daemon it starts is its own process).
    mlxd::models::fused::set_one_model(true);
    // Warnings by default; RUST_LOG=mlxd=info shows what loading a model decided (e.g. the
    // fused decode block's check and timing against MLX's operations).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    };
    idle_cpu();
    // End without library exit handlers, as the daemon does: OpenBLAS 0.3.21's can wait forever
    // for its worker thread after several threads used BLAS (docs/platforms.md), and a finished
    // benchmark must not hang its script.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// `MLXD_BENCH_IDLE_SECS=N`: after the command, stay idle N seconds and print the process's CPU
/// use meanwhile (MLX's threads included): what an idle daemon costs its host.
fn idle_cpu() {
    let Some(secs) = std::env::var("MLXD_BENCH_IDLE_SECS").ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    println!(
        "idle {secs} s: {:.1}% of one core (spin guard active: {})",
        idle_cpu_percent(Duration::from_secs(secs)),
        mlxd::spin_guard::active()
    );
}

fn run() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        None | Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return Ok(());
        }
        Some("kernel-check") => return kernel_check::run(),
        Some("kernel-sources") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            let flag =
                |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(PathBuf::from);
            let usage = "usage: mlxd-bench kernel-sources --out DIR [--plugin-dir DIR] [--plugin NAME[:JSON]]...";
            let out = flag("--out").context(usage)?;
            let plugins: Vec<(String, String)> = args
                .windows(2)
                .filter(|w| w[0] == "--plugin")
                .map(|w| w[1].split_once(':').map_or((w[1].clone(), "{}".into()), |(n, p)| (n.into(), p.into())))
                .collect();
            return kernel_sources::run(&out, flag("--plugin-dir"), &plugins);
        }
        _ => {}
    }
    let args = parse_args()?;
    if std::env::var_os("MLXD_SAMPLER_EAGER").is_some() {
        mlxd::sampling::set_compiled(false);
    }
    if args.suite.is_some() {
        return suite::run(&args);
    }
    if args.sampler_check {
        return sampler_check();
    }
    if args.sampler_cost {
        let summary = sampler_cost::run(&args)?;
        return write_summary(&args, &summary);
    }
    // Plugins resolve first: a missing one should not cost a model build to find out.
    let plugin_runs = plugin_variants(&args)?;
    let dir = match (&args.model, &args.shape) {
        (Some(m), _) => m.clone(),
        (None, Some(s)) => make_model(s, &args.dtype, &args.dir)?,
        (None, None) => {
            bail!("give --model DIR or --shape NAME ({})", SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "))
        }
    };
    if args.graph {
        let mut variants: Vec<(String, SamplingParams)> =
            sampler_variants(&args.samplers)?.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
        variants.extend(plugin_runs);
        if args.clients.len() == 1 && args.clients[0] > 1 {
            return print_batched_graph(&dir, args.clients[0]);
        }
        return print_step_graph(&dir, &variants);
    }
    if args.alternate {
        let summary = alternate::run(&args, &dir)?;
        return write_summary(&args, &summary);
    }
    if args.fused_timing {
        let summary = fused_timing::run(&args, &dir)?;
        return write_summary(&args, &summary);
    }
    if args.step_parts {
        let summary = step_parts::run(&args, &dir)?;
        return write_summary(&args, &summary);
    }
    if args.fused_check {
        let summary = fused_check::run(&args, &dir)?;
        return write_summary(&args, &summary);
    }
    if args.batch {
        let summary = batch::run(&args, &dir, &args.model_kernels)?;
        return write_summary(&args, &summary);
    }
    if args.serve {
        let summary = serve_load::run(serve_load::LoadArgs {
            dir: &dir,
            clients: args.clients.clone(),
            prompt: args.prompt,
            gen: args.gen,
            mlx_lm: args.mlx_lm,
            python: args.python.clone(),
        })?;
        return write_summary(&args, &summary);
    }
    let summary = engine_compare(&args, &dir, &plugin_runs)?;
    write_summary(&args, &summary)
}

/// Writes a command's summary to `--json FILE`, when given.
fn write_summary(args: &Args, summary: &Value) -> Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(summary)?)?;
    }
    Ok(())
}

/// The engine against mlx-lm on the model in `dir`: every sampler variant and plugin row,
/// interleaved, then the prompt-cache row. Prints the table; returns the summary.
fn engine_compare(args: &Args, dir: &Path, plugin_runs: &[(String, SamplingParams)]) -> Result<Value> {
    let report = mlxd::runtime::Report::gather();
    eprintln!(
        "model {} | MLX {} {} | {}",
        dir.display(),
        report.mlx_version,
        report.backend,
        report.device_name.clone().unwrap_or_default()
    );

    let model = mlxd::models::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    println!(
        "one-sequence decode steps: {}; batched: {}",
        if model.model.fused_decode() { "the fused block (one kernel launch for all decoder blocks)" } else { "MLX's operations" },
        match model.model.fused_batch_rows() {
            0 => "MLX's operations".to_string(),
            n => format!("the fused block up to {n} rows"),
        }
    );
    let weight_bytes = model.model.weight_bytes();
    let vocab = model.model.args.vocab as u32;
    let mut engine = Engine::new(model, EngineOptions { prompt_cache_bytes: 0, ..Default::default() });
    engine.model.eos_ids.clear(); // random weights: run to the token count, like mlx-lm's loop
    let prompt = random_prompt(args.prompt, vocab, 7);
    // Same BLAS for both: the Python wheel's libmlx would otherwise use its reference BLAS.
    let preload = report.blas.strip_prefix("OpenBLAS (").and_then(|p| p.strip_suffix(')')).map(String::from);

    // Variants run interleaved, so slow drifts of clock or load hit all alike, and each round
    // starts one variant later (A B C, B C A, C A B, ...), so that no variant always runs first
    // after the pause between rounds: a fixed order biased the run-by-run ratios by 2-3% on a
    // lent H100 (a pass-through plugin, which adds no device work, measured 2.9% slower).
    let variants_list = variant_list(args, plugin_runs)?;
    let mut ours: Vec<Vec<Value>> = vec![Vec::new(); variants_list.len()];
    // `MLXD_BENCH_HOST_DELAY_US`: extra host work per token (a busy wait after each token is read,
    // while the device runs the step queued before it). If the step is bound by the device's
    // work, the delay only shortens the wait for the next token; if the device idles until the
    // host comes back, every step grows by it.
    let host_delay = std::env::var("MLXD_BENCH_HOST_DELAY_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&us| us > 0)
        .map(Duration::from_micros);
    let mut profiles = vec![mlxd::engine::StepProfile::default(); variants_list.len()];
    let n_variants = variants_list.len();
    for r in 0..=args.repeats {
        for k in (0..n_variants).map(|i| (i + r) % n_variants) {
            let sampler = &variants_list[k].1;
            mlxd::sampling::set_sampler_fused(is_fused_twin(&variants_list[k].0));
            let req = GenerateRequest {
                prompt: prompt.clone(),
                max_tokens: args.gen,
                stop: vec![],
                sampler: sampler.clone(),
            };
            engine.reset_profile();
            let _ = mlx_rs::memory::clear_cache();
            let _ = mlx_rs::memory::reset_peak_memory();
            let mut arrivals = Vec::with_capacity(args.gen);
            let out = engine.generate(&req, |_| {
                arrivals.push(std::time::Instant::now());
                if let Some(d) = host_delay {
                    spin_for(d);
                }
                true
            })?;
            if r > 0 {
                let mut run = run_json(&out, mlx_rs::memory::peak_memory().unwrap_or(0));
                run["step_median_s"] = json!(median_step(&arrivals));
                ours[k].push(run);
                let p = engine.profile();
                let acc = &mut profiles[k];
                acc.steps += p.steps;
                acc.build += p.build;
                acc.build_cpu += p.build_cpu;
                acc.wait += p.wait;
                acc.poll += p.poll;
                acc.graph += p.graph;
                acc.sampler += p.sampler;
            }
        }
    }
    // mlx-lm runs the variants it has a twin of (bench/mlx_lm_bench.py): greedy and full,
    // interleaved in one process like ours.
    let twins: Vec<&str> = variants_list
        .iter()
        .filter(|(name, sampler)| sampler.plugins.is_empty() && matches!(name.as_str(), "greedy" | "full"))
        .map(|(name, _)| name.as_str())
        .collect();
    let peer_runs = if args.mlx_lm && !twins.is_empty() {
        Some(run_mlx_lm(args, dir, preload.as_deref(), &twins.join(","))?)
    } else {
        None
    };
    let mut variants = serde_json::Map::new();
    for (k, (name, _)) in variants_list.iter().enumerate() {
        let profile = profiles[k];
        let per_step = |d: Duration| per_step(d, &profile);
        eprintln!(
            "mlxd {name}: host build {:.3} ms/step (model graph {:.3}, sampler graph {:.3}, launch {:.3}; thread CPU time {:.3}), waiting for the device {:.3} ms/step{}",
            per_step(profile.build),
            per_step(profile.graph),
            per_step(profile.sampler),
            per_step(profile.build.saturating_sub(profile.graph + profile.sampler)),
            per_step(profile.build_cpu),
            per_step(profile.wait),
            if profile.poll > Duration::ZERO {
                format!(" (until MLX reported the ids available {:.3}, then the read)", per_step(profile.poll))
            } else {
                String::new()
            }
        );
        let theirs = peer_runs.as_ref().map(|p| &p["variants"][name.as_str()]).filter(|v| !v.is_null()).cloned();
        variants.insert(
            name.to_string(),
            json!({"mlxd": {"runs": ours[k], "host_build_ms_per_step": per_step(profile.build), "host_sampler_graph_ms_per_step": per_step(profile.sampler), "host_model_graph_ms_per_step": per_step(profile.graph), "host_build_cpu_ms_per_step": per_step(profile.build_cpu), "device_wait_ms_per_step": per_step(profile.wait)}, "mlx_lm": theirs}),
        );
    }
    if let Some(out) = &args.profile {
        for (name, sampler) in &variants_list {
            let req = GenerateRequest {
                prompt: prompt.clone(),
                max_tokens: args.gen,
                stop: vec![],
                sampler: sampler.clone(),
            };
            profile::record(out, name, || {
                let mut steps = 0;
                for _ in 0..args.repeats.max(1) {
                    steps += engine.generate(&req, |_| true)?.ids.len().saturating_sub(1);
                }
                Ok(steps)
            })?;
        }
    }
    let cache_row =
        if args.cache_prompt > 0 { prompt_cache_ttft(&mut engine, vocab, args.cache_prompt)? } else { Value::Null };
    let summary = json!({
        "model": dir.display().to_string(),
        "weight_bytes": weight_bytes,
        "prompt_tokens": args.prompt,
        "gen_tokens": args.gen,
        "repeats": args.repeats,
        "device": report.device_name,
        "backend": report.backend,
        "mlx": report.mlx_version,
        "variants": variants,
        "mlx_lm_blas_preload": preload,
        "prompt_cache": cache_row,
    });
    print_table(&summary);
    eprintln!(
        "process CPU while idle for 1 s after the runs: {:.0}% of one core",
        idle_cpu_percent(Duration::from_secs(1))
    );
    Ok(summary)
}

/// Busy-waits `d` (a sleep would hand the core back and wake late).
fn spin_for(d: Duration) {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// The process's CPU time over `span` in which it does nothing, as a percentage of one core:
/// what a resident model costs the machine between requests (MLX 0.32's CUDA completion worker
/// busy-polls once it has run, ml-explore/mlx#4451, unless [`mlxd::spin_guard`] is active).
fn idle_cpu_percent(span: Duration) -> f64 {
    let cpu = || {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let (before, start) = (cpu(), std::time::Instant::now());
    std::thread::sleep(span);
    (cpu() - before).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0
}

/// The sampler settings compared: `greedy`, and `full` (temperature 0.7, top-p 0.9, top-k 50,
/// min-p 0.05, repetition penalty 1.1 over 64 tokens), the issue's pipeline; and, to find out
/// which stage costs what, each of its parts alone on top of greedy / temperature 0.7:
/// `temperature`, `top-k`, `top-p`, `min-p`, `repetition`.
fn sampler_variants(names: &[String]) -> Result<Vec<(&'static str, SamplingParams)>> {
    let hot = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams { temperature: 0.7, seed: Some(1), ..Default::default() };
        f(&mut p);
        p
    };
    names
        .iter()
        .map(|n| match n.as_str() {
            "greedy" => Ok(("greedy", SamplingParams::default())),
            "full" => Ok(("full", SamplingParams { seed: Some(1), ..full_sampling() })),
            "temperature" => Ok(("temperature", hot(|_| {}))),
            "top-k" => Ok(("top-k", hot(|p| p.top_k = 50))),
            "top-p" => Ok(("top-p", hot(|p| p.top_p = 0.9))),
            "min-p" => Ok(("min-p", hot(|p| p.min_p = 0.05))),
            "repetition" => Ok((
                "repetition",
                SamplingParams { repetition_penalty: 1.1, repetition_context_size: 64, ..Default::default() },
            )),
            other => bail!(
                "--samplers: unknown variant {other} (greedy, full, temperature, top-k, top-p, min-p, repetition)"
            ),
        })
        .collect()
}

/// The `--samplers` variants, then the `--plugin` rows, then with `--fused-twins` each of them
/// but greedy again as `NAME+fused` (run with the fused sampling kernels, [`is_fused_twin`]).
fn variant_list(args: &Args, plugin_runs: &[(String, SamplingParams)]) -> Result<Vec<(String, SamplingParams)>> {
    let mut variants: Vec<(String, SamplingParams)> =
        sampler_variants(&args.samplers)?.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
    variants.extend(plugin_runs.iter().cloned());
    if args.fused_twins {
        let twins: Vec<_> =
            variants.iter().filter(|(n, _)| n != "greedy").map(|(n, s)| (format!("{n}+fused"), s.clone())).collect();
        variants.extend(twins);
    }
    Ok(variants)
}

/// Whether variant `name` is a `--fused-twins` twin.
fn is_fused_twin(name: &str) -> bool {
    name.ends_with("+fused")
}

/// The shape `--shape` names.
fn shape_named(name: &str) -> Result<&'static Shape> {
    SHAPES.iter().find(|s| s.name == name).with_context(|| {
        format!("unknown shape {name} ({})", SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "))
    })
}

/// The element type `--dtype` names (`q4`: 4-bit weights around bfloat16 activations).
fn dtype_named(name: &str) -> Result<Dtype> {
    Ok(match name {
        "bf16" | "q4" => Dtype::Bfloat16,
        "f16" => Dtype::Float16,
        "f32" => Dtype::Float32,
        other => bail!("--dtype {other}: use bf16, f16, f32 or q4"),
    })
}

/// The issue's full pipeline: temperature 0.7, top-p 0.9, top-k 50, min-p 0.05, repetition
/// penalty 1.1 over 64 tokens (no seed).
fn full_sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        top_k: 50,
        min_p: 0.05,
        repetition_penalty: 1.1,
        repetition_context_size: 64,
        ..Default::default()
    }
}

/// The sampler plugins the benchmark loads: from `--plugin-dir`, by default this executable's
/// folder (where `cargo build -p mlxd-plugin-NAME` puts them beside mlxd-bench).
struct BenchPlugins {
    dir: PathBuf,
    registry: mlxd::plugins::PluginRegistry,
}

impl BenchPlugins {
    fn open(dir: Option<&Path>) -> Result<Self> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()?.parent().context("executable directory")?.to_path_buf(),
        };
        Ok(BenchPlugins { registry: mlxd::plugins::PluginRegistry::new(vec![dir.clone()]), dir })
    }

    /// Plugin `name`; the error says where it looked and how to build it.
    fn get(&self, name: &str) -> Result<std::sync::Arc<mlxd::plugins::Plugin>> {
        self.registry.get(name).map_err(|e| {
            anyhow::anyhow!(
                "{e}; build it (cargo build --release -p mlxd-plugin-{name}) or pass --plugin-dir (looked in {})",
                self.dir.display()
            )
        })
    }
}

/// Greedy decoding through each `--plugin`, as variants named `plugin:NAME`.
fn plugin_variants(args: &Args) -> Result<Vec<(String, SamplingParams)>> {
    if args.plugins.is_empty() {
        return Ok(Vec::new());
    }
    let plugins = BenchPlugins::open(args.plugin_dir.as_deref())?;
    args.plugins
        .iter()
        .map(|(name, params)| {
            let plugin = plugins.get(name)?;
            serde_json::from_str::<Value>(params).with_context(|| format!("--plugin {name}: params are not JSON"))?;
            let request = mlxd::plugins::PluginRequest { plugin, params: params.clone() };
            Ok((format!("plugin:{name}"), SamplingParams { plugins: vec![request], ..Default::default() }))
        })
        .collect()
}

/// Prints the primitives of one single-sequence decode step (model + sampler) for each sampler
/// variant, counted by kind: on the GPU every primitive costs host time to build and launch, so
/// this is the step's overhead. The model part is the same for all variants; the difference to
/// `greedy` is what the sampler adds.
fn print_step_graph(dir: &Path, variants: &[(String, SamplingParams)]) -> Result<()> {
    let loaded = mlxd::models::load(dir)?;
    let model = &loaded.model;
    let vocab = model.args.vocab as usize;
    let mut totals = Vec::new();
    for (name, params) in variants {
        let mut cache = mlxd::cache::SequenceCache::new(model.num_layers());
        let prompt = Array::from_slice(&[1i32, 2, 3, 4], &[1, 4]);
        model.forward_last(&prompt, &mut cache)?.eval()?;
        cache.eval()?;
        let mut sampler = mlxd::sampling::SequenceSampler::new(params, vocab, &[1, 2, 3, 4])?;
        let token = Array::from_slice(&[5u32], &[1]);
        // A first step evaluated in full, so the second one shows a steady state (compiled
        // graphs traced, state arrays materialized).
        let logits = model.forward_batch(&token, &mut [&mut cache])?;
        let first = mlxd::sampling::sample_batch(&logits, &mut [&mut sampler])?;
        first.eval()?;
        cache.eval()?;
        let logits = model.forward_batch(&first, &mut [&mut cache])?;
        let sampled = mlxd::sampling::sample_batch(&logits, &mut [&mut sampler])?;
        let kinds = graph_kinds(&sampled)?;
        let total: usize = kinds.values().sum();
        println!("{name}: {total} primitives in one decode step");
        for (k, n) in &kinds {
            println!("{n:6} {k}");
        }
        totals.push((name.clone(), total));
    }
    if let Some((_, base)) = totals.iter().find(|(n, _)| n == "greedy").cloned() {
        println!("\n| sampler | primitives / step | beyond greedy |\n| --- | --- | --- |");
        for (name, total) in totals {
            println!("| {name} | {total} | {:+} |", total as i64 - base as i64);
        }
    }
    Ok(())
}

/// Prints the primitives of one greedy decode step of `rows` sequences stacked in one batch
/// (`graph --clients N`), next to a one-sequence step, by kind: what batching adds per step.
fn print_batched_graph(dir: &Path, rows: usize) -> Result<()> {
    let loaded = mlxd::models::load(dir)?;
    let model = &loaded.model;
    let mut caches = Vec::new();
    for r in 0..rows {
        let mut cache = mlxd::cache::SequenceCache::new(model.num_layers());
        let prompt = Array::from_slice(&[1i32, 2, 3, r as i32 + 4], &[1, 4]);
        model.forward_last(&prompt, &mut cache)?.eval()?;
        cache.eval()?;
        caches.push(cache);
    }
    let one = {
        let mut cache = caches[0].clone();
        let token = Array::from_slice(&[5u32], &[1]);
        model.forward_batch(&token, &mut [&mut cache])?.eval()?;
        cache.eval()?;
        let logits = model.forward_batch(&token, &mut [&mut cache])?;
        graph_kinds(&mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?)?
    };
    let views: Vec<&mlxd::cache::SequenceCache> = caches.iter().collect();
    let mut batch = mlxd::cache::BatchCache::build((0..rows as u64).collect(), &views)?;
    let tokens = Array::from_slice(&vec![5u32; rows], &[rows as i32]);
    model.forward_batched(&tokens, &mut batch)?.eval()?;
    let logits = model.forward_batched(&tokens, &mut batch)?;
    let many = graph_kinds(&mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?)?;
    let kinds: std::collections::BTreeSet<&String> = one.keys().chain(many.keys()).collect();
    println!("| primitive | 1 row | {rows} rows |\n| --- | --- | --- |");
    for k in kinds {
        let (a, b) = (one.get(k).copied().unwrap_or(0), many.get(k).copied().unwrap_or(0));
        println!("| {k} | {a} | {b} |{}", if a != b { " *" } else { "" });
    }
    println!("| total | {} | {} |", one.values().sum::<usize>(), many.values().sum::<usize>());
    Ok(())
}

/// Draws tokens through the MLX-op graph and through the CUDA sampling kernel on the same
/// random logits, rows (seeds 1-N) and steps, and prints how many draws agree (the two paths
/// differ only by rounding at a filter's boundary). Cases: the issue's full pipeline on a
/// Qwen3-sized vocabulary (not a multiple of the kernel's chunk) in float32 and bfloat16 (the
/// kernel reads bfloat16 itself; the graph converts first), temperature + top-k alone, a
/// strong repetition penalty over a short window on logits that stay the same every step (so a
/// wrongly advanced window or key changes later draws), and a vocabulary whose last chunk holds
/// fewer logits than the top-k.
fn sampler_check() -> Result<()> {
    let report = mlxd::runtime::Report::gather();
    let top_k_only = SamplingParams { temperature: 0.9, top_k: 20, ..Default::default() };
    let penalty = SamplingParams {
        temperature: 0.5,
        top_k: 8,
        repetition_penalty: 3.0,
        repetition_context_size: 4,
        ..Default::default()
    };
    let wide = SamplingParams { temperature: 1.0, top_k: 150, top_p: 0.95, ..Default::default() };
    // (name, params, rows, vocabulary, steps, same logits every step, logits' dtype)
    let bf16 = mlx_rs::Dtype::Bfloat16;
    let cases = [
        ("full", full_sampling(), 64usize, 151_936i32, 8, false, mlx_rs::Dtype::Float32),
        ("full, bfloat16 logits", full_sampling(), 64, 151_936, 8, false, bf16),
        ("temperature + top-k", top_k_only, 64, 151_936, 8, false, mlx_rs::Dtype::Float32),
        ("repetition penalty 3 over 4 tokens, fixed logits, bfloat16", penalty, 16, 49_152, 24, true, bf16),
        ("top-k 150 over 1,124 tokens", wide, 16, 1_124, 8, false, mlx_rs::Dtype::Float32),
    ];
    // Against the graph: the two kernels (the default), then the fused one (opt-in).
    let mut totals = [(0, 0); 2];
    for (name, base, rows, v, steps, fixed, dtype) in cases {
        let mut draws: Vec<Vec<u32>> = Vec::new();
        for (kernel, fused) in [(false, false), (true, false), (true, true)] {
            mlxd::sampling::set_sampler_kernel(kernel);
            mlxd::sampling::set_sampler_fused(fused);
            let mut samplers = (0..rows)
                .map(|i| {
                    let params = SamplingParams { seed: Some(1 + i as u64), ..base.clone() };
                    mlxd::sampling::SequenceSampler::new(&params, v as usize, &[1, 2, 3])
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut got = Vec::new();
            for s in 0..steps {
                let seed = if fixed { 1000 } else { 1000 + s };
                let logits =
                    random::normal::<f32>(&[rows as i32, v], 0.0, 3.0, &random::key(seed)?)?.as_dtype(dtype)?;
                let mut refs: Vec<&mut mlxd::sampling::SequenceSampler> = samplers.iter_mut().collect();
                let t = mlxd::sampling::sample_batch(&logits, &mut refs)?;
                got.extend(t.as_slice::<u32>().to_vec());
            }
            draws.push(got);
        }
        for (i, kernels) in ["the two CUDA kernels", "the fused CUDA kernel"].into_iter().enumerate() {
            let same = draws[0].iter().zip(&draws[i + 1]).filter(|(a, b)| a == b).count();
            println!(
                "{} ({}), {name}: {same} of {} draws agree between the MLX-op graph and {kernels}{}",
                report.device_name.clone().unwrap_or_default(),
                report.backend,
                draws[0].len(),
                if report.backend == "cuda" { "" } else { " (no CUDA here: both ran the graph)" }
            );
            totals[i] = (totals[i].0 + same, totals[i].1 + draws[0].len());
        }
    }
    let picks = fused_pick_check(&report)?;
    // The defaults.
    mlxd::sampling::set_sampler_kernel(true);
    mlxd::sampling::set_sampler_fused(false);
    anyhow::ensure!(picks.0 == picks.1, "the fused greedy pick disagreed with argmax or the history");
    for (kernels, (same, all)) in ["the two kernels", "the fused kernel"].into_iter().zip(totals) {
        anyhow::ensure!(same * 100 >= all * 95, "fewer than 95% of the draws of {kernels} agree with the graph");
    }
    Ok(())
}

/// The fused greedy pick with the history append (the plugin path's lone greedy rows, opt-in)
/// against MLX's argmax and a concatenation, on random float32 and bfloat16 logits (bfloat16
/// ties near the top test the lower-id rule). Returns (agreeing, compared); (0, 0) off CUDA.
fn fused_pick_check(report: &mlxd::runtime::Report) -> Result<(usize, usize)> {
    mlxd::sampling::set_sampler_fused(true);
    let history = Array::from_slice(&(0..300).collect::<Vec<i32>>(), &[1, 300]);
    let mut agree = (0, 0);
    for seed in 0..32u64 {
        let dtype = if seed % 2 == 0 { Dtype::Float32 } else { Dtype::Bfloat16 };
        let logits = random::normal::<f32>(&[1, 151_936], 0.0, 3.0, &random::key(seed)?)?.as_dtype(dtype)?;
        let Some(fused) = mlxd::sampling::pick_and_append(&logits, &history) else {
            break; // not on CUDA, or the kernels are off
        };
        let (token, appended) = fused?;
        let want = mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?.as_type::<u32>()?;
        let want_history = mlx_rs::ops::concatenate(&[history.clone(), want.reshape(&[1, 1])?.as_type::<i32>()?], 1)?;
        let same = token.as_slice::<u32>() == want.as_slice::<u32>()
            && appended.as_slice::<i32>() == want_history.as_slice::<i32>();
        agree = (agree.0 + same as usize, agree.1 + 1);
    }
    println!(
        "{} ({}), fused greedy pick + history append: {} of {} agree with argmax and a concatenation{}",
        report.device_name.clone().unwrap_or_default(),
        report.backend,
        agree.0,
        agree.1,
        if agree.1 == 0 { " (not run: no CUDA here)" } else { "" }
    );
    mlxd::sampling::set_sampler_fused(false);
    Ok(agree)
}

fn run_json(o: &Outcome, peak: usize) -> Value {
    json!({
        "ttft_s": o.time_to_first_token.as_secs_f64(),
        "prefill_tps": o.prefill_tps(),
        "decode_tps": o.decode_tps(),
        "peak_bytes": peak,
    })
}

/// Time to first token of a `tokens`-long prompt (2,000 by default): cold; sent again (an exact repeat: its KV state
/// and last logits are cached, no forward pass); and sent with one more token appended (the
/// editor's case: the cached prefix is reused and one position is computed).
fn prompt_cache_ttft(engine: &mut Engine, vocab: u32, tokens: usize) -> Result<Value> {
    engine.set_prompt_cache_budget(4 << 30);
    let prompt = random_prompt(tokens, vocab, 11);
    let req =
        |prompt: Vec<u32>| GenerateRequest { prompt, max_tokens: 2, stop: vec![], sampler: SamplingParams::default() };
    let mut extended = prompt.clone();
    extended.push(random_prompt(1, vocab, 12)[0]);
    let (mut cold, mut repeat, mut extend) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        engine.clear_prompt_cache();
        cold.push(engine.generate(&req(prompt.clone()), |_| true)?.time_to_first_token);
        repeat.push(engine.generate(&req(prompt.clone()), |_| true)?.time_to_first_token);
        engine.clear_prompt_cache();
        engine.generate(&req(prompt.clone()), |_| true)?;
        extend.push(engine.generate(&req(extended.clone()), |_| true)?.time_to_first_token);
    }
    engine.set_prompt_cache_budget(0);
    let (c, r, x) = (median_d(&mut cold), median_d(&mut repeat), median_d(&mut extend));
    Ok(json!({
        "prompt_tokens": tokens,
        "cold_ttft_s": c,
        "warm_ttft_s": r,
        "speedup": c / r.max(1e-9),
        "extended_ttft_s": x,
        "extended_speedup": c / x.max(1e-9),
    }))
}

/// `d`, summed over the steps of `p`, in milliseconds per step.
fn per_step(d: Duration, p: &mlxd::engine::StepProfile) -> f64 {
    d.as_secs_f64() * 1e3 / p.steps.max(1) as f64
}

/// The median time between consecutive tokens: the decode speed of an undisturbed step, which
/// a shared host's occasional descheduling (a few slow steps in a run) leaves alone.
fn median_step(arrivals: &[std::time::Instant]) -> Option<f64> {
    let mut gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    (!gaps.is_empty()).then(|| median_d(&mut gaps))
}

fn median_d(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn run_mlx_lm(args: &Args, dir: &Path, preload: Option<&str>, sampler: &str) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/mlx_lm_bench.py");
    let script = if script.exists() { script } else { PathBuf::from("bench/mlx_lm_bench.py") };
    let mut cmd = std::process::Command::new(&args.python);
    if let Some(lib) = preload {
        cmd.env("LD_PRELOAD", lib);
    }
    let out = cmd
        .arg(&script)
        .arg(dir)
        .args([args.prompt.to_string(), args.gen.to_string(), args.repeats.to_string(), "7".into(), sampler.into()])
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !out.status.success() {
        bail!("mlx-lm benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("mlx-lm benchmark printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn random_prompt(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut next = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..n).map(|_| (next() % u64::from(vocab)) as u32).collect()
}

/// A xorshift64 stream from `state` (not 0): cheap, reproducible numbers for the benchmark's
/// prompts and resampling.
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Field `key` of every run that has it, in run order.
fn values(runs: &Value, key: &str) -> Vec<f64> {
    runs.as_array().into_iter().flatten().filter_map(|r| r[key].as_f64()).collect()
}

fn stats(runs: &Value, key: &str) -> (f64, f64, f64) {
    let mut v = values(runs, key);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// What `variant` costs against greedy in percent, as the median over pairs of runs (each run of
/// the variant against the greedy run before it) of `key`; `time` says `key` is a duration
/// (larger is slower) rather than a speed.
fn paired_cost(s: &Value, engine: &str, variant: &str, key: &str, time: bool) -> Option<Paired> {
    let greedy = values(&s["variants"]["greedy"][engine]["runs"], key);
    let other = values(&s["variants"][variant][engine]["runs"], key);
    if greedy.is_empty() || other.len() != greedy.len() {
        return None;
    }
    let costs: Vec<f64> =
        other.iter().zip(&greedy).map(|(o, g)| (1.0 - if time { g / o } else { o / g }) * 100.0).collect();
    Some(median_interval(costs))
}

/// The median of `costs` (not empty) with a 90% interval for it: medians of 2,000 resamples
/// (with replacement), their 5th and 95th percentiles. A fixed seed keeps a run's printout
/// reproducible.
fn median_interval(costs: Vec<f64>) -> Paired {
    let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| median((0..costs.len()).map(|_| costs[(next() % costs.len() as u64) as usize]).collect()))
        .collect();
    medians.sort_by(f64::total_cmp);
    Paired { median: median(costs), low: medians[100], high: medians[1899] }
}

/// A variant's cost against the greedy run of its round, in percent: the median over the
/// rounds and a 90% bootstrap interval for it.
struct Paired {
    median: f64,
    low: f64,
    high: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_table(s: &Value) {
    println!(
        "\n{} | {} | MLX {} | prompt {} tok, generate {} tok, {} runs after warm-up (median [min-max])",
        s["device"].as_str().unwrap_or("?"),
        s["backend"].as_str().unwrap_or("?"),
        s["mlx"].as_str().unwrap_or("?"),
        s["prompt_tokens"],
        s["gen_tokens"],
        s["repeats"]
    );
    println!("| engine | sampler | decode tok/s | steady tok/s | prefill tok/s | TTFT ms | peak MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut decode = std::collections::BTreeMap::new();
    for (variant, v) in s["variants"].as_object().into_iter().flatten() {
        for engine in ["mlxd", "mlx_lm"] {
            let runs = &v[engine]["runs"];
            if runs.is_null() {
                continue;
            }
            let (d, dl, dh) = stats(runs, "decode_tps");
            let (step, _, _) = stats(runs, "step_median_s");
            let (p, _, _) = stats(runs, "prefill_tps");
            let (t, _, _) = stats(runs, "ttft_s");
            let (m, _, _) = stats(runs, "peak_bytes");
            println!(
                "| {engine} | {variant} | {d:.1} [{dl:.1}-{dh:.1}] | {:.1} | {p:.0} | {:.1} | {:.0} |",
                1.0 / step,
                t * 1e3,
                m / (1u64 << 20) as f64
            );
            decode.insert((engine, variant.as_str()), d);
        }
    }
    println!();
    if let (Some(a), Some(b)) = (decode.get(&("mlxd", "greedy")), decode.get(&("mlx_lm", "greedy"))) {
        println!("mlxd / mlx-lm decode, greedy: {:.3}x", a / b);
    }
    for engine in ["mlxd", "mlx_lm"] {
        if let (Some(g), Some(f)) = (decode.get(&(engine, "greedy")), decode.get(&(engine, "full"))) {
            println!("{engine}: full sampling costs {:.1}% of greedy decode tok/s", (1.0 - f / g) * 100.0);
        }
    }
    for ((engine, variant), d) in &decode {
        if let (Some(name), Some(g)) = (variant.strip_prefix("plugin:"), decode.get(&(*engine, "greedy"))) {
            println!(
                "{engine}: greedy through plugin `{name}` costs {:.1}% of greedy decode tok/s",
                (1.0 - d / g) * 100.0
            );
        }
    }
    // Variants run interleaved in rounds (both engines): each run against the greedy run of its
    // round is steadier on a host whose speed drifts between runs, and the median step time
    // leaves out the steps a shared host delays.
    for engine in ["mlxd", "mlx_lm"] {
        for variant in s["variants"].as_object().into_iter().flatten().map(|(v, _)| v).filter(|v| *v != "greedy") {
            let (Some(by_run), Some(by_step)) = (
                paired_cost(s, engine, variant, "decode_tps", false),
                paired_cost(s, engine, variant, "step_median_s", true),
            ) else {
                continue;
            };
            println!(
                "{engine}: {variant} costs {:.1}% run by run [90% interval {:.1}, {:.1}] (median of {variant} / the greedy run beside it), {:.1}% by median step time",
                by_run.median, by_run.low, by_run.high, by_step.median
            );
        }
    }
    let c = &s["prompt_cache"];
    if !c.is_null() {
        println!(
            "prompt cache, {}-token prompt: cold TTFT {:.2} ms, repeated {:.2} ms ({:.1}x), one token appended {:.2} ms ({:.1}x)",
            c["prompt_tokens"],
            c["cold_ttft_s"].as_f64().unwrap_or(0.0) * 1e3,
            c["warm_ttft_s"].as_f64().unwrap_or(0.0) * 1e3,
            c["speedup"].as_f64().unwrap_or(0.0),
            c["extended_ttft_s"].as_f64().unwrap_or(0.0) * 1e3,
            c["extended_speedup"].as_f64().unwrap_or(0.0)
        );
    }
    let wb = s["weight_bytes"].as_f64().unwrap_or(0.0);
    println!("weights read per token: {:.1} MiB", wb / (1u64 << 20) as f64);
}

const QUANT_GROUP: i32 = 64;
const QUANT_BITS: i32 = 4;

/// Every 2-D `.weight` (linear layers, embedding) as MLX's `weight` / `scales` / `biases`
/// triple; norms stay as they are.
fn quantize_tensors(tensors: Vec<(String, Array)>) -> Result<Vec<(String, Array)>> {
    let mut out = Vec::with_capacity(tensors.len() * 3);
    for (name, w) in tensors {
        match name.strip_suffix(".weight") {
            Some(base) if w.ndim() == 2 => {
                let (q, scales, biases) = mlx_rs::ops::quantize(&w, QUANT_GROUP, QUANT_BITS)?;
                out.push((name.clone(), q));
                out.push((format!("{base}.scales"), scales));
                out.push((format!("{base}.biases"), biases));
            }
            _ => out.push((name, w)),
        }
    }
    Ok(out)
}

/// Writes a random-weight checkpoint of `shape` (config.json, model.safetensors, a word-level
/// tokenizer.json) unless it already exists.
fn make_model(shape: &str, dtype: &str, root: &Path) -> Result<PathBuf> {
    let s = shape_named(shape)?;
    // `q4`: bf16 weights quantized the way mlx-community checkpoints are (4 bits, groups of
    // 64; every linear layer and the embedding), so both engines load an MLX-quantized model.
    let quantized = dtype == "q4";
    let dt = dtype_named(dtype)?;
    let dir = root.join(format!("{shape}-{dtype}"));
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    let config = json!({
        "model_type": s.model_type, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "intermediate_size": s.intermediate, "vocab_size": s.vocab, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "tie_word_embeddings": s.tie, "max_position_embeddings": 40960,
        "torch_dtype": match dtype { "bf16" | "q4" => "bfloat16", "f16" => "float16", _ => "float32" },
    });
    let mut config = config;
    if quantized {
        config["quantization"] = json!({"group_size": QUANT_GROUP, "bits": QUANT_BITS});
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let mut tensors: Vec<(String, Array)> = Vec::new();
    let mut key = random::key(1234)?;
    let mut rnd = |shape: &[i32], scale: f32| -> Result<Array> {
        let (k, sub) = random::split(&key, 2)?;
        key = k;
        Ok(random::normal::<f32>(shape, 0.0, scale, &sub)?.as_dtype(dt)?)
    };
    let ones = |n: i32| -> Result<Array> { Ok(mlx_rs::ops::ones::<f32>(&[n])?.as_dtype(dt)?) };
    let (d, hd) = (s.hidden, s.head_dim);
    tensors.push(("model.embed_tokens.weight".into(), rnd(&[s.vocab, d], 0.02)?));
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), ones(d)?));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), ones(d)?));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), rnd(&[s.heads * hd, d], 0.02)?));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), rnd(&[s.kv_heads * hd, d], 0.02)?));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), rnd(&[s.kv_heads * hd, d], 0.02)?));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), rnd(&[d, s.heads * hd], 0.02)?));
        if s.model_type == "qwen3" {
            tensors.push((format!("{p}.self_attn.q_norm.weight"), ones(hd)?));
            tensors.push((format!("{p}.self_attn.k_norm.weight"), ones(hd)?));
        }
        tensors.push((format!("{p}.mlp.gate_proj.weight"), rnd(&[s.intermediate, d], 0.02)?));
        tensors.push((format!("{p}.mlp.up_proj.weight"), rnd(&[s.intermediate, d], 0.02)?));
        tensors.push((format!("{p}.mlp.down_proj.weight"), rnd(&[d, s.intermediate], 0.02)?));
    }
    tensors.push(("model.norm.weight".into(), ones(d)?));
    if !s.tie {
        tensors.push(("lm_head.weight".into(), rnd(&[s.vocab, d], 0.02)?));
    }
    if quantized {
        tensors = quantize_tensors(tensors)?;
    }
    Array::save_safetensors(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, dir.join("model.safetensors"))?;
    // A word-level tokenizer over the whole vocabulary: both engines need one to load, neither
    // uses it while timing.
    let vocab: serde_json::Map<String, Value> = (0..s.vocab).map(|i| (format!("t{i}"), json!(i))).collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string())?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"tokenizer_class": "PreTrainedTokenizerFast"}).to_string(),
    )?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(greedy: &[f64], other: &[f64]) -> Value {
        let runs = |v: &[f64]| v.iter().map(|t| json!({"decode_tps": t, "step_median_s": 1.0 / t})).collect::<Vec<_>>();
        json!({"variants": {"greedy": {"mlxd": {"runs": runs(greedy)}}, "full": {"mlxd": {"runs": runs(other)}}}})
    }

    #[test]
    fn paired_cost_is_the_median_over_rounds_with_an_interval_around_it() {
        // The same 2% in every round, whatever the round's speed: no spread at all.
        let greedy = [100.0, 300.0, 200.0, 250.0, 150.0];
        let s = summary(&greedy, &greedy.map(|g| g * 0.98));
        let p = paired_cost(&s, "mlxd", "full", "decode_tps", false).unwrap();
        assert!((p.median - 2.0).abs() < 1e-9 && (p.low - 2.0).abs() < 1e-9 && (p.high - 2.0).abs() < 1e-9);
        let by_step = paired_cost(&s, "mlxd", "full", "step_median_s", true).unwrap();
        assert!((by_step.median - 2.0).abs() < 1e-9);
        // Costs of 0..=20% over 21 rounds: median 10%, an interval around it and inside the range.
        let other: Vec<f64> = (0..21).map(|i| 100.0 * (1.0 - i as f64 / 100.0)).collect();
        let p = paired_cost(&summary(&[100.0; 21], &other), "mlxd", "full", "decode_tps", false).unwrap();
        assert!((p.median - 10.0).abs() < 1e-9);
        assert!(p.low < 10.0 && p.high > 10.0 && p.low >= 0.0 && p.high <= 20.0, "{} {}", p.low, p.high);
        // Mismatched or missing runs give nothing.
        assert!(paired_cost(&summary(&greedy, &[1.0]), "mlxd", "full", "decode_tps", false).is_none());
        assert!(paired_cost(&s, "mlx_lm", "full", "decode_tps", false).is_none());
    }
}
