//! The repository's scripts from the outside. `scripts/bench-load` runs
//! with `cargo` and `wrk` on its PATH replaced by stubs that record how
//! they were called: what is checked is how the script composes the
//! benchmark's command line from its arguments and its environment (the
//! benchmark itself is measured, not tested; see BENCHMARKS.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A folder of stubs: `cargo` writes its arguments, one a line, to
/// `calls/N`; `wrk` does nothing (it is only looked for).
fn stubs(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(dir.join("calls"))?;
    let cargo = format!(
        "#!/bin/sh\nn=$(ls '{calls}' | wc -l)\nprintf '%s\\n' \"$@\" > '{calls}/'$n\n",
        calls = dir.join("calls").display()
    );
    for (name, text) in [("cargo", cargo.as_str()), ("wrk", "#!/bin/sh\n")] {
        std::fs::write(bin.join(name), text)?;
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(bin)
}

/// `scripts/bench-load ARGS` with `env` (and the build and the report
/// skipped); what it printed, and the arguments of each `cargo` call.
fn bench_load(args: &[&str], env: &[(&str, &str)]) -> Result<(Output, Vec<Vec<String>>)> {
    let dir = tempfile::tempdir()?;
    let bin = stubs(dir.path())?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(repo().join("scripts/bench-load"))
        .args(args)
        .env("PATH", path)
        .env("SKIP_BUILD", "1")
        .env("NO_REPORT", "1")
        .env_remove("ROUNDS")
        .env_remove("OUT")
        .env_remove("NOTE")
        .envs(env.iter().copied())
        .output()
        .context("running scripts/bench-load")?;
    let mut calls = Vec::new();
    for n in 0.. {
        let Ok(text) = std::fs::read_to_string(dir.path().join("calls").join(n.to_string())) else {
            break;
        };
        calls.push(text.lines().map(str::to_string).collect());
    }
    Ok((out, calls))
}

/// `cargo bench -p digibot --bench load -- ARGS`.
fn bench(args: &[&str]) -> Vec<String> {
    ["bench", "-p", "digibot", "--bench", "load", "--"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

/// The issue's command, as its header suggests it: `--rounds` given once
/// (the argument, not `ROUNDS`), the other flags passed through.
#[test]
fn bench_load_arguments_win_over_the_environment() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out_env = tmp.path().join("env.json");
    let out_arg = tmp.path().join("arg.json");
    let env = [
        ("ROUNDS", "5"),
        ("NOTE", "from NOTE"),
        ("OUT", out_env.to_str().context("path")?),
    ];

    let (out, calls) = bench_load(
        &["--rounds", "1", "--seconds", "2", "--targets", "bare"],
        &env,
    )?;
    ensure!(out.status.success(), "{out:?}");
    let out_env_real = std::fs::canonicalize(tmp.path())?.join("env.json");
    let out_env_real = out_env_real.to_str().context("path")?;
    ensure!(
        calls
            == [bench(&[
                "--rounds",
                "1",
                "--out",
                out_env_real,
                "--note",
                "from NOTE",
                "--seconds",
                "2",
                "--targets",
                "bare"
            ])],
        "{calls:?}"
    );

    // Each of the script's own flags, both spellings, over its variable.
    let out_arg_flag = format!("--out={}", out_arg.display());
    let (out, calls) = bench_load(
        &[
            "--rounds=2",
            &out_arg_flag,
            "--note",
            "from --note",
            "--warmup",
            "0",
        ],
        &env,
    )?;
    ensure!(out.status.success(), "{out:?}");
    let out_arg_real = std::fs::canonicalize(tmp.path())?.join("arg.json");
    ensure!(
        calls
            == [bench(&[
                "--rounds",
                "2",
                "--out",
                out_arg_real.to_str().context("path")?,
                "--note",
                "from --note",
                "--warmup",
                "0"
            ])],
        "{calls:?}"
    );

    // Without arguments, the variables (and the script's defaults).
    let (out, calls) = bench_load(&[], &[("ROUNDS", "4")])?;
    ensure!(out.status.success(), "{out:?}");
    let default_out = std::fs::canonicalize(repo().join("bench"))?.join("load.json");
    ensure!(
        calls
            == [bench(&[
                "--rounds",
                "4",
                "--out",
                default_out.to_str().context("path")?,
                "--note",
                ""
            ])],
        "{calls:?}"
    );

    // A flag without its value is refused before anything runs.
    let (out, calls) = bench_load(&["--seconds", "2", "--rounds"], &env)?;
    ensure!(
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("--rounds needs a value")
            && calls.is_empty(),
        "{out:?} {calls:?}"
    );

    // --help is the benchmark's, with nothing else run or written.
    let (out, calls) = bench_load(&["--help"], &env)?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(calls == [bench(&["--help"])], "{calls:?}");
    ensure!(!out_env.exists() && !out_arg.exists());
    Ok(())
}

/// The README's first screen is what `scripts/demo` prints before
/// digibot's log (its banner, with the defaults and a token).
#[test]
fn the_readme_shows_what_the_demo_prints() -> Result<()> {
    let demo = std::fs::read_to_string(repo().join("scripts/demo"))?;
    let banner = demo
        .split_once("cat >&2 <<EOF\n")
        .and_then(|(_, rest)| rest.split_once("\nEOF\n"))
        .map(|(banner, _)| banner)
        .context("scripts/demo prints no banner")?;
    // As bash expands the here-document with the demo's defaults.
    let printed = banner
        .replace("$listen", "127.0.0.1:8080")
        .replace("$DIGIBOT_PLUGINS_DIR", "data/demo-plugins")
        .replace("$DIGIBOT_ADMIN_TOKEN", "9f3c…")
        .replace("\\\\", "\\");
    let readme = std::fs::read_to_string(repo().join("README.md"))?;
    let shown = readme
        .split_once("prints what to do next:\n\n```\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(shown, _)| shown)
        .context("the README does not show the demo's banner")?;
    ensure!(
        printed.trim() == shown.trim(),
        "the demo prints:\n{}\nthe README shows:\n{}",
        printed.trim(),
        shown.trim()
    );
    Ok(())
}
