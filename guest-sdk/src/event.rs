//! The events a bot receives, with a few conveniences, and the conversion of
//! [`Action`]s into what crosses the component boundary.

use crate::bindings::digishare::bot::types as wit;
use digibot_protocol::Action;

pub use wit::{
    Choice, Contact, Content, Conversation, Media, MediaKind, Message, Phone, Sender, SenderKind,
    UnknownContent,
};

impl Message {
    /// The text, when this is a text message.
    pub fn text(&self) -> Option<&str> {
        match &self.content {
            Content::Text(text) => Some(text),
            _ => None,
        }
    }

    /// The id of the button or list row the customer picked, if any.
    pub fn choice_id(&self) -> Option<&str> {
        match &self.content {
            Content::ButtonReply(choice) | Content::ListReply(choice) => Some(&choice.id),
            _ => None,
        }
    }

    /// The shared location, when this is a location message.
    pub fn location(&self) -> Option<&wit::Location> {
        match &self.content {
            Content::Location(location) => Some(location),
            _ => None,
        }
    }
}

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
