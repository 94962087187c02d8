//! Faults, each with its defined outcome, through the real daemon (docs/reliability.md lists
//! them with the plugin failures tested in tests/plugins.rs): a sampler plugin that never
//! returns; truncated and corrupt model files; a model larger than the memory budget; a client
//! that never reads; SIGTERM in the middle of a batch.

mod common;

use common::daemon::{ask, connect, finish, recv, send, start, Daemon, Ws};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn lib_name(stem: &str) -> String {
    if cfg!(target_os = "macos") {
        format!("lib{stem}.dylib")
    } else {
        format!("lib{stem}.so")
    }
}

/// A plugin directory with `faulty` and `passthrough` (built by cargo as dev-dependencies).
fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    for p in ["faulty", "passthrough"] {
        let name = lib_name(&format!("mlxd_plugin_{p}"));
        std::fs::copy(deps.join(&name), dir.path().join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    dir
}

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::tiny::write_tiny_model(dir.path());
    dir
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

async fn status(ws: &mut Ws) -> Value {
    ask(ws, json!({"type": "status", "id": "status"})).await["data"].clone()
}

fn model_status<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["resident_models"].as_array().unwrap().iter().find(|m| m["name"] == name)
}

/// Waits for a request's first token (skipping `started`).
async fn first_token(ws: &mut Ws, id: &str) {
    loop {
        let m = recv(ws).await;
        assert_eq!(m["id"], id, "{m}");
        match m["type"].as_str() {
            Some("token") => return,
            Some("started") => continue,
            _ => panic!("{id} ended before its first token: {m}"),
        }
    }
}

/// Outcome: the watchdog (engine.step_timeout_s) sets the stuck model aside within the timeout
/// plus a second; every request in flight on it, the culprit and its batch mates, ends with one
/// `internal` error naming the setting; other models keep serving meanwhile; the next request
/// loads a fresh copy that answers exactly as before; and when the plugin finally returns, the
/// old thread ends and its memory is released (`stalled_models` empties).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_returns_is_cut_off_by_the_watchdog() {
    let plugins = plugin_dir();
    let tiny = tiny_model();
    let d = start(&format!(
        "[engine]\nstep_timeout_s = 6\n[plugins]\ndirs = [{}]\n\
         [models.smol]\npath = \"default\"\npreload = true\nkeep_alive_s = 0\n\
         [models.tiny]\npath = {}\npreload = true\n",
        toml_path(plugins.path()),
        toml_path(tiny.path())
    ));
    let mut ws = connect(&d).await;
    let greedy = |id: &str| json!({"type": "generate", "id": id, "model": "smol", "prompt": "The capital of France is", "max_tokens": 8});
    send(&mut ws, greedy("ref")).await;
    let reference = finish(&mut ws, &["ref"]).await.remove("ref").unwrap();
    assert_eq!(reference.outcome(), "done:length");

    // A healthy long request, then one whose plugin hangs (25 s) on its second call. The
    // timeout (6 s) leaves room for slow steps when the tests run side by side on two cores.
    let no_eos = json!({"logit_bias": {"0": -100, "1": -100, "2": -100}});
    send(&mut ws, json!({"type": "generate", "id": "victim", "model": "smol", "prompt": "Write a long story about a dragon.", "max_tokens": 400, "sampling": no_eos})).await;
    first_token(&mut ws, "victim").await;
    let mut culprit = connect(&d).await;
    let hang = json!([{"name": "faulty", "params": {"fail": "apply", "how": "hang", "after": 1, "hang_ms": 25000}}]);
    send(&mut culprit, json!({"type": "generate", "id": "hang", "model": "smol", "prompt": "Hello", "max_tokens": 50, "plugins": hang})).await;
    let t0 = Instant::now();

    // Another model is not affected while this one is stuck.
    let mut other = connect(&d).await;
    send(&mut other, json!({"type": "generate", "id": "t", "model": "tiny", "prompt": "abc", "max_tokens": 32})).await;
    let t = finish(&mut other, &["t"]).await.remove("t").unwrap();
    assert!(t.last["type"] == "done", "{:?}", t.last);

    let hung = finish(&mut culprit, &["hang"]).await.remove("hang").unwrap();
    let waited = t0.elapsed();
    assert_eq!(hung.outcome(), "error:internal", "{:?}", hung.last);
    assert!(hung.last["message"].as_str().unwrap().contains("engine.step_timeout_s"), "{}", hung.last);
    assert!(waited < Duration::from_secs(20), "the watchdog took {waited:?}");
    let victim = finish(&mut ws, &["victim"]).await.remove("victim").unwrap();
    assert_eq!(victim.outcome(), "error:internal", "{:?}", victim.last);
    let s = status(&mut ws).await;
    assert_eq!(s["stalled_models"], json!(["smol"]), "{s}");

    // A fresh copy serves the same model, with the same answer.
    send(&mut ws, greedy("again")).await;
    let again = finish(&mut ws, &["again"]).await.remove("again").unwrap();
    assert_eq!((again.outcome(), &again.ids, &again.text), (reference.outcome(), &reference.ids, &reference.text));
    let tok = ask(&mut ws, json!({"type": "tokenize", "id": "tk", "model": "smol", "text": "Hello"})).await;
    assert_eq!(tok["type"], "result", "{tok}");

    // The plugin returns after 25 s; the old thread finds its clients gone and ends.
    let mut ended = false;
    for _ in 0..120 {
        if status(&mut ws).await["stalled_models"] == json!([]) {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ended, "the stuck thread ended once the plugin returned");
}

/// Outcome: a request for a model whose files are missing, truncated or corrupt ends with
/// `model_load_failed` naming the file; nothing stays loaded; other models keep serving; asking
/// again gives the same answer (no half-loaded state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_corrupt_model_files_are_named_and_others_keep_serving() {
    let root = tempfile::tempdir().unwrap();
    let make = |name: &str| -> PathBuf {
        let p = root.path().join(name);
        common::tiny::write_tiny_model(&p);
        p
    };
    let good = make("good");
    let truncated = make("truncated");
    let st = truncated.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..len as usize / 2]).unwrap();
    let corrupt = make("corrupt");
    let mut bytes = std::fs::read(corrupt.join("model.safetensors")).unwrap();
    for b in bytes.iter_mut().skip(8).take(64) {
        *b = b'#';
    }
    std::fs::write(corrupt.join("model.safetensors"), &bytes).unwrap();
    let bad_config = make("bad_config");
    std::fs::write(bad_config.join("config.json"), "{\"model_type\": \"llama\", \"hidden_size\": ").unwrap();
    let gguf = mlxd::default_model::ensure().expect("default model");
    let short_gguf = root.path().join("short.gguf");
    let head = std::fs::read(&gguf).unwrap();
    std::fs::write(&short_gguf, &head[..head.len() / 3]).unwrap();
    let header_only = root.path().join("header.gguf");
    std::fs::write(&header_only, &head[..4096]).unwrap();

    let cases: Vec<(&str, PathBuf, &str)> = vec![
        ("truncated", truncated.clone(), "model.safetensors"),
        ("corrupt", corrupt.clone(), "model.safetensors"),
        ("bad_config", bad_config.clone(), "config.json"),
        ("short_gguf", short_gguf.clone(), "short.gguf"),
        ("header_gguf", header_only.clone(), "header.gguf"),
        ("missing", root.path().join("nowhere"), "does not exist"),
    ];
    let mut cfg = format!("[models.good]\npath = {}\n", toml_path(&good));
    for (name, path, _) in &cases {
        cfg += &format!("[models.{name}]\npath = {}\n", toml_path(path));
    }
    let d = start(&cfg);
    let mut ws = connect(&d).await;
    for round in 0..2 {
        for (name, path, needle) in &cases {
            let id = format!("{name}{round}");
            let r = ask(&mut ws, json!({"type": "generate", "id": id, "model": name, "prompt": "hi", "max_tokens": 4}))
                .await;
            assert_eq!(
                (r["type"].as_str(), r["code"].as_str()),
                (Some("error"), Some("model_load_failed")),
                "{name}: {r}"
            );
            let msg = r["message"].as_str().unwrap();
            assert!(msg.contains(&path.display().to_string()) && msg.contains(needle), "{name}: {msg}");
            assert!(msg.contains(&format!("model `{name}`")), "{name}: {msg}");
        }
        send(
            &mut ws,
            json!({"type": "generate", "id": format!("good{round}"), "model": "good", "prompt": "hi", "max_tokens": 4}),
        )
        .await;
        let id = format!("good{round}");
        let ok = finish(&mut ws, &[id.as_str()]).await.remove(&id).unwrap();
        assert_eq!(ok.outcome(), "done:length", "{:?}", ok.last);
    }
    let models = ask(&mut ws, json!({"type": "models", "id": "m"})).await;
    let loaded: Vec<&str> = models["data"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["loaded"] == true)
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["good"], "{models}");
}

/// Outcome: a model that cannot fit the budget even alone is refused with `out_of_memory` naming
/// `engine.memory_budget_mb` (SmolLM2's GGUF is 98 MB on disk and 0.54 GB once expanded on the
/// CPU: the load is counted as loaded and given back); its memory is released; a small model
/// still loads and serves, and the refusal repeats identically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_memory_budget_is_refused() {
    let tiny = tiny_model();
    let d = start(&format!(
        "[engine]\nmemory_budget_mb = 200\n[models.big]\npath = \"default\"\n[models.tiny]\npath = {}\n",
        toml_path(tiny.path())
    ));
    let mut ws = connect(&d).await;
    for round in 0..2 {
        let r = ask(
            &mut ws,
            json!({"type": "generate", "id": format!("big{round}"), "model": "big", "prompt": "hi", "max_tokens": 4}),
        )
        .await;
        assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("out_of_memory")), "{r}");
        assert!(r["message"].as_str().unwrap().contains("engine.memory_budget_mb"), "{r}");
        let r = ask(&mut ws, json!({"type": "load", "id": format!("load{round}"), "model": "big"})).await;
        assert_eq!(r["code"], "out_of_memory", "{r}");
    }
    // The refused copy's weights are freed once its thread ends.
    let mut freed = false;
    for _ in 0..50 {
        if status(&mut ws).await["memory"]["active_bytes"].as_u64().unwrap() < 64 << 20 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(freed, "the refused model's memory was released: {}", status(&mut ws).await["memory"]);
    send(&mut ws, json!({"type": "generate", "id": "small", "model": "tiny", "prompt": "hi", "max_tokens": 4})).await;
    assert_eq!(finish(&mut ws, &["small"]).await["small"].outcome(), "done:length");
}

/// Outcome: a client that stops reading pauses only its own generation (others on the same model
/// finish as fast and with the same output); after `server.slow_client_timeout_s` of taking
/// nothing it is cancelled, which frees its batch slot and KV memory; if it reads again it finds
/// its tokens and `done` / `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_pauses_only_itself_and_is_cancelled_after_the_timeout() {
    let tiny = tiny_model();
    let d = start(&format!(
        "stream_buffer = 8\nslow_client_timeout_s = 2\n[limits]\nmax_tokens = 100000\n[models.tiny]\npath = {}\npreload = true\n",
        toml_path(tiny.path())
    ));
    let mut ws = connect(&d).await;
    let greedy =
        |id: &str| json!({"type": "generate", "id": id, "model": "tiny", "prompt": "Hello there", "max_tokens": 64});
    send(&mut ws, greedy("ref")).await;
    let reference = finish(&mut ws, &["ref"]).await.remove("ref").unwrap();

    // Large events (20 logprobs each), end-of-sequence banned: megabytes of output, more than
    // the socket buffers hold.
    let mut slow = connect(&d).await;
    send(
        &mut slow,
        json!({"type": "generate", "id": "slow", "model": "tiny", "prompt": "x", "max_tokens": 100000,
                           "logprobs": 20, "sampling": {"logit_bias": {"257": -100}}}),
    )
    .await;
    for i in 0..5 {
        let id = format!("fast{i}");
        let t = Instant::now();
        send(&mut ws, greedy(&id)).await;
        let f = finish(&mut ws, &[id.as_str()]).await.remove(&id).unwrap();
        assert_eq!((&f.ids, &f.text), (&reference.ids, &reference.text), "{id}");
        assert!(t.elapsed() < Duration::from_secs(30), "{id} took {:?}", t.elapsed());
    }
    let mut cancelled = false;
    for _ in 0..240 {
        let s = status(&mut ws).await;
        let m = model_status(&s, "tiny").unwrap().clone();
        if m["slow_client_cancels"] == 1 && m["running"] == 0 && m["kv_cache_bytes"] == 0 {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(cancelled, "the unread request was cancelled: {}", status(&mut ws).await);
    let f = finish(&mut slow, &["slow"]).await.remove("slow").unwrap();
    assert_eq!(f.outcome(), "done:cancelled", "{:?}", f.last);
    let n = f.last["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 100000 && n as usize == f.ids.len(), "{n} tokens, {} received", f.ids.len());
}

/// Outcome: on SIGTERM every request, running or still queued, on every model and connection,
/// gets exactly one final event (`done`; `cancelled` unless it had just finished), and the
/// process exits with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_batch_finishes_every_request_and_exits_zero() {
    let tiny = tiny_model();
    let d = start(&format!(
        "[limits]\nmax_batch = 2\nmax_tokens = 100000\n[models.smol]\npath = \"default\"\npreload = true\nkeep_alive_s = 0\n\
         [models.tiny]\npath = {}\npreload = true\n",
        toml_path(tiny.path())
    ));
    let long = |id: &str, model: &str| {
        json!({"type": "generate", "id": id, "model": model, "prompt": "Write a long story about the sea.", "max_tokens": 5000,
               "sampling": {"logit_bias": {"0": -100, "1": -100, "2": -100, "257": -100}}})
    };
    let mut a = connect(&d).await;
    let mut b = connect(&d).await;
    let mut c = connect(&d).await;
    for id in ["a1", "a2", "a3"] {
        send(&mut a, long(id, "smol")).await;
    }
    send(&mut b, long("b1", "tiny")).await;
    send(&mut b, long("b2", "tiny")).await;
    send(&mut c, long("c1", "smol")).await;
    send(&mut c, json!({"type": "generate", "id": "c2", "model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300})).await;
    // Both smol slots decoding (a1, a2), three smol requests queued, two tiny ones decoding.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ws = connect(&d).await;
    let mut busy = false;
    // Preloading and the first steps can take a while when tests share two cores.
    for _ in 0..600 {
        let s = status(&mut ws).await;
        if let (Some(sm), Some(ti)) = (model_status(&s, "smol"), model_status(&s, "tiny")) {
            if sm["running"] == 2 && sm["queued"] == 3 && ti["running"] == 2 && sm["tokens"].as_u64().unwrap_or(0) > 0 {
                busy = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(busy, "the batch is full and requests are queued: {}", status(&mut ws).await);
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    let fa = finish(&mut a, &["a1", "a2", "a3"]).await;
    let fb = finish(&mut b, &["b1", "b2"]).await;
    let fc = finish(&mut c, &["c1", "c2"]).await;
    for (id, f) in fa.iter().chain(&fb).chain(&fc) {
        assert_eq!(f.outcome(), "done:cancelled", "{id}: {:?}", f.last);
        assert_eq!(f.last["usage"]["completion_tokens"].as_u64().unwrap() as usize, f.ids.len(), "{id}");
    }
    let smol: Vec<&common::daemon::Finished> = fa.values().chain(fc.values()).collect();
    assert_eq!(smol.iter().filter(|f| f.started && !f.ids.is_empty()).count(), 2, "two smol requests were decoding");
    assert_eq!(
        smol.iter().filter(|f| !f.started && f.ids.is_empty()).count(),
        3,
        "three ended while queued, without starting"
    );
    assert!(fb.values().all(|f| f.started && !f.ids.is_empty()), "both tiny requests were decoding");
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(recv(ws).await["type"], "closed");
    }
    let mut d: Daemon = d;
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(t0.elapsed() < Duration::from_secs(20), "stopped in {:?}", t0.elapsed());
}
