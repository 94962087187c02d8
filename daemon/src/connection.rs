//! One WebSocket connection: reads client messages, runs each request in its own task, and
//! writes every event through one bounded outgoing queue.
//!
//! Requests are multiplexed by their client-chosen ids. Closing the connection cancels all of
//! its requests; a server shutdown cancels them too, and their final `done` events are still
//! written before the socket closes.

use crate::engine::worker::{Job, JobEvent};
use crate::protocol::{parse_client_message, ClientMessage, ErrorCode, ServerMessage, Timings, Usage, PROTOCOL_VERSION};
use crate::server::{Shared, Stream};
use crate::validation::validate_generate;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Outgoing events buffered per connection before request tasks wait (and, behind them, their
/// sequences pause on the model thread).
const OUTGOING: usize = 1024;

pub(crate) type Out = mpsc::Sender<ServerMessage>;

/// Runs a connection to its end.
pub async fn serve(ws: WebSocketStream<Box<dyn Stream>>, shared: Arc<Shared>) {
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    shared.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = ws.split();
    let (out, mut out_rx) = mpsc::channel::<ServerMessage>(OUTGOING);
    let metrics = shared.metrics.clone();
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if matches!(m, ServerMessage::Error { .. }) {
                metrics.errors_total.fetch_add(1, Ordering::Relaxed);
            }
            let text = serde_json::to_string(&m).expect("server messages serialize");
            if sink.send(Message::text(text)).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let hello = ServerMessage::Hello {
        protocol: PROTOCOL_VERSION,
        server: format!("mlxd {}", env!("CARGO_PKG_VERSION")),
        capabilities: json!({
            "messages": ["generate", "cancel", "tokenize", "detokenize", "models", "load", "unload", "plugins", "reload_plugins", "status"],
            "chat_templates": true,
            "logprobs": crate::sampling::MAX_LOGPROBS,
            "sampling": ["temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                         "repetition_context_size", "presence_penalty", "frequency_penalty", "logit_bias", "seed"],
            "plugins": true,
            "plugin_abi": format!("{}.{}", mlxd_plugin_api::sys::ABI_MAJOR, mlxd_plugin_api::sys::ABI_MINOR),
            "max_frame_bytes": shared.config.server.max_frame_bytes,
            "max_tokens": shared.config.limits.max_tokens,
            "max_prompt_tokens": shared.config.limits.max_prompt_tokens,
        }),
        default_model: shared.config.default_model().to_string(),
    };
    let _ = out.send(hello).await;

    let mut running: HashMap<String, Arc<AtomicBool>> = HashMap::new();
    let mut tasks: JoinSet<Option<String>> = JoinSet::new();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            frame = source.next() => match frame {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(text))) => {
                    shared.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
                    dispatch(text.as_str(), &shared, &out, &mut running, &mut tasks).await;
                }
                Some(Ok(Message::Binary(_))) => {
                    let _ = out.send(ServerMessage::error(None, ErrorCode::InvalidMessage, "binary frames are not part of the protocol; send JSON text")).await;
                }
                Some(Ok(_)) => {} // ping / pong: tungstenite answers pings itself
                Some(Err(WsError::Capacity(e))) => {
                    let _ = out.send(ServerMessage::error(None, ErrorCode::FrameTooLarge, format!("{e} (server.max_frame_bytes = {})", shared.config.server.max_frame_bytes))).await;
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection read failed");
                    break;
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(Some(id)) = done {
                    running.remove(&id);
                }
            }
            _ = shutdown.recv() => break,
        }
    }
    // Disconnect or shutdown: cancel everything still running and let the final events out.
    for flag in running.values() {
        flag.store(true, Ordering::SeqCst);
    }
    while tasks.join_next().await.is_some() {}
    drop(out);
    let _ = writer.await;
    shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
}

async fn dispatch(
    text: &str,
    shared: &Arc<Shared>,
    out: &Out,
    running: &mut HashMap<String, Arc<AtomicBool>>,
    tasks: &mut JoinSet<Option<String>>,
) {
    let msg = match parse_client_message(text) {
        Ok(m) => m,
        Err((id, code, message)) => {
            let _ = out.send(ServerMessage::error(id.as_deref(), code, message)).await;
            return;
        }
    };
    let reply = |id: String, data: serde_json::Value| ServerMessage::Result { id, data };
    match msg {
        ClientMessage::Generate(g) => {
            let mut v = match validate_generate(g.clone(), &shared.config.limits) {
                Ok(v) => v,
                Err(m) => {
                    let _ = out.send(ServerMessage::error(Some(&g.id), ErrorCode::InvalidRequest, m)).await;
                    return;
                }
            };
            if running.contains_key(&v.id) {
                let _ = out.send(ServerMessage::error(Some(&v.id), ErrorCode::DuplicateId, format!("request `{}` is already running on this connection", v.id))).await;
                return;
            }
            if running.len() >= shared.config.server.max_requests_per_connection {
                shared.metrics.busy_total.fetch_add(1, Ordering::Relaxed);
                let _ = out.send(ServerMessage::error(Some(&v.id), ErrorCode::Busy, format!("{} requests are running on this connection (server.max_requests_per_connection)", running.len()))).await;
                return;
            }
            if let Err(e) = resolve_plugins(&mut v, shared) {
                let _ = out.send(ServerMessage::error(Some(&v.id), ErrorCode::PluginError, e)).await;
                return;
            }
            let cancel = Arc::new(AtomicBool::new(false));
            running.insert(v.id.clone(), cancel.clone());
            let (shared, out) = (shared.clone(), out.clone());
            tasks.spawn(async move {
                let id = v.id.clone();
                run_generate(v, cancel, &shared, &out).await;
                Some(id)
            });
        }
        ClientMessage::Cancel { id } => match running.get(&id) {
            Some(flag) => flag.store(true, Ordering::SeqCst),
            None => {
                let _ = out.send(ServerMessage::error(Some(&id), ErrorCode::InvalidRequest, format!("no running request `{id}` on this connection"))).await;
            }
        },
        ClientMessage::Tokenize { id, model, text, add_special } => {
            let (shared, out) = (shared.clone(), out.clone());
            tasks.spawn(async move {
                let r = with_model(&shared, model.as_deref(), |reply| crate::engine::worker::Command::Tokenize { text, add_special, reply }).await;
                let _ = out.send(match r {
                    Ok((model, Ok(tokens))) => reply(id, json!({"model": model, "tokens": tokens})),
                    Ok((_, Err(m))) => ServerMessage::error(Some(&id), ErrorCode::InvalidRequest, format!("`text`: {m}")),
                    Err((code, m)) => ServerMessage::error(Some(&id), code, m),
                }).await;
                None
            });
        }
        ClientMessage::Detokenize { id, model, tokens } => {
            let (shared, out) = (shared.clone(), out.clone());
            tasks.spawn(async move {
                let r = with_model(&shared, model.as_deref(), |reply| crate::engine::worker::Command::Detokenize { tokens, reply }).await;
                let _ = out.send(match r {
                    Ok((model, Ok(text))) => reply(id, json!({"model": model, "text": text})),
                    Ok((_, Err(m))) => ServerMessage::error(Some(&id), ErrorCode::InvalidRequest, format!("`tokens`: {m}")),
                    Err((code, m)) => ServerMessage::error(Some(&id), code, m),
                }).await;
                None
            });
        }
        ClientMessage::Models { id } => {
            let _ = out.send(reply(id, shared.registry.listing())).await;
        }
        ClientMessage::Load { id, model } => {
            let (shared, out) = (shared.clone(), out.clone());
            tasks.spawn(async move {
                let started = Instant::now();
                let _ = out.send(match shared.registry.get(Some(&model)).await {
                    Ok((name, _)) => reply(id, json!({"model": name, "loaded": true, "ms": started.elapsed().as_millis() as u64})),
                    Err(e) => ServerMessage::error(Some(&id), e.code, e.message),
                }).await;
                None
            });
        }
        ClientMessage::Unload { id, model } => {
            let _ = out.send(match shared.registry.unload(&model) {
                Ok(was_loaded) => reply(id, json!({"model": model, "unloaded": was_loaded})),
                Err(e) => ServerMessage::error(Some(&id), e.code, e.message),
            }).await;
        }
        ClientMessage::Plugins { id } => {
            let _ = out.send(reply(id, shared.plugins.listing())).await;
        }
        ClientMessage::ReloadPlugins { id } => {
            let (shared, out) = (shared.clone(), out.clone());
            tasks.spawn(async move {
                let plugins = shared.plugins.clone();
                let _ = tokio::task::spawn_blocking(move || plugins.reload()).await;
                let _ = out.send(reply(id, shared.plugins.listing())).await;
                None
            });
        }
        ClientMessage::Status { id } => {
            let mut data = shared.metrics.status(&shared.registry);
            data["runtime"] = serde_json::to_value(crate::runtime::Report::gather()).unwrap_or_default();
            let _ = out.send(reply(id, data)).await;
        }
    }
}

/// Resolves the plugins a request names against the catalog of this moment (the request then
/// holds their libraries whatever reloads follow) and checks they combine with its sampling.
pub(crate) fn resolve_plugins(v: &mut crate::validation::ValidGenerate, shared: &Shared) -> Result<(), String> {
    if v.plugins.is_empty() {
        return Ok(());
    }
    let p = shared.plugins.resolve(&v.plugins).map_err(|e| e.to_string())?;
    crate::plugins::registry::check_combination(&p, &v.sampling).map_err(|e| e.to_string())?;
    v.sampling.plugins = p;
    Ok(())
}

/// Sends a command to a model's thread and waits for its answer.
async fn with_model<T>(
    shared: &Shared,
    model: Option<&str>,
    make: impl FnOnce(oneshot::Sender<T>) -> crate::engine::worker::Command,
) -> Result<(String, T), (ErrorCode, String)> {
    let (name, handle) = shared.registry.get(model).await.map_err(|e| (e.code, e.message))?;
    let (tx, rx) = oneshot::channel();
    if !handle.send(make(tx)) {
        return Err((ErrorCode::Internal, format!("model `{name}` stopped")));
    }
    tokio::select! {
        r = rx => r.map(|v| (name.clone(), v)).map_err(|_| (ErrorCode::Internal, format!("model `{name}` stopped"))),
        _ = handle.stats.stalled() => Err((ErrorCode::Internal, stalled_message(&name, shared))),
    }
}

/// What requests in flight on a model the watchdog set aside are told.
fn stalled_message(model: &str, shared: &Shared) -> String {
    format!(
        "model `{model}` stopped responding: one step ran for more than {} s (engine.step_timeout_s), as a sampler \
         plugin that never returns would; its requests were failed and the model loads again on the next request",
        shared.config.engine.step_timeout_s
    )
}

/// Runs a validated generation on its model and sends its events to `out`, the final one last.
pub(crate) async fn run_generate(v: crate::validation::ValidGenerate, cancel: Arc<AtomicBool>, shared: &Shared, out: &Out) {
    let received = Instant::now();
    let id = v.id.clone();
    let (model, handle) = match shared.registry.get(v.model.as_deref()).await {
        Ok(x) => x,
        Err(e) => {
            let _ = out.send(ServerMessage::error(Some(&id), e.code, e.message)).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel(shared.config.server.stream_buffer.max(2));
    let job = Job {
        id: id.clone(),
        input: v.input,
        max_tokens: v.max_tokens,
        max_prompt_tokens: shared.config.limits.max_prompt_tokens,
        stop: v.stop,
        sampling: v.sampling,
        events: tx,
        cancel,
    };
    if handle.submit(job).is_err() {
        shared.metrics.busy_total.fetch_add(1, Ordering::Relaxed);
        let _ = out
            .send(ServerMessage::error(Some(&id), ErrorCode::Busy, format!("model `{model}` has {} requests waiting (limits.max_queue); try again shortly", shared.config.limits.max_queue)))
            .await;
        return;
    }
    let mut first_token: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            biased;
            ev = rx.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
            _ = handle.stats.stalled() => {
                let _ = out.send(ServerMessage::error(Some(&id), ErrorCode::Internal, stalled_message(&model, shared))).await;
                return;
            }
        };
        let msg = match ev {
            JobEvent::Started { prompt_tokens } => ServerMessage::Started { id: id.clone(), model: model.clone(), prompt_tokens },
            JobEvent::Token(t) => {
                first_token.get_or_insert_with(Instant::now);
                ServerMessage::Token {
                    id: id.clone(),
                    text: t.text,
                    tokens: vec![t.id],
                    logprobs: t.logprobs.map(|l| {
                        let text = |i: usize| l.top_text.get(i).cloned().unwrap_or_default();
                        let top = l.top.iter().enumerate().map(|(i, (t, p))| json!({"token": t, "logprob": p, "text": text(i)}));
                        json!({"logprob": l.logprob, "text": l.text, "top": top.collect::<Vec<_>>()})
                    }),
                }
            }
            JobEvent::Done(o) => {
                let ttft = first_token.map_or(0.0, |t| (t - received).as_secs_f64() * 1e3);
                ServerMessage::Done {
                    id: id.clone(),
                    finish_reason: o.finish,
                    usage: Usage { prompt_tokens: o.prompt_tokens, completion_tokens: o.ids.len(), cached_tokens: o.cached_tokens },
                    timings: Timings {
                        time_to_first_token_ms: ttft,
                        tokens_per_second: o.decode_tps(),
                        total_ms: received.elapsed().as_secs_f64() * 1e3,
                    },
                }
            }
            JobEvent::Error { code, message } => ServerMessage::error(Some(&id), code, message),
        };
        let last = matches!(msg, ServerMessage::Done { .. } | ServerMessage::Error { .. });
        if out.send(msg).await.is_err() || last {
            return;
        }
    }
    // The model thread went away without a final event (unload or crash).
    let _ = out.send(ServerMessage::error(Some(&id), ErrorCode::Internal, format!("model `{model}` stopped before the request finished"))).await;
}
