//! Turning a plugin's [`Action`] into the exact Messages API request it
//! becomes: the one place that knows Digishare's request shapes. Limits are
//! checked by [`Action::validate`] (shared with the guest SDK) before any
//! request is built, and so is what a plugin may say in the conversation's
//! state (an assist plugin, while a human is in charge, only notes).

use digibot_protocol::{Action, LimitError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// One HTTP request to Digishare, ready for the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiRequest {
    pub method: String,
    /// Path under the API base, e.g. `/v1/messages`.
    pub path: String,
    pub body: Value,
}

/// An action a plugin returned that digibot will not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin}: {kind} action #{index} refused: {reason}")]
pub struct Rejected {
    pub plugin: String,
    pub index: usize,
    pub kind: &'static str,
    pub reason: Refusal,
}

/// Why an action is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It breaks one of Digishare's limits.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// It would reach the customer while a human agent is in charge.
    #[error(
        "a human agent is in charge of this conversation: an assist plugin may only write internal notes"
    )]
    HumanInCharge,
}

/// What a plugin may send in the conversation it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Anything (the bot is in charge).
    Everything,
    /// Internal notes only (an assist plugin while a human is in charge).
    NotesOnly,
}

/// Validates `action` and builds its request for `conversation_id` (which
/// comes from the event, never from the plugin).
pub fn to_request(
    plugin: &str,
    index: usize,
    conversation_id: &str,
    action: &Action,
) -> Result<ApiRequest, Rejected> {
    to_request_in(plugin, index, conversation_id, action, Scope::Everything)
}

/// [`to_request`], refusing what `scope` does not allow.
pub fn to_request_in(
    plugin: &str,
    index: usize,
    conversation_id: &str,
    action: &Action,
    scope: Scope,
) -> Result<ApiRequest, Rejected> {
    let rejected = |reason: Refusal| Rejected {
        plugin: plugin.to_string(),
        index,
        kind: action.kind(),
        reason,
    };
    if scope == Scope::NotesOnly && !matches!(action, Action::Note { .. }) {
        return Err(rejected(Refusal::HumanInCharge));
    }
    action.validate().map_err(|e| rejected(e.into()))?;
    Ok(build(conversation_id, action))
}

/// Whether a queued request is a hand-off (attaching an agent): once
/// delivered, a human is in charge of the conversation.
pub fn is_hand_off(method: &str, path: &str) -> bool {
    method == "PUT"
        && path.starts_with("/v1/conversations/")
        && path.ends_with("/attach/participants")
}

fn message(
    conversation_id: &str,
    kind: Option<&str>,
    to_customer: bool,
    extra: Value,
) -> ApiRequest {
    let mut body = Map::new();
    body.insert("conversation_id".into(), json!(conversation_id));
    if let Some(kind) = kind {
        body.insert("type".into(), json!(kind));
    }
    body.insert("send_to_third".into(), json!(to_customer));
    if let Value::Object(extra) = extra {
        body.extend(extra);
    }
    ApiRequest {
        method: "POST".into(),
        path: "/v1/messages".into(),
        body: Value::Object(body),
    }
}

/// Inserts `key: value` only when the value is present.
fn put(map: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        map.insert(key.into(), json!(v));
    }
}

fn interactive(header: Option<&str>, mut body: Map<String, Value>) -> Value {
    if let Some(h) = header {
        body.insert("header".into(), json!({"type": "text", "text": h}));
    }
    Value::Object(body)
}

fn build(conversation_id: &str, action: &Action) -> ApiRequest {
    match action {
        Action::Text { body, reply_to } => {
            let mut extra = Map::new();
            extra.insert("body".into(), json!(body));
            put(&mut extra, "reply_to", reply_to.as_deref());
            message(conversation_id, Some("text"), true, Value::Object(extra))
        }
        Action::Note { body } => {
            message(conversation_id, Some("text"), false, json!({"body": body}))
        }
        Action::Buttons(b) => {
            let buttons: Vec<Value> = b
                .buttons
                .iter()
                .map(|b| json!({"type": "reply", "reply": {"id": b.id, "title": b.title}}))
                .collect();
            let mut body = Map::new();
            body.insert("type".into(), json!("button"));
            body.insert("body".into(), json!({"text": b.body}));
            body.insert("action".into(), json!({"buttons": buttons}));
            let body = interactive(b.header.as_deref(), body);
            message(
                conversation_id,
                Some("interactive"),
                true,
                json!({"body": body}),
            )
        }
        Action::List(l) => {
            let sections: Vec<Value> = l
                .sections
                .iter()
                .map(|s| {
                    let rows: Vec<Value> = s
                        .rows
                        .iter()
                        .map(|r| {
                            let mut row = Map::new();
                            row.insert("id".into(), json!(r.id));
                            row.insert("title".into(), json!(r.title));
                            put(&mut row, "description", r.description.as_deref());
                            Value::Object(row)
                        })
                        .collect();
                    let mut section = Map::new();
                    put(
                        &mut section,
                        "title",
                        Some(s.title.as_str()).filter(|t| !t.is_empty()),
                    );
                    section.insert("rows".into(), Value::Array(rows));
                    Value::Object(section)
                })
                .collect();
            let mut body = Map::new();
            body.insert("type".into(), json!("list"));
            body.insert("body".into(), json!({"text": l.body}));
            body.insert(
                "action".into(),
                json!({"button": l.button, "sections": sections}),
            );
            let body = interactive(l.header.as_deref(), body);
            message(
                conversation_id,
                Some("interactive"),
                true,
                json!({"body": body}),
            )
        }
        Action::Location(loc) => {
            let mut body = Map::new();
            body.insert("latitude".into(), json!(loc.latitude));
            body.insert("longitude".into(), json!(loc.longitude));
            put(&mut body, "name", loc.name.as_deref());
            put(&mut body, "address", loc.address.as_deref());
            message(
                conversation_id,
                Some("location"),
                true,
                json!({"body": body}),
            )
        }
        Action::LocationRequest { body } => message(
            conversation_id,
            Some("interactive"),
            true,
            json!({"body": {
                "type": "location_request_message",
                "body": {"text": body},
                "action": {"name": "send_location"},
            }}),
        ),
        Action::File(f) => {
            let mut file = Map::new();
            file.insert("url".into(), json!(f.url.trim()));
            put(&mut file, "file_name", f.file_name.as_deref());
            put(&mut file, "extension", f.extension.as_deref());
            if f.voice {
                file.insert("voice".into(), json!(true));
            }
            message(conversation_id, None, true, json!({"file": file}))
        }
        Action::HandOff {
            user_id,
            as_handler,
        } => {
            let mut body = Map::new();
            body.insert("users".into(), json!([user_id]));
            body.insert("bots".into(), json!([]));
            if *as_handler {
                body.insert("handler_id".into(), json!(user_id));
            }
            ApiRequest {
                method: "PUT".into(),
                path: format!(
                    "/v1/conversations/{}/attach/participants",
                    path_segment(conversation_id)
                ),
                body: Value::Object(body),
            }
        }
    }
}

/// Percent-encodes everything but unreserved characters, so an id can never
/// add a path segment or a query. `.` and `..` are unreserved characters
/// but dot segments, which URL normalisation (in reqwest, in proxies)
/// resolves to another route: as a whole segment, their dots are encoded.
pub fn path_segment(s: &str) -> String {
    if s == "." || s == ".." {
        return s.replace('.', "%2E");
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(action: Action) -> ApiRequest {
        to_request("p", 0, "conv_1", &action).unwrap()
    }

    #[test]
    fn text_and_note() {
        assert_eq!(
            req(Action::text("Hello").unwrap()).body,
            json!({"conversation_id": "conv_1", "type": "text", "send_to_third": true, "body": "Hello"})
        );
        assert_eq!(
            req(Action::text_reply_to("Hi", "msg_1").unwrap()).body,
            json!({"conversation_id": "conv_1", "type": "text", "send_to_third": true, "body": "Hi", "reply_to": "msg_1"})
        );
        assert_eq!(
            req(Action::note("VIP").unwrap()).body,
            json!({"conversation_id": "conv_1", "type": "text", "send_to_third": false, "body": "VIP"})
        );
    }

    #[test]
    fn buttons_and_lists() {
        let buttons = Action::buttons("Pick")
            .header("H")
            .button("a", "A")
            .build()
            .unwrap();
        assert_eq!(
            req(buttons).body,
            json!({"conversation_id": "conv_1", "type": "interactive", "send_to_third": true, "body": {
                "type": "button", "header": {"type": "text", "text": "H"}, "body": {"text": "Pick"},
                "action": {"buttons": [{"type": "reply", "reply": {"id": "a", "title": "A"}}]}}})
        );
        let list = Action::list("Menu", "Open")
            .row_with_description("r1", "One", "first")
            .build()
            .unwrap();
        assert_eq!(
            req(list).body["body"],
            json!({"type": "list", "body": {"text": "Menu"}, "action": {"button": "Open", "sections": [
                {"rows": [{"id": "r1", "title": "One", "description": "first"}]}]}})
        );
    }

    #[test]
    fn location_file_and_request() {
        assert_eq!(
            req(Action::place(1.0, 2.0, "N", "A").unwrap()).body,
            json!({"conversation_id": "conv_1", "type": "location", "send_to_third": true,
                   "body": {"latitude": 1.0, "longitude": 2.0, "name": "N", "address": "A"}})
        );
        assert_eq!(
            req(Action::file("https://x/y.pdf").unwrap()).body,
            json!({"conversation_id": "conv_1", "send_to_third": true, "file": {"url": "https://x/y.pdf"}})
        );
        assert_eq!(
            req(Action::location_request("Where?").unwrap()).body["body"],
            json!({"type": "location_request_message", "body": {"text": "Where?"}, "action": {"name": "send_location"}})
        );
    }

    #[test]
    fn hand_off_uses_put_on_the_event_conversation() {
        let r = to_request(
            "p",
            0,
            "conv/../x",
            &Action::hand_off("usr_17", true).unwrap(),
        )
        .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(
            r.path,
            "/v1/conversations/conv%2F..%2Fx/attach/participants"
        );
        assert_eq!(
            r.body,
            json!({"users": ["usr_17"], "bots": [], "handler_id": "usr_17"})
        );
    }

    /// Found by the `action_request` fuzz target: a conversation id `.`
    /// became `/v1/conversations/./attach/participants`, which a client
    /// normalises to `/v1/conversations/attach/participants`.
    #[test]
    fn dot_conversation_ids_cannot_become_dot_segments() {
        let hand_off = Action::hand_off("usr_17", false).unwrap();
        for (id, path) in [
            (".", "/v1/conversations/%2E/attach/participants"),
            ("..", "/v1/conversations/%2E%2E/attach/participants"),
            ("...", "/v1/conversations/.../attach/participants"),
            ("conv.1", "/v1/conversations/conv.1/attach/participants"),
        ] {
            assert_eq!(to_request("p", 0, id, &hand_off).unwrap().path, path);
        }
    }

    #[test]
    fn notes_only_refuses_everything_else_with_a_clear_reason() {
        let note = to_request_in(
            "suggest",
            0,
            "c",
            &Action::note("Try X").unwrap(),
            Scope::NotesOnly,
        );
        assert_eq!(note.unwrap().body["send_to_third"], json!(false));
        let text = Action::text("Hi").unwrap();
        let err = to_request_in("suggest", 1, "c", &text, Scope::NotesOnly).unwrap_err();
        assert_eq!(err.reason, Refusal::HumanInCharge);
        assert_eq!(
            err.to_string(),
            "plugin suggest: text action #1 refused: a human agent is in charge of this conversation: an assist plugin may only write internal notes"
        );
        let hand_off = Action::hand_off("usr_1", false).unwrap();
        assert!(to_request_in("suggest", 2, "c", &hand_off, Scope::NotesOnly).is_err());
        let r = to_request("p", 0, "c", &hand_off).unwrap();
        assert!(is_hand_off(&r.method, &r.path));
        let r = to_request("p", 0, "c", &text).unwrap();
        assert!(!is_hand_off(&r.method, &r.path));
    }

    #[test]
    fn rejection_names_plugin_and_limit() {
        let bad = Action::Text {
            body: "x".repeat(5000),
            reply_to: None,
        };
        let err = to_request("concierge", 2, "c", &bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin concierge: text action #2 refused: text is 5000 characters, the limit is 4096"
        );
    }
}
