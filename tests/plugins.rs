//! Sampler plugins (issue 5), on the CPU: loading, listing and reloading; refusal of libraries
//! of another ABI or without the entry function; each real plugin's output against its
//! definition written out here in plain Rust; failures (error code, panic, wrong shape or
//! dtype, missing entry) that end only their own request, in a batch at the sampler level, in
//! the engine with the default model, and through the real daemon over WebSocket; and the
//! read gate: decoding with plugins moves one token id per step to the host and nothing else.
//!
//! The plugins are the workspace's `plugins/` crates: the daemon's dev-dependencies on them make
//! cargo build their cdylibs (and, through their build scripts, the C plugin and C fixtures)
//! before this file runs.

mod common;

use common::daemon::{recv, send, Daemon, Ws};
use mlx_rs::Array;
use mlxd::plugins::{Kind, PluginRegistry, PluginRequest};
use mlxd::sampling::{
    read_ids, sample_batch, sample_batch_inspect, thread_host_read_stats, SamplingParams, SequenceSampler,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RUST_PLUGINS: [&str; 6] = ["passthrough", "dry", "mirostat", "top_n_sigma", "token_filter", "faulty"];

fn lib_name(stem: &str) -> String {
    if cfg!(target_os = "macos") {
        format!("lib{stem}.dylib")
    } else {
        format!("lib{stem}.so")
    }
}

/// The directory cargo put this test's dependencies' cdylibs in.
fn deps_dir() -> PathBuf {
    std::env::current_exe().expect("test executable").parent().expect("deps dir").to_path_buf()
}

/// A fresh plugin directory holding every plugin (and, with `fixtures`, the bad libraries).
fn plugin_dir(fixtures: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for p in RUST_PLUGINS {
        let name = lib_name(&format!("mlxd_plugin_{p}"));
        let from = deps_dir().join(&name);
        std::fs::copy(&from, dir.path().join(&name)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    let mut c_libs = vec![mlxd_plugin_epsilon_c::LIBRARY];
    if fixtures {
        c_libs.extend([
            mlxd_plugin_faulty::NO_ENTRY_LIB,
            mlxd_plugin_faulty::ABI_FUTURE_MINOR_LIB,
            mlxd_plugin_faulty::ABI_MAJOR_2_LIB,
            mlxd_plugin_faulty::ABI_1_0_LIB,
        ]);
    }
    for lib in c_libs {
        let from = Path::new(lib);
        std::fs::copy(from, dir.path().join(from.file_name().unwrap())).unwrap();
    }
    dir
}

/// One registry for the in-process tests (plugins load once per test binary).
fn registry() -> &'static (PluginRegistry, tempfile::TempDir) {
    static R: std::sync::OnceLock<(PluginRegistry, tempfile::TempDir)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let dir = plugin_dir(true);
        (PluginRegistry::new(vec![dir.path().to_path_buf()]), dir)
    })
}

fn use_plugin(name: &str, params: Value) -> PluginRequest {
    PluginRequest { plugin: registry().0.get(name).expect("loaded"), params: params.to_string() }
}

fn with_plugins(plugins: Vec<PluginRequest>) -> SamplingParams {
    SamplingParams { plugins, ..Default::default() }
}

fn row(values: &[f32]) -> Array {
    Array::from_slice(values, &[1, values.len() as i32])
}

/// Reads a test array (tests are outside the gate's jurisdiction).
fn host_f32(a: &Array) -> Vec<f32> {
    let a = a.as_type::<f32>().unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 10_000) as f32 / 1000.0 - 5.0
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = (g == w) || (g - w).abs() <= 1e-4 * w.abs().max(1.0);
        assert!(same, "{what}[{i}]: got {g}, want {w}\n got {got:?}\nwant {want:?}");
    }
}

/// The logits after the processors, for one row with `p` and history `prompt`.
fn processed(p: &SamplingParams, logits: &[f32], prompt: &[u32]) -> Vec<f32> {
    let mut s = SequenceSampler::new(p, logits.len(), prompt).expect("plugins create");
    let out = sample_batch_inspect(&row(logits), &mut [&mut s]).expect("step");
    assert!(s.failure().is_none(), "{:?}", s.failure());
    host_f32(&out.processed)
}

// ---------------------------------------------------------------------------------------------
// Loading, listing, reloading.

#[test]
fn loads_lists_and_refuses_with_both_versions_named() {
    let (reg, dir) = registry();
    let listing = reg.listing();
    let names: Vec<&str> = listing["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["abi-one-zero", "dry", "epsilon", "faulty", "mirostat-v2", "passthrough", "token-filter", "top-n-sigma"]
    );
    let by_name = |n: &str| listing["plugins"].as_array().unwrap().iter().find(|p| p["name"] == n).unwrap().clone();
    let dry = by_name("dry");
    assert_eq!(
        (dry["kind"].as_str(), dry["version"].as_str(), dry["abi"].as_str()),
        (Some("processor"), Some("0.1.0"), Some("1.1"))
    );
    // A plugin built for an older minor loads and runs (same major, host minor >= its minor).
    assert_eq!(by_name("abi-one-zero")["abi"], "1.0");
    let p = with_plugins(vec![use_plugin("abi-one-zero", json!({}))]);
    assert_close(&processed(&p, &[0.5, -2.0, 3.0], &[1]), &[1.5, -1.0, 4.0], "ABI 1.0 plugin");
    assert_eq!(dry["params_schema"]["properties"]["base"]["default"], 1.75);
    assert_eq!(dry["capabilities"]["history"], true);
    assert_eq!(by_name("mirostat-v2")["kind"], "sampler");
    assert_eq!(
        by_name("epsilon")["description"],
        "epsilon sampling: drops tokens less likely than epsilon (written in C)"
    );

    let refused = listing["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 3, "{refused:?}");
    let why = |stem: &str| {
        refused.iter().find(|r| r["file"].as_str().unwrap().contains(stem)).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let future = why("abi_future");
    assert!(future.contains(&dir.path().join(lib_name("mlxd_fixture_abi_future")).display().to_string()), "{future}");
    assert!(future.contains("ABI 1.99") && future.contains("speaks ABI 1.1"), "{future}");
    let major = why("abi_major2");
    assert!(major.contains("ABI 2.0") && major.contains("speaks ABI 1.1"), "{major}");
    assert!(why("no_entry").contains("exports no `mlxd_sampler_plugin_v1`"), "{}", why("no_entry"));

    let e = reg.get("nope").unwrap_err().to_string();
    assert!(e.contains("no sampler plugin named `nope`") && e.contains("abi-one-zero, dry, epsilon"), "{e}");
    // A name that matches a refused file says why that file was refused.
    let e = reg.get("no-entry").unwrap_err().to_string();
    assert!(e.contains("refused at load") && e.contains("exports no"), "{e}");
}

#[test]
fn reload_picks_up_changes_and_never_unloads_a_library_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let reg = PluginRegistry::new(vec![dir.path().to_path_buf()]);
    assert!(reg.catalog().plugins.is_empty());
    let name = lib_name("mlxd_plugin_token_filter");
    std::fs::copy(deps_dir().join(&name), dir.path().join(&name)).unwrap();
    assert!(reg.catalog().plugins.is_empty(), "nothing changes before a reload");
    reg.reload();
    let plugin = reg.get("token-filter").expect("loaded after reload");
    assert_eq!(plugin.kind, Kind::Processor);

    // A sequence holds the plugin; the file goes away and the catalog forgets it...
    let p = with_plugins(vec![PluginRequest { plugin, params: json!({"ban": [0, 1]}).to_string() }]);
    let mut s = SequenceSampler::new(&p, 4, &[2]).unwrap();
    std::fs::remove_file(dir.path().join(&name)).unwrap();
    reg.reload();
    assert!(reg.get("token-filter").is_err());
    // ...and the sequence still runs on the library it holds.
    for _ in 0..3 {
        let t = read_ids(&s.sample(&row(&[9.0, 8.0, 1.0, 2.0])).unwrap()).unwrap();
        assert_eq!(t, [3]);
    }
}

// ---------------------------------------------------------------------------------------------
// Each plugin against its definition.

#[test]
fn passthrough_changes_nothing() {
    let logits = pseudo(50, 1);
    let p = with_plugins(vec![use_plugin("passthrough", json!({}))]);
    assert_eq!(processed(&p, &logits, &[1]), logits);
}

/// `MLXD_CAP_MODEL_DTYPE`: a processor that sets it gets the logits in their own dtype (the
/// pass-through hands bfloat16 back as it came); one that does not gets float32 (the ABI 1.0
/// fixture, which adds 1). The values stay the same either way.
#[test]
fn processors_get_float32_unless_they_take_the_model_dtype() {
    use mlxd::plugins::{instance::StepInfo, PluginInstance};
    let values = [0.5f32, -2.0, 3.0, 1.25];
    let bf16 = row(&values).as_dtype(mlx_rs::Dtype::Bfloat16).unwrap();
    let info = StepInfo { prompt_tokens: 1, generated_tokens: 0, temperature: 0.0 };
    let run = |name: &str| {
        let plugin = registry().0.get(name).expect("loaded");
        let mut p = PluginInstance::create(plugin, "{}", values.len(), 7).expect("create");
        p.apply(&bf16, None, info).expect("apply")
    };
    let through = run("passthrough");
    assert_eq!(through.dtype(), mlx_rs::Dtype::Bfloat16, "passthrough sets CAP_MODEL_DTYPE");
    assert_eq!(host_f32(&through), values);
    let plus_one = run("abi-one-zero");
    assert_eq!(plus_one.dtype(), mlx_rs::Dtype::Float32, "a plugin without the flag sees float32");
    assert_eq!(host_f32(&plus_one), values.map(|x| x + 1.0));
    let by_name = |n: &str| registry().0.get(n).unwrap().describe();
    assert_eq!(by_name("passthrough")["capabilities"]["model_dtype"], true);
    assert_eq!(by_name("abi-one-zero")["capabilities"]["model_dtype"], false);

    // Whole steps on bfloat16 logits: greedy alone, through each plugin, and DRY (float32 out).
    for plugins in [vec![], vec![use_plugin("passthrough", json!({}))], vec![use_plugin("abi-one-zero", json!({}))]] {
        let mut s = SequenceSampler::new(&with_plugins(plugins), values.len(), &[1]).unwrap();
        assert_eq!(read_ids(&s.sample(&bf16).unwrap()).unwrap(), [2]);
    }
    let dry = with_plugins(vec![use_plugin("dry", json!({"multiplier": 100.0, "allowed_length": 1}))]);
    // History 0 2 0: token 2 followed 0 before, so after this 0 it is penalized; token 3 wins.
    let mut s = SequenceSampler::new(&dry, values.len(), &[0, 2, 0]).unwrap();
    assert_eq!(read_ids(&s.sample(&bf16).unwrap()).unwrap(), [3]);
}

#[test]
fn token_filter_bans_and_allows() {
    let logits = pseudo(10, 2);
    let inf = f32::NEG_INFINITY;
    let p = with_plugins(vec![use_plugin("token-filter", json!({"ban": [1, 7]}))]);
    let want: Vec<f32> = logits.iter().enumerate().map(|(i, &x)| if i == 1 || i == 7 { inf } else { x }).collect();
    assert_eq!(processed(&p, &logits, &[1]), want);
    let p = with_plugins(vec![use_plugin("token-filter", json!({"allow": [2, 3, 9], "ban": [3]}))]);
    let want: Vec<f32> = logits.iter().enumerate().map(|(i, &x)| if i == 2 || i == 9 { x } else { inf }).collect();
    assert_eq!(processed(&p, &logits, &[1]), want);
}

/// llama.cpp's top-n-sigma: mean and population σ over the finite logits.
fn top_n_sigma_reference(logits: &[f32], n: f64) -> Vec<f32> {
    let valid: Vec<f64> = logits.iter().filter(|x| x.is_finite()).map(|&x| x as f64).collect();
    let mean = valid.iter().sum::<f64>() / valid.len() as f64;
    let sigma = (valid.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / valid.len() as f64).sqrt();
    let max = valid.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    logits.iter().map(|&x| if (x as f64) < max - n * sigma { f32::NEG_INFINITY } else { x }).collect()
}

#[test]
fn top_n_sigma_keeps_what_its_definition_keeps() {
    for (seed, n) in [(3, 1.0), (4, 0.5), (5, 2.0)] {
        let mut logits = pseudo(64, seed);
        logits[5] = f32::NEG_INFINITY; // earlier filters' -inf do not count
        let p = with_plugins(vec![use_plugin("top-n-sigma", json!({"n": n}))]);
        let got = processed(&p, &logits, &[1]);
        let want = top_n_sigma_reference(&logits, n);
        assert_eq!(
            got.iter().map(|x| x.is_finite()).collect::<Vec<_>>(),
            want.iter().map(|x| x.is_finite()).collect::<Vec<_>>(),
            "n = {n}"
        );
        assert!(want.iter().filter(|x| x.is_finite()).count() < 63, "n = {n}: the case removes something");
        assert_close(&got, &want, &format!("top-n-sigma n={n}"));
    }
}

#[test]
fn epsilon_written_in_c_keeps_what_its_definition_keeps() {
    let logits = pseudo(40, 6);
    for eps in [0.001f64, 0.02, 0.2, 0.9] {
        let p = with_plugins(vec![use_plugin("epsilon", json!({"epsilon": eps}))]);
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let want: Vec<f32> = logits
            .iter()
            .map(|&x| if x as f64 - lse >= f64::ln(eps) || x as f64 == m { x } else { f32::NEG_INFINITY })
            .collect();
        assert_close(&processed(&p, &logits, &[1]), &want, &format!("epsilon {eps}"));
    }
    let e =
        SequenceSampler::new(&with_plugins(vec![use_plugin("epsilon", json!({"epsilon": 2}))]), 4, &[1]).unwrap_err();
    assert!(e.to_string().contains("plugin `epsilon`") && e.to_string().contains("(0, 1)"), "{e}");
    let e = SequenceSampler::new(&with_plugins(vec![use_plugin("epsilon", json!({"eps": 0.1}))]), 4, &[1]).unwrap_err();
    assert!(e.to_string().contains("unknown field `eps`"), "{e}");
}

#[derive(Debug)]
struct DryParams {
    multiplier: f64,
    base: f64,
    allowed_length: usize,
    penalty_last_n: i64,
    breakers: Vec<u32>,
}

/// DRY straight from its definition (see `plugins/dry`), O(N²).
fn dry_reference(logits: &[f32], history: &[u32], p: &DryParams) -> Vec<f32> {
    let mut out = logits.to_vec();
    let t = history.len();
    let n = if p.penalty_last_n < 0 { t } else { t.min(p.penalty_last_n as usize) };
    if p.multiplier == 0.0 || p.penalty_last_n == 0 || n <= p.allowed_length {
        return out;
    }
    let w = &history[t - n..];
    let rep_limit = (0..n).rev().find(|&j| p.breakers.contains(&w[j])).map_or(n, |j| n - 1 - j);
    let mut longest: HashMap<u32, usize> = HashMap::new();
    for pos in 0..n - 1 {
        let mut l = 0;
        while l <= pos && w[pos - l] == w[n - 1 - l] {
            l += 1;
        }
        let l = l.min(rep_limit);
        if l >= p.allowed_length {
            let e = longest.entry(w[pos + 1]).or_insert(0);
            *e = (*e).max(l);
        }
    }
    let max_exp = if p.base > 1.000001 { (88.0 / (p.base as f32 as f64).ln()).floor() as i64 } else { 0 };
    for (token, l) in longest {
        if p.breakers.contains(&token) {
            continue;
        }
        let mut exp = (l - p.allowed_length) as i64;
        if max_exp > 0 {
            exp = exp.min(max_exp);
        }
        out[token as usize] -= (p.multiplier * p.base.powi(exp as i32)) as f32;
    }
    out
}

fn dry_use(p: &DryParams) -> PluginRequest {
    use_plugin(
        "dry",
        json!({"multiplier": p.multiplier, "base": p.base, "allowed_length": p.allowed_length,
               "penalty_last_n": p.penalty_last_n, "sequence_breakers": p.breakers}),
    )
}

#[test]
fn dry_penalizes_what_its_definition_penalizes() {
    let logits = pseudo(16, 7);
    let history = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3];
    let base = DryParams { multiplier: 0.8, base: 1.75, allowed_length: 2, penalty_last_n: -1, breakers: vec![] };
    let cases = [
        ("defaults", base),
        ("window", DryParams { penalty_last_n: 6, ..base_dry() }),
        ("breaker in the suffix", DryParams { breakers: vec![2], ..base_dry() }),
        ("breaker, allowed 1", DryParams { breakers: vec![2], allowed_length: 1, ..base_dry() }),
        ("breaker is a candidate", DryParams { breakers: vec![4], ..base_dry() }),
        ("base 1", DryParams { base: 1.0, multiplier: 2.0, ..base_dry() }),
        ("off", DryParams { multiplier: 0.0, ..base_dry() }),
    ];
    for (what, d) in &cases {
        let got = processed(&with_plugins(vec![dry_use(d)]), &logits, &history);
        let want = dry_reference(&logits, &history, d);
        assert_close(&got, &want, what);
    }
    // The defaults case penalizes 4 and 5 (they would extend "1 2 3" to length 4).
    let want = dry_reference(&logits, &history, &cases[0].1);
    assert!(want[4] < logits[4] && want[5] < logits[5] && want[6] == logits[6]);

    // Random histories over a small alphabet, random parameters.
    for case in 0..40u64 {
        let r = pseudo(64, 100 + case);
        let len = 8 + (r[0].abs() * 6.0) as usize;
        let history: Vec<u32> = r[1..=len].iter().map(|x| (x.abs() * 1.3) as u32 % 5).collect();
        let d = DryParams {
            multiplier: 0.5 + r[50].abs() as f64 / 5.0,
            base: 1.0 + r[51].abs() as f64 / 2.0,
            allowed_length: 1 + (r[52].abs() as usize) % 3,
            penalty_last_n: [-1, 0, 5, 12][(r[53].abs() as usize) % 4],
            breakers: if r[54] > 0.0 { vec![(r[55].abs() as u32) % 5] } else { vec![] },
        };
        let logits = pseudo(8, 200 + case);
        let got = processed(&with_plugins(vec![dry_use(&d)]), &logits, &history);
        assert_close(&got, &dry_reference(&logits, &history, &d), &format!("random case {case} {history:?}"));
    }
}

fn base_dry() -> DryParams {
    DryParams { multiplier: 0.8, base: 1.75, allowed_length: 2, penalty_last_n: -1, breakers: vec![] }
}

/// The history grows with every generated token (greedy decoding over fixed logits).
#[test]
fn dry_sees_the_generated_tokens() {
    let logits = pseudo(6, 9);
    let d = DryParams { multiplier: 0.3, base: 1.5, allowed_length: 1, ..base_dry() };
    let mut s = SequenceSampler::new(&with_plugins(vec![dry_use(&d)]), 6, &[0, 1, 2, 0, 1]).unwrap();
    let mut history = vec![0, 1, 2, 0, 1];
    for step in 0..8 {
        let out = sample_batch_inspect(&row(&logits), &mut [&mut s]).unwrap();
        assert_close(&host_f32(&out.processed), &dry_reference(&logits, &history, &d), &format!("step {step}"));
        history.push(read_ids(&out.tokens).unwrap()[0]);
    }
}

/// Decoding with DRY for many steps: after its first step the plugin updates its match lengths
/// with each new token instead of recomputing them; every step must still equal the definition
/// (growing and sliding windows, breakers, allowed lengths, bases with and without a cap).
#[test]
fn dry_updates_step_by_step_as_the_definition_says() {
    for case in 0..12u64 {
        let r = pseudo(16, 500 + case);
        let d = DryParams {
            multiplier: 0.5 + r[0].abs() as f64 / 10.0,
            base: [1.0, 1.3, 1.75, 3.0][(r[1].abs() as usize) % 4],
            allowed_length: 1 + (r[2].abs() as usize) % 3,
            penalty_last_n: [-1, 6, 11, 40][(r[3].abs() as usize) % 4],
            breakers: if r[4] > 0.0 { vec![(r[5].abs() as u32) % 6] } else { vec![] },
        };
        let prompt: Vec<u32> = r[6..12].iter().map(|x| (x.abs() * 1.7) as u32 % 6).collect();
        let mut s = SequenceSampler::new(&with_plugins(vec![dry_use(&d)]), 6, &prompt).unwrap();
        let mut history = prompt.clone();
        for step in 0..30u64 {
            let logits = pseudo(6, 900 + case * 100 + step);
            let out = sample_batch_inspect(&row(&logits), &mut [&mut s]).unwrap();
            assert!(s.failure().is_none(), "{:?}", s.failure());
            let want = dry_reference(&logits, &history, &d);
            assert_close(
                &host_f32(&out.processed),
                &want,
                &format!("case {case} {d:?} step {step} history {history:?}"),
            );
            history.push(read_ids(&out.tokens).unwrap()[0]);
        }
    }
}

fn log2_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| (v as f64 - lse) / std::f64::consts::LN_2).collect()
}

/// Mirostat v2's truncated set for `mu`: surprise at most `mu`, and the best token always.
fn mirostat_keep(logits: &[f32], mu: f64) -> Vec<bool> {
    let best = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    log2_softmax(logits).iter().zip(logits).map(|(&l2, &x)| -l2 <= mu || x == best).collect()
}

#[test]
fn mirostat_follows_its_definition() {
    let logits = [2.0f32, 1.5, 1.0, 0.2, -0.5, -1.0, -2.0, -3.0];
    let (tau, eta) = (1.5f64, 0.3f64);
    let mut s =
        SequenceSampler::new(&with_plugins(vec![use_plugin("mirostat-v2", json!({"tau": tau, "eta": eta}))]), 8, &[1])
            .unwrap();
    // Every token lies in the set the reference mu allows, with mu updated from the drawn
    // tokens' renormalized surprise; the set must change along the way.
    let mut mu = 2.0 * tau;
    let mut sizes = std::collections::BTreeSet::new();
    for step in 0..300 {
        let keep = mirostat_keep(&logits, mu);
        sizes.insert(keep.iter().filter(|&&k| k).count());
        let t = read_ids(&s.sample(&row(&logits)).unwrap()).unwrap()[0] as usize;
        assert!(keep[t], "step {step}: token {t} outside the set for mu {mu}: {keep:?}");
        let kept: Vec<f32> = logits.iter().zip(&keep).map(|(&x, &k)| if k { x } else { f32::NEG_INFINITY }).collect();
        let surprise = -log2_softmax(&kept)[t];
        mu -= eta * (surprise - tau);
    }
    assert!(sizes.len() >= 2, "mu moved the cut: {sizes:?}");

    // The first draw of many seeds follows the renormalized distribution of the set at 2 tau.
    let keep = mirostat_keep(&logits, 2.0 * tau);
    let kept: Vec<f32> = logits.iter().zip(&keep).map(|(&x, &k)| if k { x } else { f32::NEG_INFINITY }).collect();
    let probs: Vec<f64> = log2_softmax(&kept).iter().map(|l| 2f64.powf(*l)).collect();
    let n = 600;
    let mut counts = [0usize; 8];
    for seed in 0..n {
        let p = SamplingParams {
            seed: Some(seed as u64),
            ..with_plugins(vec![use_plugin("mirostat-v2", json!({"tau": tau}))])
        };
        let mut s = SequenceSampler::new(&p, 8, &[1]).unwrap();
        counts[read_ids(&s.sample(&row(&logits)).unwrap()).unwrap()[0] as usize] += 1;
    }
    let chi2: f64 = (0..8)
        .filter(|&i| probs[i] > 0.0)
        .map(|i| (counts[i] as f64 - n as f64 * probs[i]).powi(2) / (n as f64 * probs[i]))
        .sum();
    assert!(counts.iter().zip(&keep).all(|(&c, &k)| k || c == 0), "{counts:?}");
    assert!(chi2 < 25.0, "chi-square {chi2} for counts {counts:?} vs {probs:?}");

    // The same seed draws the same tokens.
    let draw = |seed| {
        let p = SamplingParams { seed: Some(seed), ..with_plugins(vec![use_plugin("mirostat-v2", json!({}))]) };
        let mut s = SequenceSampler::new(&p, 8, &[1]).unwrap();
        (0..10).map(|_| read_ids(&s.sample(&row(&logits)).unwrap()).unwrap()[0]).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
}

#[test]
fn plugins_compose_in_request_order_with_the_builtins() {
    let logits = pseudo(12, 11);
    // Built-in bias first, then ban, then top-n-sigma on what is left.
    let mut p = with_plugins(vec![
        use_plugin("token-filter", json!({"ban": [3]})),
        use_plugin("top-n-sigma", json!({"n": 1.0})),
    ]);
    p.logit_bias.insert(4, 3.0);
    let mut want = logits.clone();
    want[4] += 3.0;
    want[3] = f32::NEG_INFINITY;
    let want = top_n_sigma_reference(&want, 1.0);
    assert_close(&processed(&p, &logits, &[1]), &want, "bias, ban, top-n-sigma");

    // A final sampler replaces the built-in filters: the combination is refused up front.
    let mut p = with_plugins(vec![use_plugin("mirostat-v2", json!({}))]);
    p.top_p = 0.9;
    let e = SequenceSampler::new(&p, 12, &[1]).unwrap_err();
    assert_eq!(e.code(), "plugin_error");
    assert!(e.to_string().contains("`sampling.top_p`"), "{e}");
    let p = with_plugins(vec![use_plugin("mirostat-v2", json!({})), use_plugin("mirostat-v2", json!({}))]);
    assert!(SequenceSampler::new(&p, 12, &[1]).unwrap_err().to_string().contains("one final sampler"));
}

// ---------------------------------------------------------------------------------------------
// Failures stay with their row.

fn faulty(fail: &str, how: &str) -> SamplingParams {
    with_plugins(vec![use_plugin("faulty", json!({"fail": fail, "how": how}))])
}

#[test]
fn a_failing_plugin_fails_only_its_row_of_the_batch() {
    let v = 16;
    let logits: Vec<f32> = (0..3).flat_map(|r| pseudo(v, 20 + r)).collect();
    let batch = Array::from_slice(&logits, &[3, v as i32]);
    let alone = |p: &SamplingParams, r: usize| {
        let mut s = SequenceSampler::new(p, v, &[1, 2]).unwrap();
        read_ids(&s.sample(&row(&logits[r * v..(r + 1) * v])).unwrap()).unwrap()[0]
    };
    let ok_a = with_plugins(vec![use_plugin("token-filter", json!({"ban": [0, 1, 2, 3, 4, 5]}))]);
    let ok_c =
        SamplingParams { temperature: 0.7, seed: Some(3), ..with_plugins(vec![use_plugin("passthrough", json!({}))]) };
    for how in [
        ("apply", "error"),
        ("apply", "panic"),
        ("apply", "shape"),
        ("apply", "dtype"),
        ("accept", "error"),
        ("accept", "panic"),
    ] {
        let bad = faulty(how.0, how.1);
        let mut rows: Vec<SequenceSampler> =
            [&ok_a, &bad, &ok_c].iter().map(|p| SequenceSampler::new(p, v, &[1, 2]).unwrap()).collect();
        let mut refs: Vec<&mut SequenceSampler> = rows.iter_mut().collect();
        let tokens = read_ids(&sample_batch(&batch, &mut refs).expect("the batch itself succeeds")).unwrap();
        assert_eq!(tokens[0], alone(&ok_a, 0), "{how:?}: row 0");
        assert_eq!(tokens[2], alone(&ok_c, 2), "{how:?}: row 2");
        assert!(rows[0].failure().is_none() && rows[2].failure().is_none(), "{how:?}");
        let e = rows[1].failure().unwrap_or_else(|| panic!("{how:?}: row 1 failed")).to_string();
        assert!(e.starts_with("plugin `faulty`"), "{e}");
        let expect = match how.1 {
            "error" => format!("failing in {} on purpose", how.0),
            "panic" => format!("panicked: faulty: panicking in {} on purpose", how.0),
            "shape" => "must return [1, 16] float logits".to_string(),
            _ => "Int32".to_string(),
        };
        assert!(e.contains(&expect), "{how:?}: {e}");
    }
    // Errors and panics in create fail the request before it starts.
    for how in ["error", "panic"] {
        let e = SequenceSampler::new(&faulty("create", how), v, &[1]).unwrap_err().to_string();
        assert!(e.starts_with("plugin `faulty`: create failed"), "{e}");
    }
    let e = SequenceSampler::new(&with_plugins(vec![use_plugin("dry", json!({"base": 0.5}))]), v, &[1]).unwrap_err();
    assert!(e.to_string().contains("`base` must be >= 1"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The engine with the default model: isolation, and the read gate.

fn engine() -> mlxd::engine::Engine {
    let path = mlxd::default_model::ensure().expect("default model available");
    let model = mlxd::models::load(&path).expect("SmolLM2 loads");
    mlxd::engine::Engine::new(model, mlxd::engine::EngineOptions { prompt_cache_bytes: 0, ..Default::default() })
}

fn request(
    e: &mlxd::engine::Engine,
    text: &str,
    max_tokens: usize,
    sampler: SamplingParams,
) -> mlxd::engine::GenerateRequest {
    let prompt = e.model.tokenizer.encode(text, true).unwrap();
    mlxd::engine::GenerateRequest { prompt, max_tokens, stop: vec![], sampler }
}

#[test]
fn engine_batches_survive_a_failing_plugin_and_read_only_ids() {
    let mut e = engine();
    let greedy = request(&e, "The capital of France is", 12, SamplingParams::default());
    let dry = request(&e, "One, two, three, one, two, three, one, two,", 12, with_plugins(vec![dry_use(&base_dry())]));
    let failing =
        request(&e, "Hello", 12, with_plugins(vec![use_plugin("faulty", json!({"fail": "apply", "after": 3}))]));
    let alone: Vec<Vec<u32>> = [&greedy, &dry].iter().map(|r| e.generate(r, |_| true).unwrap().ids).collect();

    let mut rows =
        vec![e.start(greedy.clone()).unwrap(), e.start(failing.clone()).unwrap(), e.start(dry.clone()).unwrap()];
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); 3];
    while rows.iter().any(|r| r.finished().is_none()) {
        let mut refs: Vec<&mut mlxd::engine::Row> = rows.iter_mut().collect();
        e.step(&mut refs, |i, ev| {
            ids[i].push(ev.id);
            true
        })
        .expect("the step succeeds for the batch");
    }
    assert_eq!(ids[0], alone[0], "the greedy row is what it is alone");
    assert_eq!(ids[2], alone[1], "the DRY row is what it is alone");
    let err = rows[1].failure().expect("the faulty row failed").to_string();
    assert!(err.contains("plugin `faulty`") && err.contains("failing in apply"), "{err}");
    assert!(ids[1].len() < 12, "the faulty row stopped early: {:?}", ids[1]);
    assert!(rows[0].failure().is_none() && rows[2].failure().is_none());
    for r in rows {
        e.finish(r);
    }
    // Engine::generate reports a plugin failure as an error.
    let err = e.generate(&failing, |_| true).unwrap_err().to_string();
    assert!(err.contains("plugin `faulty`"), "{err}");

    // Decoding with processor and sampler plugins moves one u32 per token to the host.
    let mut p = with_plugins(vec![
        dry_use(&base_dry()),
        use_plugin("top-n-sigma", json!({"n": 2.0})),
        use_plugin("mirostat-v2", json!({"tau": 3.0})),
    ]);
    p.temperature = 0.8;
    p.seed = Some(5);
    let req = request(&e, "Write a poem about the sea.", 24, p);
    e.model.eos_ids.clear(); // run to the token count whatever mirostat draws
    let before = thread_host_read_stats();
    let reads_before = e.host_reads();
    let out = e.generate(&req, |_| true).unwrap();
    let after = thread_host_read_stats();
    let n = out.ids.len() as u64;
    assert_eq!(n, 24, "{:?}", out.ids);
    assert_eq!(e.host_reads() - reads_before, n);
    assert_eq!((after.reads - before.reads, after.bytes - before.bytes, after.refused - before.refused), (n, 4 * n, 0));
}

// ---------------------------------------------------------------------------------------------
// The real daemon over WebSocket.

fn start_daemon(plugins: &Path) -> Daemon {
    common::daemon::start(&format!("[plugins]\ndirs = [{:?}]\n", plugins.display().to_string()))
}

async fn connect(d: &Daemon) -> Ws {
    let (ws, hello) = common::daemon::connect_with(d, Some(&d.token), None).await.expect("connects");
    assert_eq!(hello["capabilities"]["plugins"], true, "{hello}");
    ws
}

/// Every request's final event (`done` or `error`) and token count, by id.
async fn finals(ws: &mut Ws, ids: &[&str]) -> HashMap<String, (Value, usize)> {
    let mut tokens: HashMap<String, usize> = HashMap::new();
    let mut out = HashMap::new();
    while out.len() < ids.len() {
        let m = recv(ws).await;
        let id = m["id"].as_str().unwrap_or_default().to_string();
        assert!(ids.contains(&id.as_str()), "event for an unknown id: {m}");
        match m["type"].as_str().unwrap() {
            "token" => *tokens.entry(id).or_default() += 1,
            "done" | "error" => {
                let n = tokens.get(&id).copied().unwrap_or(0);
                assert!(out.insert(id, (m, n)).is_none(), "one final event per request");
            }
            _ => {}
        }
    }
    out
}

fn gen(id: &str, prompt: &str, max_tokens: u32, plugins: Value) -> Value {
    json!({"type": "generate", "id": id, "prompt": prompt, "max_tokens": max_tokens, "plugins": plugins})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_lists_runs_isolates_and_reloads_plugins() {
    let plugins = plugin_dir(true);
    let d = start_daemon(plugins.path());
    let mut ws = connect(&d).await;

    send(&mut ws, json!({"type": "plugins", "id": "l"})).await;
    let l = recv(&mut ws).await;
    let names: Vec<&str> =
        l["data"]["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"dry") && names.contains(&"epsilon") && names.contains(&"mirostat-v2"), "{l}");
    assert_eq!(l["data"]["refused"].as_array().unwrap().len(), 3, "{l}");

    // Healthy and failing requests together: each failure names its plugin, the rest finish.
    let reqs = [
        gen("plain", "The capital of France is", 10, json!([])),
        gen("dry", "one two one two one two", 10, json!([{"name": "dry", "params": {"multiplier": 1.0}}])),
        gen("miro", "Once upon a time", 10, json!([{"name": "mirostat-v2", "params": {"tau": 4.0}}, ])),
        gen("c", "Once upon a time", 10, json!([{"name": "epsilon", "params": {"epsilon": 0.01}}])),
        gen("err", "Hello", 10, json!([{"name": "faulty", "params": {"fail": "apply", "after": 2}}])),
        gen("panic", "Hello", 10, json!([{"name": "faulty", "params": {"fail": "apply", "how": "panic", "after": 1}}])),
        gen("shape", "Hello", 10, json!([{"name": "faulty", "params": {"fail": "apply", "how": "shape"}}])),
        gen("create", "Hello", 10, json!([{"name": "faulty", "params": {"fail": "create"}}])),
        gen("noentry", "Hello", 10, json!([{"name": "no-entry"}])),
        gen("params", "Hello", 10, json!([{"name": "dry", "params": {"base": -1}}])),
    ];
    for r in &reqs {
        send(&mut ws, r.clone()).await;
    }
    let ids: Vec<&str> = reqs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let out = finals(&mut ws, &ids).await;
    for ok in ["plain", "dry", "miro", "c"] {
        let (m, n) = &out[ok];
        assert_eq!(m["type"], "done", "{ok}: {m}");
        assert_eq!(m["usage"]["completion_tokens"].as_u64().unwrap() as usize, *n, "{ok}");
    }
    for (bad, needle) in [
        ("err", "failing in apply on purpose"),
        ("panic", "panicking in apply on purpose"),
        ("shape", "must return [1, "),
        ("create", "create failed"),
        ("noentry", "exports no `mlxd_sampler_plugin_v1`"),
        ("params", "`base` must be >= 1"),
    ] {
        let (m, _) = &out[bad];
        assert_eq!((m["type"].as_str(), m["code"].as_str()), (Some("error"), Some("plugin_error")), "{bad}: {m}");
        let msg = m["message"].as_str().unwrap();
        let plugin = if bad == "noentry" {
            "no-entry"
        } else if bad == "params" {
            "dry"
        } else {
            "faulty"
        };
        assert!(msg.contains(&format!("plugin `{plugin}`")) && msg.contains(needle), "{bad}: {msg}");
    }
    assert!(out["err"].1 >= 2 && out["err"].1 < 10, "tokens before the failure still arrived: {}", out["err"].1);

    // A request running on `passthrough` outlives its file and a reload.
    send(&mut ws, gen("long", "Write a long story about a dragon.", 120, json!([{"name": "passthrough"}]))).await;
    loop {
        let m = recv(&mut ws).await;
        if m["type"] == "token" {
            break;
        }
    }
    std::fs::remove_file(plugins.path().join(lib_name("mlxd_plugin_passthrough"))).unwrap();
    send(&mut ws, json!({"type": "reload_plugins", "id": "r1"})).await;
    let mut reloaded = None;
    let mut long_done = None;
    while reloaded.is_none() || long_done.is_none() {
        let m = recv(&mut ws).await;
        match (m["id"].as_str(), m["type"].as_str()) {
            (Some("r1"), Some("result")) => reloaded = Some(m),
            (Some("long"), Some("done" | "error")) => long_done = Some(m),
            _ => {}
        }
    }
    let r = reloaded.unwrap();
    assert!(!r["data"]["plugins"].as_array().unwrap().iter().any(|p| p["name"] == "passthrough"), "{r}");
    assert_eq!(long_done.unwrap()["type"], "done", "the running request finished on the unloaded library");
    send(&mut ws, gen("gone", "Hi", 3, json!([{"name": "passthrough"}]))).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["code"], "plugin_error", "{m}");

    // SIGHUP reloads too.
    let name = lib_name("mlxd_plugin_passthrough");
    std::fs::copy(deps_dir().join(&name), plugins.path().join(&name)).unwrap();
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) }, 0);
    let mut listed = false;
    for _ in 0..50 {
        send(&mut ws, json!({"type": "plugins", "id": "l2"})).await;
        let l = recv(&mut ws).await;
        if l["data"]["plugins"].as_array().unwrap().iter().any(|p| p["name"] == "passthrough") {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed, "SIGHUP reloaded the plugin directory");
    send(&mut ws, gen("back", "Hi", 3, json!([{"name": "passthrough"}]))).await;
    assert_eq!(finals(&mut ws, &["back"]).await["back"].0["type"], "done");
    drop(ws);
}
