//! `digibot build [DIR]`: builds a plugin folder to a WebAssembly component
//! and prints the path of the `.wasm`, whatever its language: a Rust crate
//! (`Cargo.toml`) with `cargo build --release --target wasm32-wasip2` (the
//! harness's invocation, `digibot_testing::build`), a TypeScript or
//! JavaScript plugin (`package.json`) with scripts/build-typescript-plugins
//! (componentize-js), a Python one (`app.py`) with
//! scripts/build-python-plugins (componentize-py); those two write
//! `DIR/target/NAME.wasm`.

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

/// This repository, as built: where the guest build scripts are.
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// What a plugin folder is written in, from the file that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Language {
    Rust,
    TypeScript,
    Python,
}

fn language(dir: &Path) -> Option<Language> {
    if dir.join("Cargo.toml").is_file() {
        Some(Language::Rust)
    } else if dir.join("package.json").is_file() {
        Some(Language::TypeScript)
    } else if dir.join("app.py").is_file() {
        Some(Language::Python)
    } else {
        None
    }
}

pub fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    match language(&args.dir) {
        Some(Language::Rust) => build_rust(&args.dir),
        Some(lang) => build_guest(&args.dir, lang),
        None => {
            eprintln!(
                "digibot build: {} is not a plugin folder: no Cargo.toml (Rust), package.json (TypeScript/JavaScript) or app.py (Python)",
                args.dir.display()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A TypeScript or Python plugin, with this repository's build script for
/// its language, into `DIR/target/NAME.wasm`.
fn build_guest(dir: &Path, lang: Language) -> anyhow::Result<ExitCode> {
    let dir = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("plugin")
        .replace('-', "_");
    let wasm = dir.join("target").join(format!("{name}.wasm"));
    let script = Path::new(REPO).join(match lang {
        Language::TypeScript => "scripts/build-typescript-plugins",
        _ => "scripts/build-python-plugins",
    });
    if !script.is_file() {
        eprintln!(
            "digibot build: {} not found: this digibot was built outside its repository",
            script.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let out = std::process::Command::new(&script)
        .arg(format!("--dir={}", dir.display()))
        .arg(format!("--out={}", wasm.display()))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", script.display()))?;
    // The script's progress goes to stderr: stdout is the component's path.
    use std::io::Write;
    let mut stderr = std::io::stderr();
    stderr.write_all(&out.stdout)?;
    stderr.write_all(&out.stderr)?;
    if !out.status.success() || !wasm.is_file() {
        eprintln!("digibot build: building {} failed", dir.display());
        return Ok(ExitCode::FAILURE);
    }
    println!("{}", wasm.display());
    Ok(ExitCode::SUCCESS)
}

fn build_rust(dir: &Path) -> anyhow::Result<ExitCode> {
    match cargo_build(dir, None, Diagnostics::Forward) {
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
