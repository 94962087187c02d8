//! mlxd's CUDA kernels, run on the CPU by the emulator (`mlxd::runtime::emulate_cuda_kernels`:
//! each kernel wrapped as MLX wraps it, compiled by the C++ compiler, one fiber per CUDA
//! thread), against the same computation in MLX operations. The GPU runs the same checks at
//! full size (`mlxd-bench sampler-check`, `kernel-check`); these keep the kernels' logic under
//! test in CI, where there is no GPU: the sampling kernels, the greedy pick with the history
//! append, the append, the tensor-core products, the padded attention, DRY's kernel, the fused decode block, and the
//! engine's batched decode through the products and the attention against MLX's operations.
//! Emulation is process-wide, so this file is its own test binary, and everything runs in one
//! test (the switches it flips are process-wide too; launches are serialized anyway).

mod common;

use mlx_rs::ops::indexing::{argmax_axis, TryIndexOp};
use mlx_rs::{ops, random, Array, Dtype};
use mlxd::engine::{Engine, EngineOptions, GenerateRequest};
use mlxd::plugins::instance::StepInfo;
use mlxd::plugins::{PluginInstance, PluginRegistry};
use mlxd::sampling::{SamplingParams, SequenceSampler};
use std::path::PathBuf;

fn normal(shape: &[i32], std: f32, seed: u64, d: Dtype) -> Array {
    random::normal::<f32>(shape, 0.0, std, &random::key(seed).unwrap()).unwrap().as_dtype(d).unwrap()
}

fn max_abs(a: &Array) -> f32 {
    ops::abs(a).unwrap().max(None).unwrap().try_item_exact::<f32>().unwrap()
}

/// Tokens drawn for `rows` rows (seeds 1..=rows; row `i` with `params[i % params.len()]`) over
/// `steps` steps of random logits (the same logits every step when `fixed`), through the graph
/// or the kernels (two or fused).
fn draws(params: &[&SamplingParams], rows: i32, vocab: i32, steps: u64, fixed: bool, d: Dtype, path: &str) -> Vec<u32> {
    mlxd::sampling::set_sampler_kernel(path != "graph");
    mlxd::sampling::set_sampler_fused(path == "fused");
    let mut samplers: Vec<SequenceSampler> = (0..rows)
        .map(|i| {
            SequenceSampler::new(
                &SamplingParams { seed: Some(1 + i as u64), ..params[i as usize % params.len()].clone() },
                vocab as usize,
                &[1, 2, 3],
            )
        })
        .collect::<Result<_, _>>()
        .unwrap();
    let mut tokens = Vec::new();
    for step in 0..steps {
        let logits = normal(&[rows, vocab], 3.0, 1000 + if fixed { 0 } else { step }, d);
        let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
        tokens.extend(mlxd::sampling::sample_batch(&logits, &mut refs).unwrap().as_slice::<u32>().to_vec());
    }
    tokens
}

fn sampling_kernels_draw_what_the_graph_draws() {
    // The issue's full pipeline with a shorter window, a strong penalty over a window of five,
    // a top-k wider than a short last chunk.
    let full = SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        top_k: 50,
        min_p: 0.05,
        repetition_penalty: 1.1,
        repetition_context_size: 32,
        ..Default::default()
    };
    let penalty = SamplingParams {
        temperature: 0.6,
        top_k: 6,
        repetition_penalty: 2.5,
        repetition_context_size: 5,
        ..Default::default()
    };
    let wide = SamplingParams { temperature: 1.1, top_k: 140, top_p: 0.97, ..Default::default() };
    let widest = SamplingParams { temperature: 0.9, top_k: 256, min_p: 0.01, ..Default::default() };
    let narrow = SamplingParams { temperature: 1.3, top_k: 8, top_p: 0.95, ..Default::default() };
    // (what, params, rows, vocabulary, steps, same logits every step, dtype): a vocabulary of
    // three chunks and a short last one, bfloat16 and float16 logits read as they are, a strong
    // penalty over a short window on fixed logits (a wrongly advanced window changes later
    // draws), a top-k larger than the last chunk, more candidates than stage 2 keeps in shared
    // memory (33 chunks x 256 > 4,096: their keys are read from global memory each pass), more
    // chunks than k (stage 2 keeps only the chunks whose best beats the k-th best chunk's).
    // A batch of rows that each set other parameters (each reads its own row of the kernels'
    // parameter array).
    type Case<'a> = (&'a str, &'a [&'a SamplingParams], i32, i32, u64, bool, Dtype);
    let cases: [Case; 8] = [
        ("full", &[&full], 4, 2_100, 3, false, Dtype::Float32),
        ("full, bfloat16", &[&full], 4, 2_100, 3, false, Dtype::Bfloat16),
        ("full, float16", &[&full], 2, 2_100, 2, false, Dtype::Float16),
        ("penalty 2.5 over 5 tokens, fixed logits", &[&penalty], 2, 1_500, 8, true, Dtype::Bfloat16),
        ("top-k 140 over 1,124 tokens", &[&wide], 3, 1_124, 3, false, Dtype::Float32),
        ("top-k 256 over 33,000 tokens", &[&widest], 2, 33_000, 2, false, Dtype::Bfloat16),
        ("rows with different parameters, fixed logits", &[&penalty, &wide, &full], 3, 1_500, 6, true, Dtype::Float32),
        ("top-k 6 and 8 over 20 chunks", &[&penalty, &narrow], 2, 20_000, 4, false, Dtype::Bfloat16),
    ];
    for (what, params, rows, vocab, steps, fixed, d) in cases {
        let graph = draws(params, rows, vocab, steps, fixed, d, "graph");
        for path in ["kernels", "fused"] {
            let got = draws(params, rows, vocab, steps, fixed, d, path);
            let same = graph.iter().zip(&got).filter(|(a, b)| a == b).count();
            // The paths differ only by rounding at a filter's boundary.
            assert!(
                same * 100 >= graph.len() * 95,
                "{what}: {path} drew {got:?}, the graph {graph:?} ({same} of {} agree)",
                graph.len()
            );
            assert!(got.iter().all(|&t| t < vocab as u32), "{what}: {path} drew a token outside the vocabulary");
        }
    }
    mlxd::sampling::set_sampler_fused(false);
}

fn greedy_pick_with_append_and_the_append_are_exact() {
    mlxd::sampling::set_sampler_kernel(true);
    mlxd::sampling::set_sampler_fused(true);
    let history = Array::from_slice(&(0..37).map(|i| i * 11).collect::<Vec<i32>>(), &[1, 37]);
    for (seed, d) in [(1, Dtype::Float32), (2, Dtype::Bfloat16), (3, Dtype::Bfloat16)] {
        let logits = normal(&[1, 3_000], 3.0, seed, d);
        let (token, appended) = mlxd::sampling::pick_and_append(&logits, &history).expect("fused is on").unwrap();
        let want = argmax_axis(&logits, -1, false).unwrap().as_type::<u32>().unwrap();
        assert_eq!(token.as_slice::<u32>(), want.as_slice::<u32>(), "{d:?} seed {seed}");
        let mut want_history = history.as_slice::<i32>().to_vec();
        want_history.push(want.as_slice::<u32>()[0] as i32);
        assert_eq!(appended.as_slice::<i32>(), &want_history[..]);
    }
    // Ties go to the lower id, as MLX's argmax.
    let tied = Array::from_slice(&[0.0f32, 5.0, 1.0, 5.0], &[1, 4]);
    let (token, _) = mlxd::sampling::pick_and_append(&tied, &history).unwrap().unwrap();
    assert_eq!(token.as_slice::<u32>(), &[1]);
    mlxd::sampling::set_sampler_fused(false);
    let two = Array::from_slice(&[1i32, 2, 3, 4, 5, 6], &[2, 3]);
    let appended = mlxd::sampling::append_history(&two, &Array::from_slice(&[7u32, 8], &[2])).unwrap().unwrap();
    assert_eq!(appended.shape(), &[2, 4]);
    assert_eq!(appended.as_slice::<i32>(), &[1, 2, 3, 7, 4, 5, 6, 8]);
}

fn padded_attention_matches_masked_attention() {
    mlxd::models::cuda::set_enabled(true);
    // Rows padded by different amounts: row b attends to columns pads[b] ..= cur.
    let (b, hq, hkv, dh, cap, cur) = (3, 4, 2, 64, 40, 30);
    let pads = [0i32, 5, 29];
    for d in [Dtype::Float32, Dtype::Bfloat16] {
        assert!(mlxd::models::cuda::attention_applies(d, hq, hkv, dh));
        let q = normal(&[b, hq, 1, dh], 1.0, 30, d);
        let keys = normal(&[b, hkv, cap, dh], 1.0, 31, d);
        let values = normal(&[b, hkv, cap, dh], 1.0, 32, d);
        let starts = Array::from_slice(&pads, &[b]);
        let offsets = Array::from_slice(&pads.map(|p| cur - p), &[b]);
        let scale = 1.0 / (dh as f32).sqrt();
        let got = mlxd::models::cuda::attention(&q, &keys, &values, &starts, &offsets, scale).unwrap();
        let (g, l) = (hq / hkv, cur + 1);
        let qf = q.as_type::<f32>().unwrap().reshape(&[b, hkv, g, 1, dh]).unwrap();
        let kf =
            keys.as_type::<f32>().unwrap().try_index((.., .., ..l, ..)).unwrap().reshape(&[b, hkv, 1, l, dh]).unwrap();
        let vf = values
            .as_type::<f32>()
            .unwrap()
            .try_index((.., .., ..l, ..))
            .unwrap()
            .reshape(&[b, hkv, 1, l, dh])
            .unwrap();
        let scores =
            ops::multiply(ops::matmul(&qf, kf.swap_axes(-1, -2).unwrap()).unwrap(), Array::from_f32(scale)).unwrap();
        let cols = ops::arange::<_, i32>(None, l, None).unwrap().reshape(&[1, 1, 1, 1, l]).unwrap();
        let live = ops::ge(&cols, starts.reshape(&[b, 1, 1, 1, 1]).unwrap()).unwrap();
        let scores = ops::select(&live, &scores, Array::from_f32(f32::NEG_INFINITY)).unwrap();
        let probs = ops::softmax_axis(&scores, -1, None).unwrap();
        let want = ops::matmul(&probs, &vf).unwrap().reshape(&[b, hq, 1, dh]).unwrap();
        assert_eq!(got.shape(), want.shape());
        let err = max_abs(&ops::subtract(got.as_type::<f32>().unwrap(), &want).unwrap()) / max_abs(&want);
        let tolerance = if d == Dtype::Float32 { 1e-5 } else { 2e-2 };
        assert!(err <= tolerance, "{d:?}: error {err} over tolerance {tolerance}");
    }
}

fn tensor_core_products_match_float32_products() {
    mlxd::models::cuda::set_enabled(true);
    // (rows, K, widths of the parts): one part; two; three whose total is no multiple of 8.
    let cases: [(i32, i32, &[i32]); 3] = [(2, 128, &[64]), (5, 1024, &[40, 24]), (16, 576, &[24, 8, 11])];
    for d in [Dtype::Bfloat16, Dtype::Float16] {
        for (i, &(m, k, widths)) in cases.iter().enumerate() {
            let n: i32 = widths.iter().sum();
            let x = normal(&[m, k], 1.0, 10 + i as u64, d);
            let w = normal(&[n, k], 0.05, 20 + i as u64, d);
            assert!(mlxd::models::cuda::rows_apply(&x, &w), "{m}x{k} by {n}x{k} refused");
            let parts = mlxd::models::cuda::rows(&x, &w, widths).unwrap();
            let want = ops::matmul(x.as_type::<f32>().unwrap(), w.as_type::<f32>().unwrap().t()).unwrap();
            let mut start = 0;
            for (part, &width) in parts.iter().zip(widths) {
                assert_eq!(part.shape(), &[m, width]);
                let expected = want.try_index((.., start..start + width)).unwrap();
                let err =
                    max_abs(&ops::subtract(part.as_type::<f32>().unwrap(), &expected).unwrap()) / max_abs(&expected);
                assert!(err <= 2e-2, "{d:?} {m}x{k} by {n}x{k}, columns {start}..{}: error {err}", start + width);
                start += width;
            }
        }
    }
}

/// A two-layer Qwen3-shaped model with random bfloat16 weights (the products' kernel takes
/// 16-bit types; every matrix's K is a multiple of 64, the heads 32 wide), with the byte-level
/// tokenizer of the daemon tests' tiny model.
fn bf16_model(dir: &std::path::Path) -> mlxd::models::LoadedModel {
    common::tiny::write_tiny_model(dir);
    let mut config = common::tiny_config("qwen3");
    config["vocab_size"] = serde_json::json!(common::tiny::VOCAB);
    config["eos_token_id"] = serde_json::json!(257);
    common::write_checkpoint(dir, &config, None);
    let file = dir.join("model.safetensors");
    let weights = Array::load_safetensors(&file).unwrap();
    let cast: Vec<(String, Array)> =
        weights.into_iter().map(|(k, v)| (k, v.as_dtype(Dtype::Bfloat16).unwrap())).collect();
    // Loading is lazy: read everything before the file is overwritten.
    mlx_rs::transforms::eval(cast.iter().map(|(_, v)| v)).unwrap();
    Array::save_safetensors(cast.iter().map(|(k, v)| (k.as_str(), v)), None, &file).unwrap();
    mlxd::models::load(dir).unwrap()
}

/// Greedy tokens of rows started together from prompts of different lengths (a left-padded
/// stack), stepped until each has `gen` tokens.
fn batched_greedy(engine: &mut Engine, prompts: &[Vec<u32>], gen: usize) -> Vec<Vec<u32>> {
    let mut rows: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .start(GenerateRequest {
                    prompt: p.clone(),
                    max_tokens: gen,
                    stop: vec![],
                    sampler: SamplingParams::default(),
                })
                .unwrap()
        })
        .collect();
    let mut tokens = vec![Vec::new(); prompts.len()];
    while rows.iter().any(|r| r.finished().is_none()) {
        let mut live: Vec<(usize, &mut mlxd::engine::Row)> =
            rows.iter_mut().enumerate().filter(|(_, r)| r.finished().is_none()).collect();
        let index: Vec<usize> = live.iter().map(|(i, _)| *i).collect();
        let mut refs: Vec<&mut mlxd::engine::Row> = live.iter_mut().map(|(_, r)| &mut **r).collect();
        engine
            .step(&mut refs, |i, event| {
                tokens[index[i]].push(event.id);
                true
            })
            .unwrap();
    }
    tokens
}

fn batched_decode_with_the_kernels_matches_mlx_operations() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::new(bf16_model(dir.path()), EngineOptions { prompt_cache_bytes: 0, ..Default::default() });
    let prompts: Vec<Vec<u32>> =
        [5usize, 11, 18].iter().map(|&n| (0..n as u32).map(|i| (i * 37 + n as u32) % 250).collect()).collect();
    mlxd::models::cuda::set_enabled(false);
    let reference = batched_greedy(&mut engine, &prompts, 8);
    let before = mlxd::runtime::emulated_kernel_launches();
    mlxd::models::cuda::set_enabled(true);
    let got = batched_greedy(&mut engine, &prompts, 8);
    let after = mlxd::runtime::emulated_kernel_launches();
    let ran = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    assert!(ran("mlxd_padded_attention") > 0, "the batched steps did not use the padded attention: {after:?}");
    assert!(ran("mlxd_rows1") + ran("mlxd_rows2") + ran("mlxd_rows3") > 0, "no product kernel ran: {after:?}");
    // Deterministic on both sides; bfloat16 products summed in another order may still move a
    // near-tie, so a few later tokens may differ, never the first two of a row.
    let (mut same, mut all) = (0, 0);
    for (g, r) in got.iter().zip(&reference) {
        assert_eq!(g.len(), r.len());
        assert_eq!(g[..2], r[..2], "kernels {got:?}, MLX operations {reference:?}");
        same += g.iter().zip(r).filter(|(a, b)| a == b).count();
        all += r.len();
    }
    assert!(same * 10 >= all * 9, "kernels {got:?}, MLX operations {reference:?}");
}

/// The folder cargo put this test's dependencies' cdylibs in (the DRY plugin among them).
fn deps_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

/// The DRY plugin, loaded from a folder of its own (kept alive with it).
fn dry_plugin() -> (tempfile::TempDir, std::sync::Arc<mlxd::plugins::Plugin>) {
    let dir = tempfile::tempdir().unwrap();
    let name = "libmlxd_plugin_dry.so";
    std::fs::copy(deps_dir().join(name), dir.path().join(name)).unwrap();
    let registry = PluginRegistry::new(vec![dir.path().to_path_buf()]);
    let plugin = registry.get("dry").unwrap();
    (dir, plugin)
}

fn dry_kernel_matches_its_operations() {
    let (_dir, plugin) = dry_plugin();
    let vocab = 3_000;
    for (params, d) in
        [(r#"{"multiplier":0.8}"#, Dtype::Bfloat16), (r#"{"multiplier":1.5,"allowed_length":3}"#, Dtype::Float32)]
    {
        let make = |kernels: bool| {
            mlxd::plugins::kernels::set_enabled(kernels);
            let p = PluginInstance::create(plugin.clone(), params, vocab, 0).unwrap();
            mlxd::plugins::kernels::set_enabled(true);
            p
        };
        let (mut kernel, mut operations) = (make(true), make(false));
        // A history that repeats a lot: ids from a small alphabet.
        let history: Vec<i32> = (0..90).map(|i| (i * 7 + i / 5) % 6).collect();
        let mut penalized = 0;
        for step in 0..3usize {
            let t = 80 + step;
            let h = Array::from_slice(&history[..t], &[1, t as i32]);
            let logits = normal(&[1, vocab as i32], 2.0, 60 + step as u64, d);
            let info = StepInfo { prompt_tokens: 80, generated_tokens: step, temperature: 0.0 };
            let got = kernel.apply(&logits, Some(&h), info).unwrap().as_type::<f32>().unwrap();
            let want = operations.apply(&logits, Some(&h), info).unwrap().as_type::<f32>().unwrap();
            assert_eq!(got.shape(), want.shape());
            let same = ops::eq(&got, &want).unwrap();
            let diff = ops::divide(
                ops::abs(ops::subtract(&got, &want).unwrap()).unwrap(),
                ops::maximum(ops::abs(&want).unwrap(), Array::from_f32(1.0)).unwrap(),
            )
            .unwrap();
            let err = max_abs(&ops::select(&same, Array::from_f32(0.0), &diff).unwrap());
            assert!(err <= 1e-5, "{params} on {d:?}, step {step}: error {err}");
            let moved = ops::ne(&want, logits.as_type::<f32>().unwrap()).unwrap();
            penalized += moved.as_type::<i32>().unwrap().sum(None).unwrap().try_item_exact::<i32>().unwrap();
        }
        assert!(penalized > 0, "{params}: DRY penalized nothing, so nothing was compared");
    }
}

/// A greedy request through the DRY plugin in the engine, three ways: MLX operations only; the
/// plugin's kernel, argmax and the history append kernel; the plugin's kernel and the fused
/// pick with the append (`MLXD_SAMPLER_FUSED`, the plugin chain's `appended` history).
fn greedy_through_dry_is_the_same_with_the_fused_pick() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::new(bf16_model(dir.path()), EngineOptions { prompt_cache_bytes: 0, ..Default::default() });
    engine.model.eos_ids.clear();
    let (_plugins, plugin) = dry_plugin();
    let prompt: Vec<u32> = (0..24u32).map(|i| [65, 66, 67, 68][(i % 4) as usize]).collect();
    let sampler = SamplingParams {
        plugins: vec![mlxd::plugins::PluginRequest { plugin, params: r#"{"multiplier":0.8}"#.into() }],
        ..Default::default()
    };
    let request = GenerateRequest { prompt, max_tokens: 12, stop: vec![], sampler };
    let mut run = |kernels: bool, fused: bool| {
        mlxd::sampling::set_sampler_kernel(kernels);
        mlxd::plugins::kernels::set_enabled(kernels);
        mlxd::sampling::set_sampler_fused(fused);
        let before = mlxd::runtime::emulated_kernel_launches();
        let defined = mlxd::plugins::kernels::definitions();
        let ids = engine.generate(&request, |_| true).unwrap().ids;
        let after = mlxd::runtime::emulated_kernel_launches();
        // The request's plugin instance defines its kernel once, not once per step (the Rust
        // helper builds the parameter-name arrays anew for every call).
        let defined = mlxd::plugins::kernels::definitions() - defined;
        assert!(defined <= 1, "the DRY kernel was defined {defined} times in one request");
        let ran = |name: &str| after.get(name).copied().unwrap_or(0) > before.get(name).copied().unwrap_or(0);
        (ids, ran("plugin_dry_penalty"), ran("mlxd_history_append"), ran("mlxd_pick_append"))
    };
    let (operations, dry_kernel, _, _) = run(false, false);
    assert!(!dry_kernel, "the kernels were off");
    let (kernels, dry_kernel, append, _) = run(true, false);
    assert!(dry_kernel && append, "the DRY kernel and the append kernel ran");
    let (fused, dry_kernel, _, pick_append) = run(true, true);
    assert!(dry_kernel && pick_append, "the DRY kernel and the fused pick ran");
    mlxd::sampling::set_sampler_fused(false);
    assert_eq!(operations.len(), 12);
    assert_eq!(kernels, operations, "the kernels against MLX operations");
    assert_eq!(fused, operations, "the fused pick against MLX operations");
}

/// A tiny 4-bit checkpoint of `model_type` (MLX's affine format, groups of 32) with its floats
/// (scales, biases, norms) in `floats` (mlx-community's 4-bit models have them in bfloat16).
fn q4_model(dir: &std::path::Path, model_type: &str, floats: Dtype) -> mlxd::models::LoadedModel {
    common::tiny::write_tiny_model(dir);
    let mut config = common::tiny_config(model_type);
    config["vocab_size"] = serde_json::json!(common::tiny::VOCAB);
    common::write_checkpoint(dir, &config, Some(4));
    let file = dir.join("model.safetensors");
    let weights = Array::load_safetensors(&file).unwrap();
    let cast: Vec<(String, Array)> = weights
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == Dtype::Float32 { v.as_dtype(floats).unwrap() } else { v };
            (k, v)
        })
        .collect();
    mlx_rs::transforms::eval(cast.iter().map(|(_, v)| v)).unwrap();
    Array::save_safetensors(cast.iter().map(|(k, v)| (k.as_str(), v)), None, &file).unwrap();
    mlxd::models::load(dir).unwrap()
}

/// Logits of one decode step (`forward_batch` with one row), fused or through MLX's operations.
fn step(
    model: &mlxd::models::Transformer,
    token: u32,
    cache: &mut mlxd::cache::SequenceCache,
    fused: bool,
) -> Vec<f32> {
    mlxd::models::fused::set_enabled(fused);
    let logits = model.forward_batch(&Array::from_slice(&[token as i32], &[1]), &mut [cache]).unwrap();
    mlxd::models::fused::set_enabled(true);
    common::to_vec(&logits)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32
}

/// The fused decode block (one kernel per block, its phases launched one by one here) decodes
/// as MLX's operations do: Qwen3 (q/k norms) and Llama (Llama 3 RoPE scaling), 4-bit, past a
/// prompt long enough that each head's attention is split into chunks. With float32 scales and
/// activations the two agree to float rounding (the same arithmetic); in bfloat16 the values
/// are rounded where MLX's step rounds them, but MLX's CPU kernels round some intermediate
/// sums elsewhere, so logits differ by ~3% there and greedy tokens agree. The cache it writes in
/// place stays the sequence's own: a prefix copy decoding first does not disturb the original,
/// and a clone decodes on storage of its own.
fn fused_decode_matches_mlx_operations() {
    // Batched steps take the kernel (the default; a process with MLXD_FUSED_BATCH=0 would not).
    mlxd::models::fused::set_batches_enabled(true);
    // Both blocks of the tiny models in one launch (the default), and for one model one launch
    // per block (what a device that fails the launch of several gets at load).
    for (model_type, dtype, bound, one_per_launch) in [
        ("qwen3", Dtype::Float32, 1e-5, false),
        ("llama", Dtype::Float32, 1e-5, false),
        ("qwen3", Dtype::Bfloat16, 5e-2, false),
        ("llama", Dtype::Bfloat16, 5e-2, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut loaded = q4_model(dir.path(), model_type, dtype);
        if one_per_launch {
            loaded.model.set_fused_blocks_per_launch(1);
        }
        let model = &loaded.model;
        assert!(model.fused_decode(), "{model_type}: the fused step was not taken (or failed its check at load)");
        if one_per_launch {
            assert_eq!(model.fused_blocks_per_launch(), 1);
        } else if std::env::var_os("MLXD_FUSED_LAYERS").is_none() {
            assert_eq!(model.fused_blocks_per_launch(), model.num_layers(), "a step's blocks in one launch");
        }
        let prompt: Vec<i32> = (0..21).map(|i| (i * 13 + 5) % 97).collect();
        let mut fused = mlxd::cache::SequenceCache::new(model.num_layers());
        model.forward_all(&Array::from_slice(&prompt, &[1, prompt.len() as i32]), &mut fused).unwrap();
        let mut reference = fused.clone();
        let before = mlxd::runtime::emulated_kernel_launches().get("mlxd_fused_block").copied().unwrap_or(0);
        let (mut token, mut worst) = (7u32, 0.0f32);
        for i in 0..5 {
            let want = step(model, token, &mut reference, false);
            let got = step(model, token, &mut fused, true);
            let err = common::rel_err(&got, &want);
            worst = worst.max(err);
            assert!(err <= bound, "{model_type} {dtype:?} step {i}: fused logits rel err {err:e}");
            assert_eq!(argmax(&got), argmax(&want), "{model_type} step {i}: greedy token");
            token = argmax(&want);
        }
        let launches = mlxd::runtime::emulated_kernel_launches().get("mlxd_fused_block").copied().unwrap_or(0);
        assert_eq!(launches - before, 5 * 5 * model.num_layers(), "five phases per block per step");
        assert_eq!(fused.offset(), prompt.len() as i32 + 5);
        // A prefix copy (as the prompt cache hands out) decodes first, then the original goes on.
        let mut copy = fused.prefix_copy(prompt.len() as i32 + 2).unwrap();
        let mut copy_ref = reference.prefix_copy(prompt.len() as i32 + 2).unwrap();
        let got = step(model, 3, &mut copy, true);
        let want = step(model, 3, &mut copy_ref, false);
        assert!(common::rel_err(&got, &want) <= bound, "{model_type} {dtype:?}: the prefix copy's step");
        let got = step(model, token, &mut fused, true);
        let want = step(model, token, &mut reference, false);
        let err = common::rel_err(&got, &want);
        assert!(err <= bound, "{model_type} {dtype:?}: the original after its copy decoded: rel err {err:e}");
        eprintln!("{model_type} {dtype:?}: fused decode, worst logits rel err {worst:e}");
        let worst = fused_batch_matches(model, bound, &format!("{model_type} {dtype:?}"));
        eprintln!("{model_type} {dtype:?}: fused batched decode, worst logits rel err {worst:e}");
    }
}

/// Three sequences of different lengths stacked in one batch (the server's path, each row but
/// the longest padded) decode through the fused kernel as through MLX's operations, row by
/// row, for three steps; split back, each sequence's cache holds what the kernel wrote in place,
/// and the shortest goes on alone. Returns the worst relative error of the logits.
fn fused_batch_matches(model: &mlxd::models::Transformer, bound: f32, what: &str) -> f32 {
    use mlxd::cache::{BatchCache, SequenceCache};
    assert!(model.fused_batch_rows() >= 3, "{what}: batched steps do not take the fused kernel");
    let lens = [21, 9, 30];
    let caches: Vec<SequenceCache> = lens
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            let prompt: Vec<i32> = (0..n).map(|i| (i * 7 + r as i32 * 11 + 3) % 97).collect();
            let mut cache = SequenceCache::new(model.num_layers());
            model.forward_all(&Array::from_slice(&prompt, &[1, n]), &mut cache).unwrap();
            cache
        })
        .collect();
    let views: Vec<&SequenceCache> = caches.iter().collect();
    let mut fused = BatchCache::build(vec![0, 1, 2], &views).unwrap();
    let mut reference = BatchCache::build(vec![0, 1, 2], &views).unwrap();
    let before = mlxd::runtime::emulated_kernel_launches().get("mlxd_fused_batch").copied().unwrap_or(0);
    let (mut tokens, mut worst) = (vec![5i32, 17, 42], 0.0f32);
    for i in 0..3 {
        let t = Array::from_slice(&tokens, &[3]);
        mlxd::models::fused::set_enabled(false);
        let want = common::to_vec(&model.forward_batched(&t, &mut reference).unwrap());
        mlxd::models::fused::set_enabled(true);
        let got = common::to_vec(&model.forward_batched(&t, &mut fused).unwrap());
        let vocab = want.len() / 3;
        for r in 0..3 {
            let (g, w) = (&got[r * vocab..(r + 1) * vocab], &want[r * vocab..(r + 1) * vocab]);
            let err = common::rel_err(g, w);
            worst = worst.max(err);
            assert!(err <= bound, "{what} batched step {i} row {r}: fused logits rel err {err:e}");
            // The greedy token is the reference's, or one it scores within the bound of its best
            // (bfloat16 near-ties: MLX's CPU kernels round some sums where the GPU's do not).
            let (best, top) = (argmax(w) as usize, w.iter().map(|v| v.abs()).fold(0.0f32, f32::max));
            let pick = argmax(g) as usize;
            assert!(
                pick == best || w[best] - w[pick] <= bound * top,
                "{what} batched step {i} row {r}: greedy token {pick}, the reference's {best}"
            );
            tokens[r] = argmax(w) as i32;
        }
    }
    let launches = mlxd::runtime::emulated_kernel_launches().get("mlxd_fused_batch").copied().unwrap_or(0);
    assert_eq!(launches - before, 3 * 5 * model.num_layers(), "{what}: five phases per block per batched step");
    let (mut fused, mut reference) = (fused.split().unwrap(), reference.split().unwrap());
    assert_eq!(fused[1].1.offset(), lens[1] + 3);
    let got = step(model, tokens[1] as u32, &mut fused[1].1, true);
    let want = step(model, tokens[1] as u32, &mut reference[1].1, false);
    let err = common::rel_err(&got, &want);
    assert!(err <= bound, "{what}: a row split from the batch, alone: rel err {err:e}");
    worst.max(err)
}

#[test]
fn cuda_kernels_compute_what_mlx_operations_compute() {
    mlxd::runtime::emulate_cuda_kernels();
    // Kernels are evaluated as they are called: the sampling step cannot be a compiled function.
    mlxd::sampling::set_compiled(false);
    fused_decode_matches_mlx_operations();
    greedy_pick_with_append_and_the_append_are_exact();
    padded_attention_matches_masked_attention();
    tensor_core_products_match_float32_products();
    batched_decode_with_the_kernels_matches_mlx_operations();
    dry_kernel_matches_its_operations();
    greedy_through_dry_is_the_same_with_the_fused_pick();
    sampling_kernels_draw_what_the_graph_draws();
}
