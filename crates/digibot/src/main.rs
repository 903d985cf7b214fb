//! The `digibot` command: the server (`serve`) and the operators' and
//! plugin authors' tools. This crate only wires: settings in, the other
//! crates' parts built and connected (see docs/architecture.md).

mod cli;
mod config;
mod serve;

use clap::Parser;

/// mimalloc rather than glibc's malloc: the pipeline allocates and frees
/// on many threads (tokio's workers, the store's writer, the plugin
/// janitor), where glibc's malloc and free took 13% of its samples.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
