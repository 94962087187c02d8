//! `mlxd-bench alternate`: sampler variants compared inside one decode, block by block.
//!
//! The engine's paired rounds (`mlxd-bench engine`) compare a variant with the greedy run beside
//! it, each a whole generation of its own (prefill, then 48 tokens or so). On the lent GPUs the
//! host's speed drifts by tens of percent from one round to the next, so a 2% difference needs
//! hundreds of rounds to show. Here one sequence decodes on and on, and the sampler changes every
//! `--gen` steps (a block), the variants taking turns in rotating order: adjacent blocks run on
//! the same host state, a few milliseconds apart. Each step is the engine's decode step, with
//! the same order of work: build the model's graph and the sampler's on the last token (still on
//! the device), queue them (`async_eval`), then read the token before it, the one host read per
//! step. A block's first step is not timed (it reads the token the other variant drew and may
//! pay for what that variant left behind in the caches); the KV cache goes back to the prompt
//! whenever it has grown by 1,024 positions. A variant's cost is the median over rounds of
//! its mean step time against greedy's in the same round, with a 90% bootstrap interval.

use crate::{median, median_interval, Args, Paired};
use anyhow::{Context, Result};
use mlx_rs::transforms::async_eval;
use mlx_rs::Array;
use mlxd::sampling::{read_ids, sample_batch, SequenceSampler};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// Positions the cache may grow past the prompt before it goes back to the prompt.
const SEGMENT: i32 = 1024;

/// One timed step's parts, in microseconds: the model's graph, the sampler's graph, queueing
/// both, and reading the token before.
#[derive(Default, Clone, Copy)]
struct Parts {
    model: f64,
    sampler: f64,
    launch: f64,
    read: f64,
}

impl Parts {
    fn total(&self) -> f64 {
        self.model + self.sampler + self.launch + self.read
    }
}

/// Greedy tokens from `base` with each block as one kernel and through MLX's operations, 64 steps
/// each: prints how many agree, where they first part, and the first step's logits difference.
fn greedy_agreement(model: &mlxd::models::Transformer, base: &mlxd::cache::SequenceCache, first: &Array) -> Result<()> {
    let run = |fused: bool| -> Result<(Vec<u32>, Vec<f32>)> {
        mlxd::models::fused::set_enabled(fused);
        let (mut cache, mut last) = (base.clone(), first.clone());
        let (mut ids, mut logits0) = (Vec::new(), Vec::new());
        for i in 0..64 {
            let logits = model.forward_batch(&last, &mut [&mut cache])?;
            if i == 0 {
                logits0 = logits.as_dtype(mlx_rs::Dtype::Float32)?.as_slice::<f32>().to_vec();
            }
            last = mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?.as_type::<u32>()?;
            ids.push(read_ids(&last)?[0]);
        }
        mlxd::models::fused::set_enabled(true);
        Ok((ids, logits0))
    };
    let (fused, lf) = run(true)?;
    let (ops, lo) = run(false)?;
    let same = fused.iter().zip(&ops).filter(|(a, b)| a == b).count();
    let parted = fused.iter().zip(&ops).position(|(a, b)| a != b);
    let diff = lf.iter().zip(&lo).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let top = lo.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    println!(
        "fused decode block vs MLX's operations, greedy from the prompt: {same}/64 tokens agree (first difference at {}), first step's logits differ by at most {:.3}% of the largest",
        parted.map_or("none".to_string(), |p| p.to_string()),
        100.0 * diff / top.max(1e-6)
    );
    Ok(())
}

pub(crate) fn run(args: &Args, dir: &Path) -> Result<Value> {
    let report = mlxd::runtime::Report::gather();
    let loaded = mlxd::models::load(dir)?;
    let model = &loaded.model;
    let vocab = model.args.vocab;
    let mut variants = crate::variant_list(args, &crate::plugin_variants(args)?)?;
    // Where the model decodes each block as one kernel, greedy through MLX's operations takes
    // its turn too: the fused block's gain, measured the same way.
    let unfused = model.fused_decode().then_some(variants.len());
    if unfused.is_some() {
        variants.push(("greedy-unfused".into(), mlxd::sampling::SamplingParams::default()));
    }
    anyhow::ensure!(
        variants.first().is_some_and(|(n, _)| n == "greedy") && variants.len() > 1,
        "alternate compares variants with greedy: --samplers greedy,... (or plugins)"
    );
    let block = args.gen.max(2);
    let rounds = args.repeats.max(1);
    let prompt = crate::random_prompt(args.prompt.max(1), vocab as u32, 7);
    let mut samplers = variants
        .iter()
        .map(|(name, params)| {
            SequenceSampler::new(params, vocab as usize, &prompt).with_context(|| format!("variant {name}"))
        })
        .collect::<Result<Vec<_>>>()?;

    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut base = mlxd::cache::SequenceCache::new(model.num_layers());
    let logits = model.forward_last(&Array::from_slice(&ids, &[1, ids.len() as i32]), &mut base)?;
    let first = mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?.as_type::<u32>()?;
    first.eval()?;
    base.eval()?;
    if unfused.is_some() {
        greedy_agreement(model, &base, &first)?;
    }
    let mut cache = base.clone();
    let mut last = first;

    // One decode step with sampler `v`: queues the next token, reads the one before it.
    let mut step = |v: usize, cache: &mut mlxd::cache::SequenceCache, last: &mut Array| -> Result<Parts> {
        let t0 = Instant::now();
        mlxd::models::fused::set_enabled(Some(v) != unfused);
        let logits = model.forward_batch(last, &mut [&mut *cache]);
        mlxd::models::fused::set_enabled(true);
        let logits = logits?;
        let t1 = Instant::now();
        let next = sample_batch(&logits, &mut [&mut samplers[v]])?;
        let t2 = Instant::now();
        async_eval([&next])?;
        let t3 = Instant::now();
        let read = read_ids(last)?;
        let t4 = Instant::now();
        anyhow::ensure!(read.len() == 1 && (read[0] as i32) < vocab, "variant {}: read {read:?}", variants[v].0);
        if let Some(e) = samplers[v].take_failure() {
            anyhow::bail!("variant {}: {e}", variants[v].0);
        }
        *last = next;
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        Ok(Parts { model: us(t0, t1), sampler: us(t1, t2), launch: us(t2, t3), read: us(t3, t4) })
    };

    // Warm-up: every variant a few blocks (compiled graphs traced, kernels loaded).
    for v in 0..variants.len() {
        for _ in 0..2 * block {
            step(v, &mut cache, &mut last)?;
        }
    }
    cache = base.clone();

    let n = variants.len();
    // Per variant: each round's mean step time (µs) and every timed step's parts.
    let mut means = vec![Vec::with_capacity(rounds); n];
    let mut parts: Vec<Vec<Parts>> = vec![Vec::new(); n];
    let started = Instant::now();
    for round in 0..rounds {
        for j in 0..n {
            let v = (round + j) % n;
            if cache.offset() - base.offset() > SEGMENT {
                cache = base.clone();
            }
            step(v, &mut cache, &mut last)?;
            let mut sum = 0.0;
            for _ in 1..block {
                let p = step(v, &mut cache, &mut last)?;
                sum += p.total();
                parts[v].push(p);
            }
            means[v].push(sum / (block - 1) as f64);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    println!(
        "model {} | MLX {} {} | {} | {} variants alternating in blocks of {block} steps (the first untimed), {rounds} rounds, {:.0} s",
        dir.display(),
        report.mlx_version,
        report.backend,
        report.device_name.clone().unwrap_or_else(|| "cpu".into()),
        n,
        elapsed
    );
    println!("| sampler | decode tok/s | step µs | model graph | sampler graph | launch | read | cost vs greedy [90% interval] |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut out = Vec::new();
    for v in 0..n {
        let pick = |f: fn(&Parts) -> f64| median(parts[v].iter().map(f).collect());
        let step_us = median(means[v].clone());
        let cost = (v > 0).then(|| paired(&means[0], &means[v]));
        let cost_text =
            cost.as_ref().map_or(String::new(), |p| format!("{:.2}% [{:.2}, {:.2}]", p.median, p.low, p.high));
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {cost_text} |",
            variants[v].0,
            1e6 / step_us,
            step_us,
            pick(|p| p.model),
            pick(|p| p.sampler),
            pick(|p| p.launch),
            pick(|p| p.read),
        );
        out.push(json!({
            "variant": variants[v].0,
            "round_mean_step_us": means[v],
            "median_step_us": step_us,
            "median_parts_us": {
                "model_graph": pick(|p| p.model),
                "sampler_graph": pick(|p| p.sampler),
                "launch": pick(|p| p.launch),
                "read": pick(|p| p.read),
            },
            "cost_vs_greedy_percent": cost.map(|p| json!({"median": p.median, "low": p.low, "high": p.high})),
        }));
    }
    Ok(json!({
        "stamp": crate::suite::stamp(),
        "model": dir.display().to_string(),
        "block_steps": block,
        "rounds": rounds,
        "prompt_tokens": prompt.len(),
        "variants": out,
    }))
}

/// The cost of `other` against `greedy`, round by round (`other / greedy - 1` of the mean step
/// times, in percent): the median and its 90% interval ([`median_interval`]).
fn paired(greedy: &[f64], other: &[f64]) -> Paired {
    median_interval(greedy.iter().zip(other).map(|(g, o)| (o / g - 1.0) * 100.0).collect())
}

#[cfg(test)]
mod tests {
    use super::paired;

    #[test]
    fn paired_cost_is_the_median_ratio_of_the_rounds() {
        // 3% slower in every round, whatever the round's speed: no spread.
        let greedy = [100.0, 250.0, 180.0, 120.0];
        let p = paired(&greedy, &greedy.map(|g| g * 1.03));
        assert!((p.median - 3.0).abs() < 1e-9 && (p.low - 3.0).abs() < 1e-9 && (p.high - 3.0).abs() < 1e-9);
        // 0..=10% over 11 rounds: median 5%, an interval around it inside the range.
        let other: Vec<f64> = (0..11).map(|i| 100.0 * (1.0 + i as f64 / 100.0)).collect();
        let p = paired(&[100.0; 11], &other);
        let (m, lo, hi) = (p.median, p.low, p.high);
        assert!((m - 5.0).abs() < 1e-9 && lo < 5.0 && hi > 5.0 && lo >= 0.0 && hi <= 10.0, "{m} {lo} {hi}");
    }
}
