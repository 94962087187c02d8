//! `mlxd-bench kernel-sources --out DIR [--plugin-dir DIR] [--plugin NAME[:JSON]]...`: records
//! every CUDA kernel mlxd can queue, on any machine, for `tests/nvrtc/check.py` to compile with
//! NVRTC where no GPU is.
//!
//! The kernels are recorded through the calls the engine makes (`mlxd::runtime::
//! record_cuda_kernels`): the sampling kernels (the two, the fused one, the greedy pick with the
//! history append) for each logits dtype, a vocabulary that is a multiple of the chunk and one
//! that is not, with and without a repetition window; the products of 2-16 rows in one, two and
//! three parts for the 16-bit types; the padded attention for Qwen3-0.6B's and Llama-3.2-1B's
//! heads in each float dtype; the fused decode block for both shapes, 4-bit, in the 16-bit types; a
//! plugin's history append; and the `dry` plugin's own kernel
//! (loaded from `--plugin-dir`, by default this executable's folder). Each distinct compile is
//! one JSON file in DIR. Fails when a kernel family was not reached, so a refactoring that
//! moves a call site off these paths cannot silently shrink what the check compiles.
//!
//! With `--plugin` (repeatable), only those plugins' kernels are recorded: each instance is
//! created with the given parameters and applied once to zero logits of each float dtype with a
//! short history, as a plugin author's compile check without a GPU (plugin-api/README.md).

use anyhow::{anyhow, ensure, Context, Result};
use mlx_rs::{Array, Dtype};
use mlxd::plugins::instance::StepInfo;
use mlxd::plugins::PluginInstance;
use mlxd::sampling::{SamplingParams, SequenceSampler};
use std::path::{Path, PathBuf};

/// Every kernel name (or name prefix, for plugins) the recording must contain.
const EXPECTED: [&str; 11] = [
    "mlxd_fused_block",
    "mlxd_fused_batch",
    "mlxd_sample_chunks",
    "mlxd_sample_pick",
    "mlxd_sample-",
    "mlxd_pick_append",
    "mlxd_history_append",
    "mlxd_rows1",
    "mlxd_rows2",
    "mlxd_rows3",
    "mlxd_padded_attention",
];

const FLOATS: [Dtype; 3] = [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16];

pub fn run(out: &Path, plugin_dir: Option<PathBuf>, plugins: &[(String, String)]) -> Result<()> {
    mlxd::runtime::record_cuda_kernels(out).with_context(|| format!("recording into {}", out.display()))?;
    mlxd::sampling::set_sampler_kernel(true);
    mlxd::models::cuda::set_enabled(true);
    mlxd::plugins::kernels::set_enabled(true);
    let registry = crate::BenchPlugins::open(plugin_dir.as_deref())?;
    if plugins.is_empty() {
        sampling()?;
        model()?;
        ensure!(plugin(&registry, "dry", r#"{"multiplier":0.8}"#)? > 0, "the dry plugin queued no kernel");
        let files = mlxd::runtime::recorded_cuda_kernels();
        for name in EXPECTED {
            ensure!(files.iter().any(|f| f.starts_with(name)), "no `{name}` kernel was recorded");
        }
    } else {
        for (name, params) in plugins {
            let kernels = plugin(&registry, name, params)?;
            println!("{name}: {kernels} kernel compile(s)");
        }
    }
    let files = mlxd::runtime::recorded_cuda_kernels();
    println!("{} kernel compiles recorded in {}:", files.len(), out.display());
    for f in &files {
        println!("  {f}");
    }
    Ok(())
}

/// One draw of two rows through the sampling pipeline, each configuration.
fn sampling() -> Result<()> {
    let full = crate::full_sampling();
    let top_k = SamplingParams { temperature: 0.9, top_k: 20, ..Default::default() };
    for fused in [false, true] {
        mlxd::sampling::set_sampler_fused(fused);
        for dtype in FLOATS {
            // Qwen3's vocabulary, then one whose last chunk is shorter than the top-k.
            for (params, vocab) in [(&full, 151_936), (&top_k, 1_124)] {
                let mut rows = (0..2u64)
                    .map(|i| {
                        SequenceSampler::new(&SamplingParams { seed: Some(1 + i), ..params.clone() }, vocab, &[1, 2])
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut refs: Vec<&mut SequenceSampler> = rows.iter_mut().collect();
                let logits = mlx_rs::ops::zeros_dtype(&[2, vocab as i32], dtype)?;
                let tokens = mlxd::sampling::sample_batch(&logits, &mut refs)?;
                ensure!(tokens.shape() == [2], "two rows drew {:?}", tokens.shape());
            }
        }
        if fused {
            let history = Array::zeros::<i32>(&[1, 4])?;
            for dtype in [Dtype::Float32, Dtype::Bfloat16] {
                let logits = mlx_rs::ops::zeros_dtype(&[1, 151_936], dtype)?;
                mlxd::sampling::pick_and_append(&logits, &history).context("the fused pick is off")??;
            }
        }
    }
    mlxd::sampling::set_sampler_fused(false);
    let history = Array::zeros::<i32>(&[1, 4])?;
    mlxd::sampling::append_history(&history, &Array::zeros::<u32>(&[1])?).context("the append kernel is off")??;
    Ok(())
}

/// The batched decode step's kernels, at the shapes `kernel-check` verifies on a GPU.
fn model() -> Result<()> {
    for d in [Dtype::Bfloat16, Dtype::Float16] {
        for &(m, k, widths) in crate::kernel_check::PRODUCT_CASES.iter() {
            let n: i32 = widths.iter().sum();
            let (x, w) = (mlx_rs::ops::zeros_dtype(&[m, k], d)?, mlx_rs::ops::zeros_dtype(&[n, k], d)?);
            ensure!(mlxd::models::cuda::rows_apply(&x, &w), "the product kernel refuses {m}x{k} by {n}x{k}");
            mlxd::models::cuda::rows(&x, &w, widths)?;
        }
    }
    for d in FLOATS {
        for (hq, hkv, dh) in [(16, 8, 128), (32, 8, 64)] {
            ensure!(
                mlxd::models::cuda::attention_applies(d, hq, hkv, dh),
                "attention refuses {hq}/{hkv} heads of {dh}"
            );
            let q = mlx_rs::ops::zeros_dtype(&[2, hq, 1, dh], d)?;
            let kv = mlx_rs::ops::zeros_dtype(&[2, hkv, 64, dh], d)?;
            let (starts, offsets) = (Array::from_slice(&[0i32, 3], &[2]), Array::from_slice(&[10i32, 7], &[2]));
            mlxd::models::cuda::attention(&q, &kv, &kv, &starts, &offsets, 1.0 / (dh as f32).sqrt())?;
        }
    }
    // The fused decode block for the 4-bit Qwen3-0.6B and Llama-3.2-1B shapes.
    for d in [Dtype::Bfloat16, Dtype::Float16] {
        mlxd::models::fused::queue_for_shape(1024, 16, 8, 128, 3072, true, d)?;
        mlxd::models::fused::queue_for_shape(2048, 32, 8, 64, 8192, false, d)?;
    }
    Ok(())
}

/// Applies plugin `name` with `params` once per float dtype of the logits (a processor that
/// takes the model's dtype gets each; others get float32, as in the engine) to zero logits with
/// a short history. Returns how many new kernel compiles it recorded.
fn plugin(plugins: &crate::BenchPlugins, name: &str, params: &str) -> Result<usize> {
    let plugin = plugins.get(name)?;
    let before = mlxd::runtime::recorded_cuda_kernels().len();
    let vocab = 151_936;
    for d in FLOATS {
        let mut instance = PluginInstance::create(plugin.clone(), params, vocab, 0).map_err(|e| anyhow!("{e}"))?;
        let history = Array::from_slice(&[1i32, 2, 3, 1, 2, 3, 1, 2], &[1, 8]);
        let logits = mlx_rs::ops::zeros_dtype(&[1, vocab as i32], d)?;
        let info = StepInfo { prompt_tokens: 8, generated_tokens: 0, temperature: 0.0 };
        instance.apply(&logits, Some(&history), info).map_err(|e| anyhow!("{name} on {d:?} logits: {e}"))?;
    }
    Ok(mlxd::runtime::recorded_cuda_kernels().len() - before)
}
