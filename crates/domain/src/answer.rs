//! What an answer of Digishare's Messages API means for the action that was
//! sent: delivered (with the new message's id), to be retried (and when,
//! from `Retry-After`), or refused for good. Pure, so that every status,
//! header and body Digishare could send is fuzzed (`fuzz/`): the sender
//! makes the request and records the outcome, this decides.

use std::time::{Duration, SystemTime};

/// The meaning of one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered; `message_id` is the created message's, when Digishare
    /// answered one.
    Sent { message_id: Option<String> },
    /// Not delivered yet: try again, after `retry_after` when Digishare
    /// said so (saturating: an absurd value is a very long wait, which the
    /// sender caps).
    Retry { retry_after: Option<Duration> },
    /// A 2xx that says the file could not be fetched or used.
    FileRefused,
    /// Refused because the conversation's 24-hour window is closed.
    WindowClosed,
    /// Refused for any other reason: retrying cannot help.
    Refused,
}

/// Classifies an answer: its `status`, its `Retry-After` header (raw, if
/// any), its body, and whether the request carried a file. `now` dates a
/// `Retry-After` given as an HTTP date.
pub fn classify(
    status: u16,
    retry_after: Option<&[u8]>,
    body: &str,
    sent_file: bool,
    now: SystemTime,
) -> Verdict {
    match status {
        200..=299 => {
            // Digishare answers 200 even when it could not fetch a file,
            // with a text message saying so.
            if sent_file && body.contains("unsupported file type") {
                Verdict::FileRefused
            } else {
                Verdict::Sent {
                    message_id: message_id(body),
                }
            }
        }
        408 | 429 | 500..=599 => Verdict::Retry {
            retry_after: retry_after
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| parse_retry_after(v, now)),
        },
        _ if crate::lifecycle::is_window_refusal(body) => Verdict::WindowClosed,
        _ => Verdict::Refused,
    }
}

/// The id of the message Digishare created, from either documented answer:
/// `{"id": ...}` or `{"data": {"id": ...}}`.
pub fn message_id(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let id = value
        .get("id")
        .or_else(|| value.get("data").and_then(|d| d.get("id")))?;
    match id {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `Retry-After` as seconds (fractions allowed) or an HTTP date, as a
/// wait from `now`; `None` when it is neither. Seconds too many for a
/// [`Duration`] saturate to [`Duration::MAX`] (the sender caps every wait).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<f64>() {
        if !(secs.is_finite() && secs >= 0.0) {
            return None;
        }
        return Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn message_id_from_both_answers() {
        assert_eq!(
            message_id(r#"{"id": "msg_1", "status": "sent"}"#).as_deref(),
            Some("msg_1")
        );
        assert_eq!(
            message_id(r#"{"data": {"object": "Message", "id": 42}}"#).as_deref(),
            Some("42")
        );
        assert_eq!(message_id(r#"{"status": "ok"}"#), None);
        assert_eq!(message_id("not json"), None);
    }

    #[test]
    fn retry_after_in_seconds_or_date() {
        assert_eq!(parse_retry_after("2", now()), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("0.5", now()),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_retry_after("-1", now()), None);
        assert_eq!(parse_retry_after("NaN", now()), None);
        assert_eq!(parse_retry_after("inf", now()), None);
        let past = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH);
        assert_eq!(parse_retry_after(&past, now()), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now() + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now()),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("soon", now()), None);
    }

    /// Found by the `sender_answer` fuzz target: `Duration::from_secs_f64`
    /// panics on more seconds than a `Duration` holds, and the panic
    /// skipped the sender's cleanup (the conversation stayed in flight).
    #[test]
    fn a_huge_retry_after_saturates_instead_of_panicking() {
        for huge in [
            "11111111111111111111111",
            "1e20",
            "18446744073709551616",
            "1.7e308",
        ] {
            assert_eq!(
                parse_retry_after(huge, now()),
                Some(Duration::MAX),
                "{huge}"
            );
        }
        assert_eq!(
            classify(429, Some(b"11111111111111111111111"), "111", true, now()),
            Verdict::Retry {
                retry_after: Some(Duration::MAX)
            }
        );
    }

    #[test]
    fn statuses_mean_what_the_contract_says() {
        assert_eq!(
            classify(201, None, r#"{"id":"m1"}"#, false, now()),
            Verdict::Sent {
                message_id: Some("m1".into())
            }
        );
        assert_eq!(
            classify(200, None, "unsupported file type", true, now()),
            Verdict::FileRefused
        );
        assert_eq!(
            classify(200, None, "unsupported file type", false, now()),
            Verdict::Sent { message_id: None }
        );
        for status in [408, 429, 500, 503, 599] {
            assert_eq!(
                classify(status, Some(b"3"), "", false, now()),
                Verdict::Retry {
                    retry_after: Some(Duration::from_secs(3))
                },
                "{status}"
            );
        }
        assert_eq!(
            classify(503, Some(&[0xff, 0xfe]), "", false, now()),
            Verdict::Retry { retry_after: None },
            "a header that is not UTF-8 is ignored"
        );
        assert_eq!(
            classify(
                400,
                None,
                "(#131047) Re-engagement message: more than 24 hours",
                false,
                now()
            ),
            Verdict::WindowClosed
        );
        for status in [301, 400, 401, 404, 422, 600, 0] {
            assert_eq!(classify(status, None, "no", false, now()), Verdict::Refused);
        }
    }
}
