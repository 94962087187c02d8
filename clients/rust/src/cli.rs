//! The client half of the `mlxd` command line: `run`, `chat`, `models`, `status`, `plugins`.
//!
//! Exit codes scripts can rely on: 0 success; 1 the daemon answered with an error; 2 bad usage;
//! 3 the daemon is not reachable; 4 the daemon refused the token or origin; 130 interrupted.

use crate::{Client, Endpoint, Error, Event, GenerateRequest};
use serde_json::{json, Value};
use std::io::{BufRead, Write};

/// Success.
pub const EXIT_OK: i32 = 0;
/// The daemon answered with an error.
pub const EXIT_REQUEST: i32 = 1;
/// Bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Daemon unreachable.
pub const EXIT_UNREACHABLE: i32 = 3;
/// Token or origin refused.
pub const EXIT_REFUSED: i32 = 4;
/// Interrupted by ctrl-c.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Usage text of the client commands.
pub const USAGE: &str = "client commands (talk to a running daemon; MLXD_URL / MLXD_TOKEN override discovery):
  mlxd run [OPTIONS] PROMPT           stream one answer to stdout
      --model NAME  --max-tokens N  --temperature T  --top-p P  --top-k K  --min-p P
      --repetition-penalty R  --seed S  --stop STR  --system TEXT  --raw (no chat template)
      --plugin NAME[:JSON]  --json (print events as JSON lines)
  mlxd chat [--model NAME] [--system TEXT] [sampling options]
                                      interactive chat; /reset /system TEXT /model NAME /quit
  mlxd models | status | plugins      what the daemon has (JSON)";

/// True for the subcommands this module handles.
pub fn handles(cmd: &str) -> bool {
    matches!(cmd, "run" | "chat" | "models" | "status" | "plugins")
}

/// Runs a client subcommand; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mlxd: cannot start the async runtime: {e}");
            return EXIT_REQUEST;
        }
    };
    match rt.block_on(dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mlxd: {e}");
            exit_code(&e)
        }
    }
}

fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Connect { .. } | Error::Closed => EXIT_UNREACHABLE,
        Error::Refused { .. } => EXIT_REFUSED,
        Error::Request { .. } => EXIT_REQUEST,
        Error::Config(_) => EXIT_USAGE,
    }
}

struct Options {
    req: GenerateRequest,
    system: Option<String>,
    raw: bool,
    json: bool,
    positional: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, Error> {
    let mut o = Options { req: GenerateRequest::default(), system: None, raw: false, json: false, positional: Vec::new() };
    let mut it = args.iter();
    let usage = |m: String| Error::Config(format!("{m}\n{USAGE}"));
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| usage(format!("{name} needs a value")));
        let num = |name: &str, v: String| -> Result<Value, Error> {
            v.parse::<f64>().map(|f| json!(f)).map_err(|_| usage(format!("{name} must be a number, got {v:?}")))
        };
        let int = |name: &str, v: String| -> Result<u64, Error> {
            v.parse::<u64>().map_err(|_| usage(format!("{name} must be a whole number, got {v:?}")))
        };
        match a.as_str() {
            "--model" => o.req.model = Some(val("--model")?),
            "--max-tokens" => o.req.max_tokens = Some(int("--max-tokens", val("--max-tokens")?)? as u32),
            "--temperature" => drop(o.req.sampling.insert("temperature".into(), num("--temperature", val("--temperature")?)?)),
            "--top-p" => drop(o.req.sampling.insert("top_p".into(), num("--top-p", val("--top-p")?)?)),
            "--min-p" => drop(o.req.sampling.insert("min_p".into(), num("--min-p", val("--min-p")?)?)),
            "--repetition-penalty" => {
                drop(o.req.sampling.insert("repetition_penalty".into(), num("--repetition-penalty", val("--repetition-penalty")?)?))
            }
            "--top-k" => drop(o.req.sampling.insert("top_k".into(), json!(int("--top-k", val("--top-k")?)?))),
            "--seed" => drop(o.req.sampling.insert("seed".into(), json!(int("--seed", val("--seed")?)?))),
            "--stop" => o.req.stop.push(val("--stop")?),
            "--system" => o.system = Some(val("--system")?),
            "--plugin" => {
                let spec = val("--plugin")?;
                let (name, params) = match spec.split_once(':') {
                    Some((n, p)) => (n.to_string(), serde_json::from_str(p).map_err(|e| usage(format!("--plugin {n}: params are not JSON: {e}")))?),
                    None => (spec.clone(), json!({})),
                };
                o.req.plugins.push(json!({"name": name, "params": params}));
            }
            "--raw" => o.raw = true,
            "--json" => o.json = true,
            s if s.starts_with("--") => return Err(usage(format!("unknown option {s}"))),
            s => o.positional.push(s.to_string()),
        }
    }
    Ok(o)
}

async fn dispatch(args: &[String]) -> Result<i32, Error> {
    let (cmd, rest) = args.split_first().ok_or_else(|| Error::Config(USAGE.into()))?;
    let opts = parse(rest)?;
    let client = Client::connect(&Endpoint::discover()?).await?;
    match cmd.as_str() {
        "models" | "status" | "plugins" => {
            let data = client.request(cmd, json!({})).await?;
            println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default());
            Ok(EXIT_OK)
        }
        "run" => {
            let prompt = opts.positional.join(" ");
            if prompt.is_empty() {
                return Err(Error::Config(format!("no prompt given\n{USAGE}")));
            }
            let mut req = opts.req.clone();
            if opts.raw {
                req.prompt = Some(prompt);
            } else {
                let mut messages = Vec::new();
                if let Some(s) = &opts.system {
                    messages.push(json!({"role": "system", "content": s}));
                }
                messages.push(json!({"role": "user", "content": prompt}));
                req.messages = Some(messages);
            }
            let (_, code) = stream(&client, req, opts.json).await?;
            Ok(code)
        }
        "chat" => chat(&client, opts).await,
        _ => Err(Error::Config(USAGE.into())),
    }
}

/// Streams one generation to stdout; ctrl-c cancels it. Returns the text and the exit code.
async fn stream(client: &Client, req: GenerateRequest, json_lines: bool) -> Result<(String, i32), Error> {
    let mut generation = client.generate(req).await?;
    let mut out = std::io::stdout();
    let mut text = String::new();
    let started = std::time::Instant::now();
    let mut waiting_note = false;
    let mut interrupted = false;
    loop {
        let event = tokio::select! {
            e = generation.next() => e,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)), if !waiting_note && text.is_empty() => {
                // A model that is not resident yet loads on first use: say so instead of hanging.
                eprint!("(waiting for the model: loading or busy...)\r");
                waiting_note = true;
                continue;
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                generation.cancel();
                continue;
            }
        };
        let Some(event) = event else { break };
        let event = event?;
        if waiting_note {
            eprint!("{:48}\r", "");
            waiting_note = false;
        }
        match &event {
            Event::Token { text: t, .. } => {
                text.push_str(t);
                if !json_lines {
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                }
            }
            Event::Done { raw, .. } => {
                if !json_lines {
                    let tps = raw["timings"]["tokens_per_second"].as_f64().unwrap_or(0.0);
                    let n = raw["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    println!();
                    eprintln!("[{n} tokens, {tps:.1} tok/s, {:.1} s, {}]", started.elapsed().as_secs_f64(), raw["finish_reason"].as_str().unwrap_or(""));
                }
            }
            Event::Started { .. } => {}
        }
        if json_lines {
            let v = match &event {
                Event::Started { model, prompt_tokens } => json!({"type": "started", "model": model, "prompt_tokens": prompt_tokens}),
                Event::Token { text, tokens } => json!({"type": "token", "text": text, "tokens": tokens}),
                Event::Done { raw, .. } => raw.clone(),
            };
            println!("{v}");
        }
    }
    Ok((text, if interrupted { EXIT_INTERRUPTED } else { EXIT_OK }))
}

async fn chat(client: &Client, opts: Options) -> Result<i32, Error> {
    let mut model = opts.req.model.clone();
    let mut system = opts.system.clone();
    let mut history: Vec<Value> = Vec::new();
    let stdin = std::io::stdin();
    eprintln!("chatting with {} (/reset, /system TEXT, /model NAME, /quit)", model.as_deref().unwrap_or(client.hello["default_model"].as_str().unwrap_or("the default model")));
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| Error::Config(e.to_string()))? == 0 {
            return Ok(EXIT_OK);
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        match line.split_once(' ').map_or((line.as_str(), ""), |(a, b)| (a, b)) {
            ("/quit" | "/exit", _) => return Ok(EXIT_OK),
            ("/reset", _) => {
                history.clear();
                eprintln!("(history cleared)");
                continue;
            }
            ("/system", text) => {
                system = (!text.is_empty()).then(|| text.to_string());
                history.clear();
                eprintln!("(system prompt set; history cleared)");
                continue;
            }
            ("/model", name) if !name.is_empty() => {
                model = Some(name.to_string());
                history.clear();
                eprintln!("(now using {name}; history cleared)");
                continue;
            }
            (cmd, _) if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}: /reset, /system TEXT, /model NAME, /quit");
                continue;
            }
            _ if line.trim().is_empty() => continue,
            _ => {}
        }
        history.push(json!({"role": "user", "content": line}));
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.extend(history.iter().cloned());
        let req = GenerateRequest { model: model.clone(), messages: Some(messages), prompt: None, ..opts.req.clone() };
        match stream(client, req, false).await {
            Ok((text, _)) => history.push(json!({"role": "assistant", "content": text})),
            Err(e @ Error::Request { .. }) => {
                eprintln!("mlxd: {e}");
                history.pop();
            }
            Err(e) => return Err(e),
        }
    }
}
