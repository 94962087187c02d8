//! `mlxd-bench fused-check [--clients 1,2,3,4,8] [--repeats 20]`: the fused decode block's
//! load-time check, repeated. Each repeat runs one step of the same prefilled rows through the
//! fused kernel and through MLX's operations, and compares: the error the load-time check
//! judges (largest difference over the largest value), and whether each side gives the same
//! numbers as its own first repeat. A kernel that answers the same input differently (a race)
//! shows there, apart from one that is only imprecise. `MLXD_FUSED_BATCH=force` checks batched
//! rows even where the kernel times slower at load.

use super::Args;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The largest absolute difference of two equally long slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn run(args: &Args, dir: &Path) -> Result<Value> {
    let loaded = mlxd::models::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let model = &loaded.model;
    let most = model.fused_batch_rows();
    println!("fused decode block: one sequence {}, batched steps of up to {most} rows", model.fused_decode());
    println!("\n| rows | repeats | error vs MLX's operations: min / median / max | fused repeats unlike the first (largest difference) | reference repeats unlike the first |");
    println!("| --- | --- | --- | --- | --- |");
    let mut out = Vec::new();
    for &rows in &args.clients {
        let kept = if rows == 1 { model.fused_decode() } else { rows <= most };
        if !kept {
            println!("| {rows} | not fused (see the log: turned down at load, or batches off) | | | |");
            continue;
        }
        let mut errors = Vec::new();
        let (mut first_fused, mut first_ref): (Option<Vec<f32>>, Option<Vec<f32>>) = (None, None);
        let (mut fused_unlike, mut ref_unlike, mut fused_worst, mut ref_worst) = (0, 0, 0.0f32, 0.0f32);
        for _ in 0..args.repeats.max(1) {
            let (got, want) = model.fused_check_outputs(rows)?;
            let top = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            errors.push(f64::from(max_diff(&got, &want) / top));
            let first = first_fused.get_or_insert_with(|| got.clone());
            let d = max_diff(first, &got);
            fused_unlike += usize::from(d > 0.0);
            fused_worst = fused_worst.max(d / top);
            let first = first_ref.get_or_insert_with(|| want.clone());
            let d = max_diff(first, &want);
            ref_unlike += usize::from(d > 0.0);
            ref_worst = ref_worst.max(d / top);
        }
        let mut sorted = errors.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        println!(
            "| {rows} | {n} | {:.4} / {:.4} / {:.4} | {fused_unlike} ({fused_worst:.4}) | {ref_unlike} ({ref_worst:.4}) |",
            sorted[0],
            sorted[n / 2],
            sorted[n - 1]
        );
        out.push(json!({
            "rows": rows,
            "errors": errors,
            "fused_repeats_unlike_first": fused_unlike,
            "fused_largest_relative_difference": fused_worst,
            "reference_repeats_unlike_first": ref_unlike,
            "reference_largest_relative_difference": ref_worst,
        }));
    }
    Ok(json!({"model": dir.display().to_string(), "checks": out}))
}
