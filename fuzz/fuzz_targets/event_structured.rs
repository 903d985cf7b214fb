//! The webhook parser on real webhooks, edited: one of the fixtures, with
//! values set (scalars, arrays, objects) or removed at paths made of the
//! keys Digishare's webhooks use. It reaches deeper than raw bytes (the
//! JSON is always well formed), never panics, and what it accepts reads
//! back unchanged from the inbox's JSON.

#![no_main]

use arbitrary::Arbitrary;
use digibot_domain::event::Event;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const FIXTURES: &[&str] = &[
    include_str!("../../tests/fixtures/webhooks/conversation_archived.json"),
    include_str!("../../tests/fixtures/webhooks/message_agent.json"),
    include_str!("../../tests/fixtures/webhooks/message_button_reply.json"),
    include_str!("../../tests/fixtures/webhooks/message_contacts.json"),
    include_str!("../../tests/fixtures/webhooks/message_image.json"),
    include_str!("../../tests/fixtures/webhooks/message_list_reply.json"),
    include_str!("../../tests/fixtures/webhooks/message_location.json"),
    include_str!("../../tests/fixtures/webhooks/message_sticker.json"),
    include_str!("../../tests/fixtures/webhooks/message_text_customer.json"),
    include_str!("../../tests/fixtures/webhooks/message_text_minimal.json"),
    include_str!("../../tests/fixtures/webhooks/message_unknown_type.json"),
    include_str!("../../tests/fixtures/webhooks/message_unsupported.json"),
    include_str!("../../tests/fixtures/webhooks/new_conversation.json"),
    include_str!("../../tests/fixtures/webhooks/new_conversation_minimal.json"),
    include_str!("../../tests/fixtures/webhooks/other_event_ticket_created.json"),
];

/// The keys the fixtures use, so edits land where the parser looks.
const KEYS: &[&str] = &[
    "event",
    "event_id",
    "data",
    "id",
    "conversation_id",
    "created_at",
    "archived_at",
    "body",
    "type",
    "sender",
    "model_type",
    "model_id",
    "name",
    "third",
    "channel",
    "platform_id",
    "platform_link",
    "latitude",
    "longitude",
    "button_reply",
    "list_reply",
    "title",
    "description",
    "url",
    "mime_type",
    "file_name",
    "extension",
    "size",
    "voice",
    "is_voice",
    "errors",
    "code",
    "phones",
    "phone",
    "formatted_name",
    "system",
    "send_to_third",
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

impl Key {
    fn name(&self) -> String {
        match self {
            Key::Known(i) => KEYS[*i as usize % KEYS.len()].to_string(),
            Key::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Model(u8),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

impl Json {
    fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            // JSON has no NaN or infinity: those become null, as serde_json makes them.
            Json::Float(f) => Value::from(*f),
            Json::Str(s) => Value::String(s.clone()),
            // The values the parser switches on.
            Json::Model(i) => Value::String(
                [
                    "third",
                    "user",
                    "bot",
                    "text",
                    "location",
                    "interactive",
                    "image",
                    "sticker",
                    "contacts",
                    "unsupported",
                    "button_reply",
                    "list_reply",
                    "live_chat.new_message",
                    "live_chat.new_conversation",
                    "live_chat.conversation_archived",
                ][*i as usize % 15]
                    .to_string(),
            ),
            Json::Array(items) => Value::Array(items.iter().map(Json::value).collect()),
            Json::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.name(), v.value()))
                    .collect::<Map<_, _>>(),
            ),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Set(Vec<Key>, Json),
    Remove(Vec<Key>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    fixture: u8,
    edits: Vec<Edit>,
}

/// The object at `path` under `root`, made (replacing whatever was there)
/// when missing.
fn object_at<'a>(root: &'a mut Value, path: &[Key]) -> &'a mut Map<String, Value> {
    let mut at = root;
    for key in path {
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
        at = at
            .as_object_mut()
            .expect("just made an object")
            .entry(key.name())
            .or_insert(Value::Null);
    }
    if !at.is_object() {
        *at = Value::Object(Map::new());
    }
    at.as_object_mut().expect("just made an object")
}

fuzz_target!(|input: Input| {
    let mut value: Value = serde_json::from_str(FIXTURES[input.fixture as usize % FIXTURES.len()])
        .expect("the fixtures are JSON");
    let edited = !input.edits.is_empty();
    for edit in &input.edits {
        match edit {
            Edit::Set(path, json) => {
                if let Some((last, parents)) = path.split_last() {
                    object_at(&mut value, parents).insert(last.name(), json.value());
                } else {
                    value = json.value();
                }
            }
            Edit::Remove(path) => {
                if let Some((last, parents)) = path.split_last() {
                    object_at(&mut value, parents).remove(&last.name());
                }
            }
        }
    }
    // The same JSON as bytes, as the edge sees it.
    let bytes = serde_json::to_vec(&value).expect("a value serializes");
    let parsed = Event::parse(&bytes);
    if !edited {
        assert!(parsed.is_ok(), "a fixture no longer parses: {parsed:?}");
    }
    let Ok(event) = parsed else {
        return;
    };
    assert!(!event.key.is_empty());
    if let Some(conversation) = event.conversation_id() {
        assert!(!conversation.is_empty(), "an empty conversation id");
    }
    let stored = serde_json::to_string(&event).expect("an event serializes");
    let back: Event = serde_json::from_str(&stored).expect("a stored event reads back");
    assert_eq!(back, event, "the stored event reads back different");
});
