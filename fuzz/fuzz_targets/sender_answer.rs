//! What the sender makes of Digishare's answer: any status, any
//! `Retry-After` bytes, any body (`answer::classify`). Never a panic; a
//! retry only for 408, 429 and 5xx; a wait the sender can add to the clock
//! once capped.

#![no_main]

use arbitrary::Arbitrary;
use digibot_domain::answer::{Verdict, classify, parse_retry_after};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, SystemTime};

#[derive(Arbitrary, Debug)]
struct Answer<'a> {
    status: u16,
    retry_after: Option<&'a [u8]>,
    body: &'a str,
    sent_file: bool,
    /// Seconds since the epoch of the sender's clock.
    now: u32,
}

fuzz_target!(|answer: Answer| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(answer.now.into());
    let verdict = classify(
        answer.status,
        answer.retry_after,
        answer.body,
        answer.sent_file,
        now,
    );
    match &verdict {
        Verdict::Sent { message_id } => {
            assert!((200..=299).contains(&answer.status));
            assert!(message_id.as_ref().is_none_or(|id| !id.is_empty()));
        }
        Verdict::FileRefused => assert!(answer.sent_file && (200..=299).contains(&answer.status)),
        Verdict::Retry { retry_after } => {
            assert!(matches!(answer.status, 408 | 429 | 500..=599));
            if let Some(wait) = retry_after {
                // What the sender does with it: capped, then added to now.
                let capped = (*wait).min(Duration::from_secs(3600));
                let _ = now + capped;
            }
        }
        Verdict::WindowClosed | Verdict::Refused => {
            assert!(!(200..=299).contains(&answer.status));
            assert!(!matches!(answer.status, 408 | 429 | 500..=599));
        }
    }
    if let Some(text) = answer.retry_after.and_then(|v| std::str::from_utf8(v).ok()) {
        let _ = parse_retry_after(text, now);
    }
});
