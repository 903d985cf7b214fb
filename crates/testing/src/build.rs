//! Building a plugin crate to a WebAssembly component with `cargo build
//! --release --target wasm32-wasip2`: shared by the harness
//! ([`crate::Bot::build`]) and `digibot build`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target plugins are built for: it emits components directly.
pub const TARGET: &str = "wasm32-wasip2";

/// What to say when the target is missing, word for word.
pub const INSTALL_HINT: &str = "run `rustup target add wasm32-wasip2`";

/// Why a plugin crate did not build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no Cargo.toml in {}", .0.display())]
    NoManifest(PathBuf),
    #[error("the {TARGET} target is not installed: {INSTALL_HINT}")]
    MissingTarget,
    #[error("cannot run cargo: {0}")]
    Spawn(std::io::Error),
    #[error("cargo build failed ({status}){}", tail(.stderr))]
    Failed { status: String, stderr: String },
    #[error("cargo built no .wasm; does Cargo.toml say crate-type = [\"cdylib\"]?")]
    NoComponent,
}

fn tail(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines.len().saturating_sub(40);
    format!(":\n{}", lines[start..].join("\n"))
}

/// Where cargo's diagnostics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diagnostics {
    /// Copied to our stderr as they come (the CLI).
    Forward,
    /// Kept, and put in the error if the build fails (tests).
    Capture,
}

/// What `cargo build` produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// Every component built, in cargo's order.
    pub components: Vec<PathBuf>,
    /// The component of the package whose Cargo.toml is in the folder, if
    /// it has one (a virtual workspace manifest has none).
    pub main: Option<PathBuf>,
}

/// Builds the crate in `dir` for [`TARGET`] in release mode, into
/// `target_dir` when given (else cargo's own choice).
pub fn cargo_build(
    dir: &Path,
    target_dir: Option<&Path>,
    diagnostics: Diagnostics,
) -> Result<Built, BuildError> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(BuildError::NoManifest(dir.to_path_buf()));
    }
    if target_missing(dir) {
        return Err(BuildError::MissingTarget);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .args(["build", "--release", "--target", TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(target_dir) = target_dir {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let mut child = cmd.spawn().map_err(BuildError::Spawn)?;
    let stderr = child.stderr.take().map(|pipe| {
        std::thread::spawn(move || {
            let mut kept = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if diagnostics == Diagnostics::Forward {
                    let _ = writeln!(std::io::stderr(), "{line}");
                }
                kept.push_str(&line);
                kept.push('\n');
            }
            kept
        })
    });
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout);
    }
    let status = child.wait().map_err(BuildError::Spawn)?;
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    if !status.success() {
        if says_target_missing(&stderr) {
            return Err(BuildError::MissingTarget);
        }
        return Err(BuildError::Failed {
            status: status.to_string(),
            stderr: if diagnostics == Diagnostics::Capture {
                stderr
            } else {
                String::new()
            },
        });
    }
    let built = components(&stdout, &manifest);
    if built.components.is_empty() {
        return Err(BuildError::NoComponent);
    }
    Ok(built)
}

/// The `.wasm` artifacts in cargo's JSON messages.
fn components(messages: &str, manifest: &Path) -> Built {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let manifest = canonical(manifest);
    let mut built = Built {
        components: Vec::new(),
        main: None,
    };
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(files) = msg["filenames"].as_array() else {
            continue;
        };
        for file in files.iter().filter_map(Value::as_str) {
            if !file.ends_with(".wasm") {
                continue;
            }
            let path = PathBuf::from(file);
            let from = msg["manifest_path"]
                .as_str()
                .map(|p| canonical(Path::new(p)));
            if from.as_deref() == Some(manifest.as_path()) {
                built.main = Some(path.clone());
            }
            built.components.push(path);
        }
    }
    built
}

/// Asks rustup (when there is one) whether the target is installed for the
/// toolchain `dir` uses. Without rustup, the build's own error tells.
fn target_missing(dir: &Path) -> bool {
    let Ok(out) = Command::new("rustup")
        .current_dir(dir)
        .args(["target", "list", "--installed"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    out.status.success()
        && !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == TARGET)
}

/// Whether cargo's output is the "no standard library for this target"
/// failure.
fn says_target_missing(stderr: &str) -> bool {
    stderr.contains("target may not be installed")
        || stderr.contains("can't find crate for `core`")
        || stderr.contains("can't find crate for `std`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_missing_target() {
        let stderr = "error[E0463]: can't find crate for `core`\n  |\n  = note: the `wasm32-wasip2` target may not be installed\n  = help: consider downloading the target with `rustup target add wasm32-wasip2`";
        assert!(says_target_missing(stderr));
        assert!(!says_target_missing("error: expected `;`"));
        assert_eq!(
            BuildError::MissingTarget.to_string(),
            "the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`"
        );
    }

    #[test]
    fn finds_the_component_of_the_crate() {
        let dir = std::env::temp_dir();
        let manifest = dir.join("Cargo.toml");
        let messages = format!(
            "{}\n{}\nnot json\n",
            serde_json::json!({"reason": "compiler-artifact", "manifest_path": "/elsewhere/Cargo.toml",
                "filenames": ["/t/libdep.rlib"]}),
            serde_json::json!({"reason": "compiler-artifact", "manifest_path": manifest,
                "filenames": ["/t/wasm32-wasip2/release/mybot.wasm"]}),
        );
        let built = components(&messages, &manifest);
        assert_eq!(
            built.components,
            vec![PathBuf::from("/t/wasm32-wasip2/release/mybot.wasm")]
        );
        assert_eq!(built.main, built.components.first().cloned());
    }
}
