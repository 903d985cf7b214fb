//! A conversation's history as a plugin reads it (`conversation.history`):
//! the customer's and agents' messages (from the inbox) and the bot's own
//! (from the outbox), merged oldest first and bounded.

use crate::event::{Content, Message, SenderKind};
use serde::Serialize;

/// The most entries one `history` call returns.
pub const HISTORY_MAX: usize = 50;

/// Who wrote a history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Author {
    Customer,
    Agent,
    /// digibot, for one of its plugins.
    Bot,
    System,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    pub author: Author,
    /// `text`, `location`, `button_reply`, `media`, ... (Digishare's kinds
    /// for received messages; the action's type for the bot's).
    pub kind: String,
    /// The text, when it has one (a text, a choice's title, a caption).
    pub text: Option<String>,
    /// When digibot received or queued it (ms since the epoch).
    pub at: i64,
}

impl HistoryEntry {
    /// A received message, as history.
    pub fn from_message(m: &Message, received_at: i64) -> HistoryEntry {
        let author = match m.sender.kind {
            SenderKind::Customer => Author::Customer,
            SenderKind::Agent => Author::Agent,
            SenderKind::System | SenderKind::Other => Author::System,
        };
        let (kind, text) = match &m.content {
            Content::Text { text } => ("text".to_string(), Some(text.clone())),
            Content::Location(l) => ("location".to_string(), l.name.clone()),
            Content::ButtonReply(c) => ("button_reply".to_string(), Some(c.title.clone())),
            Content::ListReply(c) => ("list_reply".to_string(), Some(c.title.clone())),
            Content::Media(_) => ("media".to_string(), None),
            Content::Sticker => ("sticker".to_string(), None),
            Content::Contacts { .. } => ("contacts".to_string(), None),
            Content::Unsupported { .. } => ("unsupported".to_string(), None),
            Content::Unknown { type_name, .. } => (type_name.clone(), None),
        };
        HistoryEntry {
            author,
            kind,
            text,
            at: received_at,
        }
    }

    /// A request digibot queued for the conversation (a Messages API body),
    /// as history; `None` for what is not a message (a hand-off).
    pub fn from_request(body: &serde_json::Value, queued_at: i64) -> Option<HistoryEntry> {
        let mut kind = body.get("type")?.as_str()?.to_string();
        if body.get("send_to_third") == Some(&serde_json::Value::Bool(false)) {
            // An internal note: agents see it, the customer does not.
            kind = "note".to_string();
        }
        let text = body
            .get("body")
            .and_then(|b| b.as_str())
            .map(str::to_string);
        Some(HistoryEntry {
            author: Author::Bot,
            kind,
            text,
            at: queued_at,
        })
    }
}

/// The last `limit` (at most [`HISTORY_MAX`]) of `entries`, oldest first;
/// ties keep the order given (received before sent).
pub fn last(mut entries: Vec<HistoryEntry>, limit: usize) -> Vec<HistoryEntry> {
    entries.sort_by_key(|e| e.at);
    let limit = limit.min(HISTORY_MAX);
    let skip = entries.len().saturating_sub(limit);
    entries.split_off(skip)
}

/// The history of a conversation from what the store read: its received
/// messages (`(message, received_at, seq)`), the message ids digibot's own
/// sends got (their echoes are left out, as are messages sent through the
/// API), and its queued request bodies (`(body, queued_at, event_seq)`:
/// the seq of the event whose turn queued them). Ordered by inbox order,
/// each event's replies right after it.
pub fn assemble(
    received: Vec<(crate::event::Event, i64, i64)>,
    own_ids: &std::collections::HashSet<String>,
    requests: Vec<(serde_json::Value, i64, i64)>,
    limit: usize,
) -> Vec<HistoryEntry> {
    let mut entries = Vec::new();
    for (event, at, seq) in received {
        let crate::event::EventKind::Message(m) = &event.kind else {
            continue;
        };
        if m.sender.kind == SenderKind::Agent && (m.sent_through_api() || own_ids.contains(&m.id)) {
            continue;
        }
        entries.push(((seq, 0), HistoryEntry::from_message(m, at)));
    }
    for (n, (body, at, seq)) in requests.iter().enumerate() {
        if let Some(entry) = HistoryEntry::from_request(body, *at) {
            entries.push(((*seq, 1 + n as i64), entry));
        }
    }
    // Requests came newest first: within one event, keep their order.
    entries.sort_by_key(|((seq, n), _)| (*seq, if *n == 0 { 0 } else { i64::MAX - n }));
    let limit = limit.min(HISTORY_MAX);
    let skip = entries.len().saturating_sub(limit);
    entries.into_iter().skip(skip).map(|(_, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(author: Author, text: &str, at: i64) -> HistoryEntry {
        HistoryEntry {
            author,
            kind: "text".into(),
            text: Some(text.into()),
            at,
        }
    }

    #[test]
    fn history_is_the_last_entries_oldest_first_and_bounded() {
        let all = vec![
            entry(Author::Bot, "b", 2),
            entry(Author::Customer, "a", 1),
            entry(Author::Customer, "c", 3),
        ];
        let texts = |v: Vec<HistoryEntry>| v.into_iter().filter_map(|e| e.text).collect::<Vec<_>>();
        assert_eq!(texts(last(all.clone(), 2)), ["b", "c"]);
        assert_eq!(texts(last(all.clone(), 10)), ["a", "b", "c"]);
        let many = (0..100).map(|i| entry(Author::Customer, "x", i)).collect();
        assert_eq!(last(many, 1000).len(), HISTORY_MAX);
    }
}
