//! `mlxd-bench sampler-cost`: the host time one sampling step costs on its own, per sampler
//! variant, with no model around it.
//!
//! Decode is bound by the host on the lent GPUs (a step's ~1.9 ms is the host building and
//! submitting ~300-700 primitives; the device waits), so whatever host time a sampler adds is
//! its overhead, one for one. The engine's runs measure that difference inside a whole step,
//! where it is a few percent of a noisy total; here the logits are fixed device arrays
//! (`[1, V]`, evaluated once) and each step is only the sampler: building its graph
//! (`sample_batch`, lazy), submitting it (`async_eval`: on CUDA, MLX encodes every primitive
//! into its graph and launches it on this thread) and reading the token (the one host read
//! per step). Variants run in rotating rounds; the table gives medians over all steps and
//! the primitive count of one step, and says where a variant's extra time sits (build, submit,
//! or waiting for the device).

use crate::{median, plugin_variants, Args};
use anyhow::{Context, Result};
use mlx_rs::random;
use mlx_rs::transforms::async_eval;
use mlxd::runtime::graph_kinds;
use mlxd::sampling::{sample_batch, SamplingParams, SequenceSampler};
use serde_json::{json, Value};
use std::time::Instant;

/// Steps a variant takes before it is timed (compiled graphs traced, kernels loaded).
const WARMUP: usize = 20;
/// Steps each variant takes under the profiler (`--profile DIR`): a sampler step is tens of
/// microseconds, and the profiler samples about once a millisecond.
const PROFILE_STEPS: usize = 20_000;

pub(crate) fn run(args: &Args) -> Result<Value> {
    let report = mlxd::runtime::Report::gather();
    let vocab = crate::shape_named(args.shape.as_deref().unwrap_or("qwen3-0.6b"))?.vocab;
    // The logits come in the model's activation dtype (bfloat16 for q4).
    let dtype = crate::dtype_named(&args.dtype)?;
    mlxd::sampling::prepare_kernels(vocab, dtype);
    let variants = crate::variant_list(args, &plugin_variants(args)?)?;
    let rows = args.clients.first().copied().unwrap_or(1).max(1);
    let steps = args.gen.max(1);
    let prompt = crate::random_prompt(args.prompt.max(1), vocab as u32, 7);
    let logits = random::normal::<f32>(&[rows as i32, vocab], 0.0, 3.0, &random::key(1)?)?.as_dtype(dtype)?;
    logits.eval()?;
    // One sampling step of every row; returns when it started, was built, queued and read.
    let step = |samplers: &mut Vec<SequenceSampler>, name: &str| -> Result<[Instant; 4]> {
        let t0 = Instant::now();
        let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
        let tokens = sample_batch(&logits, &mut refs)?;
        let t1 = Instant::now();
        async_eval([&tokens])?;
        let t2 = Instant::now();
        let ids = mlxd::sampling::read_ids(&tokens)?;
        let t3 = Instant::now();
        anyhow::ensure!(ids.len() == rows && ids.iter().all(|&t| (t as i32) < vocab), "{name}: read {ids:?}");
        for s in samplers.iter_mut() {
            if let Some(e) = s.take_failure() {
                anyhow::bail!("{name}: {e}");
            }
        }
        Ok([t0, t1, t2, t3])
    };
    let make = |name: &str, params: &SamplingParams| -> Result<Vec<SequenceSampler>> {
        (0..rows)
            .map(|r| {
                let params = SamplingParams { seed: params.seed.map(|s| s + r as u64), ..params.clone() };
                SequenceSampler::new(&params, vocab as usize, &prompt).with_context(|| format!("variant {name}"))
            })
            .collect()
    };

    // Per variant: build, submit, read (microseconds per step), over every round.
    let mut times: Vec<[Vec<f64>; 3]> = variants.iter().map(|_| Default::default()).collect();
    let mut primitives = vec![0usize; variants.len()];
    let n = variants.len();
    for round in 0..args.repeats.max(1) {
        for j in 0..n {
            let i = (round + j) % n;
            let (name, params) = &variants[i];
            mlxd::sampling::set_sampler_fused(crate::is_fused_twin(name));
            let mut samplers = make(name, params)?;
            for s in 0..WARMUP + steps {
                if round == 0 && s == WARMUP {
                    // The primitives of one steady step (built, counted, then dropped: the
                    // samplers' state moved on with it, which the next steps continue from).
                    let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
                    let tokens = sample_batch(&logits, &mut refs)?;
                    primitives[i] = graph_kinds(&tokens)?.values().sum();
                    tokens.eval()?;
                }
                let [t0, t1, t2, t3] = step(&mut samplers, name)?;
                if s >= WARMUP {
                    let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
                    times[i][0].push(us(t0, t1));
                    times[i][1].push(us(t1, t2));
                    times[i][2].push(us(t2, t3));
                }
            }
        }
    }
    if let Some(dir) = &args.profile {
        for (name, params) in &variants {
            mlxd::sampling::set_sampler_fused(crate::is_fused_twin(name));
            let mut samplers = make(name, params)?;
            for _ in 0..WARMUP {
                step(&mut samplers, name)?;
            }
            crate::profile::record(dir, name, || {
                for _ in 0..PROFILE_STEPS {
                    step(&mut samplers, name)?;
                }
                Ok(PROFILE_STEPS)
            })?;
        }
    }
    mlxd::sampling::set_sampler_fused(false);

    println!(
        "\nSampler alone, [{rows}, {vocab}] {dtype:?} logits on the device ({}, {}), {} rounds x {steps} steps, medians in us per step:\n",
        report.device_name.clone().unwrap_or_else(|| "cpu".into()),
        report.backend,
        args.repeats.max(1),
    );
    println!("| sampler | primitives | build | submit | read (device + transfer) | total | beyond greedy |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    let med: Vec<[f64; 4]> = times
        .iter()
        .map(|t| {
            let total: Vec<f64> = (0..t[0].len()).map(|k| t[0][k] + t[1][k] + t[2][k]).collect();
            [median(t[0].clone()), median(t[1].clone()), median(t[2].clone()), median(total)]
        })
        .collect();
    let greedy = variants.iter().position(|(n, _)| n == "greedy").map(|g| med[g][3]);
    for (i, (name, _)) in variants.iter().enumerate() {
        let [b, s, r, t] = med[i];
        let beyond = greedy.map_or_else(|| "-".to_string(), |g| format!("{:+.1}", t - g));
        println!("| {name} | {} | {b:.1} | {s:.1} | {r:.1} | {t:.1} | {beyond} |", primitives[i]);
        rows.push(json!({
            "variant": name, "primitives": primitives[i],
            "build_us": b, "submit_us": s, "read_us": r, "total_us": t,
        }));
    }
    Ok(json!({
        "kind": "sampler-cost",
        "device": report.device_name,
        "backend": report.backend,
        "mlx": report.mlx_version,
        "vocab": vocab,
        "rows": rows,
        "dtype": format!("{dtype:?}"),
        "steps": steps,
        "rounds": args.repeats.max(1),
        "variants": rows,
    }))
}
