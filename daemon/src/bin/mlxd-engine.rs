//! `mlxd-engine`: the daemon proper, linked against MLX. Started through `mlxd`, which checks
//! that MLX can be loaded first.
use anyhow::{bail, Context, Result};
use mlxd::chat::{ChatTemplate, Message};
use mlxd::engine::{Engine, EngineOptions, GenerateRequest};
use mlxd::sampling::SamplingParams;
use std::io::Write;
use std::path::PathBuf;

const USAGE: &str = "usage:
  mlxd serve [--config PATH] [--listen ADDR:PORT] [--log-json]
                                      run the daemon (default config: ~/.config/mlxd/config.toml)
  mlxd doctor                         what MLX this machine runs on
  mlxd generate [--model PATH] [--max-tokens N] [--temperature T] [--seed S] [--raw] PROMPT
                                      one generation, streamed to stdout (default model: SmolLM2)";

fn main() -> Result<()> {
    mlxd::runtime::prepare_mlx_environment();
    mlxd::spin_guard::install();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("doctor") => {
            print!("{}", mlxd::runtime::Report::gather().with_matmul_benchmark().render());
            Ok(())
        }
        Some("generate") => {
            // One model in this process (see mlxd::models::fused::set_one_model).
            mlxd::models::fused::set_one_model(true);
            generate(&args[1..])
        }
        Some("serve") => serve(&args[1..]),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn serve(args: &[String]) -> Result<()> {
    let mut opts = mlxd::serve::ServeOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => opts.config = Some(it.next().context("--config needs a path")?.into()),
            "--listen" => opts.listen = Some(it.next().context("--listen needs ADDR:PORT")?.clone()),
            "--log-json" => opts.log_json = true,
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    mlxd::serve::init_logging(opts.log_json);
    let cfg = mlxd::serve::load_config(&opts)?;
    cfg.engine.apply_to_environment(); // before MLX starts and before any thread exists
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(mlxd::serve::serve(cfg))?;
    // Shutdown is complete: every request got its final event and the model threads were
    // joined (or given up on, see `Registry::unload_all`). End here without running C++ static
    // destructors: MLX's would tear down its device and scheduler under any thread still inside
    // it, which aborts the process (SIGABRT) instead of exiting 0.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process; nothing after it runs.
    unsafe { libc::_exit(0) }
}

fn generate(args: &[String]) -> Result<()> {
    let mut model: Option<PathBuf> = None;
    let mut max_tokens = 256usize;
    let mut sampler = SamplingParams::default();
    let mut raw = false;
    let mut prompt = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--model" => model = Some(val("--model")?.into()),
            "--max-tokens" => {
                max_tokens = val("--max-tokens")?.parse().context("--max-tokens must be a whole number")?
            }
            "--temperature" => {
                sampler.temperature = val("--temperature")?.parse().context("--temperature must be a number")?
            }
            "--seed" => sampler.seed = Some(val("--seed")?.parse().context("--seed must be a whole number")?),
            "--raw" => raw = true,
            s if s.starts_with("--") => bail!("unknown option {s}\n{USAGE}"),
            s => prompt = Some(s.to_string()),
        }
    }
    let prompt = prompt.context("no prompt given")?;
    let path = match model {
        Some(p) => p,
        None => mlxd::default_model::ensure()?,
    };
    let loaded = mlxd::models::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let text = match (&loaded.chat_template, raw) {
        (Some(t), false) => {
            let eos = loaded.eos_ids.first().and_then(|&id| loaded.tokenizer.id_to_token(id)).unwrap_or_default();
            ChatTemplate::new(t, "", &eos)?.render(&[Message { role: "user".into(), content: prompt }], true)?
        }
        _ => prompt,
    };
    let ids = loaded.tokenizer.encode(&text, false)?;
    let mut engine = Engine::new(loaded, EngineOptions::default());
    let mut out = std::io::stdout().lock();
    let req = GenerateRequest { prompt: ids, max_tokens, stop: vec![], sampler };
    let outcome = engine.generate(&req, |ev| {
        let _ = out.write_all(ev.text.as_bytes());
        let _ = out.flush();
        true
    })?;
    eprintln!(
        "\n[{} prompt tokens, {} generated, {:.0} ms to first token, {:.1} tok/s, finish: {:?}]",
        outcome.prompt_tokens,
        outcome.ids.len(),
        outcome.time_to_first_token.as_secs_f64() * 1e3,
        outcome.decode_tps(),
        outcome.finish
    );
    Ok(())
}
