//! Model residency through the real daemon: load and unload on request, unload after the
//! keep-alive, eviction of idle models to stay within the memory budget, refusal when busy models
//! fill it, and the Unix-domain socket.

mod common;

use common::daemon::{connect_with, recv, send, start, Daemon, Ws};
use serde_json::{json, Value};
use std::time::Duration;

/// Three names for the default GGUF (98 MB on disk, 0.54 GB once expanded to f32 on the CPU),
/// and a budget that holds one of them.
fn config(extra_server: &str) -> String {
    format!(
        "{extra_server}[engine]\nmemory_budget_mb = 850\n\
         [models.first]\npath = \"default\"\nkeep_alive_s = 0\n\
         [models.second]\npath = \"default\"\nkeep_alive_s = 0\n\
         [models.brief]\npath = \"default\"\nkeep_alive_s = 1\n"
    )
}

async fn ask(ws: &mut Ws, v: Value) -> Value {
    send(ws, v).await;
    recv(ws).await
}

async fn loaded(ws: &mut Ws) -> Vec<String> {
    let m = ask(ws, json!({"type": "models", "id": "m"})).await;
    m["data"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["loaded"] == true)
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

async fn connect(d: &Daemon) -> Ws {
    connect_with(d, Some(&d.token), None).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_unload_evict_refuse_and_keep_alive() {
    let d = start(&config(""));
    let mut ws = connect(&d).await;
    assert!(loaded(&mut ws).await.is_empty(), "nothing preloads");

    let r = ask(&mut ws, json!({"type": "load", "id": "l1", "model": "first"})).await;
    assert_eq!(r["data"]["loaded"], true, "{r}");
    assert_eq!(loaded(&mut ws).await, vec!["first"]);

    // What the budget leaves after the weights (850 MiB - 0.54 GB) bounds the KV cache a request may
    // reserve: 8,192 positions of SmolLM2 (46 KB each in f32) do not fit, 16 do.
    let r =
        ask(&mut ws, json!({"type": "generate", "id": "huge", "model": "first", "prompt": "Hi", "max_tokens": 8192}))
            .await;
    assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("out_of_memory")), "{r}");
    assert!(r["message"].as_str().unwrap().contains("memory_budget_mb"), "{r}");
    let r =
        ask(&mut ws, json!({"type": "generate", "id": "small", "model": "first", "prompt": "Hi", "max_tokens": 16}))
            .await;
    assert_eq!(r["type"], "started", "{r}");
    loop {
        if recv(&mut ws).await["type"] == "done" {
            break;
        }
    }

    // The budget holds one copy: loading the second evicts the idle first.
    let r = ask(&mut ws, json!({"type": "load", "id": "l2", "model": "second"})).await;
    assert_eq!(r["data"]["loaded"], true, "{r}");
    assert_eq!(loaded(&mut ws).await, vec!["second"]);

    // While `second` generates it cannot be evicted: loading `first` is refused.
    send(
        &mut ws,
        json!({"type": "generate", "id": "busy", "model": "second", "prompt": "Once upon a time", "max_tokens": 400}),
    )
    .await;
    loop {
        if recv(&mut ws).await["type"] == "token" {
            break;
        }
    }
    send(&mut ws, json!({"type": "load", "id": "l3", "model": "first"})).await;
    let refusal = loop {
        let m = recv(&mut ws).await;
        if m["id"] == "l3" {
            break m;
        }
    };
    assert_eq!(refusal["code"], "out_of_memory", "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains("memory_budget_mb"), "{refusal}");
    // ... and cannot be unloaded either.
    send(&mut ws, json!({"type": "unload", "id": "u0", "model": "second"})).await;
    let busy = loop {
        let m = recv(&mut ws).await;
        if m["id"] == "u0" {
            break m;
        }
    };
    assert_eq!(busy["code"], "busy", "{busy}");
    send(&mut ws, json!({"type": "cancel", "id": "busy"})).await;
    loop {
        let m = recv(&mut ws).await;
        if m["id"] == "busy" && m["type"] == "done" {
            break;
        }
    }

    let r = ask(&mut ws, json!({"type": "unload", "id": "u1", "model": "second"})).await;
    assert_eq!(r["data"]["unloaded"], true, "{r}");
    assert!(loaded(&mut ws).await.is_empty());
    let r = ask(&mut ws, json!({"type": "unload", "id": "u2", "model": "nope"})).await;
    assert_eq!(r["code"], "unknown_model", "{r}");

    // A model with a 1 s keep-alive is unloaded by the reaper (it runs every 5 s).
    let r =
        ask(&mut ws, json!({"type": "generate", "id": "g", "model": "brief", "prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(r["type"], "started", "{r}");
    loop {
        if recv(&mut ws).await["type"] == "done" {
            break;
        }
    }
    assert_eq!(loaded(&mut ws).await, vec!["brief"]);
    let mut gone = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if loaded(&mut ws).await.is_empty() {
            gone = true;
            break;
        }
    }
    assert!(gone, "the keep-alive unloaded the idle model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_speaks_the_same_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mlxd.sock");
    let d = start(&format!("unix_socket = {:?}\n", sock.display().to_string()));
    use std::os::unix::fs::PermissionsExt;
    let mut mode = 0;
    for _ in 0..50 {
        if let Ok(m) = std::fs::metadata(&sock) {
            mode = m.permissions().mode() & 0o777;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mode, 0o600, "the socket is private to its owner");
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let req = format!("ws://localhost/?token={}", d.token);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"hello\""));
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"type": "tokenize", "id": "t", "text": "Hello"}).to_string(),
    ))
    .await
    .unwrap();
    let m: Value = serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(m["type"], "result", "{m}");
}

/// The memory budget holds under load: eight requests of different lengths on a model whose
/// share of the budget fits only a few of them decoding together. Those that do not fit wait
/// (none is refused: each fits alone), all finish, batches still form, and MLX's peak memory
/// over the whole run, loading included, stays within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_holds_under_concurrent_requests() {
    // SmolLM2 expanded to f32 on the CPU: 0.54 GB of weights, 46 KB of KV cache per position.
    let d = start(
        "[engine]\nmemory_budget_mb = 720\nprompt_cache_mb = 64\n\
         [models.smol]\npath = \"default\"\nkeep_alive_s = 0\npreload = true\n",
    );
    let mut ws = connect(&d).await;
    let words = "the quick brown fox jumps over the lazy dog ";
    for i in 0..8 {
        // Prompts of 9 to 450 words: padded into one stacked batch, the short rows take as
        // much room as the long ones.
        let prompt = words.repeat(1 + i * i);
        send(&mut ws, json!({"type": "generate", "id": format!("r{i}"), "prompt": prompt, "max_tokens": 24})).await;
    }
    let (mut done, mut running_max) = (0, 0);
    while done < 8 {
        let m = recv(&mut ws).await;
        match m["type"].as_str() {
            Some("done") => done += 1,
            Some("error") => panic!("a request that fits alone was refused: {m}"),
            Some("token") if m["id"] == "r0" => {
                let s = ask(&mut ws, json!({"type": "status", "id": "s"})).await;
                let model = &s["data"]["resident_models"][0];
                running_max = running_max.max(model["running"].as_u64().unwrap_or(0));
            }
            _ => {}
        }
    }
    let s = ask(&mut ws, json!({"type": "status", "id": "s"})).await;
    let memory = &s["data"]["memory"];
    let (peak, budget) = (memory["peak_bytes"].as_u64().unwrap(), memory["budget_bytes"].as_u64().unwrap());
    eprintln!(
        "memory budget test: peak {} MiB of a {} MiB budget; up to {running_max} running; {s}",
        peak >> 20,
        budget >> 20
    );
    assert!(peak > 0 && peak <= budget, "MLX peak memory {peak} exceeds the budget {budget}: {s}");
    let model = &s["data"]["resident_models"][0];
    assert!(model["mean_batch"].as_f64().unwrap() > 1.0, "requests still batched: {model}");
    // What the model reports holding stays within what the budget leaves it.
    let share = model["memory_share_bytes"].as_u64().expect("a share under a budget");
    let held = model["memory_plan_bytes"].as_u64().unwrap() + model["prompt_cache_bytes"].as_u64().unwrap();
    assert!(share > 0 && share < budget && held <= share, "{model}");
}
