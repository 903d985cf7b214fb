//! The layering of the settings' sources over their declaration: for each
//! declared argument, the value of the highest source that has one (a
//! `serve` flag, else its environment variable, else its key in the file,
//! else its default), checked by the argument's own parser so a bad value
//! is reported as the variable, key or flag it came from; then one clap
//! parse of the chosen values builds [`Settings`].
//!
//! An empty value, wherever it comes from, unsets the setting: an optional
//! one is off, one with a default takes its default.

use super::Settings;
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: unknown setting `{key}` (docs/operations.md lists them)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("{path}: {key} = {value:?}: {why}")]
    File {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
    #[error("{var}={value:?}: {why}")]
    Env {
        var: String,
        value: String,
        why: String,
    },
    #[error("--{flag}={value:?}: {why}")]
    Flag {
        flag: String,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The settings flags given to `serve` on its command line, as given; they
/// are checked with the other sources when the settings are loaded.
#[derive(Clone, Default)]
pub struct Flags(BTreeMap<String, String>);

/// Names only: a flag may be a secret.
impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Flags {
    /// The value of the setting with this id (its file key), if given.
    fn get(&self, id: &str) -> Option<&str> {
        self.0.get(id).map(String::as_str)
    }
}

impl FromArgMatches for Flags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Flags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for arg in declared().get_arguments() {
            let id = arg.get_id().as_str();
            if matches.value_source(id) == Some(ValueSource::CommandLine)
                && let Some(value) = matches.get_one::<String>(id)
            {
                self.0.insert(id.to_string(), value.clone());
            }
        }
        Ok(())
    }
}

impl Args for Flags {
    /// Every setting as a flag, with its doc, variable and default for
    /// `--help`; its value is kept as text here (the environment clap also
    /// reads is ignored) and parsed when the settings are loaded.
    fn augment_args(cmd: Command) -> Command {
        let ids: Vec<String> = declared()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        Settings::augment_args(cmd).mut_args(|arg| {
            if ids.iter().any(|id| id == arg.get_id().as_str()) {
                arg.value_parser(clap::builder::ValueParser::string())
            } else {
                arg
            }
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Flags::augment_args(cmd)
    }
}

/// The declaration: one argument per setting.
pub(super) fn declared() -> Command {
    Settings::augment_args(Command::new("digibot serve"))
}

/// Where a setting's value came from, to say so when it is bad.
enum Source<'a> {
    Flag(&'a str),
    Env(&'a str),
    File(&'a Path),
}

/// Defaults < `file` < `env` < `flags`.
pub(super) fn layer(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Flags,
) -> Result<Settings, ConfigError> {
    let declared = declared();
    let in_file = match file {
        Some(path) => read_file(path, &declared)?,
        None => BTreeMap::new(),
    };
    let mut argv = Vec::new();
    for arg in declared.get_arguments() {
        let id = arg.get_id().as_str();
        let long = arg.get_long().unwrap_or(id);
        let var = arg.get_env().and_then(|v| v.to_str());
        let (source, value) = if let Some(value) = flags.get(id) {
            (Source::Flag(long), value.to_string())
        } else if let Some(value) = var.and_then(env) {
            (Source::Env(var.unwrap_or_default()), value)
        } else if let (Some(path), Some(value)) = (file, in_file.get(id)) {
            (Source::File(path), value.clone())
        } else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        if let Err(why) = check(arg, long, &value) {
            // A secret's value is not repeated in the error.
            let value = if arg.is_hide_env_values_set() {
                "***".to_string()
            } else {
                value
            };
            return Err(match source {
                Source::Flag(flag) => ConfigError::Flag {
                    flag: flag.to_string(),
                    value,
                    why,
                },
                Source::Env(var) => ConfigError::Env {
                    var: var.to_string(),
                    value,
                    why,
                },
                Source::File(path) => ConfigError::File {
                    path: path.to_path_buf(),
                    key: id.to_string(),
                    value,
                    why,
                },
            });
        }
        argv.push(format!("--{long}={value}"));
    }
    let matches = parser(declared)
        .try_get_matches_from(argv)
        .map_err(|e| ConfigError::Invalid(clap_reason(&e)))?;
    Settings::from_arg_matches(&matches).map_err(|e| ConfigError::Invalid(clap_reason(&e)))
}

/// The declaration as a parser of the chosen values alone (clap would
/// otherwise read the process environment itself).
fn parser(declared: Command) -> Command {
    declared.no_binary_name(true).mut_args(|a| a.env(None))
}

/// Whether `value` parses as `arg`'s type; why not, in words.
fn check(arg: &Arg, long: &str, value: &str) -> Result<(), String> {
    Command::new("setting")
        .no_binary_name(true)
        .arg(arg.clone().env(None))
        .try_get_matches_from([format!("--{long}={value}")])
        .map(drop)
        .map_err(|e| {
            let possible: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|p| p.get_name().to_string())
                .collect();
            match std::error::Error::source(&e) {
                Some(source) => source.to_string(),
                None if !possible.is_empty() => format!("expected {}", possible.join(" or ")),
                None => clap_reason(&e),
            }
        })
}

/// A clap error's first line, without its `error: ` prefix.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// The file's settings by id (`retry.base_ms` for `[retry] base_ms`), as
/// text; a key that is not a setting is an error.
fn read_file(path: &Path, declared: &Command) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let ids: Vec<&str> = declared
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .collect();
    let mut values = BTreeMap::new();
    flatten(path, &ids, "", &table, &mut values)?;
    Ok(values)
}

fn flatten(
    path: &Path,
    ids: &[&str],
    prefix: &str,
    table: &toml::Table,
    out: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (key, value) in table {
        let id = format!("{prefix}{key}");
        let is_section = ids.iter().any(|i| i.starts_with(&format!("{id}.")));
        let text = match value {
            toml::Value::Table(inner) if is_section => {
                flatten(path, ids, &format!("{id}."), inner, out)?;
                continue;
            }
            _ if !ids.contains(&id.as_str()) => {
                return Err(ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    key: id,
                });
            }
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    key: id,
                    value: value.to_string(),
                    why: "expected a single value".into(),
                });
            }
        };
        out.insert(id, text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digibot.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// `serve`'s flags as clap parses them from a command line.
    fn flags(args: &[&str]) -> Flags {
        let cmd = Flags::augment_args(Command::new("serve"));
        let matches = cmd
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap();
        Flags::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let (_dir, path) = file(
            "listen = \"127.0.0.1:9000\"\nconcurrency = 4\nrelease_command = \"/file\"\n\
             [retry]\nbase_ms = 7\nmax_ms = 70\n[runtime]\npooling = false\nmax_actions = 9\n",
        );
        let s = layer(
            Some(&path),
            &env(&[
                ("DIGIBOT_LISTEN", "127.0.0.1:9100"),
                ("DIGIBOT_RETRY_MAX_MS", "700"),
                ("DIGIBOT_PLUGIN_MAX_ACTIONS", "8"),
            ]),
            &flags(&["--listen", "127.0.0.1:9200", "--retry-max-ms=7000"]),
        )
        .unwrap();
        assert_eq!(s.listen.port(), 9200, "flag over env over file");
        assert_eq!(s.retry.max_ms, 7000, "flag over env over file, in a table");
        assert_eq!(s.runtime.max_actions, 8, "env over file");
        assert_eq!(s.concurrency, 4, "file over default");
        assert_eq!(s.retry.base_ms, 7);
        assert!(!s.runtime.pooling);
        assert_eq!(s.release_command, "/file");
        assert_eq!(s.send_concurrency, 32, "default");
        assert_eq!(s.runtime.max_log_bytes, 16 << 10, "default");
    }

    #[test]
    fn an_empty_value_unsets() {
        let (_dir, path) = file("api_token = \"from-file\"\nconcurrency = 4\n");
        let s = layer(
            Some(&path),
            &env(&[("DIGIBOT_API_TOKEN", ""), ("DIGIBOT_CONCURRENCY", "")]),
            &Flags::default(),
        )
        .unwrap();
        assert!(
            s.api_token.is_none(),
            "an empty variable unsets the file's token"
        );
        assert_eq!(s.concurrency, 64, "and an empty number is its default");
    }

    #[test]
    fn bad_values_name_their_source() {
        let bad_env = layer(
            None,
            &env(&[("DIGIBOT_RETRY_BASE_MS", "soon")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad_env.starts_with("DIGIBOT_RETRY_BASE_MS=\"soon\": ")
                && bad_env.contains("invalid digit"),
            "{bad_env}"
        );

        let bad_bool = layer(None, &env(&[("DIGIBOT_POOLING", "yes")]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert_eq!(bad_bool, "DIGIBOT_POOLING=\"yes\": expected true or false");

        let bad_enum = layer(
            None,
            &env(&[("DIGIBOT_DURABILITY", "fast")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            bad_enum,
            "DIGIBOT_DURABILITY=\"fast\": expected full or normal"
        );

        let (_dir, path) = file("[runtime]\ncompile = \"slow\"\n");
        let bad_file = layer(Some(&path), &env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            bad_file,
            format!(
                "{}: runtime.compile = \"slow\": expected fast or optimized",
                path.display()
            )
        );

        let bad_flag = layer(None, &env(&[]), &flags(&["--lease-ms=-1"]))
            .unwrap_err()
            .to_string();
        assert!(bad_flag.starts_with("--lease-ms=\"-1\": "), "{bad_flag}");
    }

    #[test]
    fn a_bad_secret_is_not_repeated() {
        let err = layer(
            None,
            &env(&[("DIGIBOT_DATABASE_POOL", "many")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"many\""), "{err}");
        // No secret can fail to parse today; the rule is checked on the
        // declaration instead: every secret hides its value.
        for arg in declared().get_arguments() {
            let id = arg.get_id().as_str();
            let secret = matches!(
                id,
                "api_token"
                    | "client_secret"
                    | "webhook_token"
                    | "webhook_basic"
                    | "admin_token"
                    | "database_url"
            );
            assert_eq!(arg.is_hide_env_values_set(), secret, "{id}");
        }
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        for (text, key) in [
            ("listne = \"127.0.0.1:1\"\n", "listne"),
            ("[retry]\nbase = 1\n", "retry.base"),
            ("[runtim]\npooling = true\n", "runtim"),
            ("retry = 5\n", "retry"),
        ] {
            let (_dir, path) = file(text);
            let err = layer(Some(&path), &env(&[]), &Flags::default()).unwrap_err();
            assert!(
                matches!(&err, ConfigError::UnknownKey { key: k, .. } if k == key),
                "{text}: {err}"
            );
        }
        let (_dir, path) = file("listen = [1]\n");
        assert!(matches!(
            layer(Some(&path), &env(&[]), &Flags::default()).unwrap_err(),
            ConfigError::File { .. }
        ));
    }

    /// One naming rule, so nobody has to look a setting up three times:
    /// the flag is the variable without `DIGIBOT_`, in kebab case; the
    /// file key is the id.
    #[test]
    fn every_setting_has_a_variable_and_a_flag_named_alike() {
        for arg in declared().get_arguments() {
            let id = arg.get_id().as_str();
            let var = arg.get_env().and_then(|v| v.to_str()).expect(id);
            let long = arg.get_long().expect(id);
            assert_eq!(
                var,
                format!("DIGIBOT_{}", long.to_uppercase().replace('-', "_")),
                "{id}"
            );
            assert!(arg.get_help().is_some(), "{id} has no doc");
        }
    }
}
