//! `mlxd-bench step-parts`: where a one-sequence greedy decode step's time goes, part by part
//! (the embedding, the decoder blocks, the final norm with the vocabulary's head, the greedy
//! pick, and the whole step), without a profiler: each part is queued `--gen` times and
//! evaluated at once, `--repeats` times, so its launches follow each other on the device and
//! the median wall time per call is its device time wherever the host keeps ahead. A part that
//! takes a larger share of the whole step than its kernels' bytes suggest is where to look. The
//! sequence is a random `--prompt`-token prompt, prefilled.

use super::{random_prompt, Args};
use anyhow::{Context, Result};
use mlx_rs::Array;
use mlxd::cache::SequenceCache;
use serde_json::{json, Value};
use std::path::Path;

pub fn run(args: &Args, dir: &Path) -> Result<Value> {
    let loaded = mlxd::models::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let model = &loaded.model;
    let vocab = model.args.vocab as u32;
    let prompt: Vec<i32> = random_prompt(args.prompt, vocab, 7).into_iter().map(|t| t as i32).collect();
    let mut cache = SequenceCache::new(model.num_layers());
    model.prefill(&Array::from_slice(&prompt, &[1, prompt.len() as i32]), &mut cache)?;
    let (k, repeats) = (args.gen.max(1), args.repeats.max(1));
    let parts = model.step_part_times(&mut cache, k, repeats)?;
    let step = parts.last().map_or(f64::NAN, |p| p.1);
    println!(
        "decode step parts, one sequence, greedy: {} ({}), {k} calls queued at once, median of {repeats}",
        dir.display(),
        if model.fused_decode() { "fused decoder blocks" } else { "MLX's operations" },
    );
    println!("\n| part | µs per call | share of the whole step |\n| --- | --- | --- |");
    for (name, us) in &parts {
        println!("| {name} | {us:.1} | {:.1}% |", 100.0 * us / step);
    }
    let rest = step - parts.iter().take(parts.len().saturating_sub(1)).map(|p| p.1).sum::<f64>();
    println!("| the step less its parts (launch gaps, host) | {rest:.1} | {:.1}% |", 100.0 * rest / step);
    let rows: Vec<Value> = parts.iter().map(|(name, us)| json!({ "part": name, "us_per_call": us })).collect();
    Ok(json!({ "model": dir.display().to_string(), "calls": k, "repeats": repeats, "parts": rows }))
}
