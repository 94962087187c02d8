//! `engine --profile DIR`: where the host's time goes in each variant's decode, for machines
//! without `perf` (the lent GPU machines have none). After the timed, interleaved comparison,
//! each variant decodes `--repeats` more times under a sampling CPU profiler (SIGPROF at
//! ~1 kHz of process CPU time; no kernel permissions needed) and its stacks are written to
//! `DIR/<variant>.folded` in the folded format flame-graph tools read (`thread;outer;...;leaf
//! count`; the thread that decodes is named `decode`), after a first line `# steps N hz H` so per-step costs can be compared across
//! variants (`bench/profile_diff.py`). The timed table never runs under the profiler.
//!
//! Built only with the `profile` feature (`cargo build --release -p mlxd --features profile`).

use anyhow::Result;
use std::path::Path;

/// Samples per second of process CPU time.
#[cfg(feature = "profile")]
const HZ: i32 = 997;

/// Runs `decode` (which returns how many decode steps it ran) under the profiler and writes the
/// stacks to `dir/<name>.folded`.
#[cfg(feature = "profile")]
pub fn record(dir: &Path, name: &str, decode: impl FnOnce() -> Result<usize>) -> Result<()> {
    use std::collections::HashMap;
    use std::fmt::Write as _;
    let guard = pprof::ProfilerGuardBuilder::default().frequency(HZ).build()?;
    let steps = decode()?;
    let report = guard.report().build()?;
    drop(guard);
    // SAFETY: pthread_self has no preconditions.
    let this_thread = unsafe { libc::pthread_self() } as u64;
    let mut folded: HashMap<String, isize> = HashMap::new();
    for (frames, count) in &report.data {
        // MLX's own threads inherit the process's name: the decoding thread is `decode`.
        let mut line = if frames.thread_id == this_thread {
            "decode".to_string()
        } else {
            frames.thread_name_or_id().replace([';', ' '], "_")
        };
        for frame in frames.frames.iter().rev() {
            for symbol in frame.iter().rev() {
                // Spaces and semicolons separate fields in the folded format.
                write!(line, ";{}", symbol.name().replace(';', ":").replace(' ', "")).expect("write to String");
            }
        }
        *folded.entry(line).or_default() += count;
    }
    let mut lines: Vec<(String, isize)> = folded.into_iter().collect();
    lines.sort_by(|a, b| b.1.cmp(&a.1));
    let mut text = format!("# steps {steps} hz {HZ}\n");
    for (stack, count) in lines {
        writeln!(text, "{stack} {count}").expect("write to String");
    }
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("{}.folded", name.replace([':', '/'], "-")));
    std::fs::write(&file, text)?;
    eprintln!(
        "profile of {name}: {} samples over {steps} steps -> {}",
        report.data.values().sum::<isize>(),
        file.display()
    );
    Ok(())
}

#[cfg(not(feature = "profile"))]
pub fn record(_dir: &Path, _name: &str, _decode: impl FnOnce() -> Result<usize>) -> Result<()> {
    anyhow::bail!("--profile: this mlxd-bench was built without the profile feature (cargo build --release -p mlxd --features profile)")
}
