//! Security checks through the real daemon that tests/daemon.rs does not already make (it covers
//! a missing, wrong or nearly right token and foreign browser origins; `mlxd::auth`'s unit tests
//! cover the constant-time comparison and the token file's mode): plugin and model paths sent by
//! a client, the token given as a query parameter, a token file with loose permissions or no
//! valid token at start, and the limits on frames, prompts, tokens, connections and requests.

mod common;

use common::daemon::{ask, connect, connect_with, finish, recv, send, start, start_in, Ws};
use futures_util::SinkExt;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

fn lib_name(stem: &str) -> String {
    if cfg!(target_os = "macos") {
        format!("lib{stem}.dylib")
    } else {
        format!("lib{stem}.so")
    }
}

fn deps_dir() -> std::path::PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

fn toml_path(p: &std::path::Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn http_status(e: WsError) -> u16 {
    match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::tiny::write_tiny_model(dir.path());
    dir
}

/// A client can name plugins and models, never files: a plugin given as a path or a library
/// file name is refused with `invalid_request` before anything is loaded, even when the path
/// points at a real plugin; a name that is not in the configured directories is unknown; a model
/// path is an unknown model name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_and_model_paths_from_a_client_are_refused() {
    let plugins = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let pass = lib_name("mlxd_plugin_passthrough");
    let faulty = lib_name("mlxd_plugin_faulty");
    std::fs::copy(deps_dir().join(&pass), plugins.path().join(&pass)).unwrap();
    std::fs::copy(deps_dir().join(&faulty), elsewhere.path().join(&faulty)).unwrap();
    let tiny = tiny_model();
    let d = start(&format!(
        "[plugins]\ndirs = [{}]\n[models.tiny]\npath = {}\npreload = true\n",
        toml_path(plugins.path()),
        toml_path(tiny.path())
    ));
    let mut ws = connect(&d).await;
    let outside = elsewhere.path().join(&faulty).display().to_string();
    let relative = format!("../{}/{faulty}", elsewhere.path().file_name().unwrap().to_str().unwrap());
    let as_paths = [outside.as_str(), relative.as_str(), faulty.as_str(), "./faulty", "..\\faulty", "faulty.dylib"];
    for (i, name) in as_paths.iter().enumerate() {
        let r = ask(&mut ws, json!({"type": "generate", "id": format!("p{i}"), "prompt": "hi", "max_tokens": 2, "plugins": [{"name": name}]})).await;
        assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("invalid_request")), "{name}: {r}");
        assert!(r["message"].as_str().unwrap().contains("never paths"), "{name}: {r}");
    }
    for (i, name) in ["faulty", "mlxd_plugin_faulty"].iter().enumerate() {
        let r = ask(&mut ws, json!({"type": "generate", "id": format!("n{i}"), "prompt": "hi", "max_tokens": 2, "plugins": [{"name": name}]})).await;
        assert_eq!(r["code"], "plugin_error", "{name}: {r}");
        assert!(r["message"].as_str().unwrap().contains("no sampler plugin named"), "{name}: {r}");
    }
    // Nothing from outside the configured directory was loaded.
    let listing = ask(&mut ws, json!({"type": "plugins", "id": "l"})).await;
    let names: Vec<&str> =
        listing["data"]["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["passthrough"], "{listing}");
    assert!(!listing.to_string().contains(&outside), "{listing}");
    send(
        &mut ws,
        json!({"type": "generate", "id": "ok", "prompt": "hi", "max_tokens": 2, "plugins": [{"name": "passthrough"}]}),
    )
    .await;
    assert_eq!(finish(&mut ws, &["ok"]).await["ok"].outcome(), "done:length");
    // Models are names from the configuration too.
    let model_file = tiny.path().display().to_string();
    for (i, msg) in [
        json!({"type": "generate", "id": "m0", "model": model_file, "prompt": "hi"}),
        json!({"type": "load", "id": "m1", "model": model_file}),
        json!({"type": "load", "id": "m2", "model": "/etc/passwd"}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = ask(&mut ws, msg).await;
        assert_eq!(r["code"], "unknown_model", "{i}: {r}");
    }
}

/// The token also works as `?token=` (for clients that cannot set headers), and a wrong one
/// there is refused like a wrong header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_as_a_query_parameter_is_checked_the_same_way() {
    let tiny = tiny_model();
    let d = start(&format!("[models.tiny]\npath = {}\n", toml_path(tiny.path())));
    let url = |t: &str| format!("ws://{}/?token={t}", d.addr);
    // The right token with its last character changed (to one the token alphabet has).
    let (head, last) = d.token.split_at(d.token.len() - 1);
    let wrong = format!("{head}{}", if last == "0" { "1" } else { "0" });
    assert_eq!(http_status(tokio_tungstenite::connect_async(url(&wrong)).await.unwrap_err()), 401);
    assert_eq!(http_status(tokio_tungstenite::connect_async(url("")).await.unwrap_err()), 401);
    let (mut ws, _) = tokio_tungstenite::connect_async(url(&d.token)).await.expect("right token in the query");
    assert_eq!(recv(&mut ws).await["type"], "hello");
    // A wrong header is not rescued by a right query parameter: the header is what counts.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url(&d.token)).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {wrong}").parse().unwrap());
    assert_eq!(http_status(tokio_tungstenite::connect_async(req).await.unwrap_err()), 401);
}

/// A token file others can read (0644) is tightened to 0600 at start and its token kept (it may
/// have been read, so the warning says how to rotate it); a token file without a valid token stops
/// the daemon at start with a message naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_with_loose_permissions_is_tightened_and_a_bad_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let token = "ab".repeat(32);
    std::fs::write(state.join("token"), format!("{token}\n")).unwrap();
    std::fs::set_permissions(state.join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let tiny = tiny_model();
    let d = start_in(dir, &format!("[models.tiny]\npath = {}\n", toml_path(tiny.path())));
    assert_eq!(d.token, token);
    let mode = std::fs::metadata(d.dir.path().join("state/token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "tightened");
    let mode = std::fs::metadata(d.dir.path().join("state")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the state directory is private");
    connect_with(&d, Some(&token), None).await.expect("the existing token still works");
    drop(d);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("token"), "guessable\n").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = {}\n", toml_path(&state)))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mlxd"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("MLXD_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon refused to start");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "it never listened");
    assert!(
        stderr.contains(&state.join("token").display().to_string()) && stderr.contains("no valid token"),
        "{stderr}"
    );
}

/// Limits: a frame over `max_frame_bytes` gets `frame_too_large` and its connection closes; a
/// prompt over `limits.max_prompt_tokens` and `max_tokens` over `limits.max_tokens` are refused
/// with `invalid_request` naming the setting; a connection beyond `max_connections` gets HTTP 503;
/// a request beyond `max_requests_per_connection` gets `busy`. Each refusal leaves the daemon
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_frames_prompts_tokens_connections_and_requests_are_enforced() {
    let tiny = tiny_model();
    let d = start(&format!(
        "max_frame_bytes = 4096\nmax_connections = 3\nmax_requests_per_connection = 2\n\
         [limits]\nmax_prompt_tokens = 32\nmax_tokens = 5000\n[models.tiny]\npath = {}\npreload = true\n",
        toml_path(tiny.path())
    ));
    let mut ws = connect(&d).await;
    // The tiny model has one token per byte, plus BOS.
    let r = ask(&mut ws, json!({"type": "generate", "id": "long", "prompt": "x".repeat(40), "max_tokens": 2})).await;
    assert_eq!(r["code"], "invalid_request", "{r}");
    assert!(r["message"].as_str().unwrap().contains("limits.max_prompt_tokens"), "{r}");
    let r = ask(&mut ws, json!({"type": "generate", "id": "chat", "messages": [{"role": "user", "content": "y".repeat(40)}], "max_tokens": 2})).await;
    assert!(r["message"].as_str().unwrap().contains("limits.max_prompt_tokens"), "{r}");
    send(&mut ws, json!({"type": "generate", "id": "fits", "prompt": "x".repeat(30), "max_tokens": 2})).await;
    assert_eq!(finish(&mut ws, &["fits"]).await["fits"].outcome(), "done:length");
    let r = ask(&mut ws, json!({"type": "generate", "id": "many", "prompt": "x", "max_tokens": 5001})).await;
    assert_eq!(r["code"], "invalid_request", "{r}");
    assert!(r["message"].as_str().unwrap().contains("limits.max_tokens"), "{r}");

    // Two running requests per connection; the third is busy.
    let long = |id: &str| json!({"type": "generate", "id": id, "prompt": "x", "max_tokens": 5000, "sampling": {"logit_bias": {"257": -100}}});
    send(&mut ws, long("r1")).await;
    send(&mut ws, long("r2")).await;
    let r = ask(&mut ws, long("r3")).await;
    assert_eq!(r["code"], "busy", "{r}");
    assert!(r["message"].as_str().unwrap().contains("max_requests_per_connection"), "{r}");
    send(&mut ws, json!({"type": "cancel", "id": "r1"})).await;
    send(&mut ws, json!({"type": "cancel", "id": "r2"})).await;
    let f = finish(&mut ws, &["r1", "r2"]).await;
    assert!(f.values().all(|f| f.outcome() == "done:cancelled"), "{f:?}");

    // Three connections at most.
    let second = connect(&d).await;
    let third = connect(&d).await;
    let e = connect_with(&d, Some(&d.token), None).await.map(|_| ()).unwrap_err();
    assert_eq!(http_status(e), 503);
    drop(third);
    let mut fourth: Option<Ws> = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok((w, _)) = connect_with(&d, Some(&d.token), None).await {
            fourth = Some(w);
            break;
        }
    }
    let mut fourth = fourth.expect("a slot frees when a connection closes");
    drop(second);

    // An oversize frame closes only its connection.
    fourth
        .send(Message::text(json!({"type": "generate", "id": "big", "prompt": "z".repeat(5000)}).to_string()))
        .await
        .unwrap();
    assert_eq!(recv(&mut fourth).await["code"], "frame_too_large");
    send(&mut ws, json!({"type": "generate", "id": "after", "prompt": "hi", "max_tokens": 3})).await;
    assert_eq!(finish(&mut ws, &["after"]).await["after"].outcome(), "done:length");
}
