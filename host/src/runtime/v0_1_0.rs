//! `digishare:bot@0.1.0`: its bindings, and the conversions between its
//! types and the host's own, at this module's edge. The rest of the host
//! sees only [`crate::event`] and [`digibot_protocol::Action`]; a later WIT
//! version gets a sibling module that converts to the same types.

use super::Call;
use super::state::{HostState, LogLevel};
use crate::event;
use digibot_protocol as proto;
use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

wasmtime::component::bindgen!({
    world: "bot",
    path: "../wit/since_v0.1.0",
});

use digishare::bot::types as wit;

/// The interface version this module speaks.
pub const VERSION: &str = "0.1.0";

pub use self::BotPre as Pre;

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    Bot::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

/// A fresh instance, not yet called.
pub fn instantiate(pre: &Pre<HostState>, store: &mut Store<HostState>) -> wasmtime::Result<Bot> {
    pre.instantiate(store)
}

/// Calls the export for `call` on `bot`, an instance that was never called
/// before. The outer error is a trap; the inner one the plugin's own `err`.
pub fn call(
    bot: &Bot,
    store: &mut Store<HostState>,
    call: &Call<'_>,
) -> wasmtime::Result<Result<Vec<proto::Action>, String>> {
    let answer = match call {
        // 0.1.0 has no conversation state: its plugins do not see it.
        Call::NewConversation {
            event_id,
            conversation,
            ..
        } => bot.call_on_new_conversation(
            &mut *store,
            &wit::NewConversationEvent {
                event_id: event_id.to_string(),
                conversation: to_wit_conversation(conversation),
            },
        )?,
        Call::Message {
            event_id, message, ..
        } => bot.call_on_message(
            &mut *store,
            &wit::MessageEvent {
                event_id: event_id.to_string(),
                message: to_wit_message(message),
            },
        )?,
    };
    Ok(answer.map(|actions| actions.into_iter().map(from_wit_action).collect()))
}

impl wit::Host for HostState {}

impl digishare::bot::log::Host for HostState {
    fn log(&mut self, level: digishare::bot::log::Level, message: String) {
        use digishare::bot::log::Level;
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        HostState::log(self, level, &message);
    }
}

impl digishare::bot::config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config_get(&key)
    }
}

impl digishare::bot::kv::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.kv_get(&key)
    }
    fn set(&mut self, key: String, value: String) -> Result<(), String> {
        self.kv_set(key, value)
    }
    fn delete(&mut self, key: String) {
        self.kv_delete(key)
    }
}

fn to_wit_conversation(c: &event::Conversation) -> wit::Conversation {
    wit::Conversation {
        id: c.id.clone(),
        customer_id: c.customer_id.clone(),
        customer_name: c.customer_name.clone(),
        channel: c.channel.clone(),
        platform_id: c.platform_id.clone(),
        created_at: c.created_at.clone(),
    }
}

fn to_wit_choice(c: &event::Choice) -> wit::Choice {
    wit::Choice {
        id: c.id.clone(),
        title: c.title.clone(),
        description: c.description.clone(),
    }
}

fn to_wit_message(m: &event::Message) -> wit::Message {
    use event::Content as C;
    let content = match &m.content {
        C::Text { text } => wit::Content::Text(text.clone()),
        C::Location(l) => wit::Content::Location(wit::Location {
            latitude: l.latitude,
            longitude: l.longitude,
            name: l.name.clone(),
            address: l.address.clone(),
        }),
        C::ButtonReply(c) => wit::Content::ButtonReply(to_wit_choice(c)),
        C::ListReply(c) => wit::Content::ListReply(to_wit_choice(c)),
        C::Media(media) => wit::Content::Media(wit::Media {
            kind: match media.kind {
                event::MediaKind::Image => wit::MediaKind::Image,
                event::MediaKind::Webp => wit::MediaKind::Webp,
                event::MediaKind::Video => wit::MediaKind::Video,
                event::MediaKind::Audio => wit::MediaKind::Audio,
                event::MediaKind::Pdf => wit::MediaKind::Pdf,
                event::MediaKind::Other => wit::MediaKind::Other,
            },
            file_name: media.file_name.clone(),
            mime_type: media.mime_type.clone(),
            size: media.size,
            storage_path: media.storage_path.clone(),
            is_voice: media.is_voice,
        }),
        C::Sticker => wit::Content::Sticker,
        C::Contacts { contacts } => wit::Content::Contacts(
            contacts
                .iter()
                .map(|c| wit::Contact {
                    name: c.name.clone(),
                    phones: c
                        .phones
                        .iter()
                        .map(|p| wit::Phone {
                            number: p.number.clone(),
                            kind: p.kind.clone(),
                        })
                        .collect(),
                })
                .collect(),
        ),
        C::Unsupported { errors } => wit::Content::Unsupported(errors.clone()),
        C::Unknown {
            type_name,
            raw_json,
        } => wit::Content::Unknown(wit::UnknownContent {
            type_name: type_name.clone(),
            raw_json: raw_json.clone(),
        }),
    };
    wit::Message {
        id: m.id.clone(),
        conversation_id: m.conversation_id.clone(),
        sender: wit::Sender {
            kind: match m.sender.kind {
                event::SenderKind::Customer => wit::SenderKind::Customer,
                event::SenderKind::Agent => wit::SenderKind::Agent,
                event::SenderKind::System => wit::SenderKind::System,
                event::SenderKind::Other => wit::SenderKind::Other,
            },
            name: m.sender.name.clone(),
            id: m.sender.id.clone(),
        },
        created_at: m.created_at.clone(),
        content,
    }
}

fn from_wit_action(a: wit::Action) -> proto::Action {
    match a {
        wit::Action::Text(t) => proto::Action::Text {
            body: t.body,
            reply_to: t.reply_to,
        },
        wit::Action::Buttons(b) => proto::Action::Buttons(proto::Buttons {
            header: b.header,
            body: b.body,
            buttons: b
                .buttons
                .into_iter()
                .map(|b| proto::Button {
                    id: b.id,
                    title: b.title,
                })
                .collect(),
        }),
        wit::Action::List(l) => proto::Action::List(proto::ListMenu {
            header: l.header,
            body: l.body,
            button: l.button,
            sections: l
                .sections
                .into_iter()
                .map(|s| proto::ListSection {
                    title: s.title,
                    rows: s
                        .rows
                        .into_iter()
                        .map(|r| proto::ListRow {
                            id: r.id,
                            title: r.title,
                            description: r.description,
                        })
                        .collect(),
                })
                .collect(),
        }),
        wit::Action::Location(l) => proto::Action::Location(proto::Location {
            latitude: l.latitude,
            longitude: l.longitude,
            name: l.name,
            address: l.address,
        }),
        wit::Action::LocationRequest(body) => proto::Action::LocationRequest { body },
        wit::Action::File(f) => proto::Action::File(proto::FileReply {
            url: f.url,
            file_name: f.file_name,
            extension: f.extension,
            voice: f.voice,
        }),
        wit::Action::Note(body) => proto::Action::Note { body },
        wit::Action::HandOff(h) => proto::Action::HandOff {
            user_id: h.user_id,
            as_handler: h.as_handler,
        },
    }
}
