//! The `digibot` command: the server (`serve`) and the operators' and
//! plugin authors' tools. This crate only wires: settings in, the other
//! crates' parts built and connected (see docs/architecture.md).

mod cli;
mod config;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = cli::init_tracing() {
        eprintln!("digibot: {e}");
        return std::process::ExitCode::from(2);
    }
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("digibot: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
