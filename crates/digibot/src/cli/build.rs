//! `digibot build [DIR]`: builds a plugin crate to a WebAssembly component
//! with `cargo build --release --target wasm32-wasip2` and prints the path
//! of the `.wasm` (the cargo invocation is the harness's:
//! `digibot_testing::build`).

use clap::Args;
use digibot_testing::build::{Diagnostics, cargo_build};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The plugin crate (the folder holding its Cargo.toml).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
}

pub fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    match cargo_build(&args.dir, None, Diagnostics::Forward) {
        Ok(built) => {
            for path in built.main.iter().chain(
                built
                    .components
                    .iter()
                    .filter(|p| Some(*p) != built.main.as_ref()),
            ) {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("digibot build: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
