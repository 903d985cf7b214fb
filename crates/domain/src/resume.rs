//! Hand-back: when a human gives a conversation back to the bot (the
//! release command, an operator, idle release), the store records a
//! [`Resumed`] event in the release's own transaction, and the dispatcher
//! hands it to the plugins (`on-resume`) before the conversation's next
//! event, so a flow can pick up where it stopped.

use serde::{Deserialize, Serialize};

/// The name of the event a hand-back becomes.
pub const EVENT_NAME: &str = "digibot.resumed";

/// How the conversation came back to the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// An agent wrote the release command as an internal note.
    Command,
    /// An operator released it (admin API, CLI).
    Operator,
    /// No agent wrote for the configured idle time.
    Idle,
}

impl Cause {
    /// The cause of a release, from the reason it was recorded with (the
    /// dispatcher's and the operators' reasons start with these words).
    pub fn of_reason(reason: &str) -> Cause {
        if reason.starts_with("idle") {
            Cause::Idle
        } else if reason.starts_with("release command") {
            Cause::Command
        } else {
            Cause::Operator
        }
    }
}

/// A hand-back: the payload of its `digibot.resumed` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    pub conversation_id: String,
    pub cause: Cause,
    pub reason: String,
    /// When the human took it over and when it came back (ms).
    pub taken_at: i64,
    pub released_at: i64,
    /// Messages received in the conversation meanwhile (the customer's
    /// and the agents').
    pub messages: u32,
    /// Set when the event is handled, as for timers.
    #[serde(default)]
    pub outside_window: bool,
}

impl Resumed {
    /// The key of the hand-back that ends the human's turn which began at
    /// `taken_at`: one per takeover, so recording it twice is a duplicate.
    pub fn key(conversation_id: &str, taken_at: i64) -> String {
        format!("resume:{conversation_id}:{taken_at}")
    }

    /// How long the human had the conversation (ms).
    pub fn human_ms(&self) -> u64 {
        u64::try_from(self.released_at - self.taken_at).unwrap_or(0)
    }

    pub fn into_event(self) -> crate::event::Event {
        crate::event::Event {
            key: Resumed::key(&self.conversation_id, self.taken_at),
            name: EVENT_NAME.to_string(),
            kind: crate::event::EventKind::Resumed(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_back_is_an_event_of_its_conversation_keyed_by_its_takeover() {
        let resumed = Resumed {
            conversation_id: "conv_1".into(),
            cause: Cause::of_reason("release command from Ann (message m1)"),
            reason: "release command from Ann (message m1)".into(),
            taken_at: 1_000,
            released_at: 61_000,
            messages: 3,
            outside_window: false,
        };
        assert_eq!(resumed.cause, Cause::Command);
        assert_eq!(resumed.human_ms(), 60_000);
        let event = resumed.into_event();
        assert_eq!(event.key, "resume:conv_1:1000");
        assert_eq!(event.conversation_id(), Some("conv_1"));
        assert!(event.dispatched() && event.invokes_plugins());
        assert_eq!(
            Cause::of_reason("idle: no agent message for 60 s"),
            Cause::Idle
        );
        assert_eq!(Cause::of_reason("released by an operator"), Cause::Operator);
    }
}
