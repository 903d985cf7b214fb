//! Secrets a plugin may use without seeing them: the placeholder
//! `{{secret:NAME}}` in a header value it sends, replaced by the host at
//! send time, and the values scrubbed from what comes back (a server that
//! echoes the request's headers must not hand the plugin the secret).

use std::borrow::Cow;
use std::fmt;

const OPEN: &[u8] = b"{{secret:";
const CLOSE: &[u8] = b"}}";

/// Shortest secret value accepted: shorter values could not be scrubbed
/// from responses without mangling ordinary text.
pub const SECRET_MIN_BYTES: usize = 8;

/// A secret's name: `A-Z`, `0-9` and `_`, starting with a letter, at most
/// 64 bytes (`DIGIBOT_SECRET_<NAME>` in the environment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct SecretName(String);

/// Why a name, a value or a placeholder is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secret name {0:?}: use capital letters, digits and `_`, starting with a letter (64 at most)"
    )]
    Name(String),
    #[error(
        "secret {0}: the value is shorter than {SECRET_MIN_BYTES} bytes (too short to be redacted reliably)"
    )]
    TooShort(SecretName),
    #[error(
        "secret {0}: the value must be printable ASCII (it goes into an HTTP header), without line breaks"
    )]
    NotHeaderSafe(SecretName),
    #[error("a header value has `{{{{secret:` without a closing `}}}}`, or an invalid name in it")]
    Malformed,
}

impl SecretName {
    pub fn parse(s: &str) -> Result<SecretName, SecretError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_uppercase()
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(SecretName(s.to_string()))
        } else {
            Err(SecretError::Name(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{{secret:NAME}}`.
    pub fn placeholder(&self) -> String {
        format!("{{{{secret:{}}}}}", self.0)
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SecretName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks a value the operator supplies for `name`.
pub fn check_value(name: &SecretName, value: &str) -> Result<(), SecretError> {
    if value.len() < SECRET_MIN_BYTES {
        return Err(SecretError::TooShort(name.clone()));
    }
    if !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(SecretError::NotHeaderSafe(name.clone()));
    }
    Ok(())
}

/// The secret names a header value refers to, in order (repeats kept).
pub fn placeholders(value: &[u8]) -> Result<Vec<SecretName>, SecretError> {
    let mut names = Vec::new();
    let mut rest = value;
    while let Some(i) = find(rest, OPEN) {
        let after = &rest[i + OPEN.len()..];
        let end = find(after, CLOSE).ok_or(SecretError::Malformed)?;
        let name = std::str::from_utf8(&after[..end]).map_err(|_| SecretError::Malformed)?;
        names.push(SecretName::parse(name).map_err(|_| SecretError::Malformed)?);
        rest = &after[end + CLOSE.len()..];
    }
    Ok(names)
}

/// `value` with every placeholder replaced by `lookup(name)`.
pub fn substitute<E>(
    value: &[u8],
    mut lookup: impl FnMut(&SecretName) -> Result<String, E>,
) -> Result<Vec<u8>, SubstituteError<E>> {
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = find(rest, OPEN) {
        out.extend_from_slice(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let end = find(after, CLOSE).ok_or(SubstituteError::Malformed)?;
        let name = std::str::from_utf8(&after[..end])
            .ok()
            .and_then(|n| SecretName::parse(n).ok())
            .ok_or(SubstituteError::Malformed)?;
        out.extend_from_slice(lookup(&name).map_err(SubstituteError::Lookup)?.as_bytes());
        rest = &after[end + CLOSE.len()..];
    }
    out.extend_from_slice(rest);
    Ok(out)
}

/// Why [`substitute`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubstituteError<E> {
    Malformed,
    Lookup(E),
}

/// `bytes` with every occurrence of each secret value (raw, and escaped as
/// in a JSON string when that differs) replaced by its placeholder.
pub fn scrub<'a>(bytes: &'a [u8], secrets: &[(SecretName, String)]) -> Cow<'a, [u8]> {
    let mut out = Cow::Borrowed(bytes);
    for (name, value) in secrets {
        let placeholder = name.placeholder();
        let json = serde_json::to_string(value).unwrap_or_default();
        let json = json.trim_matches('"');
        let mut forms = vec![value.as_str()];
        if json != value {
            forms.push(json);
        }
        for form in forms {
            if form.is_empty() || find(&out, form.as_bytes()).is_none() {
                continue;
            }
            out = Cow::Owned(replace_all(&out, form.as_bytes(), placeholder.as_bytes()));
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(i) = find(rest, needle) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(with);
        rest = &rest[i + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> SecretName {
        SecretName::parse(s).unwrap()
    }

    #[test]
    fn names() {
        assert!(SecretName::parse("ORDERS_TOKEN").is_ok());
        assert!(SecretName::parse("A1").is_ok());
        for bad in [
            "",
            "orders_token",
            "1TOKEN",
            "_T",
            "ORDERS-TOKEN",
            "ÄB",
            &"A".repeat(65),
        ] {
            assert!(SecretName::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(name("X_Y").placeholder(), "{{secret:X_Y}}");
    }

    #[test]
    fn values() {
        let n = name("T");
        assert!(check_value(&n, "s3cret-token").is_ok());
        assert_eq!(
            check_value(&n, "short"),
            Err(SecretError::TooShort(n.clone()))
        );
        assert_eq!(
            check_value(&n, "line\nbreak-here"),
            Err(SecretError::NotHeaderSafe(n.clone()))
        );
    }

    #[test]
    fn placeholders_are_found_and_substituted() {
        let v = b"Bearer {{secret:ORDERS_TOKEN}} and {{secret:B}}";
        assert_eq!(placeholders(v).unwrap(), [name("ORDERS_TOKEN"), name("B")]);
        assert_eq!(placeholders(b"plain").unwrap(), []);
        assert_eq!(placeholders(b"{{secret:X"), Err(SecretError::Malformed));
        assert_eq!(
            placeholders(b"{{secret:lower}}"),
            Err(SecretError::Malformed)
        );
        // Braces that are not the placeholder are left alone.
        assert_eq!(placeholders(b"{{other}} {secret:X}").unwrap(), []);

        let out = substitute::<()>(v, |n| Ok(format!("<{n}>"))).unwrap();
        assert_eq!(out, b"Bearer <ORDERS_TOKEN> and <B>");
        assert_eq!(
            substitute(b"x {{secret:Q}}", |_| Err::<String, _>("missing")),
            Err(SubstituteError::Lookup("missing"))
        );
        assert_eq!(
            substitute::<()>(b"{{secret:Q", |_| Ok(String::new())),
            Err(SubstituteError::Malformed)
        );
    }

    #[test]
    fn scrubbing_replaces_values_raw_and_json_escaped() {
        let secrets = [
            (name("T"), "s3cret-token".to_string()),
            (name("Q"), "quo\"ted-value".to_string()),
        ];
        let body = br#"{"auth":"Bearer s3cret-token","q":"quo\"ted-value","x":"s3cret-token"}"#;
        let out = scrub(body, &secrets);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"auth":"Bearer {{secret:T}}","q":"{{secret:Q}}","x":"{{secret:T}}"}"#
        );
        assert!(matches!(scrub(b"nothing here", &secrets), Cow::Borrowed(_)));
    }
}
