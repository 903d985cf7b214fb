//! What every `digishare:bot` version module has in common, written once:
//! [`version_edge!`] expands, inside a module that ran `bindgen!` on its
//! WIT folder, to the linker and call glue, the `log`/`config`/`kv` host
//! functions, and the conversions between that version's generated types
//! and the host's own.
//!
//! Each version's bindings are distinct Rust types, but the versions are
//! structurally the same wherever they did not change (same names, same
//! fields), so the same source compiles against each. What a version
//! changed stays in its own module: it defines
//! `new_conversation_event(event_id, conversation, state)` and
//! `message_event(event_id, message, burst, state)`, which build its event records
//! (and decide what of the host's event that version can carry). When a
//! later version changes a type this macro converts, that conversion moves
//! out of the macro into the version modules.

/// Expands to the shared edge of a version module; see the module docs.
/// The invoking module must have `wit` (its `digishare::bot::types`),
/// `Bot`, `BotPre` and `digishare::bot::{log, config, kv}` in scope, as
/// `bindgen!` and `use digishare::bot::types as wit` give it.
macro_rules! version_edge {
    () => {
        use ::digibot_domain::event;
        use digibot_protocol as proto;
        use wasmtime::Store;
        use wasmtime::StoreContextMut;
        use wasmtime::component::{HasSelf, Linker, WasmStr};
        use $crate::Call;
        use $crate::state::{HostState, LogLevel, check_key};

        pub use self::BotPre as Pre;

        /// Adds this version's `types`, `log`, `config` and `kv` (one interface at a
        /// time: a version's world may import interfaces linked elsewhere,
        /// such as `wasi:http`).
        pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
            wit::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
            digishare::bot::log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| {
                state
            })?;
            digishare::bot::config::add_to_linker::<HostState, HasSelf<HostState>>(
                linker,
                |state| state,
            )?;
            digishare::bot::kv::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| {
                state
            })?;
            // The generated glue copies every string argument before the
            // host sees it. The calls that take a plugin's string are
            // defined again over `WasmStr`: the host measures the string
            // in the plugin's memory and refuses one past its bound
            // without copying it (a 64 MiB guest could otherwise make the
            // host hold its keys and log lines).
            linker.allow_shadowing(true);
            let bounded = add_bounded(linker);
            linker.allow_shadowing(false);
            bounded
        }

        fn level(level: digishare::bot::log::Level) -> LogLevel {
            use digishare::bot::log::Level;
            match level {
                Level::Trace => LogLevel::Trace,
                Level::Debug => LogLevel::Debug,
                Level::Info => LogLevel::Info,
                Level::Warn => LogLevel::Warn,
                Level::Error => LogLevel::Error,
            }
        }

        /// The length in bytes of a plugin's string, read in its memory.
        fn len_of(store: &StoreContextMut<'_, HostState>, s: &WasmStr) -> wasmtime::Result<usize> {
            Ok(s.to_str(store)?.len())
        }

        /// A key handed to `call`, copied once it is known to be in bounds.
        fn key_of(
            store: &StoreContextMut<'_, HostState>,
            key: &WasmStr,
            call: &str,
        ) -> wasmtime::Result<String> {
            check_key(call, len_of(store, key)?)?;
            Ok(key.to_str(store)?.into_owned())
        }

        fn add_bounded(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
            let mut log = linker.instance(&format!("digishare:bot/log@{VERSION}"))?;
            log.func_wrap(
                "log",
                |mut store: StoreContextMut<'_, HostState>,
                 (lvl, message): (digishare::bot::log::Level, WasmStr)| {
                    let len = len_of(&store, &message)?;
                    if store.data_mut().log_admits(len) {
                        let message = message.to_str(&store)?.into_owned();
                        store.data_mut().log(level(lvl), &message);
                    }
                    Ok(())
                },
            )?;
            let mut config = linker.instance(&format!("digishare:bot/config@{VERSION}"))?;
            config.func_wrap(
                "get",
                |store: StoreContextMut<'_, HostState>, (key,): (WasmStr,)| {
                    let key = key_of(&store, &key, "config.get")?;
                    Ok((store.data().config_get(&key),))
                },
            )?;
            let mut kv = linker.instance(&format!("digishare:bot/kv@{VERSION}"))?;
            // The KV calls wait on the store: async, so a turn waiting on
            // a read holds no thread.
            kv.func_wrap_async(
                "get",
                |mut store: StoreContextMut<'_, HostState>, (key,): (WasmStr,)| {
                    Box::new(async move {
                        let key = key_of(&store, &key, "kv.get")?;
                        Ok((store.data_mut().kv_get(&key).await?,))
                    })
                },
            )?;
            kv.func_wrap_async(
                "delete",
                |mut store: StoreContextMut<'_, HostState>, (key,): (WasmStr,)| {
                    Box::new(async move {
                        let key = key_of(&store, &key, "kv.delete")?;
                        store.data_mut().kv_delete(key).await?;
                        Ok(())
                    })
                },
            )?;
            kv.func_wrap_async(
                "set",
                |mut store: StoreContextMut<'_, HostState>, (key, value): (WasmStr, WasmStr)| {
                    Box::new(async move {
                        let (key_len, value_len) = (len_of(&store, &key)?, len_of(&store, &value)?);
                        if let Err(refusal) = store.data_mut().kv_set_admits(key_len, value_len) {
                            return Ok((Err(refusal),));
                        }
                        let key = key.to_str(&store)?.into_owned();
                        let value = value.to_str(&store)?.into_owned();
                        Ok((store.data_mut().kv_set(key, value).await,))
                    })
                },
            )?;
            Ok(())
        }

        /// A fresh instance, not yet called.
        pub async fn instantiate(
            pre: &Pre<HostState>,
            store: &mut Store<HostState>,
        ) -> wasmtime::Result<Bot> {
            pre.instantiate_async(store).await
        }

        /// Calls the export for `call` on `bot`, an instance that was never called
        /// before. The outer error is a trap; the inner one the plugin's own `err`.
        pub async fn call(
            bot: &Bot,
            store: &mut Store<HostState>,
            call: &Call<'_>,
        ) -> wasmtime::Result<Result<Vec<proto::Action>, String>> {
            let answer = match *call {
                Call::NewConversation {
                    event_id,
                    conversation,
                    state,
                } => {
                    let event =
                        new_conversation_event(event_id, to_wit_conversation(conversation), state);
                    bot.call_on_new_conversation(&mut *store, &event).await?
                }
                Call::Message {
                    event_id,
                    message,
                    burst,
                    state,
                } => {
                    let event = message_event(event_id, to_wit_message(message), burst, state);
                    bot.call_on_message(&mut *store, &event).await?
                }
                // The `bot` world has no timer export: a plugin that can
                // take timer events is called through its version module's
                // own glue (`v0_3_0::TimedBot`), never here.
                Call::Timer { .. } | Call::Resume { .. } => Ok(Vec::new()),
            };
            Ok(answer.map(|actions| actions.into_iter().map(from_wit_action).collect()))
        }

        impl wit::Host for HostState {}

        impl digishare::bot::log::Host for HostState {
            // Shadowed by `add_bounded`; kept equivalent for the generated
            // `add_to_linker`, which requires these impls.
            async fn log(&mut self, lvl: digishare::bot::log::Level, message: String) {
                HostState::log(self, level(lvl), &message);
            }
        }

        impl digishare::bot::config::Host for HostState {
            async fn get(&mut self, key: String) -> Option<String> {
                self.config_get(&key)
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
    };
}

/// The `kv` host functions of the versions whose `kv` has only the
/// conversation scope (0.1.0, 0.2.0); 0.3.0 adds the scoped calls.
macro_rules! conversation_kv_host {
    () => {
        impl digishare::bot::kv::Host for HostState {
            // Shadowed by `add_bounded`; kept equivalent for the generated
            // `add_to_linker`.
            async fn get(&mut self, key: String) -> Option<String> {
                check_key("kv.get", key.len()).ok()?;
                self.kv_get(&key).await.ok().flatten()
            }
            async fn set(&mut self, key: String, value: String) -> Result<(), String> {
                self.kv_set(key, value).await
            }
            async fn delete(&mut self, key: String) {
                let _ = self.kv_delete(key).await;
            }
        }
    };
}

/// The event records of the versions whose events carry who is in charge
/// (0.2.0 on): each version has its own generated types, so each module
/// expands these for its `wit` types.
macro_rules! events_with_state {
    () => {
        fn new_conversation_event(
            event_id: &str,
            conversation: wit::Conversation,
            state: event::ConversationState,
        ) -> wit::NewConversationEvent {
            wit::NewConversationEvent {
                event_id: event_id.to_string(),
                conversation,
                state: to_wit_state(state),
            }
        }

        fn to_wit_state(state: event::ConversationState) -> wit::ConversationState {
            match state {
                event::ConversationState::Bot => wit::ConversationState::Bot,
                event::ConversationState::Human => wit::ConversationState::Human,
                event::ConversationState::Closed => wit::ConversationState::Closed,
            }
        }
    };
}
