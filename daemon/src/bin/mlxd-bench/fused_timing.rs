//! `mlxd-bench fused-timing`: where the fused decode block's time goes on the GPU, one row or a
//! batch. Run with `MLXD_FUSED_TIMING=1` (the kernel then counts, for its block 0, the
//! nanoseconds of each phase and of each grid barrier's wait, the barrier between two decoder
//! blocks of one launch, and the time between one launch's end and the next's start); for each
//! batch size it decodes `--gen` steps from prompts of `--prompt` tokens (row i: `i * --stagger`
//! more) and prints block 0's mean microseconds per block in each stretch. Without the variable
//! the counters stay zero and it says so.

use super::Args;
use anyhow::{bail, Context, Result};
use mlx_rs::Array;
use mlxd::cache::{BatchCache, SequenceCache};
use serde_json::{json, Value};
use std::path::Path;

const STRETCHES: [&str; 11] = [
    "norm + qkv",
    "barrier",
    "attention",
    "barrier",
    "o-proj",
    "barrier",
    "norm + gate/up",
    "barrier",
    "down",
    "barrier between blocks",
    "gap between launches",
];

pub fn run(args: &Args, dir: &Path) -> Result<Value> {
    if std::env::var("MLXD_FUSED_TIMING").as_deref() != Ok("1") {
        bail!("set MLXD_FUSED_TIMING=1: the kernel counts its time only then");
    }
    let loaded = mlxd::models::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let model = &loaded.model;
    let most = model.fused_batch_rows();
    println!("fused decode block: one sequence {}, batched steps of up to {most} rows", model.fused_decode());
    println!("\n| rows | calls | {} | total µs per block |", STRETCHES.join(" | "));
    println!("|{}", " --- |".repeat(STRETCHES.len() + 3));
    let mut out = Vec::new();
    for &rows in &args.clients {
        if rows == 1 && !model.fused_decode() {
            println!("| 1 | not fused (turned down at load, or MLXD_FUSED_DECODE=0) |");
            continue;
        }
        if rows > 1 && rows > most {
            println!("| {rows} | not fused (turned down at load, or MLXD_FUSED_BATCH=0) |");
            continue;
        }
        let mut caches: Vec<SequenceCache> = (0..rows)
            .map(|r| {
                let n = (args.prompt + r * args.stagger) as i32;
                let mut cache = SequenceCache::new(model.num_layers());
                let prompt: Vec<i32> = (0..n).map(|i| (i * 31 + r as i32 * 7) % 1000).collect();
                model.prefill(&Array::from_slice(&prompt, &[1, n]), &mut cache)?;
                Ok(cache)
            })
            .collect::<Result<_>>()?;
        let mut batch = if rows > 1 {
            let views: Vec<&SequenceCache> = caches.iter().collect();
            Some(BatchCache::build((0..rows as u64).collect(), &views)?)
        } else {
            None
        };
        let mut tokens = Array::from_slice(&vec![1i32; rows], &[rows as i32]);
        for _ in 0..args.gen {
            let logits = match &mut batch {
                Some(b) => model.forward_batched(&tokens, b)?,
                None => model.forward_batch(&tokens, &mut [&mut caches[0]])?,
            };
            let next = mlx_rs::ops::indexing::argmax_axis(&logits, -1, false)?;
            mlx_rs::transforms::async_eval([&next])?;
            tokens.eval()?;
            tokens = next;
        }
        tokens.eval()?;
        let work = match &batch {
            Some(b) => b.fused_workspace(),
            None => caches[0].fused_workspace(),
        }
        .context("no fused step ran")?;
        let (calls, us) = work.timing()?;
        let total: f64 = us[..9].iter().sum();
        let cells: Vec<String> = us.iter().map(|v| format!("{v:.1}")).collect();
        println!("| {rows} | {calls} | {} | {total:.1} |", cells.join(" | "));
        out.push(json!({ "rows": rows, "calls": calls, "us_per_call": us.to_vec(), "total_us": total }));
    }
    Ok(json!({ "model": dir.display().to_string(), "stretches": STRETCHES, "sizes": out }))
}
