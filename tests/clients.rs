//! The Rust client crate and the `mlxd` CLI against the real daemon: streaming, requests,
//! cancellation (explicit, by dropping a generation, and ctrl-c in the CLI), and exit codes.

mod common;

use common::daemon::{recv, send, start, Daemon};
use mlxd_client::{Client, Endpoint, Event, GenerateRequest};
use serde_json::json;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

fn endpoint(d: &Daemon) -> Endpoint {
    Endpoint { url: format!("ws://{}/", d.addr), token: Some(d.token.clone()) }
}

/// Polls `status` until the model has nothing running.
async fn wait_idle(d: &Daemon) -> bool {
    let (mut ws, _) = common::daemon::connect_with(d, Some(&d.token), None).await.unwrap();
    for _ in 0..100 {
        send(&mut ws, json!({"type": "status", "id": "s"})).await;
        let s = recv(&mut ws).await;
        if s["data"]["resident_models"][0]["running"] == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_streams_answers_and_cancels() {
    let d = start("");
    let client = Client::connect(&endpoint(&d)).await.unwrap();
    assert_eq!(client.hello["protocol"], 1);

    let mut req = GenerateRequest::chat("What is the capital of France?");
    req.max_tokens = Some(40);
    let mut g = client.generate(req).await.unwrap();
    let mut text = String::new();
    let mut finish = String::new();
    while let Some(ev) = g.next().await {
        match ev.unwrap() {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done { finish_reason, .. } => finish = finish_reason,
            Event::Started { prompt_tokens, .. } => assert!(prompt_tokens > 0),
        }
    }
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(finish, "stop");

    let tokens = client.request("tokenize", json!({"text": "Hello world"})).await.unwrap();
    assert!(tokens["tokens"].as_array().unwrap().len() >= 2);
    let err = client.request("load", json!({"model": "nope"})).await.unwrap_err();
    assert!(matches!(err, mlxd_client::Error::Request { ref code, .. } if code == "unknown_model"), "{err}");

    // Explicit cancel after the first token.
    let mut req = GenerateRequest::prompt("Once upon a time");
    req.max_tokens = Some(400);
    let mut g = client.generate(req).await.unwrap();
    let mut n = 0;
    let finish = loop {
        match g.next().await.unwrap().unwrap() {
            Event::Token { .. } => {
                n += 1;
                if n == 1 {
                    g.cancel();
                }
            }
            Event::Done { finish_reason, .. } => break finish_reason,
            Event::Started { .. } => {}
        }
    };
    assert_eq!(finish, "cancelled");
    assert!(n < 50, "stopped after {n} tokens");

    // Dropping a generation mid-stream cancels it on the daemon.
    let mut req = GenerateRequest::prompt("The history of the world");
    req.max_tokens = Some(400);
    let mut g = client.generate(req).await.unwrap();
    while !matches!(g.next().await.unwrap().unwrap(), Event::Token { .. }) {}
    drop(g);
    assert!(wait_idle(&d).await, "a dropped generation stops on the daemon");

    // A wrong token is refused with 401.
    let bad = Endpoint { url: format!("ws://{}/", d.addr), token: Some("nope".into()) };
    match Client::connect(&bad).await {
        Err(mlxd_client::Error::Refused { status, .. }) => assert_eq!(status, 401),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

fn cli(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlxd"));
    c.args(args).env("MLXD_URL", format!("ws://{}/", d.addr)).env("MLXD_TOKEN", &d.token);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_streams_exits_with_meaningful_codes_and_ctrl_c_cancels() {
    let d = start("");
    let out = cli(&d, &["run", "--max-tokens", "40", "What is the capital of France?"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));

    let out = cli(&d, &["run", "--top-p", "7", "hi"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    let out = cli(&d, &["status"]).env("MLXD_TOKEN", "wrong").output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    let out = cli(&d, &["models"]).env("MLXD_URL", "ws://127.0.0.1:1/").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = cli(&d, &["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    // ctrl-c while streaming: the CLI cancels the generation and exits 130.
    let mut child = cli(&d, &["run", "--raw", "--max-tokens", "400", "Once upon a time"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(wait_idle(&d).await, "the daemon stopped generating after ctrl-c");
}
