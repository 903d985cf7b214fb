//! The operator's secrets: `DIGIBOT_SECRET_<NAME>` variables and a secrets
//! file of `NAME=value` lines (refused unless only its owner may read it,
//! mode 0600 or 0400). A variable wins over the file. Values are never
//! printed: `Debug` shows names only.

use digibot_domain::outbound::SecretName;
use digibot_domain::outbound::secret::{SecretError, check_value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The prefix of a secret's environment variable.
pub const ENV_PREFIX: &str = "DIGIBOT_SECRET_";

/// Secret values by name.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<SecretName, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Why the secrets cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read the secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the secrets file {path} may be read by others (mode {mode:o}): `chmod 600` it, digibot refuses it until then"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the secrets file {path}, line {line}: {why}")]
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{var}: {source}")]
    Env { var: String, source: SecretError },
    #[error("the secrets file {path}, line {line}: {source}")]
    Value {
        path: PathBuf,
        line: usize,
        source: SecretError,
    },
}

impl Secrets {
    /// From the environment (`vars`, e.g. `std::env::vars()`) and, if given,
    /// the secrets file.
    pub fn load(
        vars: impl IntoIterator<Item = (String, String)>,
        file: Option<&Path>,
    ) -> Result<Secrets, SecretsError> {
        let mut secrets = BTreeMap::new();
        if let Some(path) = file {
            read_file(path, &mut secrets)?;
        }
        for (var, value) in vars {
            let Some(name) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let env = |source| SecretsError::Env {
                var: var.clone(),
                source,
            };
            let name = SecretName::parse(name).map_err(env)?;
            check_value(&name, &value).map_err(env)?;
            secrets.insert(name, value);
        }
        Ok(Secrets(secrets))
    }

    /// The value of `name`, if the operator supplied it.
    pub fn get(&self, name: &SecretName) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &SecretName> {
        self.0.keys()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn read_file(path: &Path, secrets: &mut BTreeMap<SecretName, String>) -> Result<(), SecretsError> {
    let read = |source| SecretsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(read)?;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(SecretsError::Line {
                path: path.to_path_buf(),
                line: line_no,
                why: "expected NAME=value".into(),
            });
        };
        let value_error = |source| SecretsError::Value {
            path: path.to_path_buf(),
            line: line_no,
            source,
        };
        let name = SecretName::parse(name.trim()).map_err(value_error)?;
        let value = value.trim();
        check_value(&name, value).map_err(value_error)?;
        secrets.insert(name, value.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn name(s: &str) -> SecretName {
        SecretName::parse(s).unwrap()
    }

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn environment_and_file_merge_the_variable_winning() {
        let f = file(
            "# orders\nORDERS_TOKEN = from-the-file-1\nCRM_KEY=crm-key-value\n\n",
            0o600,
        );
        let vars = [
            (
                "DIGIBOT_SECRET_ORDERS_TOKEN".to_string(),
                "from-the-env-1".to_string(),
            ),
            (
                "DIGIBOT_API_TOKEN".to_string(),
                "not a plugin secret".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let s = Secrets::load(vars, Some(f.path())).unwrap();
        assert_eq!(s.get(&name("ORDERS_TOKEN")), Some("from-the-env-1"));
        assert_eq!(s.get(&name("CRM_KEY")), Some("crm-key-value"));
        assert_eq!(s.len(), 2);
        // Debug shows names, never values.
        let debug = format!("{s:?}");
        assert!(
            debug.contains("ORDERS_TOKEN") && !debug.contains("from-the"),
            "{debug}"
        );
    }

    #[test]
    fn a_file_others_may_read_is_refused() {
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let f = file("A_TOKEN=abcdefgh\n", mode);
            let e = Secrets::load([], Some(f.path())).unwrap_err();
            assert!(
                matches!(e, SecretsError::Permissions { .. }),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        let f = file("A_TOKEN=abcdefgh\n", 0o400);
        assert!(Secrets::load([], Some(f.path())).is_ok());
    }

    #[test]
    fn bad_lines_and_values_say_where() {
        let f = file("A_TOKEN=abcdefgh\nnot a line\n", 0o600);
        let e = Secrets::load([], Some(f.path())).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("NAME=value"), "{e}");
        let f = file("lower=abcdefgh\n", 0o600);
        assert!(
            Secrets::load([], Some(f.path()))
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        let f = file("SHORT=abc\n", 0o600);
        let e = Secrets::load([], Some(f.path())).unwrap_err().to_string();
        assert!(e.contains("shorter than 8"), "{e}");
        let e = Secrets::load(
            [("DIGIBOT_SECRET_bad".to_string(), "abcdefgh".to_string())],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("DIGIBOT_SECRET_bad:"), "{e}");
        let missing = Secrets::load([], Some(Path::new("/nonexistent/secrets"))).unwrap_err();
        assert!(matches!(missing, SecretsError::Read { .. }));
    }
}
