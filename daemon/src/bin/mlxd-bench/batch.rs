//! `mlxd-bench batch`: the engine decoding B sequences together, without the daemon around it,
//! for B = 1, 2, 4, 8, 16 by default. For each batch size it prints the aggregate tok/s, the
//! scaling against B = 1 and where a step's time goes (host build, the engine thread's CPU time
//! while building, waiting for the device), so a shortfall of the concurrency benchmark can be
//! pinned on the engine's step or on the daemon around it.
//!
//! With `--model-kernels both` every batch size runs twice, alternating, with mlxd's CUDA
//! kernels for several-row products and padded attention (`mlxd::models::cuda`) and with
//! MLX's own operations (cuBLASLt, masked attention): the A/B for those kernels. The flag
//! decides for the run (default `on`; they only run on CUDA), whatever `MLXD_MODEL_KERNELS` says.
//! `--model-kernels fused` compares the fused decode block (`mlxd::models::fused`, one kernel
//! launch for all the decoder blocks, for one row and for batches up to the model's most; it
//! turns the batches' kernel on even where `MLXD_FUSED_BATCH=0`) with mlxd's kernels without
//! it; `off` turns both off.

use super::{per_step, random_prompt, Args};
use anyhow::{Context, Result};
use mlxd::engine::{Engine, EngineOptions, GenerateRequest, StepProfile};
use mlxd::sampling::SamplingParams;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// What one batch of `b` sequences measured.
struct Measured {
    /// Tokens after each row's first, over the time of the steps that produced them.
    tps: f64,
    profile: StepProfile,
    /// Median wall time of a step in which every row was decoding.
    step_ms: f64,
}

/// Runs `b` sequences of `gen` tokens from prompts of `prompt_len` tokens (row `i`: `i * stagger`
/// more, so that rows of different lengths share a padded stack, as a daemon's rows do)
/// together, stepping until all are done; the prefill is not timed.
fn one_batch(
    engine: &mut Engine,
    b: usize,
    prompt_len: usize,
    gen: usize,
    vocab: u32,
    stagger: usize,
) -> Result<Measured> {
    let mut rows = (0..b)
        .map(|i| {
            engine.start(GenerateRequest {
                prompt: random_prompt(prompt_len + i * stagger, vocab, 100 + i as u64),
                max_tokens: gen,
                stop: vec![],
                sampler: SamplingParams::default(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The first step reports the first tokens and stacks the rows; time from the one after.
    {
        let mut refs: Vec<_> = rows.iter_mut().collect();
        engine.step(&mut refs, |_, _| true)?;
    }
    engine.reset_profile();
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut steps = Vec::new();
    loop {
        let mut refs: Vec<_> = rows.iter_mut().filter(|r| r.finished().is_none()).collect();
        if refs.is_empty() {
            break;
        }
        let full = refs.len() == b;
        let t = Instant::now();
        engine.step(&mut refs, |_, _| {
            tokens += 1;
            true
        })?;
        if full {
            steps.push(t.elapsed());
        }
    }
    let elapsed = started.elapsed();
    let profile = engine.profile();
    for row in rows {
        engine.finish(row);
    }
    steps.sort();
    let step_ms = steps.get(steps.len() / 2).copied().unwrap_or_default().as_secs_f64() * 1e3;
    Ok(Measured { tps: tokens as f64 / elapsed.as_secs_f64(), profile, step_ms })
}

/// The batch sizes of `--clients` against each other; prints the table and returns its JSON.
pub fn run(args: &Args, dir: &Path, model_kernels: &str) -> Result<Value> {
    // (mlxd's batched-decode kernels, the fused decode block) per mode.
    let modes: Vec<(bool, bool)> = match model_kernels {
        "off" => vec![(false, false)],
        "on" => vec![(true, true)],
        "both" => vec![(true, true), (false, false)],
        "fused" => vec![(true, true), (true, false)],
        other => anyhow::bail!("--model-kernels {other}: use off, on, both or fused"),
    };
    let set_mode = |(kernels, fused): (bool, bool)| {
        mlxd::models::cuda::set_enabled(kernels);
        mlxd::models::fused::set_enabled(fused);
    };
    if model_kernels == "fused" {
        // Batched steps take the fused block even where MLXD_FUSED_BATCH=0 (checked at load).
        mlxd::models::fused::set_batches_enabled(true);
    }
    let report = mlxd::runtime::Report::gather();
    let loading = Instant::now();
    let model = mlxd::models::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    // On CUDA this includes compiling the batched-decode kernels (when they are on).
    println!("model loaded in {:.0} ms", loading.elapsed().as_secs_f64() * 1e3);
    let vocab = model.model.args.vocab as u32;
    let (fused_one, fused_rows) = (model.model.fused_decode(), model.model.fused_batch_rows());
    println!("fused decode block: one sequence {fused_one}, batched steps of up to {fused_rows} rows");
    let mut engine = Engine::new(model, EngineOptions { prompt_cache_bytes: 0, ..Default::default() });
    engine.model.eos_ids.clear(); // random weights: run to the token count
    let sizes = args.clients.clone();
    // Warm-up: every size once in every mode (kernels, compiled graphs, allocator).
    for &mode in &modes {
        set_mode(mode);
        for &b in &sizes {
            one_batch(&mut engine, b, args.prompt, args.gen.min(32), vocab, args.stagger)?;
        }
    }
    let mut results: Vec<Vec<Vec<Measured>>> =
        modes.iter().map(|_| sizes.iter().map(|_| Vec::new()).collect()).collect();
    for _ in 0..args.repeats.max(1) {
        for (si, &b) in sizes.iter().enumerate() {
            for (mi, &mode) in modes.iter().enumerate() {
                set_mode(mode);
                results[mi][si].push(one_batch(&mut engine, b, args.prompt, args.gen, vocab, args.stagger)?);
            }
        }
    }
    set_mode((true, true));

    println!(
        "\n{} | {} | MLX {} | {} | prompt {} tok (+{} per row), {} tok per row, {} runs (median)",
        report.device_name.clone().unwrap_or_default(),
        report.backend,
        report.mlx_version,
        dir.display(),
        args.prompt,
        args.stagger,
        args.gen,
        args.repeats.max(1)
    );
    println!("| rows | products, attention | aggregate tok/s | x rows=1 | step ms (median) | host build ms/step | of which model graph | thread CPU ms/step | device wait ms/step |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut out = Vec::new();
    for (mi, &mode) in modes.iter().enumerate() {
        let base = median_run(results[mi][0].iter().map(|m| m.tps).collect());
        for (si, &b) in sizes.iter().enumerate() {
            let runs = &results[mi][si];
            // The run whose throughput is the median, for its step profile.
            let mut order: Vec<usize> = (0..runs.len()).collect();
            order.sort_by(|&x, &y| runs[x].tps.total_cmp(&runs[y].tps));
            let m = &runs[order[order.len() / 2]];
            let p = &m.profile;
            let fused = mode.1 && if b == 1 { fused_one } else { b <= fused_rows };
            let kernels = match mode {
                _ if fused => "fused block",
                (true, _) => "mlxd",
                (false, _) => "MLX",
            };
            println!(
                "| {b} | {kernels} | {:.1} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                m.tps,
                m.tps / base,
                m.step_ms,
                per_step(p.build, p),
                per_step(p.graph, p),
                per_step(p.build_cpu, p),
                per_step(p.wait, p)
            );
            out.push(json!({
                "rows": b,
                "model_kernels": mode.0,
                "fused_block": fused,
                "aggregate_tps": runs.iter().map(|m| m.tps).collect::<Vec<_>>(),
                "step_ms_median": m.step_ms,
                "host_build_ms_per_step": per_step(p.build, p),
                "model_graph_ms_per_step": per_step(p.graph, p),
                "host_build_cpu_ms_per_step": per_step(p.build_cpu, p),
                "device_wait_ms_per_step": per_step(p.wait, p),
            }));
        }
    }
    Ok(json!({
        "model": dir.display().to_string(),
        "device": report.device_name,
        "backend": report.backend,
        "mlx": report.mlx_version,
        "prompt_tokens": args.prompt,
        "stagger": args.stagger,
        "gen_tokens": args.gen,
        "batches": out,
    }))
}

/// The upper of the two middle values for an even count (not their mean, as `main.rs`'s
/// `median`): the table reports each size by its median *run* (a run that happened, whose step
/// profile it prints), so the base it divides by must be picked the same way or the 1-row line
/// would not read 1.00x.
fn median_run(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
