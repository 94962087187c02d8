//! The real daemon binary, started on port 0 with its default model (SmolLM2-135M, CPU), spoken to
//! over raw WebSocket: authentication, origins, streaming, multiplexing, cancellation,
//! disconnects, malformed input, limits, batching fidelity, metrics and SIGTERM.

mod common;

use common::daemon::{assert_batched, connect_with as connect_raw, recv, send, start, Daemon, Ws};
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

async fn connect_with(d: &Daemon, token: Option<&str>, origin: Option<&str>) -> Result<Ws, WsError> {
    connect_raw(d, token, origin).await.map(|(ws, _)| ws)
}

async fn connect(d: &Daemon) -> Ws {
    connect_with(d, Some(&d.token), None).await.expect("connects with the token")
}

/// Collects one request's events until its `done` or `error`.
#[derive(Debug, Default)]
struct Run {
    text: String,
    ids: Vec<u64>,
    tokens_events: usize,
    done: Option<Value>,
    error: Option<Value>,
    started: bool,
}

async fn collect(ws: &mut Ws, ids: &[&str]) -> std::collections::HashMap<String, Run> {
    let mut runs: std::collections::HashMap<String, Run> = ids.iter().map(|i| (i.to_string(), Run::default())).collect();
    let mut open = ids.len();
    while open > 0 {
        let m = recv(ws).await;
        let id = m["id"].as_str().unwrap_or_default().to_string();
        let Some(r) = runs.get_mut(&id) else { panic!("event for unknown id: {m}") };
        match m["type"].as_str().unwrap() {
            "started" => r.started = true,
            "token" => {
                r.text.push_str(m["text"].as_str().unwrap());
                r.ids.extend(m["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()));
                r.tokens_events += 1;
            }
            "done" => {
                assert!(r.done.is_none() && r.error.is_none(), "exactly one final event for {id}");
                r.done = Some(m);
                open -= 1;
            }
            "error" => {
                assert!(r.done.is_none() && r.error.is_none(), "exactly one final event for {id}");
                r.error = Some(m);
                open -= 1;
            }
            other => panic!("unexpected event {other}: {m}"),
        }
    }
    runs
}

fn gen(id: &str, content: &str, max_tokens: u32) -> Value {
    json!({"type": "generate", "id": id, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

fn http_status(e: WsError) -> u16 {
    match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_origin_are_enforced() {
    let d = start("allowed_origins = [\"vscode-webview://mlxd-test\"]\n");
    assert_eq!(http_status(connect_with(&d, None, None).await.unwrap_err()), 401);
    assert_eq!(http_status(connect_with(&d, Some("0000"), None).await.unwrap_err()), 401);
    let almost = format!("{}x", &d.token[..d.token.len() - 1]);
    assert_eq!(http_status(connect_with(&d, Some(&almost), None).await.unwrap_err()), 401);
    assert_eq!(http_status(connect_with(&d, Some(&d.token), Some("https://evil.example")).await.unwrap_err()), 403);
    // A foreign origin is refused even without a token: a page learns nothing about the token.
    assert_eq!(http_status(connect_with(&d, None, Some("https://evil.example")).await.unwrap_err()), 403);
    connect_with(&d, Some(&d.token), Some("vscode-webview://mlxd-test")).await.expect("allow-listed origin");
    connect(&d).await;
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.dir.path().join("state/token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_multiplexed_requests_and_answers_questions() {
    let d = start("");
    let mut ws = connect(&d).await;
    send(&mut ws, gen("paris", "What is the capital of France?", 40)).await;
    send(&mut ws, json!({"type": "generate", "id": "raw", "prompt": "The three primary colors are", "max_tokens": 12})).await;
    let runs = collect(&mut ws, &["paris", "raw"]).await;
    let p = &runs["paris"];
    assert!(p.started && p.text.contains("Paris"), "{p:?}");
    let done = p.done.as_ref().unwrap();
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["usage"]["completion_tokens"].as_u64().unwrap() as usize, p.ids.len());
    assert!(done["timings"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    let r = &runs["raw"];
    assert_eq!(r.done.as_ref().unwrap()["finish_reason"], "length");
    assert_eq!(r.ids.len(), 12);

    // Tokenize / detokenize round trip, models, status.
    send(&mut ws, json!({"type": "tokenize", "id": "t", "text": "Hello world"})).await;
    let t = recv(&mut ws).await;
    assert_eq!((t["type"].as_str(), t["id"].as_str()), (Some("result"), Some("t")));
    let ids = t["data"]["tokens"].clone();
    assert!(ids.as_array().unwrap().len() >= 2);
    send(&mut ws, json!({"type": "detokenize", "id": "dt", "tokens": ids})).await;
    assert_eq!(recv(&mut ws).await["data"]["text"], "Hello world");
    send(&mut ws, json!({"type": "models", "id": "m"})).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["data"]["models"][0]["loaded"], true);
    send(&mut ws, json!({"type": "status", "id": "s"})).await;
    let s = recv(&mut ws).await;
    assert!(s["data"]["resident_models"][0]["requests"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["data"]["runtime"]["backend"], "cpu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_disconnect_stop_generation() {
    let d = start("");
    let mut ws = connect(&d).await;
    send(&mut ws, gen("long", "Write a long story about a dragon.", 400)).await;
    // Cancel after the first token.
    loop {
        let m = recv(&mut ws).await;
        if m["type"] == "token" {
            break;
        }
    }
    send(&mut ws, json!({"type": "cancel", "id": "long"})).await;
    let mut tokens = 1;
    let done = loop {
        let m = recv(&mut ws).await;
        match m["type"].as_str().unwrap() {
            "token" => tokens += 1,
            "done" => break m,
            other => panic!("unexpected {other}: {m}"),
        }
    };
    assert_eq!(done["finish_reason"], "cancelled");
    assert!(tokens < 50, "stopped promptly, after {tokens} tokens");
    send(&mut ws, json!({"type": "cancel", "id": "nope"})).await;
    assert_eq!(recv(&mut ws).await["code"], "invalid_request");

    // A closed connection cancels its requests and frees their sequences.
    let mut gone = connect(&d).await;
    send(&mut gone, gen("orphan", "Write a long story about a castle.", 400)).await;
    assert_eq!(recv(&mut gone).await["type"], "started");
    drop(gone);
    let mut idle = false;
    for _ in 0..100 {
        send(&mut ws, json!({"type": "status", "id": "s"})).await;
        let s = recv(&mut ws).await;
        let m = &s["data"]["resident_models"][0];
        if m["running"] == 0 && m["queued"] == 0 && m["kv_cache_bytes"] == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(idle, "the orphaned request was cancelled and its KV memory released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_named_errors_and_the_connection_survives() {
    let d = start("max_frame_bytes = 8192\n");
    let mut ws = connect(&d).await;
    let cases: Vec<(Message, &str, &str)> = vec![
        (Message::text("{not json"), "invalid_message", "JSON"),
        (Message::text("[1,2,3]"), "invalid_message", "object"),
        (Message::text(json!({"type": "teleport", "id": "x"}).to_string()), "invalid_message", "teleport"),
        (Message::text(json!({"id": "x"}).to_string()), "invalid_message", "type"),
        (Message::binary(vec![1u8, 2, 3]), "invalid_message", "binary"),
        (Message::text(json!({"type": "generate", "id": "u", "model": "nope", "prompt": "hi"}).to_string()), "unknown_model", "nope"),
        (Message::text(json!({"type": "generate", "id": "v", "prompt": "hi", "max_tokens": "ten"}).to_string()), "invalid_request", "max_tokens"),
        (Message::text(json!({"type": "generate", "id": "w", "prompt": "hi", "max_tokens": 10_000_000}).to_string()), "invalid_request", "max_tokens"),
        (Message::text(json!({"type": "generate", "id": "w2", "prompt": "hi", "plugins": [{"name": "no-such-plugin"}]}).to_string()), "plugin_error", "no-such-plugin"),
    ];
    for (msg, code, needle) in cases {
        ws.send(msg).await.unwrap();
        let e = recv(&mut ws).await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["code"], code, "{e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{e} should mention {needle}");
    }
    // Every invalid sampling value is named.
    let sampling = [
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_k": -1}), "top_k"),
        (json!({"min_p": 2}), "min_p"),
        (json!({"typical_p": 0}), "typical_p"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"repetition_context_size": 100000}), "repetition_context_size"),
        (json!({"presence_penalty": 5}), "presence_penalty"),
        (json!({"frequency_penalty": -5}), "frequency_penalty"),
        (json!({"logit_bias": {"999999": 1.0}}), "logit_bias"),
        (json!({"logit_bias": {"12": 1000}}), "logit_bias"),
        (json!({"seed": -1}), "seed"),
        (json!({"colour": 1}), "colour"),
    ];
    for (i, (s, field)) in sampling.iter().enumerate() {
        send(&mut ws, json!({"type": "generate", "id": format!("s{i}"), "prompt": "hi", "max_tokens": 2, "sampling": s})).await;
        let e = recv(&mut ws).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("invalid_request")), "{s}: {e}");
        assert!(e["message"].as_str().unwrap().contains(field), "{s}: {e}");
    }
    // Duplicate ids are refused while the first runs.
    send(&mut ws, json!({"type": "generate", "id": "dup", "prompt": "Once upon a time", "max_tokens": 30})).await;
    send(&mut ws, json!({"type": "generate", "id": "dup", "prompt": "Again", "max_tokens": 3})).await;
    let mut saw_duplicate = false;
    loop {
        let m = recv(&mut ws).await;
        if m["type"] == "error" && m["code"] == "duplicate_id" {
            saw_duplicate = true;
        }
        if m["type"] == "done" {
            break;
        }
    }
    assert!(saw_duplicate);
    // Still serving.
    send(&mut ws, json!({"type": "generate", "id": "ok", "prompt": "Hello", "max_tokens": 3})).await;
    assert!(collect(&mut ws, &["ok"]).await["ok"].done.is_some());

    // An oversize frame closes only that connection.
    let mut other = connect(&d).await;
    let big = json!({"type": "generate", "id": "big", "prompt": "x".repeat(20_000)}).to_string();
    ws.send(Message::text(big)).await.unwrap();
    let e = recv(&mut ws).await;
    assert_eq!(e["code"], "frame_too_large", "{e}");
    send(&mut other, json!({"type": "generate", "id": "fine", "prompt": "Hi", "max_tokens": 2})).await;
    assert!(collect(&mut other, &["fine"]).await["fine"].done.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_what_each_gets_alone() {
    let d = start("");
    let prompts = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "Name a planet."];
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut ws = connect(&d).await;
        let id = format!("a{i}");
        send(&mut ws, gen(&id, p, 24)).await;
        alone.push(collect(&mut ws, &[id.as_str()]).await.remove(&id).unwrap().ids);
    }
    let mut handles = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut ws = connect(&d).await;
        let p = p.to_string();
        handles.push(tokio::spawn(async move {
            let id = format!("c{i}");
            send(&mut ws, gen(&id, &p, 24)).await;
            collect(&mut ws, &[id.as_str()]).await.remove(&id).unwrap().ids
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let together = h.await.unwrap();
        assert_eq!(together, alone[i], "client {i}: batching changed the greedy output");
    }
    // They really ran together: the status reports batches larger than one.
    assert_batched(&mut connect(&d).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_http_and_sigterm_finishes_requests() {
    let d = start("");
    let mut ws = connect(&d).await;
    send(&mut ws, gen("g", "Hello!", 4)).await;
    collect(&mut ws, &["g"]).await;
    let mut s = TcpStream::connect(&d.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("mlxd_requests_total") && body.contains("mlxd_model_tokens_total{model=\"smollm2-135m-instruct\"}"), "{body}");
    assert!(body.contains("mlxd_model_memory_plan_bytes{model=\"smollm2-135m-instruct\"}"), "{body}");

    send(&mut ws, gen("long", "Write a long story about the sea.", 400)).await;
    loop {
        if recv(&mut ws).await["type"] == "token" {
            break;
        }
    }
    let pid = d.child.id();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let done = loop {
        let m = recv(&mut ws).await;
        if m["type"] == "done" || m["type"] == "error" {
            break m;
        }
    };
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "cancelled");
    let mut d = d;
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}
