//! Settings that are secrets: their `Debug` never shows them, so a
//! `{:?}` of the settings (a log line, a panic message) leaks nothing.

use std::fmt;

/// A secret setting (a token, a password). Read it with [`Secret::expose`]
/// where it is used; it has no `Display`, and its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A PostgreSQL URL: its `Debug` shows where it points, never its password
/// (`postgres://user:***@host/db`, and `password=***` in the query).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(Secret);

impl DatabaseUrl {
    /// The URL itself, password included, for connecting.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

impl From<String> for DatabaseUrl {
    fn from(s: String) -> DatabaseUrl {
        DatabaseUrl(Secret(s))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

/// `scheme://user:password@host/path?password=x&k=v` with both passwords
/// replaced by `***`; anything it cannot read as a URL is hidden whole.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{user_info}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_debug() {
        let s = Secret::from("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn database_urls_hide_only_the_password() {
        let cases = [
            (
                "postgres://digibot:hunter2@db.internal:5432/digibot",
                "postgres://digibot:***@db.internal:5432/digibot",
            ),
            (
                "postgresql://digibot@db/digibot?password=hunter2&sslmode=require",
                "postgresql://digibot@db/digibot?password=***&sslmode=require",
            ),
            ("postgres://db/digibot", "postgres://db/digibot"),
            // An '@' inside the password: the host is after the last one.
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("not a url hunter2", "***"),
        ];
        for (url, shown) in cases {
            let url = DatabaseUrl::from(url.to_string());
            assert_eq!(url.redacted(), shown);
            let debug = format!("{url:?}");
            assert!(
                !debug.contains("hunter2") && !debug.contains("p@ss"),
                "{debug}"
            );
        }
    }
}
