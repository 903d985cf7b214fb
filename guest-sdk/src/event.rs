//! The events a bot receives, with a few conveniences, and the conversion of
//! [`Action`]s into what crosses the component boundary.
//!
//! The event types are generated from the plugin interface
//! (`wit/since_v0.2.0/bot.wit`), so their fields are exactly what digibot
//! sends. [`Message`] and [`Conversation`] are the event's record plus the
//! [`ConversationState`] the event carries beside it, so a handler gets both
//! in one argument.

use crate::bindings::digishare::bot::types as wit;
use digibot_protocol::Action;

pub use digibot_protocol::ConversationState;
/// The customer picked a reply button or a list row: see
/// [`Content::ButtonReply`], [`Content::ListReply`] and [`Message::choice_id`].
pub use wit::Choice;
/// One contact card of a [`Content::Contacts`] message.
pub use wit::Contact;
/// What a [`Message`] carries: text, a location, a choice, a file…
pub use wit::Content;
/// A location the customer shared ([`Content::Location`]); not to be confused
/// with [`Location`](crate::Location), the pin a bot sends.
pub use wit::Location as SharedLocation;
/// A file the customer sent ([`Content::Media`]).
pub use wit::Media;
/// The kind of file in a [`Media`] message.
pub use wit::MediaKind;
/// One phone number of a [`Contact`].
pub use wit::Phone;
/// Who wrote a [`Message`].
pub use wit::Sender;
/// The kind of [`Sender`]; only [`SenderKind::Customer`] messages reach a
/// bot.
pub use wit::SenderKind;
/// A message type this version of the interface does not model
/// ([`Content::Unknown`]).
pub use wit::UnknownContent;

/// The state an event carries, as the SDK names it.
fn state(state: wit::ConversationState) -> ConversationState {
    match state {
        wit::ConversationState::Bot => ConversationState::Bot,
        wit::ConversationState::Human => ConversationState::Human,
        wit::ConversationState::Closed => ConversationState::Closed,
    }
}

/// A conversation, as [`Bot::on_new_conversation`](crate::Bot::on_new_conversation)
/// receives it.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// Digishare's conversation id (the one replies go to).
    pub id: String,
    /// The customer ("third") id.
    pub customer_id: String,
    /// The customer's display name, when Digishare sent one.
    pub customer_name: Option<String>,
    /// The channel the customer writes from, e.g. `whatsapp`.
    pub channel: Option<String>,
    /// The customer's id on that channel, e.g. a phone number.
    pub platform_id: Option<String>,
    /// When the conversation started (RFC 3339, as Digishare sent it).
    pub created_at: Option<String>,
    /// Who is in charge of the conversation as this event is handled.
    pub state: ConversationState,
}

impl From<wit::NewConversationEvent> for Conversation {
    fn from(event: wit::NewConversationEvent) -> Self {
        let wit::Conversation {
            id,
            customer_id,
            customer_name,
            channel,
            platform_id,
            created_at,
        } = event.conversation;
        Conversation {
            id,
            customer_id,
            customer_name,
            channel,
            platform_id,
            created_at,
            state: state(event.state),
        }
    }
}

/// A customer message, as [`Bot::on_message`](crate::Bot::on_message)
/// receives it.
#[derive(Debug, Clone)]
pub struct Message {
    /// Digishare's message id (what [`Action::text_reply_to`] quotes).
    pub id: String,
    /// The conversation it was written in (the one replies go to).
    pub conversation_id: String,
    /// Who wrote it: the customer, since only customer messages reach a bot.
    pub sender: Sender,
    /// When it was written (RFC 3339, as Digishare sent it).
    pub created_at: Option<String>,
    /// What it carries.
    pub content: Content,
    /// Who is in charge of the conversation as this message is handled.
    /// A plain bot only ever sees [`ConversationState::Bot`] here; an assist
    /// plugin also sees [`ConversationState::Human`], and then answers with
    /// internal notes for the agent.
    pub state: ConversationState,
    /// With `debounce_ms` in the plugin's `NAME.toml`: the customer's
    /// earlier messages of the burst this turn answers, oldest first (this
    /// message is the burst's last). Empty otherwise.
    pub burst: Vec<Message>,
}

impl Message {
    fn from_wit(m: wit::Message, state: ConversationState, burst: Vec<Message>) -> Message {
        Message {
            id: m.id,
            conversation_id: m.conversation_id,
            sender: m.sender,
            created_at: m.created_at,
            content: m.content,
            state,
            burst,
        }
    }

    /// The burst's messages and this one, oldest first: what the customer
    /// wrote since the bot last answered (just this one without
    /// `debounce_ms`).
    pub fn all(&self) -> impl Iterator<Item = &Message> {
        self.burst.iter().chain(std::iter::once(self))
    }
}

impl From<wit::MessageEvent> for Message {
    fn from(event: wit::MessageEvent) -> Self {
        let state = state(event.state);
        let burst = event
            .burst
            .into_iter()
            .map(|m| Message::from_wit(m, state, Vec::new()))
            .collect();
        Message::from_wit(event.message, state, burst)
    }
}

impl Message {
    /// The text, when this is a text message.
    ///
    /// ```
    /// # use digibot_sdk::{Content, ConversationState, Message, Sender, SenderKind};
    /// # let sender = Sender { kind: SenderKind::Customer, name: None, id: None };
    /// let message = Message {
    ///     id: "msg_1".into(),
    ///     conversation_id: "conv_1".into(),
    ///     sender,
    ///     created_at: None,
    ///     content: Content::Text("Bonjour".into()),
    ///     state: ConversationState::Bot,
    ///     burst: Vec::new(),
    /// };
    /// assert_eq!(message.text(), Some("Bonjour"));
    /// assert_eq!(message.choice_id(), None);
    /// ```
    pub fn text(&self) -> Option<&str> {
        match &self.content {
            Content::Text(text) => Some(text),
            _ => None,
        }
    }

    /// The id of the button or list row the customer picked, if any: the id
    /// the bot gave it in [`Action::buttons`] or [`Action::list`].
    ///
    /// ```
    /// # use digibot_sdk::{Choice, Content, ConversationState, Message, Sender, SenderKind};
    /// # let sender = Sender { kind: SenderKind::Customer, name: None, id: None };
    /// let message = Message {
    ///     id: "msg_2".into(),
    ///     conversation_id: "conv_1".into(),
    ///     sender,
    ///     created_at: None,
    ///     content: Content::ButtonReply(Choice {
    ///         id: "yes".into(),
    ///         title: "Oui".into(),
    ///         description: None,
    ///     }),
    ///     state: ConversationState::Bot,
    ///     burst: Vec::new(),
    /// };
    /// assert_eq!(message.choice_id(), Some("yes"));
    /// assert_eq!(message.text(), None);
    /// ```
    pub fn choice_id(&self) -> Option<&str> {
        match &self.content {
            Content::ButtonReply(choice) | Content::ListReply(choice) => Some(&choice.id),
            _ => None,
        }
    }

    /// The shared location, when this is a location message.
    ///
    /// ```
    /// # use digibot_sdk::{Content, ConversationState, Message, Sender, SenderKind, SharedLocation};
    /// # let sender = Sender { kind: SenderKind::Customer, name: None, id: None };
    /// let message = Message {
    ///     id: "msg_3".into(),
    ///     conversation_id: "conv_1".into(),
    ///     sender,
    ///     created_at: None,
    ///     content: Content::Location(SharedLocation {
    ///         latitude: 33.57,
    ///         longitude: -7.59,
    ///         name: None,
    ///         address: None,
    ///     }),
    ///     state: ConversationState::Bot,
    ///     burst: Vec::new(),
    /// };
    /// assert_eq!(message.location().map(|l| l.latitude), Some(33.57));
    /// ```
    pub fn location(&self) -> Option<&SharedLocation> {
        match &self.content {
            Content::Location(location) => Some(location),
            _ => None,
        }
    }
}

/// Converts an [`Action`] into the WIT value a plugin returns to the host.
pub(crate) fn to_wit(action: Action) -> wit::Action {
    match action {
        Action::Text { body, reply_to } => wit::Action::Text(wit::TextReply { body, reply_to }),
        Action::Buttons(b) => wit::Action::Buttons(wit::ButtonsReply {
            header: b.header,
            body: b.body,
            buttons: b
                .buttons
                .into_iter()
                .map(|b| wit::Button {
                    id: b.id,
                    title: b.title,
                })
                .collect(),
        }),
        Action::List(l) => wit::Action::List(wit::ListReply {
            header: l.header,
            body: l.body,
            button: l.button,
            sections: l
                .sections
                .into_iter()
                .map(|s| wit::ListSection {
                    title: s.title,
                    rows: s
                        .rows
                        .into_iter()
                        .map(|r| wit::ListRow {
                            id: r.id,
                            title: r.title,
                            description: r.description,
                        })
                        .collect(),
                })
                .collect(),
        }),
        Action::Location(l) => wit::Action::Location(wit::Location {
            latitude: l.latitude,
            longitude: l.longitude,
            name: l.name,
            address: l.address,
        }),
        Action::LocationRequest { body } => wit::Action::LocationRequest(body),
        Action::File(f) => wit::Action::File(wit::FileReply {
            url: f.url,
            file_name: f.file_name,
            extension: f.extension,
            voice: f.voice,
        }),
        Action::Note { body } => wit::Action::Note(body),
        Action::HandOff {
            user_id,
            as_handler,
        } => wit::Action::HandOff(wit::HandOff {
            user_id,
            as_handler,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Buttons, FileBuilder, ListMenu};

    fn message(content: Content) -> Message {
        Message {
            id: "msg_t_0001".into(),
            conversation_id: "conv_1".into(),
            sender: Sender {
                kind: SenderKind::Customer,
                name: Some("Amina".into()),
                id: Some("third_1".into()),
            },
            created_at: None,
            content,
            state: ConversationState::Bot,
            burst: Vec::new(),
        }
    }

    fn choice(id: &str) -> Choice {
        Choice {
            id: id.into(),
            title: "Title".into(),
            description: None,
        }
    }

    fn media() -> Content {
        Content::Media(Media {
            kind: MediaKind::Image,
            file_name: Some("photo.jpg".into()),
            mime_type: Some("image/jpeg".into()),
            size: Some(1234),
            storage_path: Some("files/photo.jpg".into()),
            is_voice: false,
        })
    }

    #[test]
    fn text_is_only_for_text_messages() {
        assert_eq!(message(Content::Text("salut".into())).text(), Some("salut"));
        assert_eq!(message(Content::Text(String::new())).text(), Some(""));
        assert_eq!(message(Content::ButtonReply(choice("a"))).text(), None);
        assert_eq!(message(Content::Sticker).text(), None);
        assert_eq!(message(media()).text(), None);
    }

    #[test]
    fn choice_id_covers_buttons_and_lists() {
        assert_eq!(
            message(Content::ButtonReply(choice("orders"))).choice_id(),
            Some("orders")
        );
        assert_eq!(
            message(Content::ListReply(choice("track"))).choice_id(),
            Some("track")
        );
        assert_eq!(message(Content::Text("orders".into())).choice_id(), None);
        assert_eq!(
            message(Content::Unknown(UnknownContent {
                type_name: "reaction".into(),
                raw_json: "{}".into(),
            }))
            .choice_id(),
            None
        );
    }

    #[test]
    fn location_is_only_for_location_messages() {
        let shared = SharedLocation {
            latitude: 33.5731,
            longitude: -7.5898,
            name: Some("Maarif".into()),
            address: None,
        };
        let msg = message(Content::Location(shared));
        let got = msg.location().expect("a location message");
        assert_eq!(got.latitude, 33.5731);
        assert_eq!(got.longitude, -7.5898);
        assert_eq!(got.name.as_deref(), Some("Maarif"));
        assert_eq!(got.address, None);
        assert!(msg.text().is_none() && msg.choice_id().is_none());
        assert!(
            message(Content::Text("33.5,-7.5".into()))
                .location()
                .is_none()
        );
        assert!(message(Content::Contacts(vec![])).location().is_none());
    }

    #[test]
    fn text_converts_with_and_without_reply_to() {
        match to_wit(Action::text("hello").unwrap()) {
            wit::Action::Text(t) => {
                assert_eq!(t.body, "hello");
                assert_eq!(t.reply_to, None);
            }
            other => panic!("not text: {other:?}"),
        }
        match to_wit(Action::text_reply_to("hi", "msg_t_0001").unwrap()) {
            wit::Action::Text(t) => {
                assert_eq!(t.body, "hi");
                assert_eq!(t.reply_to.as_deref(), Some("msg_t_0001"));
            }
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn buttons_convert_in_order() {
        let action = Action::buttons("Pick one")
            .header("Head")
            .button("a", "Alpha")
            .button("b", "Beta")
            .build()
            .unwrap();
        let wit::Action::Buttons(b) = to_wit(action) else {
            panic!("not buttons")
        };
        assert_eq!(b.header.as_deref(), Some("Head"));
        assert_eq!(b.body, "Pick one");
        let buttons: Vec<(&str, &str)> = b
            .buttons
            .iter()
            .map(|b| (b.id.as_str(), b.title.as_str()))
            .collect();
        assert_eq!(buttons, [("a", "Alpha"), ("b", "Beta")]);

        let bare = Action::Buttons(Buttons {
            header: None,
            body: "x".into(),
            buttons: vec![],
        });
        let wit::Action::Buttons(b) = to_wit(bare) else {
            panic!("not buttons")
        };
        assert_eq!(b.header, None);
        assert!(b.buttons.is_empty());
    }

    #[test]
    fn list_converts_sections_and_rows() {
        let action = Action::list("Body", "Open")
            .header("Head")
            .section("One")
            .row("r1", "Row 1")
            .row_with_description("r2", "Row 2", "Second")
            .section("Two")
            .row("r3", "Row 3")
            .build()
            .unwrap();
        let wit::Action::List(l) = to_wit(action) else {
            panic!("not a list")
        };
        assert_eq!(l.header.as_deref(), Some("Head"));
        assert_eq!(l.body, "Body");
        assert_eq!(l.button, "Open");
        assert_eq!(l.sections.len(), 2);
        assert_eq!(l.sections[0].title, "One");
        assert_eq!(l.sections[1].title, "Two");
        let rows: Vec<(&str, &str, Option<&str>)> = l
            .sections
            .iter()
            .flat_map(|s| &s.rows)
            .map(|r| (r.id.as_str(), r.title.as_str(), r.description.as_deref()))
            .collect();
        assert_eq!(
            rows,
            [
                ("r1", "Row 1", None),
                ("r2", "Row 2", Some("Second")),
                ("r3", "Row 3", None)
            ]
        );

        let empty = Action::List(ListMenu {
            header: None,
            body: "b".into(),
            button: "o".into(),
            sections: vec![],
        });
        let wit::Action::List(l) = to_wit(empty) else {
            panic!("not a list")
        };
        assert!(l.header.is_none() && l.sections.is_empty());
    }

    #[test]
    fn location_and_location_request_convert() {
        let wit::Action::Location(l) =
            to_wit(Action::place(33.5731, -7.5898, "Store", "Bd Al Massira").unwrap())
        else {
            panic!("not a location")
        };
        assert_eq!((l.latitude, l.longitude), (33.5731, -7.5898));
        assert_eq!(l.name.as_deref(), Some("Store"));
        assert_eq!(l.address.as_deref(), Some("Bd Al Massira"));

        let wit::Action::Location(l) = to_wit(Action::location(-1.5, 2.25).unwrap()) else {
            panic!("not a location")
        };
        assert_eq!((l.latitude, l.longitude), (-1.5, 2.25));
        assert_eq!((l.name, l.address), (None, None));

        match to_wit(Action::location_request("Where are you?").unwrap()) {
            wit::Action::LocationRequest(prompt) => assert_eq!(prompt, "Where are you?"),
            other => panic!("not a location request: {other:?}"),
        }
    }

    #[test]
    fn file_converts_every_field() {
        let wit::Action::File(f) = to_wit(Action::file("https://example.com/a.pdf").unwrap())
        else {
            panic!("not a file")
        };
        assert_eq!(f.url, "https://example.com/a.pdf");
        assert_eq!((f.file_name, f.extension, f.voice), (None, None, false));

        let voice = FileBuilder::new("https://example.com/v.ogg")
            .file_name("note.ogg")
            .extension("ogg")
            .voice(true)
            .build()
            .unwrap();
        let wit::Action::File(f) = to_wit(voice) else {
            panic!("not a file")
        };
        assert_eq!(f.url, "https://example.com/v.ogg");
        assert_eq!(f.file_name.as_deref(), Some("note.ogg"));
        assert_eq!(f.extension.as_deref(), Some("ogg"));
        assert!(f.voice);
    }

    #[test]
    fn note_and_hand_off_convert() {
        match to_wit(Action::note("VIP").unwrap()) {
            wit::Action::Note(body) => assert_eq!(body, "VIP"),
            other => panic!("not a note: {other:?}"),
        }
        for as_handler in [true, false] {
            match to_wit(Action::hand_off("usr_17", as_handler).unwrap()) {
                wit::Action::HandOff(h) => {
                    assert_eq!(h.user_id, "usr_17");
                    assert_eq!(h.as_handler, as_handler);
                }
                other => panic!("not a hand-off: {other:?}"),
            }
        }
    }

    #[test]
    fn hand_built_actions_convert_unchecked() {
        // Conversion is a plain mapping: validation is the builders' job
        // (and the host's), so an invalid value still converts faithfully.
        let wit::Action::HandOff(h) = to_wit(Action::HandOff {
            user_id: "../x".into(),
            as_handler: true,
        }) else {
            panic!("not a hand-off")
        };
        assert_eq!(h.user_id, "../x");
    }
}

/// A timer this plugin scheduled ([`crate::timers::schedule`]) came due,
/// as [`Bot::on_timer`](crate::Bot::on_timer) receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// What `schedule` returned.
    pub id: String,
    /// The conversation it was scheduled in (the one replies go to).
    pub conversation_id: String,
    /// The name it was scheduled under.
    pub name: String,
    /// The payload it was scheduled with.
    pub payload: String,
    /// When it was scheduled and when it came due (ms since the epoch).
    pub scheduled_at: u64,
    /// When it came due (ms since the epoch).
    pub due_at: u64,
    /// Who is in charge (always `Bot`: timers wait while a human is).
    pub state: ConversationState,
    /// The conversation is on WhatsApp and the customer last wrote over 24
    /// hours ago: Digishare would refuse a free-form message. Write a note
    /// ([`Action::note`](crate::Action::note)) instead, or nothing.
    pub outside_window: bool,
}

/// Why a conversation came back to the bot ([`Resume::cause`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseCause {
    /// An agent wrote the release command as an internal note.
    Command,
    /// An operator released it (admin API, `digibot conversations release`).
    Operator,
    /// No agent wrote for the configured idle time.
    Idle,
}

/// A human handed the conversation back to the bot, as
/// [`Bot::on_resume`](crate::Bot::on_resume) receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The conversation (the one replies go to).
    pub conversation_id: String,
    /// How it came back.
    pub cause: ReleaseCause,
    /// In words, e.g. `release command from Ann (message m7)`.
    pub reason: String,
    /// How long the human had it (ms).
    pub human_ms: u64,
    /// Messages written meanwhile (the customer's and the agents').
    pub messages: u32,
    /// Who is in charge (always `Bot`).
    pub state: ConversationState,
    /// As for [`Timer::outside_window`]: on WhatsApp, over 24 hours after
    /// the customer's last message.
    pub outside_window: bool,
}

impl From<wit::ResumeEvent> for Resume {
    fn from(e: wit::ResumeEvent) -> Self {
        Resume {
            conversation_id: e.conversation_id,
            cause: match e.cause {
                wit::ReleaseCause::Command => ReleaseCause::Command,
                wit::ReleaseCause::Operator => ReleaseCause::Operator,
                wit::ReleaseCause::Idle => ReleaseCause::Idle,
            },
            reason: e.reason,
            human_ms: e.human_ms,
            messages: e.messages,
            state: state(e.state),
            outside_window: e.outside_window,
        }
    }
}

impl From<wit::TimerEvent> for Timer {
    fn from(e: wit::TimerEvent) -> Self {
        Timer {
            id: e.timer_id,
            conversation_id: e.conversation_id,
            name: e.name,
            payload: e.payload,
            scheduled_at: e.scheduled_at,
            due_at: e.due_at,
            state: state(e.state),
            outside_window: e.outside_window,
        }
    }
}
