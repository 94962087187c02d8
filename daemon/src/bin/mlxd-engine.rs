//! `mlxd-engine`: the daemon proper, linked against MLX. Started through `mlxd`.
use anyhow::Result;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("doctor") => {
            print!("{}", mlxd::runtime::Report::gather().with_matmul_benchmark().render());
            Ok(())
        }
        _ => {
            eprintln!("usage: mlxd doctor");
            std::process::exit(2);
        }
    }
}
