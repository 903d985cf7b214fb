//! The dashboard's chat simulator: an operator plays the customer of a
//! simulated conversation, and each message goes through the real pipeline
//! (the live registry's plugins, the runtime and its limits, action
//! validation and request building, all via [`dispatch::run_entries`]). The
//! actions and the requests they would become are returned to the browser;
//! nothing is written to the store or the outbox, so nothing reaches
//! Digishare.
//!
//! Isolation from real conversations: simulated plugin KV lives in this
//! module's own in-memory map, never in the store, so no Digishare
//! conversation id can reach or overwrite it. Simulated invocations also
//! leave the live circuit breakers alone (each turn runs the plugins with
//! fresh health), so a failing plugin in the simulator cannot quarantine it
//! for customers, and they are left out of `/metrics`. At most [`MAX_CONVERSATIONS`] simulated conversations are
//! kept; the least recently used one is forgotten first.
//!
//! Each conversation keeps its first [`TRANSCRIPT_MAX`] turns, so that
//! `GET /admin/simulator/{conversation}/test` can write the session as a
//! conversation test (`digibot test --record FILE --simulator NAME`).

use crate::{AppState, error_body};
use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use digibot_domain::actions::ApiRequest;
use digibot_domain::event::{
    Choice, Content, ConversationState, Event, Location, customer_message_event,
    new_conversation_event,
};
use digibot_pipeline::dispatch::{self, Breaker};
use digibot_protocol::Action;
use digibot_runtime::MemoryKv;
use digibot_runtime::registry::{Entry, Health, Registry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// What the simulator works with: the live plugins and its own in-memory
/// conversations. No store: a simulated turn cannot write one.
#[derive(Clone)]
pub struct SimulatorState {
    pub simulator: Arc<Simulator>,
    pub registry: Arc<Registry>,
    /// The dispatcher's bound on concurrent turns, shared so that
    /// simulated turns take slots of the same instance pool budget.
    pub turn_slots: Arc<Semaphore>,
}

/// Simulated conversations kept at once.
pub const MAX_CONVERSATIONS: usize = 100;

/// Turns of one simulated conversation kept for its test file.
pub const TRANSCRIPT_MAX: usize = 200;

/// Prefix of a simulated conversation's id, as plugins see it.
pub const ID_PREFIX: &str = "sim-";

/// Why a simulator request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error("{0}")]
    BadRequest(String),
    #[error("bad simulated conversation name {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("empty message: type some text")]
    EmptyText,
    #[error("bad location: latitude must be within -90..90 and longitude within -180..180")]
    BadLocation,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("plugin turn failed: {0}")]
    Turn(String),
    #[error("no simulated conversation {0:?} (or it was forgotten)")]
    NotFound(String),
}

impl SimulatorError {
    fn status(&self) -> StatusCode {
        match self {
            SimulatorError::BadName(_)
            | SimulatorError::BadRequest(_)
            | SimulatorError::EmptyText
            | SimulatorError::BadLocation => StatusCode::BAD_REQUEST,
            SimulatorError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            SimulatorError::NotFound(_) => StatusCode::NOT_FOUND,
            SimulatorError::Turn(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What the simulated customer does.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Input {
    /// Opens the conversation afresh (its KV state is forgotten), as a
    /// `live_chat.new_conversation` event.
    NewConversation {
        #[serde(default)]
        customer_name: Option<String>,
    },
    Text {
        text: String,
    },
    ButtonReply {
        id: String,
        #[serde(default)]
        title: String,
    },
    ListReply {
        id: String,
        #[serde(default)]
        title: String,
    },
    Location {
        latitude: f64,
        longitude: f64,
    },
}

/// One action a plugin returned, with the request it would become or why
/// digibot refuses it.
#[derive(Debug, Clone, Serialize)]
pub struct Reply {
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<ApiRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// What one plugin did in a simulated turn.
#[derive(Debug, Clone, Serialize)]
pub struct PluginTurn {
    pub plugin: String,
    pub version: String,
    /// `ok`, `failed` or `filtered`, as in the event's stored outcomes.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub elapsed_us: u64,
    pub replies: Vec<Reply>,
}

/// The answer to one simulated event.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    pub conversation_id: String,
    /// The event's type, e.g. `live_chat.new_message`.
    pub event: String,
    pub plugins: Vec<PluginTurn>,
}

#[derive(Debug)]
struct Conversation {
    customer_name: String,
    messages: u64,
    last_used: u64,
    /// Its first [`TRANSCRIPT_MAX`] events and what the plugins did.
    transcript: Vec<(Event, Turn)>,
    /// More turns were taken than the transcript keeps.
    truncated: bool,
}

/// The simulated conversations and their plugin KV.
#[derive(Default)]
pub struct Simulator {
    kv: Arc<MemoryKv>,
    conversations: Mutex<(u64, HashMap<String, Conversation>)>,
}

fn check_name(name: &str) -> Result<(), SimulatorError> {
    if name.len() <= 64 && digibot_runtime::is_plain_name(name) {
        Ok(())
    } else {
        Err(SimulatorError::BadName(name.to_string()))
    }
}

impl Simulator {
    /// The id plugins see for the simulated conversation `name`.
    pub fn conversation_id(name: &str) -> String {
        format!("{ID_PREFIX}{name}")
    }

    /// Forgets a simulated conversation and its plugins' state. Returns
    /// whether it existed.
    pub fn reset(&self, name: &str) -> Result<bool, SimulatorError> {
        check_name(name)?;
        let mut guard = self.conversations.lock().unwrap_or_else(|e| e.into_inner());
        let existed = guard.1.remove(name).is_some();
        self.kv.clear_conversation(&Self::conversation_id(name));
        Ok(existed)
    }

    /// Builds the event `input` makes in conversation `name`, registering
    /// the conversation (and evicting the least recently used one when
    /// full).
    pub fn event(&self, name: &str, input: Input) -> Result<Event, SimulatorError> {
        check_name(name)?;
        let content = match input {
            Input::NewConversation { customer_name } => {
                self.reset(name)?;
                let customer = customer_name
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "Customer".to_string());
                self.touch(name, Some(customer.clone()));
                return Ok(new_conversation_event(
                    &Self::conversation_id(name),
                    &customer,
                ));
            }
            Input::Text { text } if text.trim().is_empty() => {
                return Err(SimulatorError::EmptyText);
            }
            Input::Text { text } => Content::Text { text },
            Input::ButtonReply { id, title } => Content::ButtonReply(Choice {
                id,
                title,
                description: None,
            }),
            Input::ListReply { id, title } => Content::ListReply(Choice {
                id,
                title,
                description: None,
            }),
            Input::Location {
                latitude,
                longitude,
            } => {
                if !digibot_protocol::limits::on_the_globe(latitude, longitude) {
                    return Err(SimulatorError::BadLocation);
                }
                Content::Location(Location {
                    latitude,
                    longitude,
                    name: None,
                    address: None,
                })
            }
        };
        let (customer, n) = self.touch(name, None);
        Ok(customer_message_event(
            &Self::conversation_id(name),
            &format!("sim_msg_{n}"),
            &customer,
            content,
        ))
    }

    /// Marks `name` used, creating it if needed; returns its customer name
    /// and the number of this message in it.
    fn touch(&self, name: &str, customer: Option<String>) -> (String, u64) {
        let mut guard = self.conversations.lock().unwrap_or_else(|e| e.into_inner());
        let (clock, conversations) = &mut *guard;
        *clock += 1;
        if !conversations.contains_key(name) && conversations.len() >= MAX_CONVERSATIONS {
            let oldest = conversations
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                conversations.remove(&oldest);
                self.kv.clear_conversation(&Self::conversation_id(&oldest));
            }
        }
        let conversation = conversations
            .entry(name.to_string())
            .or_insert_with(|| Conversation {
                customer_name: "Customer".to_string(),
                messages: 0,
                last_used: 0,
                transcript: Vec::new(),
                truncated: false,
            });
        if let Some(customer) = customer {
            conversation.customer_name = customer;
        }
        conversation.messages += 1;
        conversation.last_used = *clock;
        (conversation.customer_name.clone(), conversation.messages)
    }

    /// Keeps a turn of `name` in its transcript.
    fn remember(&self, name: &str, event: Event, turn: &Turn) {
        let mut guard = self.conversations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conversation) = guard.1.get_mut(name) {
            if conversation.transcript.len() < TRANSCRIPT_MAX {
                conversation.transcript.push((event, turn.clone()));
            } else {
                conversation.truncated = true;
            }
        }
    }

    /// The conversation test of simulated conversation `name` for
    /// `plugin` (optional when one plugin answered in it), in the form
    /// `digibot test` reads (and `digibot test --record` writes): each
    /// turn the event in digibot's stored form, expecting the requests the
    /// plugin's actions became.
    pub fn test_file(
        &self,
        name: &str,
        plugin: Option<&str>,
    ) -> Result<serde_json::Value, SimulatorError> {
        check_name(name)?;
        let guard = self.conversations.lock().unwrap_or_else(|e| e.into_inner());
        let conversation = guard
            .1
            .get(name)
            .filter(|c| !c.transcript.is_empty())
            .ok_or_else(|| SimulatorError::NotFound(name.to_string()))?;
        let mut ran: Vec<&str> = conversation
            .transcript
            .iter()
            .flat_map(|(_, turn)| turn.plugins.iter())
            .filter(|p| p.outcome != "filtered")
            .map(|p| p.plugin.as_str())
            .collect();
        ran.sort_unstable();
        ran.dedup();
        let plugin = match (plugin, ran.as_slice()) {
            (Some(p), _) if ran.contains(&p) => p,
            (Some(p), _) => {
                return Err(SimulatorError::BadRequest(format!(
                    "plugin {p} took no turn in this conversation (these did: {})",
                    ran.join(", ")
                )));
            }
            (None, [only]) => only,
            (None, _) => {
                return Err(SimulatorError::BadRequest(format!(
                    "name the plugin with ?plugin=: {} took turns in this conversation",
                    if ran.is_empty() {
                        "none".to_string()
                    } else {
                        ran.join(", ")
                    }
                )));
            }
        };
        let turns: Vec<serde_json::Value> = conversation
            .transcript
            .iter()
            .map(|(event, turn)| {
                let requests: Vec<&ApiRequest> = turn
                    .plugins
                    .iter()
                    .filter(|p| p.plugin == plugin)
                    .flat_map(|p| p.replies.iter())
                    .filter_map(|r| r.request.as_ref())
                    .collect();
                json!({ "event": event, "requests": requests })
            })
            .collect();
        let mut title = format!("simulated conversation {name}");
        if conversation.truncated {
            title.push_str(&format!(" (its first {TRANSCRIPT_MAX} turns)"));
        }
        Ok(json!({ "name": title, "turn": turns }))
    }

    /// Runs the live plugins on `event` and keeps their KV writes.
    pub async fn run(&self, registry: &Registry, event: &Event) -> Turn {
        // Fresh health per turn and no breaker: the live breakers only see
        // customers' events, and the simulator shows every failure.
        let entries: Vec<Entry> = registry
            .snapshot()
            .plugins
            .iter()
            .map(|e| Entry {
                plugin: e.plugin.clone(),
                health: Arc::new(Health::default()),
            })
            .collect();
        let breaker = Breaker {
            failures: 0,
            cooldown: Duration::ZERO,
        };
        // A simulated conversation is always the bot's: no agent is in it.
        let handled = dispatch::run_entries_unmetered(
            registry.runtime(),
            &entries,
            event,
            ConversationState::Bot,
            self.kv.clone(),
            breaker,
        )
        .await;
        for changes in &handled.kv {
            self.kv
                .apply(&changes.plugin, &changes.conversation_id, &changes.writes);
        }
        let plugins = handled
            .outcomes
            .into_iter()
            .map(|outcome| {
                // The pipeline queued the accepted actions under
                // `{event}/{plugin}/{index}` and listed the refused ones in
                // order: pair each returned action with what became of it.
                let mut rejected = outcome.rejected.into_iter();
                let replies = outcome
                    .returned
                    .into_iter()
                    .enumerate()
                    .map(|(index, action)| {
                        let key = format!("{}/{}/{index}", event.key, outcome.plugin);
                        match handled.actions.iter().find(|a| a.idempotency_key == key) {
                            Some(queued) => Reply {
                                action,
                                request: Some(ApiRequest {
                                    method: queued.method.clone(),
                                    path: queued.path.clone(),
                                    body: queued.body.clone(),
                                }),
                                rejected: None,
                            },
                            None => Reply {
                                action,
                                request: None,
                                rejected: rejected.next(),
                            },
                        }
                    })
                    .collect();
                PluginTurn {
                    plugin: outcome.plugin,
                    version: outcome.version,
                    outcome: outcome.outcome,
                    reason: outcome.reason,
                    elapsed_us: outcome.elapsed_us,
                    replies,
                }
            })
            .collect();
        Turn {
            conversation_id: event.conversation_id().unwrap_or_default().to_string(),
            event: event.name.clone(),
            plugins,
        }
    }

    /// [`Simulator::event`] then [`Simulator::run`] in a task of its own,
    /// within the dispatcher's bound on concurrent turns.
    pub async fn handle(
        self: Arc<Self>,
        registry: Arc<Registry>,
        turn_slots: Arc<Semaphore>,
        name: &str,
        input: Input,
    ) -> Result<Turn, SimulatorError> {
        let event = self.event(name, input)?;
        let slot = turn_slots
            .acquire_owned()
            .await
            .map_err(|_| SimulatorError::ShuttingDown)?;
        // Its own task, so a bug that panics in a turn answers 500 here
        // rather than taking the connection down.
        let name = name.to_string();
        tokio::spawn(async move {
            let turn = self.run(&registry, &event).await;
            drop(slot);
            self.remember(&name, event, &turn);
            turn
        })
        .await
        .map_err(|e| SimulatorError::Turn(e.to_string()))
    }
}

impl IntoResponse for SimulatorError {
    fn into_response(self) -> Response {
        (self.status(), error_body(&self)).into_response()
    }
}

/// `POST /admin/simulator/{conversation}/events`, `DELETE
/// /admin/simulator/{conversation}` and `GET
/// /admin/simulator/{conversation}/test`; the admin router adds the auth.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/simulator/{conversation}/events", post(send))
        .route(
            "/admin/simulator/{conversation}",
            axum::routing::delete(reset),
        )
        .route(
            "/admin/simulator/{conversation}/test",
            axum::routing::get(test_file),
        )
}

#[derive(Debug, Deserialize)]
struct TestQuery {
    plugin: Option<String>,
}

/// `GET /admin/simulator/{conversation}/test[?plugin=NAME]`: the session
/// as a conversation test (JSON; `digibot test` reads it as it is, and
/// `digibot test --record FILE --simulator NAME` writes it as TOML or
/// YAML).
async fn test_file(
    State(sim): State<SimulatorState>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<TestQuery>,
) -> Result<Json<serde_json::Value>, SimulatorError> {
    Ok(Json(
        sim.simulator.test_file(&name, query.plugin.as_deref())?,
    ))
}

async fn send(
    State(sim): State<SimulatorState>,
    Path(name): Path<String>,
    input: Result<Json<Input>, JsonRejection>,
) -> Result<Json<Turn>, SimulatorError> {
    let Json(input) = input.map_err(|r| SimulatorError::BadRequest(r.body_text()))?;
    let turn = sim
        .simulator
        .clone()
        .handle(sim.registry.clone(), sim.turn_slots.clone(), &name, input)
        .await?;
    Ok(Json(turn))
}

async fn reset(
    State(sim): State<SimulatorState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, SimulatorError> {
    let existed = sim.simulator.reset(&name)?;
    Ok(Json(json!({
        "reset": Simulator::conversation_id(&name),
        "existed": existed,
    })))
}
