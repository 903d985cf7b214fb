//! `digibot check FILE.wasm [--json]`: says whether a component will load in
//! this digibot, with the runtime and settings `serve` would use: its world
//! and `digishare:bot` version, its imports (flagging the refused ones), its
//! size, its compile time, and its `NAME.toml` when there is one beside it.

use crate::config::Settings;
use anyhow::Context;
use clap::Args;
use digibot_runtime::{LoadError, Manifest, Runtime, RuntimeConfig, SUPPORTED_WIT};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The component to check.
    pub file: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The runtime `serve` would build from these settings, without the
/// compile cache (so compile times are real and nothing is written).
pub(super) fn runtime(settings: &Settings) -> anyhow::Result<Runtime> {
    Runtime::new(RuntimeConfig {
        cache_dir: None,
        ..settings.runtime_config()
    })
    .map_err(|e| anyhow::anyhow!("cannot start the plugin runtime: {e:#}"))
}

/// `NAME.toml` beside `NAME.wasm`, if there is one.
pub(super) fn sibling_manifest(wasm: &Path) -> anyhow::Result<Option<(PathBuf, Manifest)>> {
    let path = wasm.with_extension("toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let manifest =
                Manifest::parse(&text).with_context(|| format!("invalid {}", path.display()))?;
            Ok(Some((path, manifest)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[derive(Debug, Serialize)]
struct Import {
    name: String,
    /// `ok` or `refused`.
    status: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    ok: bool,
    /// Why it will not load, when it will not.
    problem: Option<String>,
    size: Option<usize>,
    sha256: Option<String>,
    world: Option<String>,
    wit_version: Option<String>,
    supported_wit_versions: &'static [&'static str],
    /// All imports when it loads; the refused ones when that is the problem.
    imports: Vec<Import>,
    compile_ms: Option<u64>,
    /// The `NAME.toml` beside it, if any.
    manifest: Option<String>,
}

fn check(runtime: &Runtime, file: &Path) -> Report {
    let mut report = Report {
        file: file.display().to_string(),
        ok: false,
        problem: None,
        size: None,
        sha256: None,
        world: None,
        wit_version: None,
        supported_wit_versions: SUPPORTED_WIT,
        imports: Vec::new(),
        compile_ms: None,
        manifest: None,
    };
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            report.problem = Some(format!("cannot read {}: {e}", file.display()));
            return report;
        }
    };
    report.size = Some(bytes.len());
    let manifest = match sibling_manifest(file) {
        Ok(Some((path, manifest))) => {
            report.manifest = Some(path.display().to_string());
            manifest
        }
        Ok(None) => Manifest::default(),
        Err(e) => {
            report.problem = Some(format!("{e:#}"));
            return report;
        }
    };
    match runtime.load(&digibot_runtime::plugin_name(file), &bytes, manifest) {
        Ok(plugin) => {
            report.ok = true;
            report.sha256 = Some(plugin.hash.clone());
            report.world = Some(format!("digishare:bot/bot@{}", plugin.wit_version));
            report.wit_version = Some(plugin.wit_version.to_string());
            report.imports = plugin
                .imports
                .iter()
                .map(|name| Import {
                    name: name.clone(),
                    status: "ok",
                })
                .collect();
            report.compile_ms = Some(plugin.compile_time.as_millis() as u64);
        }
        Err(e) => {
            match &e {
                LoadError::UnsupportedVersion { found } => {
                    report.wit_version = Some(found.clone());
                }
                LoadError::RefusedImports(refused) => {
                    report.imports = refused
                        .iter()
                        .map(|name| Import {
                            name: name.clone(),
                            status: "refused",
                        })
                        .collect();
                }
                _ => {}
            }
            report.problem = Some(e.to_string());
        }
    }
    report
}

fn print_human(r: &Report) {
    println!("file:          {}", r.file);
    if let Some(size) = r.size {
        println!(
            "size:          {size} bytes ({:.1} KiB)",
            size as f64 / 1024.0
        );
    }
    if let Some(world) = &r.world {
        println!("world:         {world}");
    }
    if let Some(version) = &r.wit_version {
        println!(
            "digishare:bot: {version} (this host loads {})",
            r.supported_wit_versions.join(", ")
        );
    }
    if !r.imports.is_empty() {
        println!("imports:");
        for i in &r.imports {
            let note = match i.status {
                "refused" => "REFUSED: digibot does not provide it",
                _ if i.name.starts_with("wasi:") => "ok (WASI, no capability granted)",
                _ => "ok",
            };
            println!("  {:<40} {note}", i.name);
        }
    }
    if let Some(ms) = r.compile_ms {
        println!("compile time:  {ms} ms");
    }
    match &r.manifest {
        Some(path) => println!("manifest:      {path}"),
        None if r.ok => println!("manifest:      none (defaults)"),
        None => {}
    }
    match &r.problem {
        None => println!("OK: this component loads in digibot"),
        Some(problem) => println!("PROBLEM: {problem}"),
    }
}

pub fn run(args: CheckArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let runtime = runtime(settings)?;
    let report = check(&runtime, &args.file);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
