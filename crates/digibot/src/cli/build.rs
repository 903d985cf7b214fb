//! `digibot build [DIR]`: builds a plugin crate to a WebAssembly component
//! with `cargo build --release --target wasm32-wasip2` and prints the path
//! of the `.wasm` (the cargo invocation is the harness's:
//! `digibot_testing::build`).

use clap::Args;
use digibot_testing::build::{Diagnostics, cargo_build};
use std::path::{Path, PathBuf};
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

/// The component `digibot build` last made in the plugin folder `dir`:
/// the newest `.wasm` directly in `target/` (TypeScript, Python) or in
/// `target/wasm32-wasip2/release/` (Rust).
pub fn built_component(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for folder in [dir.join("target"), dir.join("target/wasm32-wasip2/release")] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "wasm") {
                continue;
            }
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path));
            }
        }
    }
    newest.map(|(_, p)| p).ok_or_else(|| {
        anyhow::anyhow!(
            "no component in {}/target: run `digibot build` there, or name the PLUGIN.wasm",
            dir.display()
        )
    })
}
