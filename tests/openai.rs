//! The OpenAI-compatible endpoints of the real daemon (default model, CPU), spoken to over raw
//! HTTP/1.1 as the `openai` SDKs speak it: answers whole and streamed agree with each other and
//! with the WebSocket protocol's, HTTP and WebSocket clients share the batch and each gets what it
//! gets alone, errors are OpenAI error objects that name the field, a client that hangs up
//! cancels its request, and the daemon keeps serving through all of it.

mod common;

use common::daemon::{ask, assert_batched, connect, finish, send, start, Daemon};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(String::from).collect()
    }

    fn error(&self) -> (u16, String, Value) {
        let v = self.json();
        (self.status, v["error"]["code"].as_str().unwrap_or_default().to_string(), v["error"]["param"].clone())
    }
}

/// Sends one raw request and reads the whole answer (the daemon closes each connection).
async fn raw(d: &Daemon, request: &[u8]) -> Reply {
    raw_at(&d.addr, request).await
}

async fn raw_at(addr: &str, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut bytes))
        .await
        .expect("an answer within 120 s")
        .unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {text:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Reply { status, headers: head.to_ascii_lowercase(), body: body.to_string() }
}

fn request(method: &str, path: &str, token: Option<&str>, extra: &str, body: &str) -> Vec<u8> {
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}{extra}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

async fn post(d: &Daemon, path: &str, body: Value) -> Reply {
    raw(d, &request("POST", path, Some(&d.token), "", &body.to_string())).await
}

fn question(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_answer_as_the_websocket_protocol_does() {
    let d = start("");

    let models = raw(&d, &request("GET", "/v1/models", Some(&d.token), "", "")).await;
    assert_eq!(models.status, 200, "{models:?}");
    assert_eq!(models.json()["data"][0]["id"], "smollm2-135m-instruct");

    // Whole.
    let r = post(&d, "/v1/chat/completions", question(json!({}))).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("chat.completion"), Some("smollm2-135m-instruct")));
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let content = message["content"].as_str().unwrap().to_string();
    assert!(content.contains("Paris"), "{v}");
    let usage = &v["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert!(prompt > 5 && completion >= 1, "{v}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap().to_string();

    // The same request over WebSocket: the same tokens (greedy), the same text.
    let mut ws = connect(&d).await;
    send(
        &mut ws,
        json!({"type": "generate", "id": "w", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24}),
    )
    .await;
    let w = finish(&mut ws, &["w"]).await.remove("w").unwrap();
    assert_eq!(w.text, content);
    assert_eq!(w.ids.len() as u64, completion);

    // Streamed, with the usage event: the pieces add up to the same answer.
    let r =
        post(&d, "/v1/chat/completions", question(json!({"stream": true, "stream_options": {"include_usage": true}})))
            .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.headers.contains("content-type: text/event-stream"), "{r:?}");
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]), "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, content);
    let finals: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finals.len(), 1, "{chunks:?}");
    assert_eq!(finals[0]["choices"][0]["finish_reason"], reason.as_str());
    let tail = chunks.last().unwrap();
    assert_eq!(tail["choices"], json!([]));
    assert_eq!(tail["usage"]["completion_tokens"].as_u64(), Some(completion));

    // A raw prompt, whole and streamed: the length limit reached, the same text.
    let body = json!({"prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0});
    let whole = post(&d, "/v1/completions", body.clone()).await.json();
    assert_eq!(
        (whole["object"].as_str(), whole["choices"][0]["finish_reason"].as_str()),
        (Some("text_completion"), Some("length"))
    );
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    let mut body = body;
    body["stream"] = json!(true);
    let r = post(&d, "/v1/completions", body).await;
    let streamed: String = r
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_that_name_the_field_and_the_daemon_keeps_serving() {
    let d = start("max_frame_bytes = 4096\nallowed_origins = [\"http://allowed.example\"]\n");
    let chat = |body: Value| request("POST", "/v1/chat/completions", Some(&d.token), "", &body.to_string());

    let r = raw(&d, &request("POST", "/v1/chat/completions", None, "", &question(json!({})).to_string())).await;
    assert_eq!(r.error().0, 401);
    assert_eq!(r.error().1, "unauthorized");
    let r =
        raw(&d, &request("POST", "/v1/chat/completions", Some("wrong"), "", &question(json!({})).to_string())).await;
    assert_eq!((r.status, r.json()["error"]["message"].as_str()), (401, Some("wrong token")));
    // A page of another site learns nothing, not even whether the token is right.
    let r = raw(&d, &request("GET", "/v1/models", None, "origin: http://evil.example\r\n", "")).await;
    assert_eq!(r.error(), (403, "origin_not_allowed".into(), Value::Null));
    let r = raw(&d, &request("GET", "/v1/models", Some(&d.token), "origin: http://allowed.example\r\n", "")).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("access-control-allow-origin: http://allowed.example"), "{r:?}");
    // The browser's preflight (it carries no token) for that origin only.
    let preflight = "origin: http://allowed.example\r\naccess-control-request-method: POST\r\n";
    let r = raw(&d, &request("OPTIONS", "/v1/chat/completions", None, preflight, "")).await;
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.headers.contains("access-control-allow-headers: authorization, content-type"), "{r:?}");
    let r = raw(&d, &request("OPTIONS", "/v1/chat/completions", None, "origin: http://evil.example\r\n", "")).await;
    assert_eq!(r.status, 403);

    for (body, status, code, param) in [
        (question(json!({"model": "nope"})), 404, "model_not_found", json!("model")),
        (question(json!({"temperature": "hot"})), 400, "invalid_request", json!("temperature")),
        (question(json!({"temperature": -1})), 400, "invalid_request", json!("temperature")),
        (question(json!({"n": 2})), 400, "invalid_request", json!("n")),
        (question(json!({"tools": [{"type": "function"}]})), 400, "invalid_request", json!("tools")),
        (question(json!({"max_tokens": 0})), 400, "invalid_request", json!("max_tokens")),
        (
            question(json!({"messages": [{"role": "robot", "content": "hi"}]})),
            400,
            "invalid_request",
            json!("messages[0].role"),
        ),
        (question(json!({"plugins": [{"name": "missing"}]})), 400, "plugin_error", Value::Null),
    ] {
        let r = raw(&d, &chat(body.clone())).await;
        let (got_status, got_code, got_param) = r.error();
        assert_eq!((got_status, got_code.as_str()), (status, code), "{body}: {r:?}");
        if !param.is_null() {
            assert_eq!(got_param, param, "{body}: {r:?}");
        }
    }
    let r = raw(&d, &request("POST", "/v1/chat/completions", Some(&d.token), "", "{not json")).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{r:?}");
    let r =
        raw(&d, format!("POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {}\r\n\r\n", d.token).as_bytes())
            .await;
    assert_eq!(r.status, 411);
    let big = question(json!({"stop": ["x".repeat(5000)]})).to_string();
    let r = raw(&d, &request("POST", "/v1/chat/completions", Some(&d.token), "", &big)).await;
    assert_eq!(r.error().0, 413);
    let r = raw(&d, &request("POST", "/v1/embeddings", Some(&d.token), "", "{}")).await;
    assert_eq!(r.error().0, 404);

    // A client that asks before sending its body (curl's `expect: 100-continue`) is told to go on.
    let body = json!({"prompt": "Hello", "max_tokens": 2}).to_string();
    let mut s = TcpStream::connect(&d.addr).await.unwrap();
    let head = request("POST", "/v1/completions", Some(&d.token), "expect: 100-continue\r\n", "");
    let head =
        String::from_utf8(head).unwrap().replace("content-length: 0", &format!("content-length: {}", body.len()));
    s.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut interim)).await.unwrap().unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).await.unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).await.unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");

    // Still serving.
    let r = post(&d, "/v1/chat/completions", question(json!({}))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_request() {
    let d = start("");
    let mut ws = connect(&d).await;
    // The end-of-text tokens biased away (SmolLM2's 0-2), so nothing but the hang-up ends it.
    let bias = json!({"0": -100, "1": -100, "2": -100});
    let body = json!({"prompt": "Write a story about the sea.", "max_tokens": 2000, "stream": true, "temperature": 0, "logit_bias": bias})
        .to_string();
    let mut s = TcpStream::connect(&d.addr).await.unwrap();
    s.write_all(&request("POST", "/v1/completions", Some(&d.token), "", &body)).await.unwrap();
    // Wait for the first text event, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\":\"") {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let m = ask(&mut ws, json!({"type": "models", "id": "before"})).await;
    assert_eq!(m["data"]["models"][0]["in_flight"], 1, "{m}");
    drop(s);
    // 2,000 tokens take minutes on this CPU; cancelled, the model has nothing in flight within seconds.
    let started = std::time::Instant::now();
    loop {
        let m = ask(&mut ws, json!({"type": "models", "id": "m"})).await;
        if m["data"]["models"][0]["in_flight"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still in flight: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of a chat answer, whole or streamed.
fn answer_text(r: &Reply) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    if r.headers.contains("text/event-stream") {
        r.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(String::from)
            })
            .collect()
    } else {
        r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_websocket_clients_share_the_batch_and_each_gets_what_it_gets_alone() {
    let d = start("");
    let prompts = ["Name a fruit.", "What is 2+2?", "Name a planet."];
    let body = |p: &str, stream: bool| {
        json!({"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0, "stream": stream})
            .to_string()
    };
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(answer_text(
            &raw(&d, &request("POST", "/v1/chat/completions", Some(&d.token), "", &body(p, false))).await,
        ));
    }
    // Each prompt three times at once: whole over HTTP, streamed over HTTP, and over WebSocket.
    let mut http = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for stream in [false, true] {
            let (addr, req) =
                (d.addr.clone(), request("POST", "/v1/chat/completions", Some(&d.token), "", &body(p, stream)));
            http.push((i, tokio::spawn(async move { answer_text(&raw_at(&addr, &req).await) })));
        }
    }
    let mut ws = connect(&d).await;
    for (i, p) in prompts.iter().enumerate() {
        let msg = json!({"type": "generate", "id": format!("w{i}"), "messages": [{"role": "user", "content": p}], "max_tokens": 24});
        send(&mut ws, msg).await;
    }
    let mut runs = finish(&mut ws, &["w0", "w1", "w2"]).await;
    for (i, h) in http {
        assert_eq!(h.await.unwrap(), alone[i], "prompt {i} over HTTP: batching changed the greedy output");
    }
    for (i, text) in alone.iter().enumerate() {
        assert_eq!(&runs.remove(&format!("w{i}")).unwrap().text, text, "prompt {i} over WebSocket");
    }
    // They really ran together.
    assert_batched(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_name_each_token_and_its_alternatives() {
    let d = start("");
    let r = post(&d, "/v1/chat/completions", question(json!({"logprobs": true, "top_logprobs": 3}))).await;
    let v = r.json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(entries.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap(), "{v}");
    for e in &entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        // Greedy: the chosen token is the most likely one, and the alternatives come best first.
        assert_eq!((&e["token"], &e["logprob"]), (&top[0]["token"], &top[0]["logprob"]), "{e}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{e}");
        assert_eq!(e["bytes"], json!(e["token"].as_str().unwrap().as_bytes()), "{e}");
    }
    // The tokens spell the answer (then the end-of-sequence token, when it stopped on one).
    let spelled: String = entries.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert!(spelled.starts_with(&content) && spelled.len() > content.len() - 1, "{spelled:?} vs {content:?}");

    // Streamed: the same entries, one per token.
    let r =
        post(&d, "/v1/chat/completions", question(json!({"logprobs": true, "top_logprobs": 3, "stream": true}))).await;
    let streamed: Vec<Value> = r
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .flat_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(streamed, entries);
    // Without them, none.
    let r = post(&d, "/v1/chat/completions", question(json!({}))).await;
    assert_eq!(r.json()["choices"][0]["logprobs"], Value::Null);
}
