//! Released WIT folders never change (docs/wit-versioning.md, rule 2): each
//! one's text, comments and blank lines left out, hashes to what it did on
//! release. A comment may be fixed; a type, field, case, function or name
//! may not. A failure here means a change belongs in a new
//! `wit/since_vX.Y.0/` folder, not in a released one.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// (folder, SHA-256 of its normalised WIT) for every released version.
const RELEASED: &[(&str, &str)] = &[
    (
        "since_v0.1.0",
        "eb263927da97fb350f09b0722c1b468c8361d349c6cad806ca273a5ac6a34356",
    ),
    (
        "since_v0.2.0",
        "2bfd9eb681f188c02d4b7b9d2d487510dd4d1f0770f49f5a41809c2d648a23a6",
    ),
    (
        "since_v0.3.0",
        "aa91be0c788e40a6619d19ab5b1e080a6997c68e5cc7977a9d52e7c82db0223e",
    ),
];

fn wit_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit")
}

/// Every `.wit` file under `dir`, sorted by path so the hash is stable.
fn wit_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            wit_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "wit") {
            out.push(path);
        }
    }
}

/// The folder's WIT without comments, blank lines or indentation, each
/// file under its path relative to the folder.
fn normalised(dir: &Path) -> String {
    let mut files = Vec::new();
    wit_files(dir, &mut files);
    let mut text = String::new();
    for file in files {
        let rel = file.strip_prefix(dir).expect("under the folder");
        text.push_str(&format!(
            "== {}\n",
            rel.to_string_lossy().replace('\\', "/")
        ));
        let body = std::fs::read_to_string(&file).expect("utf-8 wit");
        for line in body.lines() {
            let code = match line.find("//") {
                Some(at) => &line[..at],
                None => line,
            };
            let code = code.trim();
            if !code.is_empty() {
                text.push_str(code);
                text.push('\n');
            }
        }
    }
    text
}

fn digest(dir: &Path) -> String {
    hex::encode(Sha256::digest(normalised(dir).as_bytes()))
}

#[test]
fn released_wit_folders_are_unchanged() {
    let mut changed = Vec::new();
    for (folder, want) in RELEASED {
        let got = digest(&wit_root().join(folder));
        if got != *want {
            changed.push(format!("wit/{folder}: {got} (released as {want})"));
        }
    }
    assert!(
        changed.is_empty(),
        "released WIT changed; make the change in a new folder instead:\n{}",
        changed.join("\n")
    );
}

#[test]
fn every_wit_folder_is_released_or_the_one_in_progress() {
    // A new folder is added here on release; until then at most one folder
    // (the newest) may be unreleased.
    let mut unreleased: Vec<String> = std::fs::read_dir(wit_root())
        .expect("wit/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("since_v"))
        .filter(|name| !RELEASED.iter().any(|(f, _)| f == name))
        .collect();
    unreleased.sort();
    assert!(
        unreleased.len() <= 1,
        "more than one unreleased WIT folder: {unreleased:?}"
    );
}

#[test]
fn a_changed_field_changes_the_digest_and_a_comment_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |text: &str| std::fs::write(dir.path().join("bot.wit"), text).expect("write");
    write("package a:b@0.1.0;\ninterface t {\n    record r { x: u32 }\n}\n");
    let base = digest(dir.path());
    write("/// docs\npackage a:b@0.1.0;\n\ninterface t { // why\n        record r { x: u32 }\n}\n");
    assert_eq!(
        digest(dir.path()),
        base,
        "comments and layout are not the interface"
    );
    write("package a:b@0.1.0;\ninterface t {\n    record r { x: u64 }\n}\n");
    assert_ne!(digest(dir.path()), base, "a field's type is");
}
