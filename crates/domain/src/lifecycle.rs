//! Who is in charge of a conversation: the rules that move it between
//! `bot`, `human` and `closed` (applied by the dispatcher and the sender,
//! stored by the store), recognising digibot's own messages when they come
//! back as webhooks, and WhatsApp's 24-hour customer-service window.
//!
//! The echo race (a message digibot sent coming back as a webhook before
//! its send returned) is the pipeline's: see `digibot_pipeline::sends`.

use std::time::Duration;

pub use crate::event::ConversationState;

/// WhatsApp's customer-service window.
pub const WINDOW_MS: i64 = 24 * 3_600_000;

/// The longest a customer's message can plausibly take to reach digibot
/// (Digishare retrying while digibot is down, the way webhook senders
/// retry for up to three days); a `created_at` older than this, or after
/// the message arrived, is a clock's error, a replay or a fixture.
pub const MAX_DELIVERY_DELAY_MS: i64 = 72 * 3_600_000;

/// When the customer wrote, for the 24-hour window: the payload's
/// `created_at`, unless it is not plausible for a message digibot
/// received at `received_at` (see [`MAX_DELIVERY_DELAY_MS`]); then the
/// time digibot received it.
pub fn customer_wrote_at(created_at: Option<i64>, received_at: i64) -> i64 {
    match created_at {
        Some(at) if at <= received_at && received_at - at <= MAX_DELIVERY_DELAY_MS => at,
        _ => received_at,
    }
}

/// The lifecycle settings the dispatcher applies.
#[derive(Debug, Clone)]
pub struct Rules {
    /// An agent's internal note with this text (trimmed, any case) hands the
    /// conversation back to the bot.
    pub release_command: String,
    /// Back to the bot after this long without an agent message.
    pub idle_release: Option<Duration>,
    /// How long an agent message waits for a send in flight to the same
    /// conversation before it is judged without that send's id.
    pub echo_wait: Duration,
}

impl Rules {
    /// The rules for these settings; `request_timeout` is one Messages API
    /// attempt's.
    pub fn new(
        release_command: &str,
        human_idle_release_secs: u64,
        request_timeout: Duration,
    ) -> Rules {
        Rules {
            release_command: release_command.trim().to_string(),
            idle_release: (human_idle_release_secs > 0)
                .then(|| Duration::from_secs(human_idle_release_secs)),
            // Longer than one attempt can take (the request, plus an OAuth
            // refresh and its retried request, plus the commit): hitting it
            // means the send's outcome is unknown, not merely slow.
            echo_wait: request_timeout.saturating_mul(3) + Duration::from_secs(5),
        }
    }

    /// Whether `text` is the release command.
    pub fn is_release(&self, text: &str) -> bool {
        text.trim().eq_ignore_ascii_case(&self.release_command)
    }
}

/// Milliseconds since the epoch of an RFC 3339 time such as Digishare's
/// `2026-03-14T09:12:55.000000Z` (offsets allowed); `None` if it is not one.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let ms: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" | "" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hm = rest[1..].replace(':', "");
            if hm.len() != 4 || !hm.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            sign * (hm[..2].parse::<i64>().ok()? * 60 + hm[2..].parse::<i64>().ok()?)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// Whether the channel is WhatsApp (the one with a 24-hour window).
pub fn is_whatsapp(channel: Option<&str>) -> bool {
    channel.is_some_and(|c| c.to_ascii_lowercase().contains("whatsapp"))
}

/// Whether an API refusal body says the 24-hour window is closed (WhatsApp
/// error 131047, "re-engagement message", "more than 24 hours").
pub fn is_window_refusal(body: &str) -> bool {
    let b = body.to_ascii_lowercase();
    b.contains("131047")
        || b.contains("re-engagement")
        || b.contains("reengagement")
        || (b.contains("24") && (b.contains("hour") || b.contains(" h ") || b.contains("window")))
        || b.contains("customer service window")
        || b.contains("customer-service window")
}

/// The dead-letter error for a send refused because the window is closed.
pub fn window_refusal_error(status: u16, body: &str, last_customer_at: Option<i64>) -> String {
    let since = match last_customer_at {
        Some(at) => format!(
            " (the customer last wrote {} h ago)",
            (crate::time::now_ms() - at).max(0) / 3_600_000
        ),
        None => String::new(),
    };
    format!(
        "refused by WhatsApp: more than 24 hours since the customer's last message{since}; \
         outside the customer-service window only a template message can be sent. \
         Digishare answered {status}: {body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digishare_times_parse() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_time("2026-03-14T09:12:55.000000Z"),
            Some(1_773_479_575_000)
        );
        assert_eq!(
            parse_time("2026-03-14T10:12:55.250+01:00"),
            Some(1_773_479_575_250)
        );
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-03-14T09:12",
            "2026-03-14T09:12:55+1",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_customer_wrote_when_plausible_else_when_received() {
        let received = parse_time("2026-12-02T10:00:00Z").unwrap();
        let hours = |h: i64| received - h * 3_600_000;
        // Delivered late (Digishare retried for a day): the payload's time.
        assert_eq!(customer_wrote_at(Some(hours(25)), received), hours(25));
        assert_eq!(customer_wrote_at(Some(hours(72)), received), hours(72));
        // Months old (a fixture, a replay) or ahead of the clock: received.
        assert_eq!(customer_wrote_at(Some(hours(73)), received), received);
        assert_eq!(customer_wrote_at(Some(hours(6300)), received), received);
        assert_eq!(
            customer_wrote_at(Some(received + 60_000), received),
            received
        );
        assert_eq!(customer_wrote_at(None, received), received);
    }

    #[test]
    fn window_refusals_are_recognised() {
        assert!(is_window_refusal(
            r#"{"error":{"code":131047,"message":"Re-engagement message"}}"#
        ));
        assert!(is_window_refusal(
            "Message failed to send because more than 24 hours have passed since the customer last replied"
        ));
        assert!(!is_window_refusal(
            r#"{"message":"The given data was invalid."}"#
        ));
        assert!(is_whatsapp(Some("WhatsApp")));
        assert!(!is_whatsapp(Some("messenger")));
        assert!(!is_whatsapp(None));
    }

    #[test]
    fn release_command_matches_trimmed_any_case() {
        let rules = Rules {
            release_command: "/bot".into(),
            idle_release: None,
            echo_wait: Duration::from_secs(1),
        };
        assert!(rules.is_release(" /BOT\n"));
        assert!(!rules.is_release("/bot please"));
    }
}
