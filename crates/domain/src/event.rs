//! Typed Digishare events: the webhook body is parsed here, once, and nothing
//! past this module sees raw webhook JSON.
//!
//! Parsing is lenient where Digishare is (missing `type` means text, unknown
//! message types become [`Content::Unknown`], unknown events become
//! [`EventKind::Other`]) and strict only about the envelope itself.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a body is not a Digishare webhook.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a webhook envelope: {0}")]
    Envelope(&'static str),
    /// An id that could not be used safely as a dedup key, a header or a
    /// path segment (see [`valid_id`]).
    #[error(
        "{0} is not a valid id: ids are 1 to {MAX_ID_LEN} printable ASCII characters, no spaces, not \".\" or \"..\""
    )]
    BadId(&'static str),
}

/// The longest id accepted (`event_id`, message and conversation ids).
pub const MAX_ID_LEN: usize = 256;

/// Whether `id` can be used as a dedup key, inside an `Idempotency-Key`
/// header and as a URL path segment: 1 to [`MAX_ID_LEN`] printable ASCII
/// characters (no space, no control character such as CR or LF), and not
/// `.` or `..` (which a path would read as "here" or "up").
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_graphic())
        && id != "."
        && id != ".."
}

/// One delivered webhook, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Dedup key: `event_id` when Digishare sent one, else derived.
    pub key: String,
    /// The event name as sent, e.g. `live_chat.new_message`.
    pub name: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    NewConversation(Conversation),
    Message(Message),
    ConversationArchived {
        conversation_id: String,
        archived_at: String,
    },
    /// A timer a plugin scheduled came due (`digibot.timer`): made by
    /// digibot, not Digishare, and handled in its conversation's lane.
    Timer(crate::timer::TimerFired),
    /// A human handed the conversation back to the bot
    /// (`digibot.resumed`): made by the store with the release.
    Resumed(crate::resume::Resumed),
    /// An event digibot does not handle (e.g. `ticket.created`); recorded,
    /// acknowledged, never dispatched.
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub channel: Option<String>,
    pub platform_id: Option<String>,
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderKind {
    Customer,
    Agent,
    System,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sender {
    pub kind: SenderKind,
    pub name: Option<String>,
    pub id: Option<String>,
    /// Digishare's `model_id`: for a customer, the third's id (the one
    /// `live_chat.new_conversation` names), which `id` is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub conversation_id: String,
    pub sender: Sender,
    pub created_at: Option<String>,
    pub content: Content,
    /// `send_to_third` as sent, when present: for an agent's message,
    /// `false` is an internal note only agents see.
    #[serde(default)]
    pub to_customer: Option<bool>,
    /// `sent_using` as sent, when present: the channel (`whatsapp`, ...)
    /// or, for messages created through the Messages API, the API.
    #[serde(default)]
    pub sent_using: Option<String>,
}

impl Message {
    /// The text of a text message.
    pub fn text(&self) -> Option<&str> {
        match &self.content {
            Content::Text { text } => Some(text),
            _ => None,
        }
    }

    /// An internal note: `send_to_third` explicitly `false`. (Only
    /// meaningful for agents: customer texts carry `false` too.)
    pub fn is_internal_note(&self) -> bool {
        self.to_customer == Some(false)
    }

    /// `sent_using` says the message was created through the API (e.g.
    /// `api`, `public_api`), i.e. not typed by a person in Digishare.
    pub fn sent_through_api(&self) -> bool {
        self.sent_using.as_deref().is_some_and(|s| {
            s.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|word| word.eq_ignore_ascii_case("api"))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Location {
    pub latitude: f64,
    pub longitude: f64,
    pub name: Option<String>,
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    Image,
    Webp,
    Video,
    Audio,
    Pdf,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Media {
    pub kind: MediaKind,
    pub file_name: Option<String>,
    pub mime_type: Option<String>,
    pub size: Option<u64>,
    pub storage_path: Option<String>,
    pub is_voice: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub name: String,
    pub phones: Vec<Phone>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phone {
    pub number: String,
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    Text { text: String },
    Location(Location),
    ButtonReply(Choice),
    ListReply(Choice),
    Media(Media),
    Sticker,
    Contacts { contacts: Vec<Contact> },
    Unsupported { errors: Vec<String> },
    Unknown { type_name: String, raw_json: String },
}

/// Who is in charge of a conversation (bot, human, closed): defined once,
/// in `digibot_protocol`, because plugins built with the SDK name it too.
pub use digibot_protocol::ConversationState;

impl Event {
    /// The customer's Digishare id (the third's), when this event says it:
    /// a new conversation's third, a customer message's sender. Neither an
    /// agent's message nor a timer names one (their conversation's record
    /// keeps the last one an event said).
    pub fn customer_id(&self) -> Option<&str> {
        let id = match &self.kind {
            EventKind::NewConversation(c) => Some(c.customer_id.as_str()),
            EventKind::Message(m) if m.sender.kind == SenderKind::Customer => {
                m.sender.model_id.as_deref()
            }
            _ => None,
        };
        id.filter(|id| !id.is_empty())
    }

    /// Parses a webhook body. Fails only on bad JSON or a bad envelope;
    /// anything inside that digibot does not model is kept as unknown.
    pub fn parse(body: &[u8]) -> Result<Event, ParseError> {
        let value: Value = serde_json::from_slice(body)?;
        Event::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Event, ParseError> {
        let Value::Object(mut envelope) = value else {
            return Err(ParseError::Envelope("the body must be a JSON object"));
        };
        let name = match envelope.get("event") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => return Err(ParseError::Envelope("missing string field \"event\"")),
        };
        let Some(Value::Object(data)) = envelope.remove("data") else {
            return Err(ParseError::Envelope("missing object field \"data\""));
        };
        let event_id = envelope
            .get("event_id")
            .and_then(scalar)
            .filter(|id| !id.is_empty());
        if event_id.as_deref().is_some_and(|id| !valid_id(id)) {
            return Err(ParseError::BadId("event_id"));
        }

        let (kind, derived_key) = match name.as_str() {
            "live_chat.new_conversation" => {
                let conversation = conversation(&data)?;
                let key = format!("{name}:{}", conversation.id);
                (EventKind::NewConversation(conversation), key)
            }
            "live_chat.new_message" => {
                let message = message(&data)?;
                let key = format!("{name}:{}", message.id);
                (EventKind::Message(message), key)
            }
            "live_chat.conversation_archived" => {
                let conversation_id = required(&data, "conversation_id")?;
                let archived_at = data.get("archived_at").and_then(scalar).unwrap_or_default();
                // Part of the dedup key, so held to the same rule.
                if !archived_at.is_empty() && !valid_id(&archived_at) {
                    return Err(ParseError::BadId("archived_at"));
                }
                let key = format!("{name}:{conversation_id}:{archived_at}");
                (
                    EventKind::ConversationArchived {
                        conversation_id,
                        archived_at,
                    },
                    key,
                )
            }
            _ => {
                // Unknown events are kept, so an id is nice but not required;
                // without one, the body itself identifies the delivery.
                let key = match data.get("id").and_then(scalar) {
                    Some(id) => format!("{name}:{id}"),
                    None => format!("{name}:{}", Value::Object(data.clone())),
                };
                (EventKind::Other, key)
            }
        };
        Ok(Event {
            key: event_id.unwrap_or(derived_key),
            name,
            kind,
        })
    }

    /// The conversation the event belongs to, if any.
    pub fn conversation_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::NewConversation(c) => Some(&c.id),
            EventKind::Message(m) => Some(&m.conversation_id),
            EventKind::ConversationArchived {
                conversation_id, ..
            } => Some(conversation_id),
            EventKind::Timer(t) => Some(&t.conversation_id),
            EventKind::Resumed(r) => Some(&r.conversation_id),
            EventKind::Other => None,
        }
    }

    /// Whether plugins are invoked for this event: new conversations and
    /// customer messages. Agent and system messages are recorded only, so a
    /// bot never answers an agent or its own echo.
    pub fn invokes_plugins(&self) -> bool {
        match &self.kind {
            EventKind::NewConversation(_) | EventKind::Timer(_) | EventKind::Resumed(_) => true,
            EventKind::Message(m) => m.sender.kind == SenderKind::Customer,
            _ => false,
        }
    }

    /// Whether the dispatcher handles the event in its conversation's lane:
    /// the events that invoke plugins, and those that change who is in
    /// charge (agent messages, archiving), so that a conversation's state
    /// changes in the order its events are handled. Everything else is
    /// only recorded.
    pub fn dispatched(&self) -> bool {
        match &self.kind {
            EventKind::NewConversation(_)
            | EventKind::ConversationArchived { .. }
            | EventKind::Timer(_)
            | EventKind::Resumed(_) => true,
            EventKind::Message(m) => {
                matches!(m.sender.kind, SenderKind::Customer | SenderKind::Agent)
            }
            EventKind::Other => false,
        }
    }

    /// Ordering hint inside a conversation: Digishare's `created_at`.
    pub fn created_at(&self) -> Option<&str> {
        match &self.kind {
            EventKind::NewConversation(c) => c.created_at.as_deref(),
            EventKind::Message(m) => m.created_at.as_deref(),
            _ => None,
        }
    }
}

/// A string or number as a string (Digishare ids are strings in the docs but
/// numbers in some stored-file payloads).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn text(obj: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(scalar)
}

/// A required id: present, and a [`valid_id`] (it becomes part of the
/// dedup key, and a conversation id part of request paths).
fn required(obj: &serde_json::Map<String, Value>, key: &'static str) -> Result<String, ParseError> {
    let id = text(obj, key)
        .filter(|s| !s.is_empty())
        .ok_or(ParseError::Envelope(match key {
            "id" => "missing data.id",
            "conversation_id" => "missing conversation_id",
            _ => "missing a required id",
        }))?;
    if !valid_id(&id) {
        return Err(ParseError::BadId(match key {
            "id" => "data.id",
            "conversation_id" => "conversation_id",
            _ => "an id",
        }));
    }
    Ok(id)
}

fn object<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Option<&'a serde_json::Map<String, Value>> {
    obj.get(key).and_then(Value::as_object)
}

fn conversation(data: &serde_json::Map<String, Value>) -> Result<Conversation, ParseError> {
    let id = required(data, "id")?;
    let empty = serde_json::Map::new();
    let inner = object(data, "data").unwrap_or(&empty);
    let third = object(inner, "third").unwrap_or(&empty);
    let link = object(third, "platform_link");
    Ok(Conversation {
        id,
        customer_id: text(third, "id").unwrap_or_default(),
        customer_name: text(third, "name"),
        channel: link.and_then(|l| text(l, "channel")),
        platform_id: link.and_then(|l| text(l, "platform_id")),
        created_at: text(inner, "created_at"),
    })
}

fn message(data: &serde_json::Map<String, Value>) -> Result<Message, ParseError> {
    let id = required(data, "id")?;
    let Some(inner) = object(data, "data") else {
        return Err(ParseError::Envelope("missing object data.data"));
    };
    let conversation_id = required(inner, "conversation_id")?;
    let system = inner
        .get("system")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let sender = object(inner, "sender");
    let kind = match sender
        .and_then(|s| s.get("model_type"))
        .and_then(Value::as_str)
    {
        _ if system => SenderKind::System,
        Some("third") => SenderKind::Customer,
        Some("user") => SenderKind::Agent,
        _ => SenderKind::Other,
    };
    let type_name = inner
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("text")
        .to_string();
    let body = inner.get("body").unwrap_or(&Value::Null);
    Ok(Message {
        id,
        conversation_id,
        sender: Sender {
            kind,
            name: sender.and_then(|s| text(s, "name")),
            id: sender.and_then(|s| text(s, "id")),
            model_id: sender.and_then(|s| text(s, "model_id")),
        },
        created_at: text(inner, "created_at"),
        content: content(&type_name, body),
        to_customer: inner.get("send_to_third").and_then(Value::as_bool),
        sent_using: text(inner, "sent_using").filter(|s| !s.is_empty()),
    })
}

fn content(type_name: &str, body: &Value) -> Content {
    let unknown = || Content::Unknown {
        type_name: type_name.to_string(),
        raw_json: body.to_string(),
    };
    match type_name {
        "text" => match body {
            Value::String(text) => Content::Text { text: text.clone() },
            _ => unknown(),
        },
        "location" => {
            let Some(obj) = body.as_object() else {
                return unknown();
            };
            // A coordinate outside the globe is not a location: the body
            // stays as sent, as unknown content, rather than a typed
            // location no map (and no Messages API) would accept.
            let coord = |k: &str| {
                obj.get(k)
                    .and_then(|v| v.as_f64().or_else(|| v.as_str()?.trim().parse().ok()))
            };
            match (coord("latitude"), coord("longitude")) {
                (Some(latitude), Some(longitude))
                    if digibot_protocol::limits::on_the_globe(latitude, longitude) =>
                {
                    Content::Location(Location {
                        latitude,
                        longitude,
                        name: text(obj, "name"),
                        address: text(obj, "address"),
                    })
                }
                _ => unknown(),
            }
        }
        "interactive" => {
            let Some(obj) = body.as_object() else {
                return unknown();
            };
            let choice = |key: &str| {
                let c = object(obj, key)?;
                Some(Choice {
                    id: text(c, "id")?,
                    title: text(c, "title").unwrap_or_default(),
                    description: text(c, "description"),
                })
            };
            match obj.get("type").and_then(Value::as_str) {
                Some("button_reply") => choice("button_reply").map(Content::ButtonReply),
                Some("list_reply") => choice("list_reply").map(Content::ListReply),
                _ => None,
            }
            .unwrap_or_else(unknown)
        }
        "image" | "webp" | "video" | "audio" | "pdf" | "other" => {
            let empty = serde_json::Map::new();
            let obj = body.as_object().unwrap_or(&empty);
            let kind = match type_name {
                "image" => MediaKind::Image,
                "webp" => MediaKind::Webp,
                "video" => MediaKind::Video,
                "audio" => MediaKind::Audio,
                "pdf" => MediaKind::Pdf,
                _ => MediaKind::Other,
            };
            let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
            Content::Media(Media {
                kind,
                file_name: text(obj, "file_name"),
                mime_type: text(obj, "mime_type"),
                size: obj
                    .get("size")
                    .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok())),
                storage_path: text(obj, "path").or_else(|| text(obj, "url")),
                is_voice: flag("is_voice") || flag("voice"),
            })
        }
        "sticker" => Content::Sticker,
        "contacts" => match body.as_array() {
            Some(cards) => Content::Contacts {
                contacts: cards.iter().map(contact).collect(),
            },
            None => unknown(),
        },
        "unsupported" => Content::Unsupported {
            errors: body
                .get("errors")
                .and_then(Value::as_array)
                .map(|errors| {
                    errors
                        .iter()
                        .map(|e| match e.get("title").and_then(Value::as_str) {
                            Some(title) => title.to_string(),
                            None => e.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        },
        _ => unknown(),
    }
}

fn contact(card: &Value) -> Contact {
    let name = match card.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(n)) => text(n, "formatted_name")
            .or_else(|| text(n, "first_name"))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let phones = card
        .get("phones")
        .and_then(Value::as_array)
        .map(|phones| {
            phones
                .iter()
                .filter_map(|p| {
                    let p = p.as_object()?;
                    Some(Phone {
                        number: text(p, "phone").or_else(|| text(p, "wa_id"))?,
                        kind: text(p, "type"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Contact { name, phones }
}

// ---- Events made by digibot's own tools (simulator, chat, test harness) ----

/// A `live_chat.new_conversation` event for a WhatsApp customer, as the
/// webhook parser would produce it.
pub fn new_conversation_event(conversation_id: &str, customer_name: &str) -> Event {
    Event {
        key: format!("live_chat.new_conversation:{conversation_id}"),
        name: "live_chat.new_conversation".to_string(),
        kind: EventKind::NewConversation(Conversation {
            id: conversation_id.to_string(),
            customer_id: "thd_test".to_string(),
            customer_name: Some(customer_name.to_string()),
            channel: Some("whatsapp".to_string()),
            platform_id: None,
            created_at: None,
        }),
    }
}

/// A `live_chat.new_message` event from the customer.
pub fn customer_message_event(
    conversation_id: &str,
    message_id: &str,
    customer_name: &str,
    content: Content,
) -> Event {
    Event {
        key: format!("live_chat.new_message:{message_id}"),
        name: "live_chat.new_message".to_string(),
        kind: EventKind::Message(Message {
            id: message_id.to_string(),
            conversation_id: conversation_id.to_string(),
            sender: Sender {
                kind: SenderKind::Customer,
                name: Some(customer_name.to_string()),
                id: Some("thd_test".to_string()),
                model_id: Some("thd_test".to_string()),
            },
            created_at: None,
            content,
            to_customer: Some(false),
            sent_using: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Event {
        let path = format!(
            "{}/../../tests/fixtures/webhooks/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        Event::parse(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn the_customer_id_is_the_thirds_from_either_event() {
        let opened = fixture("new_conversation");
        assert_eq!(opened.customer_id(), Some("thd_4Kd8sPq2"));
        // A customer message's `sender.id` is not the third's id;
        // `model_id` is.
        assert_eq!(
            fixture("message_text_customer").customer_id(),
            Some("thd_4Kd8sPq2")
        );
        assert_eq!(fixture("message_agent").customer_id(), None);
        assert_eq!(fixture("message_text_minimal").customer_id(), None);
    }

    #[test]
    fn customer_text_is_a_customer_message() {
        let e = fixture("message_text_customer");
        assert_eq!(e.key, "live_chat.new_message:msg_t_0001");
        let EventKind::Message(m) = &e.kind else {
            panic!()
        };
        assert_eq!(m.sender.kind, SenderKind::Customer);
        assert_eq!(
            m.content,
            Content::Text {
                text: "Bonjour, je voudrais suivre ma commande".into()
            }
        );
        assert!(e.invokes_plugins());
    }

    #[test]
    fn missing_type_means_text_and_missing_sender_id_is_fine() {
        let e = fixture("message_text_minimal");
        let EventKind::Message(m) = &e.kind else {
            panic!()
        };
        assert_eq!(
            m.content,
            Content::Text {
                text: "/info".into()
            }
        );
        assert_eq!(m.sender.id, None);
        assert_eq!(m.conversation_id, "conv_min_01");
    }

    #[test]
    fn agent_messages_do_not_invoke_plugins() {
        let e = fixture("message_agent");
        assert!(!e.invokes_plugins());
    }

    /// A location webhook with `latitude` written as is (any JSON text).
    fn location_webhook(latitude: &str) -> String {
        format!(
            r#"{{"event":"live_chat.new_message","data":{{"id":"m1","data":{{"conversation_id":"c1","type":"location","body":{{"latitude":{latitude},"longitude":-7.5898}}}}}}}}"#
        )
    }

    fn location(latitude: &str) -> Event {
        Event::parse(location_webhook(latitude).as_bytes()).unwrap()
    }

    fn content_of(event: &Event) -> &Content {
        match &event.kind {
            EventKind::Message(m) => &m.content,
            other => panic!("{other:?}"),
        }
    }

    /// Found by the fuzzer: a 90-digit latitude parsed to one float and
    /// read back from the inbox as its neighbour.
    #[test]
    fn a_location_off_the_globe_is_kept_as_sent_not_as_a_location() {
        for latitude in [
            "3300000000000000000000000000000000000000000000000000000000000000000000000000000000001198412870.5731",
            "90.5",
            "-1e400",
            "\"NaN\"",
        ] {
            let Ok(event) = Event::parse(location_webhook(latitude).as_bytes()) else {
                continue; // serde_json refuses numbers beyond f64
            };
            match content_of(&event) {
                Content::Unknown {
                    type_name,
                    raw_json,
                } => {
                    assert_eq!(type_name, "location");
                    assert!(raw_json.contains("longitude"), "{raw_json}");
                }
                other => panic!("{latitude}: {other:?}"),
            }
        }
    }

    /// The inbox stores events as JSON: a coordinate written with more
    /// digits than an f64 holds must read back as the same f64.
    #[test]
    fn a_long_coordinate_reads_back_from_the_inbox_unchanged() {
        // serde_json's default float parser reads this as 60.23749372429682,
        // one unit off the nearest f64 (what `str::parse` gives).
        let digits = "60.2374937242968128280884406192056759400014319009953015203755";
        let event = location(digits);
        assert!(
            matches!(content_of(&event), Content::Location(l) if l.latitude == digits.parse::<f64>().unwrap())
        );
        let back: Event = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(back, event);
        let edge = location("-90");
        assert!(matches!(content_of(&edge), Content::Location(l) if l.latitude == -90.0));
    }

    #[test]
    fn every_content_type() {
        let content = |name| match fixture(name).kind {
            EventKind::Message(m) => m.content,
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(content("message_button_reply"), Content::ButtonReply(c) if c.id == "btn_yes")
        );
        assert!(
            matches!(content("message_list_reply"), Content::ListReply(c) if c.id == "row_2" && c.description.as_deref() == Some("Suivre un colis"))
        );
        assert!(
            matches!(content("message_location"), Content::Location(l) if l.latitude == 33.5731 && l.name.as_deref() == Some("Maarif"))
        );
        assert!(
            matches!(content("message_image"), Content::Media(m) if m.kind == MediaKind::Image && m.size == Some(184220) && !m.is_voice)
        );
        assert_eq!(content("message_sticker"), Content::Sticker);
        assert!(
            matches!(content("message_contacts"), Content::Contacts { contacts } if contacts[0].name == "Omar B." && contacts[0].phones[0].number == "+212600000001")
        );
        assert!(
            matches!(content("message_unsupported"), Content::Unsupported { errors } if errors == ["Message type unknown"])
        );
        match content("message_unknown_type") {
            Content::Unknown {
                type_name,
                raw_json,
            } => {
                assert_eq!(type_name, "reaction");
                assert!(raw_json.contains("msg_bot_0009"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conversations_and_other_events() {
        let e = fixture("new_conversation");
        let EventKind::NewConversation(c) = &e.kind else {
            panic!()
        };
        assert_eq!(c.channel.as_deref(), Some("whatsapp"));
        assert_eq!(c.platform_id.as_deref(), Some("212661234567"));
        assert_eq!(e.key, "live_chat.new_conversation:conv_7Hq2Lm9Xa1");

        let archived = fixture("conversation_archived");
        assert_eq!(
            archived.key,
            "live_chat.conversation_archived:conv_7Hq2Lm9Xa1:2026-03-14T10:30:00.000000Z"
        );
        assert!(!archived.invokes_plugins());

        let ticket = fixture("other_event_ticket_created");
        assert_eq!(ticket.kind, EventKind::Other);
        assert_eq!(ticket.key, "ticket.created:tkt_n65opmdwby6l84r7");
    }

    #[test]
    fn event_id_wins_as_key() {
        let e = Event::parse(br#"{"event":"live_chat.new_message","event_id":"evt_9","data":{"id":"m1","data":{"conversation_id":"c1","body":"hi","sender":{"model_type":"third"}}}}"#).unwrap();
        assert_eq!(e.key, "evt_9");
    }

    #[test]
    fn bad_envelopes_are_errors_not_panics() {
        for body in [
            &b"{not json"[..],
            b"[1,2]",
            b"{\"data\":{}}",
            b"{\"event\":\"x\"}",
            b"{\"event\":\"live_chat.new_message\",\"data\":{\"id\":\"m\"}}",
            b"{\"event\":\"live_chat.new_message\",\"data\":{\"data\":{\"conversation_id\":\"c\"}}}",
            b"null",
        ] {
            assert!(Event::parse(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn ids_that_cannot_be_keys_headers_or_path_segments_are_refused() {
        let message = |event_id: &str, id: &str, conversation: &str| {
            json!({"event": "live_chat.new_message", "event_id": event_id,
                   "data": {"id": id, "data": {"conversation_id": conversation, "body": "hi",
                   "sender": {"model_type": "third"}}}})
        };
        let long = "x".repeat(MAX_ID_LEN + 1);
        for (body, field) in [
            (message("evt\r\nX-Injected: 1", "m1", "c1"), "event_id"),
            (message(&"e".repeat(1 << 20), "m1", "c1"), "event_id"),
            (message("evt 1", "m1", "c1"), "event_id"),
            (message("évt", "m1", "c1"), "event_id"),
            (message("evt_1", "m\n1", "c1"), "data.id"),
            (message("evt_1", &long, "c1"), "data.id"),
            (message("evt_1", "m1", ".."), "conversation_id"),
            (message("evt_1", "m1", "."), "conversation_id"),
            (message("evt_1", "m1", "c\u{0}1"), "conversation_id"),
        ] {
            match Event::from_value(body.clone()) {
                Err(ParseError::BadId(f)) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let archived = json!({"event": "live_chat.conversation_archived",
            "data": {"conversation_id": "c1", "archived_at": "2026\r\n"}});
        assert!(matches!(
            Event::from_value(archived),
            Err(ParseError::BadId("archived_at"))
        ));
        // The longest allowed, and every printable character but space.
        let printable: String = (0x21u8..=0x7e).map(char::from).collect();
        let ok =
            Event::from_value(message(&"e".repeat(MAX_ID_LEN), &printable, "conv/../x")).unwrap();
        assert_eq!(ok.key.len(), MAX_ID_LEN);
        assert_eq!(ok.conversation_id(), Some("conv/../x"));
    }

    #[test]
    fn conversation_states_have_one_name_everywhere() {
        assert_eq!(ConversationState::default(), ConversationState::Bot);
        for (state, name) in [
            (ConversationState::Bot, "bot"),
            (ConversationState::Human, "human"),
            (ConversationState::Closed, "closed"),
        ] {
            assert_eq!(state.as_str(), name);
            assert_eq!(state.to_string(), name);
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<ConversationState>(name.into()).unwrap(),
                state
            );
        }
    }
}
