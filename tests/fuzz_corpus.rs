//! Replays the fuzz targets' committed inputs on stable Rust: every file under
//! `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/` goes through the same harness
//! (`mlxd::fuzzing::<target>`) that the cargo-fuzz target in `fuzz/` runs, so CI exercises the
//! harnesses and keeps every crash the fuzzers found fixed, in seconds and without nightly.
//! `MLXD_FUZZ_CORPUS=1` also replays the local, uncommitted `fuzz/corpus/<target>/` that long
//! runs (`./dev fuzz`) grow.

use std::path::{Path, PathBuf};

use mlxd::chat::{ChatTemplate, Message};
use mlxd::fuzzing::{self, TARGETS};
use mlxd::tokenizer::Tokenizer;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files directly under `dir`, sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs every input of `kind` (`seeds`, `regressions`, `corpus`) of every target; returns how
/// many ran per target.
fn replay(kind: &str) -> Vec<(&'static str, usize)> {
    TARGETS
        .iter()
        .map(|&target| {
            let files = inputs(&fuzz_dir().join(kind).join(target));
            for file in &files {
                let data = std::fs::read(file).unwrap();
                // A panic fails the test; the message names the input to reproduce it with
                // `cargo +nightly fuzz run <target> <file>`.
                let ran = std::panic::catch_unwind(|| fuzzing::run(target, &data));
                assert!(ran.is_ok(), "{target} panicked on {}", file.display());
                assert!(ran.unwrap(), "unknown target {target}");
            }
            (target, files.len())
        })
        .collect()
}

#[test]
fn every_target_has_seeds_and_they_pass() {
    for (target, n) in replay("seeds") {
        assert!(n > 0, "fuzz/seeds/{target}/ is empty");
    }
}

/// The seeds are meant to start the fuzzers inside each format: each must get through its
/// parser (a seed that fails early would only exercise the first check).
#[test]
fn seeds_are_accepted_by_their_parsers() {
    let seeds = |target: &str| inputs(&fuzz_dir().join("seeds").join(target));
    let text = |path: &Path| std::fs::read_to_string(path).unwrap();
    for s in seeds("protocol_frame") {
        assert!(mlxd::protocol::parse_client_message(&text(&s)).is_ok(), "{}", s.display());
    }
    for s in seeds("config_toml") {
        mlxd::config::Config::parse(&text(&s), &s).unwrap();
    }
    for s in seeds("gguf_header") {
        mlxd::gguf::read_header(&s).unwrap();
    }
    let llama = mlxd::gguf::read_header(&fuzz_dir().join("seeds/gguf_header/llama_tokenizer.gguf")).unwrap();
    Tokenizer::from_gguf(&llama).unwrap();
    for s in seeds("safetensors_header") {
        mlxd::models::safetensors::read_header(&s).unwrap();
    }
    for s in seeds("gguf_tokenizer") {
        let (meta, text) = fuzzing::gguf_tokenizer_input(&std::fs::read(&s).unwrap()).unwrap();
        let tok = Tokenizer::from_gguf(&meta).unwrap_or_else(|e| panic!("{}: {e}", s.display()));
        tok.encode(&text, true).unwrap();
    }
    for s in seeds("chat_template") {
        let data = text(&s);
        let (source, _) = data.split_once('\0').unwrap();
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let user = Message { role: "user".into(), content: "Hi".into() };
        t.render(&[user], true).unwrap_or_else(|e| panic!("{}: {e}", s.display()));
    }
}

#[test]
fn regressions_stay_fixed() {
    replay("regressions");
}

#[test]
fn the_fuzz_targets_match_the_harnesses() {
    // One cargo-fuzz target per harness, each calling the harness of its name.
    for target in TARGETS {
        let source = std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{target}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{target}.rs: {e}"));
        assert!(source.contains(&format!("mlxd::fuzzing::{target}(data)")), "fuzz/fuzz_targets/{target}.rs");
    }
    assert!(!fuzzing::run("no_such_target", b""));
}

#[test]
fn local_corpus_when_asked() {
    if std::env::var_os("MLXD_FUZZ_CORPUS").is_some() {
        for (target, n) in replay("corpus") {
            eprintln!("{target}: {n} corpus inputs replayed");
        }
    }
}
