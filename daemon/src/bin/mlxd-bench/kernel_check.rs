//! `mlxd-bench kernel-check`: mlxd's CUDA kernels for batched decode (`mlxd::models::cuda`)
//! against the same computation as MLX operations in float32, on random inputs of the shapes a
//! Qwen3-0.6B-sized model uses, and the `dry` plugin's kernel (ABI 1.1) against its own
//! operations path. Prints each case's largest error relative to the largest
//! reference value and fails when one exceeds the dtype's tolerance. Without CUDA it says so and
//! checks nothing.

use anyhow::{anyhow, ensure, Context, Result};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, random, Array, Dtype};
use mlxd::plugins::instance::StepInfo;
use mlxd::plugins::PluginInstance;

fn relative_error(got: &Array, want: &Array) -> Result<f32> {
    let diff = ops::abs(ops::subtract(&got.as_type::<f32>()?, want)?)?.max(None)?;
    let scale = ops::abs(want)?.max(None)?;
    Ok(diff.try_item_exact::<f32>()? / scale.try_item_exact::<f32>()?.max(1e-6))
}

fn tolerance(d: Dtype) -> f32 {
    if d == Dtype::Float32 {
        1e-4
    } else {
        2e-2
    }
}

fn normal(shape: &[i32], std: f32, seed: u64, d: Dtype) -> Result<Array> {
    Ok(random::normal::<f32>(shape, 0.0, std, &random::key(seed)?)?.as_dtype(d)?)
}

/// The product kernel's cases, `(rows, K, widths of the parts)`: Qwen3-0.6B's stacked q/k/v
/// and gate/up, its down projection and LM head, Llama-3.2-1B's down, SmolLM2's widths (K not a
/// multiple of 128, N not of 8).
pub const PRODUCT_CASES: [(i32, i32, &[i32]); 7] = [
    (2, 1024, &[2048, 1024, 1024]),
    (5, 1024, &[3072, 3072]),
    (8, 3072, &[1024]),
    (16, 2048, &[1024]),
    (8, 1024, &[151_936]),
    (11, 576, &[1533]),
    (3, 576, &[576, 192, 192]),
];

/// Products of 2-16 rows by stacked and plain matrices, and the attention over a padded stack.
pub fn run() -> Result<()> {
    let report = mlxd::runtime::Report::gather();
    println!("{} ({}), MLX {}", report.device_name.clone().unwrap_or_default(), report.backend, report.mlx_version);
    if report.backend != "cuda" {
        println!("no CUDA here: the kernels run only on MLX's CUDA backend; nothing checked");
        return Ok(());
    }
    mlxd::models::cuda::set_enabled(true);
    let mut worst = Vec::new();
    println!("| case | dtype | max error / max value | tolerance |\n| --- | --- | --- | --- |");
    let cases = &PRODUCT_CASES;
    for d in [Dtype::Bfloat16, Dtype::Float16, Dtype::Float32] {
        // The product kernel runs the tensor cores' 16-bit types; float32 stays with MLX.
        let product_cases = if d == Dtype::Float32 { &cases[..0] } else { &cases[..] };
        for (i, &(m, k, widths)) in product_cases.iter().enumerate() {
            let n: i32 = widths.iter().sum();
            let x = normal(&[m, k], 1.0, 10 + i as u64, d)?;
            let w = normal(&[n, k], 0.05, 20 + i as u64, d)?;
            anyhow::ensure!(mlxd::models::cuda::rows_apply(&x, &w), "the product kernel refuses {m}x{k} by {n}x{k}");
            let parts = mlxd::models::cuda::rows(&x, &w, widths)?;
            // Row by row: MLX takes a one-row float32 product through its gemv kernel, in full
            // float32; several rows would go through cuBLASLt, which computes float32 in TF32.
            let (xf, wt) = (x.as_type::<f32>()?, w.as_type::<f32>()?.t());
            let rows: Vec<Array> =
                (0..m).map(|r| ops::matmul(&xf.try_index(r..r + 1)?, &wt)).collect::<Result<_, _>>()?;
            let want = ops::concatenate(&rows, 0)?;
            let mut start = 0;
            let mut err: f32 = 0.0;
            for (p, &wd) in parts.iter().zip(widths) {
                ensure!(p.shape() == [m, wd], "part of shape {:?}, want [{m}, {wd}]", p.shape());
                err = err.max(relative_error(p, &want.try_index((.., start..start + wd))?)?);
                start += wd;
            }
            println!("| {m} rows x [{n}, {k}] in parts {widths:?} | {d:?} | {err:.2e} | {:.0e} |", tolerance(d));
            worst.push((err, tolerance(d)));
        }
        // Rows padded by different amounts; Qwen3-0.6B's heads (16 over 8, of 128) and
        // Llama-3.2-1B's (32 over 8, of 64), a short and a long stack.
        for (hq, hkv, dh, cap, cur, pads) in
            [(16, 8, 128, 512, 300, vec![0, 37, 100, 5, 250]), (32, 8, 64, 2304, 2100, vec![1900, 0, 12])]
        {
            let err = attention_error(d, hq, hkv, dh, cap, cur, &pads)?;
            println!(
                "| attention, {} rows padded {pads:?} to {}, {hq}/{hkv} heads of {dh} | {d:?} | {err:.2e} | {:.0e} |",
                pads.len(),
                cur + 1,
                tolerance(d)
            );
            worst.push((err, tolerance(d)));
        }
    }
    worst.extend(dry_plugin_errors()?);
    // A plugin's token history grows by one column per step through one kernel.
    let history = Array::from_slice(&(0..300).map(|i| (i * 7919) % 151_936).collect::<Vec<i32>>(), &[1, 300]);
    let token = Array::from_slice(&[151_935u32], &[1]);
    let appended = mlxd::sampling::append_history(&history, &token).context("the append kernel is off")??;
    let want = ops::concatenate(&[history.clone(), token.reshape(&[1, 1])?.as_type::<i32>()?], 1)?;
    let same = appended.shape() == want.shape() && ops::array_eq(&appended, &want, false)?.try_item_exact::<bool>()?;
    println!("| history append, 300 + 1 tokens | Int32 | {} | exact |", if same { "equal" } else { "DIFFERENT" });
    worst.push((if same { 0.0 } else { f32::NAN }, 0.0));
    // A NaN error counts as a failure.
    let failed = worst.iter().filter(|(e, t)| e.is_nan() || e > t).count();
    ensure!(failed == 0, "{failed} case(s) beyond tolerance");
    println!("all {} cases within tolerance", worst.len());
    timings()
}

const CALLS: usize = 20;

/// Microseconds per call of `make(i)` for `i` in `0..CALLS` (the graph of all the calls
/// evaluated at once, so the device's time dominates wherever a call takes longer than the
/// host's few microseconds per node), median of five after a warm-up.
fn per_call(make: &dyn Fn(usize) -> Result<Array>) -> Result<f64> {
    let mut times = Vec::new();
    for rep in 0..6 {
        let outs: Vec<Array> = (0..CALLS).map(make).collect::<Result<_>>()?;
        let t = std::time::Instant::now();
        mlx_rs::transforms::eval(outs.iter())?;
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e6 / CALLS as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Device time per call of each kernel against MLX's own operation for the same work, bf16:
/// the products of the Qwen3-0.6B and Llama-3.2-1B shapes' layers and LM heads, and padded
/// attention over 300 columns.
fn timings() -> Result<()> {
    let d = Dtype::Bfloat16;
    println!("\n| bf16, per call | mlxd kernel us | MLX us (cuBLASLt / masked attention) |\n| --- | --- | --- |");
    let shapes: [(&str, i32, i32); 7] = [
        ("Qwen3 q/k/v", 4096, 1024),
        ("Qwen3 gate/up", 6144, 1024),
        ("Qwen3 down", 1024, 3072),
        ("Qwen3 head", 151_936, 1024),
        ("Llama gate/up", 16_384, 2048),
        ("Llama down", 2048, 8192),
        ("Llama head", 128_256, 2048),
    ];
    for (name, n, k) in shapes {
        // Distinct matrices, together larger than the L2 cache, so that each call reads its
        // weights from memory as a decode step does.
        let count = if (n as usize) * (k as usize) * 2 > 64 << 20 { 2 } else { CALLS };
        let ws: Vec<Array> = (0..count).map(|i| normal(&[n, k], 0.05, 40 + i as u64, d)).collect::<Result<_>>()?;
        let wts: Vec<Array> = ws.iter().map(|w| w.t()).collect();
        mlx_rs::transforms::eval(ws.iter().chain(&wts))?;
        for m in [2, 8, 16] {
            let x = normal(&[m, k], 1.0, 41, d)?;
            let ours = per_call(&|i| Ok(mlxd::models::cuda::rows(&x, &ws[i % count], &[n])?.remove(0)))?;
            let theirs = per_call(&|i| Ok(ops::matmul(&x, &wts[i % count])?))?;
            println!("| {name} [{n}, {k}], {m} rows | {ours:.1} | {theirs:.1} |");
        }
    }
    let (hq, hkv, dh, cap, cur) = (16, 8, 128, 512, 300);
    for b in [2, 8, 16] {
        let pads: Vec<i32> = (0..b).map(|i| (i * 7) % 50).collect();
        let q = normal(&[b, hq, 1, dh], 1.0, 50, d)?;
        let keys = normal(&[b, hkv, cap, dh], 1.0, 51, d)?;
        let values = normal(&[b, hkv, cap, dh], 1.0, 52, d)?;
        let starts = Array::from_slice(&pads, &[b]);
        let offsets = Array::from_slice(&pads.iter().map(|p| cur - p).collect::<Vec<_>>(), &[b]);
        let scale = 1.0 / (dh as f32).sqrt();
        let l = cur + 1;
        let (ks, vs) = (keys.try_index((.., .., ..l, ..))?, values.try_index((.., .., ..l, ..))?);
        let cols = ops::arange::<_, i32>(None, l, None)?.reshape(&[1, 1, 1, l])?;
        let mask = ops::ge(&cols, &starts.reshape(&[b, 1, 1, 1])?)?;
        mlx_rs::transforms::eval([&ks, &vs, &mask])?;
        let ours = per_call(&|_| Ok(mlxd::models::cuda::attention(&q, &keys, &values, &starts, &offsets, scale)?))?;
        let theirs = per_call(&|_| {
            let m = mlx_rs::fast::ScaledDotProductAttentionMask::Array(&mask);
            Ok(mlx_rs::fast::scaled_dot_product_attention(&q, &ks, &vs, scale, Some(m), None)?)
        })?;
        println!("| attention, {b} rows, {hq}/{hkv} heads of {dh}, {l} columns | {ours:.1} | {theirs:.1} |");
    }
    Ok(())
}

/// The padded-attention kernel's error against float32 MLX ops, for `pads.len()` rows whose
/// last live column is `cur`, in storage `cap` columns wide.
fn attention_error(d: Dtype, hq: i32, hkv: i32, dh: i32, cap: i32, cur: i32, pads: &[i32]) -> Result<f32> {
    let b = pads.len() as i32;
    let q = normal(&[b, hq, 1, dh], 1.0, 30, d)?;
    let keys = normal(&[b, hkv, cap, dh], 1.0, 31, d)?;
    let values = normal(&[b, hkv, cap, dh], 1.0, 32, d)?;
    let starts = Array::from_slice(pads, &[b]);
    let offsets = Array::from_slice(&pads.iter().map(|p| cur - p).collect::<Vec<_>>(), &[b]);
    let scale = 1.0 / (dh as f32).sqrt();
    let got = mlxd::models::cuda::attention(&q, &keys, &values, &starts, &offsets, scale)?;
    // Reference: grouped heads as [B, kv, group, 1, D] against [B, kv, 1, L, D], float32.
    let g = hq / hkv;
    let l = cur + 1;
    let qf = q.as_type::<f32>()?.reshape(&[b, hkv, g, 1, dh])?;
    let kf = keys.as_type::<f32>()?.try_index((.., .., ..l, ..))?.reshape(&[b, hkv, 1, l, dh])?;
    let vf = values.as_type::<f32>()?.try_index((.., .., ..l, ..))?.reshape(&[b, hkv, 1, l, dh])?;
    let scores = ops::multiply(ops::matmul(&qf, &kf.swap_axes(-1, -2)?)?, Array::from_f32(scale))?;
    let cols = ops::arange::<_, i32>(None, l, None)?.reshape(&[1, 1, 1, 1, l])?;
    let live = ops::ge(&cols, &starts.reshape(&[b, 1, 1, 1, 1])?)?;
    let scores = ops::select(&live, &scores, Array::from_f32(f32::NEG_INFINITY))?;
    let probs = ops::softmax_axis(&scores, -1, None)?;
    let want = ops::matmul(&probs, &vf)?.reshape(&[b, hq, 1, dh])?;
    ensure!(got.shape() == want.shape(), "attention output {:?}, want {:?}", got.shape(), want.shape());
    relative_error(&got, &want)
}

/// The `dry` plugin's CUDA kernel (ABI 1.1 `kernel`) against the same plugin's operations path
/// (kernels switched off for that instance), over four consecutive steps so that the
/// operations' incremental update is compared too; histories drawn from a few token ids repeat
/// a lot. Error: the largest `|got - want| / max(|want|, 1)` (equal values, infinities
/// included, count as 0).
fn dry_plugin_errors() -> Result<Vec<(f32, f32)>> {
    let plugin = crate::BenchPlugins::open(None)?.get("dry")?;
    let vocab = 151_936;
    let tolerance = 1e-5;
    let mut out = Vec::new();
    for (params, alphabet, d) in [
        (r#"{"multiplier":0.8}"#, 8, Dtype::Bfloat16),
        (r#"{"multiplier":0.8,"sequence_breakers":[3,5000]}"#, 8, Dtype::Float32),
        (r#"{"multiplier":1.5,"base":1.0,"allowed_length":3,"penalty_last_n":64}"#, 4, Dtype::Bfloat16),
        (r#"{"multiplier":0.8}"#, 150_000, Dtype::Float32),
    ] {
        let make = |kernels: bool| {
            mlxd::plugins::kernels::set_enabled(kernels);
            let p = PluginInstance::create(plugin.clone(), params, vocab as usize, 0).map_err(|e| anyhow!("{e}"));
            mlxd::plugins::kernels::set_enabled(true);
            p
        };
        let (mut kernel, mut operations) = (make(true)?, make(false)?);
        let mut state = 12345u64;
        let history: Vec<i32> = (0..310)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((state >> 33) % alphabet) as i32
            })
            .collect();
        let (mut err, mut changed) = (0f32, 0i64);
        for step in 0..4usize {
            let t = 300 + step;
            let h = Array::from_slice(&history[..t], &[1, t as i32]);
            let logits = normal(&[1, vocab], 2.0, 60 + step as u64, d)?;
            let info = StepInfo { prompt_tokens: 300, generated_tokens: step, temperature: 0.0 };
            let got = kernel.apply(&logits, Some(&h), info).map_err(|e| anyhow!("{e}"))?.as_type::<f32>()?;
            let want = operations.apply(&logits, Some(&h), info).map_err(|e| anyhow!("{e}"))?.as_type::<f32>()?;
            ensure!(got.shape() == want.shape(), "kernel output {:?}, operations {:?}", got.shape(), want.shape());
            let diff = ops::divide(
                ops::abs(ops::subtract(&got, &want)?)?,
                ops::maximum(ops::abs(&want)?, Array::from_f32(1.0))?,
            )?;
            let diff = ops::select(&ops::eq(&got, &want)?, Array::from_f32(0.0), &diff)?;
            err = err.max(diff.max(None)?.try_item_exact::<f32>()?);
            let moved = ops::ne(&want, &logits.as_type::<f32>()?)?.as_type::<i32>()?.sum(None)?;
            changed += moved.try_item_exact::<i32>()? as i64;
        }
        println!(
            "| dry plugin: kernel vs its operations, {params}, {alphabet} distinct ids, 4 steps ({changed} logits penalized) | {d:?} | {err:.2e} | {tolerance:.0e} |"
        );
        if alphabet < 100 {
            ensure!(changed > 0, "dry changed no logit for a history of {alphabet} ids: nothing was compared");
        }
        out.push((err, tolerance));
    }
    Ok(out)
}
