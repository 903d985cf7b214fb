//! `digishare:bot@0.3.0`: its bindings, and the conversions between its
//! types and the host's own, at this module's edge. 0.3.0 adds outbound
//! HTTP: the world imports `wasi:http/outgoing-handler` (linked from
//! wasmtime-wasi-http, its hook in `outbound`) and `outbound`, which says
//! why a request was refused. Events and actions are 0.2.0's and convert
//! through the shared `version_edge!` (edge.rs).
//!
//! Its `kv` adds scopes (`customer`, `plugin`) and TTLs: the `-in` calls,
//! bounded over `WasmStr` like the others ([`add_scoped_kv_to_linker`]).
//!
//! It also adds timers: the `timers` import, and the `on-timer` export of
//! the `bot-with-timers` world. The export is looked up by name rather than
//! bound by `bindgen!`, because components built against the plain `bot`
//! world (before timers) have none and must keep loading: [`TimedPre`]
//! and [`TimedBot`] carry it when it is there. `on-resume` (hand-back)
//! is found the same way.

wasmtime::component::bindgen!({
    world: "bot",
    path: "../../wit/since_v0.3.0",
    // wasmtime-wasi-http's bindings are for `Send` store data.
    require_store_data_send: true,
    // Every call is async: a host call that waits (an HTTP request) holds
    // no thread.
    imports: { default: async },
    exports: { default: async },
    // wasi:http and what it uses are wasmtime-wasi(-http)'s, linked once
    // for every version.
    with: {
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
    },
});

use digishare::bot::types as wit;

/// The interface version this module speaks.
pub const VERSION: &str = "0.3.0";

version_edge!();

/// What 0.3.0 imports beyond the shared interfaces: `outbound`.
pub fn add_outbound_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    digishare::bot::outbound::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

impl digishare::bot::outbound::Host for HostState {
    async fn last_refusal(&mut self) -> Option<digishare::bot::outbound::Refusal> {
        self.http_refusal()
            .map(|r| digishare::bot::outbound::Refusal {
                kind: r.kind.to_string(),
                message: r.message,
            })
    }
}

events_with_state!();

/// 0.3.0's message event, with the burst a debounced turn answers.
fn message_event(
    event_id: &str,
    message: wit::Message,
    burst: &[event::Message],
    state: event::ConversationState,
) -> wit::MessageEvent {
    wit::MessageEvent {
        event_id: event_id.to_string(),
        message,
        state: to_wit_state(state),
        burst: burst.iter().map(to_wit_message).collect(),
    }
}

fn to_scope(scope: digishare::bot::kv::Scope) -> digibot_domain::kv::Scope {
    use digibot_domain::kv::Scope;
    use digishare::bot::kv::Scope as W;
    match scope {
        W::Conversation => Scope::Conversation,
        W::Customer => Scope::Customer,
        W::Plugin => Scope::Plugin,
    }
}

/// The refusal of a key past its bound, as the `-in` calls return it (they
/// have an error to return, so the turn goes on).
fn key_refusal(call: &str, len: usize) -> Option<String> {
    check_key(call, len)
        .err()
        .map(|limit| format!("limit: {limit}"))
}

/// 0.3.0's scoped KV calls, defined again over `WasmStr`: a key or value
/// past its bound is refused from its length in the plugin's memory, never
/// copied.
pub fn add_scoped_kv_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use digishare::bot::kv::{Scope, SetOptions};
    linker.allow_shadowing(true);
    let mut kv = linker.instance(&format!("digishare:bot/kv@{VERSION}"))?;
    let shadowed = kv
        .func_wrap_async(
            "get-in",
            |mut store: StoreContextMut<'_, HostState>, (scope, key): (Scope, WasmStr)| {
                Box::new(async move {
                    if let Some(refusal) = key_refusal("kv.get-in", key.to_str(&store)?.len()) {
                        return Ok((Err(store.data_mut().refused_with(refusal)),));
                    }
                    let key = key.to_str(&store)?.into_owned();
                    Ok((store.data_mut().kv_get_scoped(to_scope(scope), &key).await,))
                })
            },
        )
        .and_then(|()| {
            kv.func_wrap_async(
                "set-in",
                |mut store: StoreContextMut<'_, HostState>,
                 (scope, key, value, options): (Scope, WasmStr, WasmStr, SetOptions)| {
                    Box::new(async move {
                        let sizes = (key.to_str(&store)?.len(), value.to_str(&store)?.len());
                        if let Err(refusal) = store.data_mut().kv_set_admits(sizes.0, sizes.1) {
                            return Ok((Err(refusal),));
                        }
                        let key = key.to_str(&store)?.into_owned();
                        let value = value.to_str(&store)?.into_owned();
                        let set = store
                            .data_mut()
                            .kv_set_scoped(to_scope(scope), key, value, options.ttl_ms)
                            .await;
                        Ok((set,))
                    })
                },
            )
        })
        .and_then(|()| {
            kv.func_wrap_async(
                "delete-in",
                |mut store: StoreContextMut<'_, HostState>, (scope, key): (Scope, WasmStr)| {
                    Box::new(async move {
                        if let Some(refusal) =
                            key_refusal("kv.delete-in", key.to_str(&store)?.len())
                        {
                            return Ok((Err(store.data_mut().refused_with(refusal)),));
                        }
                        let key = key.to_str(&store)?.into_owned();
                        Ok((store
                            .data_mut()
                            .kv_delete_scoped(to_scope(scope), key)
                            .await,))
                    })
                },
            )
        });
    linker.allow_shadowing(false);
    shadowed
}

impl digishare::bot::kv::Host for HostState {
    // All shadowed (`add_bounded`, `add_scoped_kv_to_linker`); kept
    // equivalent for the generated `add_to_linker`.
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
    async fn get_in(
        &mut self,
        scope: digishare::bot::kv::Scope,
        key: String,
    ) -> Result<Option<String>, String> {
        if let Some(refusal) = key_refusal("kv.get-in", key.len()) {
            return Err(self.refused_with(refusal));
        }
        self.kv_get_scoped(to_scope(scope), &key).await
    }
    async fn set_in(
        &mut self,
        scope: digishare::bot::kv::Scope,
        key: String,
        value: String,
        options: digishare::bot::kv::SetOptions,
    ) -> Result<(), String> {
        self.kv_set_scoped(to_scope(scope), key, value, options.ttl_ms)
            .await
    }
    async fn delete_in(
        &mut self,
        scope: digishare::bot::kv::Scope,
        key: String,
    ) -> Result<(), String> {
        if let Some(refusal) = key_refusal("kv.delete-in", key.len()) {
            return Err(self.refused_with(refusal));
        }
        self.kv_delete_scoped(to_scope(scope), key).await
    }
}

/// What 0.3.0 imports for timers. Both calls are defined again over
/// `WasmStr`, as the KV and log calls are (edge.rs): a name or payload past
/// its bound is refused from its length in the plugin's memory, never
/// copied; and past the per-turn cap the turn stops.
pub fn add_timers_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use digishare::bot::timers::ScheduleOptions;
    digishare::bot::timers::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    linker.allow_shadowing(true);
    let mut timers = linker.instance(&format!("digishare:bot/timers@{VERSION}"))?;
    let shadowed = timers
        .func_wrap_async(
            "schedule",
            |mut store: StoreContextMut<'_, HostState>,
             (name, after_ms, payload, options): (WasmStr, u64, WasmStr, ScheduleOptions)| {
                Box::new(async move {
                    let sizes = (name.to_str(&store)?.len(), payload.to_str(&store)?.len());
                    if let Err(refusal) = store.data_mut().timer_schedule_admits(sizes.0, sizes.1) {
                        return Ok((Err(refusal),));
                    }
                    let name = name.to_str(&store)?.into_owned();
                    let payload = payload.to_str(&store)?.into_owned();
                    let scheduled = store
                        .data_mut()
                        .timer_schedule(
                            name,
                            after_ms,
                            payload,
                            options.cancel_on_customer_message,
                            options.replace,
                        )
                        .await;
                    Ok((scheduled,))
                })
            },
        )
        .and_then(|()| {
            timers.func_wrap_async(
                "cancel",
                |mut store: StoreContextMut<'_, HostState>, (name,): (WasmStr,)| {
                    Box::new(async move {
                        // No pending timer has a name past the bound: nothing
                        // to cancel, nothing copied.
                        if name.to_str(&store)?.len() > digibot_domain::timer::NAME_MAX {
                            return Ok(());
                        }
                        let name = name.to_str(&store)?.into_owned();
                        store.data_mut().timer_cancel(name).await?;
                        Ok(())
                    })
                },
            )
        });
    linker.allow_shadowing(false);
    shadowed
}

impl digishare::bot::timers::Host for HostState {
    async fn schedule(
        &mut self,
        name: String,
        after_ms: u64,
        payload: String,
        options: digishare::bot::timers::ScheduleOptions,
    ) -> Result<String, String> {
        self.timer_schedule(
            name,
            after_ms,
            payload,
            options.cancel_on_customer_message,
            options.replace,
        )
        .await
    }

    // Both shadowed in `add_timers_to_linker` (bounded over `WasmStr`, and
    // the turn stopped past the per-turn cap); kept for the generated
    // `add_to_linker`.
    async fn cancel(&mut self, name: String) {
        let _ = self.timer_cancel(name).await;
    }
}

/// What 0.3.0 imports for the conversation's history.
pub fn add_conversation_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    digishare::bot::conversation::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )?;
    // Shadowed: past the per-turn cap the turn stops (the generated glue
    // has no way to trap).
    linker.allow_shadowing(true);
    let mut conversation = linker.instance(&format!("digishare:bot/conversation@{VERSION}"))?;
    let shadowed = conversation.func_wrap_async(
        "history",
        |mut store: StoreContextMut<'_, HostState>, (limit,): (u32,)| {
            Box::new(async move {
                let entries = store.data_mut().history(limit).await?;
                Ok((entries.into_iter().map(to_wit_entry).collect::<Vec<_>>(),))
            })
        },
    );
    linker.allow_shadowing(false);
    shadowed
}

fn to_wit_entry(
    e: digibot_domain::history::HistoryEntry,
) -> digishare::bot::conversation::HistoryEntry {
    use digibot_domain::history::Author;
    use digishare::bot::conversation::Author as W;
    digishare::bot::conversation::HistoryEntry {
        author: match e.author {
            Author::Customer => W::Customer,
            Author::Agent => W::Agent,
            Author::Bot => W::Bot,
            Author::System => W::System,
        },
        kind: e.kind,
        text: e.text,
        at: u64::try_from(e.at).unwrap_or(0),
    }
}

impl digishare::bot::conversation::Host for HostState {
    async fn history(&mut self, limit: u32) -> Vec<digishare::bot::conversation::HistoryEntry> {
        HostState::history(self, limit)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(to_wit_entry)
            .collect()
    }
}

type OnTimer =
    wasmtime::component::TypedFunc<(wit::TimerEvent,), (Result<Vec<wit::Action>, String>,)>;
type OnResume =
    wasmtime::component::TypedFunc<(wit::ResumeEvent,), (Result<Vec<wit::Action>, String>,)>;

/// 0.3.0's bindings of a component, with its `on-timer` and `on-resume`
/// exports if it has them.
pub struct TimedPre {
    pre: Pre<HostState>,
    on_timer: Option<wasmtime::component::ComponentExportIndex>,
    on_resume: Option<wasmtime::component::ComponentExportIndex>,
}

/// An instance, with its `on-timer` and `on-resume` if the component
/// exports them.
pub struct TimedBot {
    bot: Bot,
    on_timer: Option<OnTimer>,
    on_resume: Option<OnResume>,
}

impl TimedPre {
    pub fn new(pre: wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<TimedPre> {
        let on_timer = pre.component().get_export_index(None, "on-timer");
        let on_resume = pre.component().get_export_index(None, "on-resume");
        Ok(TimedPre {
            pre: Pre::new(pre)?,
            on_timer,
            on_resume,
        })
    }

    /// Whether the component exports `on-timer`.
    pub fn takes_timers(&self) -> bool {
        self.on_timer.is_some()
    }

    /// Whether the component exports `on-resume`.
    pub fn takes_resume(&self) -> bool {
        self.on_resume.is_some()
    }

    pub async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<TimedBot> {
        let instance = self
            .pre
            .instance_pre()
            .instantiate_async(&mut *store)
            .await?;
        let bot = Bot::new(&mut *store, &instance)?;
        let on_timer = match &self.on_timer {
            Some(index) => Some(
                instance
                    .get_typed_func::<(wit::TimerEvent,), (Result<Vec<wit::Action>, String>,)>(
                        &mut *store,
                        index,
                    )?,
            ),
            None => None,
        };
        let on_resume = match &self.on_resume {
            Some(index) => Some(
                instance
                    .get_typed_func::<(wit::ResumeEvent,), (Result<Vec<wit::Action>, String>,)>(
                        &mut *store,
                        index,
                    )?,
            ),
            None => None,
        };
        Ok(TimedBot {
            bot,
            on_timer,
            on_resume,
        })
    }
}

impl TimedBot {
    /// [`call`], and timer events for a component that takes them.
    pub async fn call(
        &self,
        store: &mut Store<HostState>,
        call: &Call<'_>,
    ) -> wasmtime::Result<Result<Vec<proto::Action>, String>> {
        if let Call::Resume {
            event_id,
            resumed,
            state,
        } = *call
        {
            let Some(on_resume) = &self.on_resume else {
                return Ok(Ok(Vec::new()));
            };
            use digibot_domain::resume::Cause;
            let event = wit::ResumeEvent {
                event_id: event_id.to_string(),
                conversation_id: resumed.conversation_id.clone(),
                cause: match resumed.cause {
                    Cause::Command => wit::ReleaseCause::Command,
                    Cause::Operator => wit::ReleaseCause::Operator,
                    Cause::Idle => wit::ReleaseCause::Idle,
                },
                reason: resumed.reason.clone(),
                human_ms: resumed.human_ms(),
                messages: resumed.messages,
                state: to_wit_state(state),
                outside_window: resumed.outside_window,
            };
            let (answer,) = on_resume.call_async(&mut *store, (event,)).await?;
            return Ok(answer.map(|actions| actions.into_iter().map(from_wit_action).collect()));
        }
        let Call::Timer {
            event_id,
            timer,
            state,
        } = *call
        else {
            return self::call(&self.bot, store, call).await;
        };
        let Some(on_timer) = &self.on_timer else {
            return Ok(Ok(Vec::new()));
        };
        let event = wit::TimerEvent {
            event_id: event_id.to_string(),
            timer_id: timer.id.clone(),
            conversation_id: timer.conversation_id.clone(),
            name: timer.name.clone(),
            payload: timer.payload.clone(),
            scheduled_at: u64::try_from(timer.scheduled_at).unwrap_or(0),
            due_at: u64::try_from(timer.due_at).unwrap_or(0),
            state: to_wit_state(state),
            outside_window: timer.outside_window,
        };
        let (answer,) = on_timer.call_async(&mut *store, (event,)).await?;
        Ok(answer.map(|actions| actions.into_iter().map(from_wit_action).collect()))
    }
}
