//! `digibot new NAME [--dir DIR] [--lang rust|ts|python]`: scaffolds a plugin in
//! DIR/NAME: an echo bot with a greeting, a passing conversation test
//! (`tests/conversation.toml`, run by `digibot test`) and a README. In Rust
//! (crates/digibot/templates/plugin) a standalone cdylib crate on
//! `digibot-sdk` with a harness test (`digibot-testing`) too; in TypeScript
//! (crates/digibot/templates/ts) a `package.json`, a `tsconfig.json` on
//! this repository's SDK and jco-generated typings, and `src/index.ts`;
//! in Python (crates/digibot/templates/python) `app.py` and `wit-version`.

use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// This repository's crates, as built: the defaults for the paths the new
/// crate depends on.
const HOST_DIR: &str = env!("CARGO_MANIFEST_DIR");

const CARGO_TOML: &str = include_str!("../../templates/plugin/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../../templates/plugin/lib.rs.tmpl");
const TEST_RS: &str = include_str!("../../templates/plugin/test.rs.tmpl");
const CONVERSATION: &str = include_str!("../../templates/plugin/conversation.toml.tmpl");
const README: &str = include_str!("../../templates/plugin/README.md.tmpl");
const GITIGNORE: &str = include_str!("../../templates/plugin/gitignore.tmpl");

const TS_PACKAGE: &str = include_str!("../../templates/ts/package.json.tmpl");
const TS_CONFIG: &str = include_str!("../../templates/ts/tsconfig.json.tmpl");
const TS_INDEX: &str = include_str!("../../templates/ts/index.ts.tmpl");
const TS_README: &str = include_str!("../../templates/ts/README.md.tmpl");
const TS_GITIGNORE: &str = include_str!("../../templates/ts/gitignore.tmpl");

const PY_APP: &str = include_str!("../../templates/python/app.py.tmpl");
const PY_README: &str = include_str!("../../templates/python/README.md.tmpl");
const PY_GITIGNORE: &str = include_str!("../../templates/python/gitignore.tmpl");

/// The language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    /// TypeScript (componentize-js).
    #[value(alias = "typescript")]
    Ts,
    /// Python (componentize-py).
    #[value(alias = "py")]
    Python,
}

/// Names cargo or Rust refuse for a crate, or that would clash with the
/// crates a plugin depends on.
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "digibot",
    "digibot_protocol",
    "digibot_sdk",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
];

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: lowercase letters, digits, '-' and '_', starting
    /// with a letter ('-' becomes '_' in the .wasm file name).
    pub name: String,
    /// Where to create the plugin (it goes in DIR/NAME).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// The plugin's language.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// The digibot-sdk crate to depend on [default: this digibot's].
    #[arg(long, value_name = "PATH")]
    pub sdk_path: Option<PathBuf>,
    /// The digibot-testing crate the tests use [default: this digibot's].
    #[arg(long, value_name = "PATH", alias = "host-path")]
    pub testing_path: Option<PathBuf>,
}

/// Why `name` cannot be a plugin's name, if it cannot.
fn invalid_name(name: &str) -> Option<String> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    let rest_ok =
        bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !first_ok || !rest_ok || name.len() > 64 {
        return Some(format!(
            "invalid plugin name {name:?}: use 1 to 64 lowercase letters, digits, '-' and '_', starting with a letter"
        ));
    }
    let crate_name = name.replace('-', "_");
    if RESERVED.contains(&crate_name.as_str()) {
        return Some(format!(
            "invalid plugin name {name:?}: Rust or digibot already uses it"
        ));
    }
    None
}

/// `my-bot` → `MyBot`.
fn type_name(name: &str) -> String {
    name.split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `path` made absolute, as a TOML string.
fn toml_path(path: &Path) -> anyhow::Result<String> {
    let path = path.canonicalize().map_err(|e| {
        anyhow::anyhow!(
            "{} not found ({e}); pass its path explicitly",
            path.display()
        )
    })?;
    Ok(toml::Value::String(path.display().to_string()).to_string())
}

pub fn run(args: NewArgs) -> anyhow::Result<ExitCode> {
    if let Some(problem) = invalid_name(&args.name) {
        eprintln!("digibot new: {problem}");
        return Ok(ExitCode::FAILURE);
    }
    let root = args.dir.join(&args.name);
    if root.exists() {
        eprintln!(
            "digibot new: {} already exists; not touching it",
            root.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let testing = args
        .testing_path
        .unwrap_or_else(|| Path::new(HOST_DIR).join("../testing"));
    let sdk = args
        .sdk_path
        .unwrap_or_else(|| Path::new(HOST_DIR).join("../../guest-sdk"));
    let wasm = args.name.replace('-', "_");
    let fill = |template: &str| -> anyhow::Result<String> {
        Ok(template
            .replace("{{name}}", &args.name)
            .replace("{{wasm}}", &wasm)
            .replace("{{type_name}}", &type_name(&args.name))
            .replace("{{sdk_path}}", &toml_path(&sdk)?)
            .replace("{{testing_path}}", &toml_path(&testing)?))
    };
    let files = match args.lang {
        Lang::Rust => vec![
            ("Cargo.toml", fill(CARGO_TOML)?),
            ("src/lib.rs", fill(LIB_RS)?),
            ("tests/bot.rs", fill(TEST_RS)?),
            ("tests/conversation.toml", fill(CONVERSATION)?),
            ("README.md", fill(README)?),
            (".gitignore", fill(GITIGNORE)?),
        ],
        Lang::Ts => {
            let base = Path::new(HOST_DIR).join("../../guests/typescript/tsconfig.base.json");
            let base = serde_json::Value::String(
                base.canonicalize()
                    .map_err(|e| anyhow::anyhow!("{} not found ({e})", base.display()))?
                    .display()
                    .to_string(),
            )
            .to_string();
            let fill_ts = |t: &str| -> anyhow::Result<String> {
                Ok(fill(t)?.replace("{{tsconfig_base}}", &base))
            };
            vec![
                ("package.json", fill_ts(TS_PACKAGE)?),
                ("tsconfig.json", fill_ts(TS_CONFIG)?),
                ("src/index.ts", fill_ts(TS_INDEX)?),
                ("tests/conversation.toml", fill_ts(CONVERSATION)?),
                ("README.md", fill_ts(TS_README)?),
                (".gitignore", fill_ts(TS_GITIGNORE)?),
            ]
        }
        Lang::Python => vec![
            ("app.py", fill(PY_APP)?),
            ("wit-version", "0.3.0\n".to_string()),
            ("tests/conversation.toml", fill(CONVERSATION)?),
            ("README.md", fill(PY_README)?),
            (".gitignore", fill(PY_GITIGNORE)?),
        ],
    };
    std::fs::create_dir_all(&args.dir)?;
    // create_dir (not _all): if another process made it meanwhile, stop.
    std::fs::create_dir(&root)?;
    for (file, text) in &files {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    // The versions digibot was built and tested with: the new crate starts
    // from them instead of whatever the registry has today.
    let lock = Path::new(HOST_DIR).join("../../Cargo.lock");
    if args.lang == Lang::Rust && lock.is_file() {
        std::fs::copy(&lock, root.join("Cargo.lock"))?;
    }
    println!("created {}", root.display());
    println!(
        "next: cd {} && digibot build && digibot test",
        root.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(invalid_name("mybot"), None);
        assert_eq!(invalid_name("shop-bot_2"), None);
        for bad in [
            "",
            "2bot",
            "MyBot",
            "my bot",
            "bot!",
            "../x",
            "test",
            "digibot-sdk",
        ] {
            assert!(invalid_name(bad).is_some(), "{bad:?} must be refused");
        }
        assert!(invalid_name(&"a".repeat(65)).is_some());
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name("mybot"), "Mybot");
        assert_eq!(type_name("shop-bot_2"), "ShopBot2");
    }

    #[test]
    fn templates_have_no_unfilled_placeholders_left() {
        let root = std::env::temp_dir().join(format!("digibot-new-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let code = run(NewArgs {
            name: "shop-bot".into(),
            dir: root.clone(),
            lang: Lang::Rust,
            sdk_path: None,
            testing_path: None,
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        for file in [
            "Cargo.toml",
            "src/lib.rs",
            "tests/bot.rs",
            "tests/conversation.toml",
            "README.md",
            ".gitignore",
        ] {
            let text = std::fs::read_to_string(root.join("shop-bot").join(file)).unwrap();
            assert!(!text.contains("{{"), "{file} still has a placeholder");
        }
        let lib = std::fs::read_to_string(root.join("shop-bot/src/lib.rs")).unwrap();
        assert!(lib.contains("export_bot!(ShopBot);"));
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join("shop-bot/Cargo.toml")).unwrap())
                .unwrap();
        let sdk = manifest["dependencies"]["digibot-sdk"]["path"]
            .as_str()
            .unwrap();
        assert!(Path::new(sdk).join("Cargo.toml").is_file());
        // Run again: the folder exists, nothing is overwritten.
        let code = run(NewArgs {
            name: "shop-bot".into(),
            dir: root.clone(),
            lang: Lang::Rust,
            sdk_path: None,
            testing_path: None,
        })
        .unwrap();
        assert_eq!(code, ExitCode::FAILURE);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn typescript_and_python_templates_are_filled() {
        let root = std::env::temp_dir().join(format!("digibot-new-langs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (lang, files) in [
            (
                Lang::Ts,
                &[
                    "package.json",
                    "tsconfig.json",
                    "src/index.ts",
                    "tests/conversation.toml",
                    "README.md",
                ][..],
            ),
            (
                Lang::Python,
                &[
                    "app.py",
                    "wit-version",
                    "tests/conversation.toml",
                    "README.md",
                ][..],
            ),
        ] {
            let name = format!("{lang:?}-bot").to_lowercase();
            let code = run(NewArgs {
                name: name.clone(),
                dir: root.clone(),
                lang,
                sdk_path: None,
                testing_path: None,
            })
            .unwrap();
            assert_eq!(code, ExitCode::SUCCESS);
            for file in files {
                let text = std::fs::read_to_string(root.join(&name).join(file)).unwrap();
                assert!(
                    !text.contains("{{"),
                    "{lang:?}: {file} still has a placeholder"
                );
            }
            assert!(!root.join(&name).join("Cargo.lock").exists());
        }
        let tsconfig = std::fs::read_to_string(root.join("ts-bot/tsconfig.json")).unwrap();
        assert!(tsconfig.contains("guests/typescript/tsconfig.base.json"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
