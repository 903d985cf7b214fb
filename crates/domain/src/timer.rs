//! Durable timers: what a plugin schedules in a turn ([`TimerOp`], committed
//! with the turn's event, so a failed turn schedules nothing), what the
//! store keeps ([`TimerRecord`]), and the event a due timer becomes
//! ([`TimerFired`], handled in its conversation's lane like any other
//! event). The bounds a plugin is held to are here too.

use serde::{Deserialize, Serialize};

/// The longest a timer name may be, in bytes.
pub const NAME_MAX: usize = 64;
/// The largest payload, in bytes.
pub const PAYLOAD_MAX: usize = 4 << 10;
/// The longest delay: 30 days.
pub const AFTER_MAX_MS: u64 = 30 * 24 * 3_600_000;
/// Timers one plugin may have pending in one conversation.
pub const PENDING_MAX: usize = 16;
/// Schedules and cancels one turn may make.
pub const OPS_MAX: usize = 32;
/// The name of the event a due timer becomes.
pub const EVENT_NAME: &str = "digibot.timer";

/// A change a turn makes to its plugin's timers in its conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerOp {
    /// Schedules a timer; one of the same name is replaced (the host
    /// refuses a schedule that would not replace when asked not to).
    Schedule {
        id: String,
        name: String,
        /// When it comes due (ms since the epoch).
        due_at: i64,
        payload: String,
        /// Dropped when the customer writes before it is due.
        cancel_on_customer_message: bool,
    },
    /// Cancels the pending timer of that name, if any.
    Cancel { name: String },
}

/// A turn's timer changes, for one plugin and conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerChanges {
    pub plugin: String,
    pub conversation_id: String,
    pub ops: Vec<TimerOp>,
}

/// A pending timer, as stored (admin views, `digibot conversations show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerRecord {
    pub id: String,
    pub plugin: String,
    pub conversation_id: String,
    pub name: String,
    pub payload: String,
    pub scheduled_at: i64,
    pub due_at: i64,
    pub cancel_on_customer_message: bool,
}

/// A timer that came due: the payload of its `digibot.timer` event, which
/// only the plugin that scheduled it receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFired {
    pub id: String,
    pub plugin: String,
    pub conversation_id: String,
    pub name: String,
    pub payload: String,
    pub scheduled_at: i64,
    pub due_at: i64,
    /// Set when the event is handled: the conversation is on WhatsApp and
    /// the customer last wrote over 24 hours ago, so a free-form message
    /// would be refused (the plugin can write a note instead).
    #[serde(default)]
    pub outside_window: bool,
}

impl TimerFired {
    /// The event a due timer becomes; its key (`timer:ID`) makes turning
    /// the same timer into an event twice a duplicate.
    pub fn into_event(self) -> crate::event::Event {
        crate::event::Event {
            key: format!("timer:{}", self.id),
            name: EVENT_NAME.to_string(),
            kind: crate::event::EventKind::Timer(self),
        }
    }
}

/// Why a schedule was refused, as the plugin is told.
pub fn check_schedule(name: &str, after_ms: u64, payload: &str) -> Result<(), String> {
    check_sizes(name.len(), payload.len())?;
    if after_ms > AFTER_MAX_MS {
        return Err(format!(
            "limit: a timer is due at most {AFTER_MAX_MS} ms ahead (asked {after_ms})"
        ));
    }
    Ok(())
}

/// The size bounds of [`check_schedule`] alone: what the host judges from
/// the lengths of a plugin's strings, before copying them out of its memory.
pub fn check_sizes(name_len: usize, payload_len: usize) -> Result<(), String> {
    if name_len == 0 || name_len > NAME_MAX {
        return Err(format!(
            "limit: a timer name is 1 to {NAME_MAX} bytes (this one is {name_len})"
        ));
    }
    if payload_len > PAYLOAD_MAX {
        return Err(format!(
            "limit: a timer payload is at most {PAYLOAD_MAX} bytes (this one is {payload_len})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_past_a_bound_are_refused() {
        assert!(check_schedule("follow-up", 1000, "{}").is_ok());
        assert!(check_schedule("", 1, "").unwrap_err().starts_with("limit:"));
        assert!(check_schedule(&"n".repeat(NAME_MAX + 1), 1, "").is_err());
        assert!(check_schedule("a", AFTER_MAX_MS + 1, "").is_err());
        assert!(check_schedule("a", 1, &"p".repeat(PAYLOAD_MAX + 1)).is_err());
    }

    #[test]
    fn a_fired_timer_is_an_event_of_its_conversation_keyed_by_its_id() {
        let fired = TimerFired {
            id: "t1".into(),
            plugin: "reminder".into(),
            conversation_id: "conv_1".into(),
            name: "follow-up".into(),
            payload: String::new(),
            scheduled_at: 1,
            due_at: 2,
            outside_window: false,
        };
        let event = fired.into_event();
        assert_eq!(event.key, "timer:t1");
        assert_eq!(event.conversation_id(), Some("conv_1"));
        assert!(event.dispatched() && event.invokes_plugins());
    }
}
