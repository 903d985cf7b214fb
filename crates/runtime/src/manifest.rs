//! `NAME.toml`, the optional file beside a plugin's `NAME.wasm`: whether it
//! is enabled, which events it wants, its private configuration, its limits,
//! the capabilities it is granted, and whether it assists human agents.

use digibot_domain::outbound::{HttpGrant, HttpLimits, SecretName};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A plugin's settings. Every field has a default, so no file is needed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Manifest {
    pub enabled: bool,
    /// `new_conversation` and/or `message`.
    pub events: Vec<EventFilter>,
    /// Values the plugin reads with `config.get`. Only this plugin sees them.
    pub config: BTreeMap<String, String>,
    pub limits: LimitOverrides,
    pub grants: Grants,
    /// Keeps running while a human agent is in charge of a conversation,
    /// limited to internal notes (suggestions for the agent).
    pub assist: bool,
    /// What digibot sends instead when the plugin fails (trap, timeout,
    /// error) or is quarantined, so the customer is not left in silence.
    pub fallback: Option<Fallback>,
    /// Customer messages that arrive less than this apart (ms) become one
    /// turn: the plugin answers the burst's last message and sees the
    /// earlier ones with it. At most [`DEBOUNCE_MAX_MS`].
    pub debounce_ms: Option<u64>,
    /// `pin = "conversation"`: a conversation keeps the version of the
    /// plugin its first turn ran on until it is archived, whatever is
    /// installed meanwhile; new conversations get the serving version.
    pub pin: Option<Pin>,
}

/// What a plugin's version is pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pin {
    Conversation,
}

/// The longest `debounce_ms`: every message of a burst waits for it.
pub const DEBOUNCE_MAX_MS: u64 = 10_000;

/// `[fallback]`: a canned text, or a hand-off to a human.
///
/// ```toml
/// [fallback]
/// action = "hand_off"     # or "text"
/// user_id = "usr_17"      # hand_off: the agent to attach
/// as_handler = true       # hand_off: make them the handler (default true)
/// text = "Un instant..."  # text: the message (hand_off: sent before it, optional)
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub action: FallbackAction,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default = "yes")]
    pub as_handler: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackAction {
    Text,
    HandOff,
}

impl Fallback {
    /// The actions to send, checked against Digishare's limits; why the
    /// fallback is unusable otherwise.
    pub fn actions(&self) -> Result<Vec<digibot_protocol::Action>, String> {
        use digibot_protocol::Action;
        let mut actions = Vec::new();
        if let Some(text) = &self.text {
            actions.push(Action::text(text.clone()).map_err(|e| e.to_string())?);
        }
        if self.action == FallbackAction::HandOff {
            let user_id = self
                .user_id
                .clone()
                .ok_or("fallback action hand_off needs user_id")?;
            actions.push(Action::HandOff {
                user_id,
                as_handler: self.as_handler,
            });
        } else if actions.is_empty() {
            return Err("fallback action text needs text".into());
        }
        Ok(actions)
    }
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            enabled: true,
            events: vec![EventFilter::NewConversation, EventFilter::Message],
            config: BTreeMap::new(),
            limits: LimitOverrides::default(),
            grants: Grants::default(),
            assist: false,
            fallback: None,
            debounce_ms: None,
            pin: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFilter {
    NewConversation,
    Message,
    /// A timer the plugin scheduled: always wanted by an enabled plugin
    /// (it asked for it), whatever `events` lists.
    Timer,
    /// A hand-back: wanted by an enabled plugin that exports `on-resume`
    /// (exporting it is the subscription), whatever `events` lists.
    Resume,
}

/// Per-plugin overrides of [`Limits`]; unset fields keep the host default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitOverrides {
    /// Compute budget of one turn ([`Limits::compute`]).
    pub compute_ms: Option<u64>,
    /// Wall-clock deadline of one turn ([`Limits::wall`]).
    pub wall_ms: Option<u64>,
    /// The older spelling of both: sets `compute_ms` and `wall_ms` where
    /// they are not given.
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub max_actions: Option<usize>,
    pub max_action_bytes: Option<usize>,
    pub max_log_bytes: Option<usize>,
    pub max_log_lines: Option<usize>,
    pub fuel: Option<u64>,
    /// Outbound HTTP requests per turn.
    pub http_calls: Option<u32>,
    /// Largest request body a plugin may send.
    pub http_request_bytes: Option<usize>,
    /// Largest response body a plugin may receive.
    pub http_response_bytes: Option<usize>,
    /// One request, redirects included, to its last body byte.
    pub http_timeout_ms: Option<u64>,
}

/// Capabilities beyond the default sandbox. All off by default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Real time: the wall clock (otherwise it reads as the Unix epoch) and
    /// the monotonic clock with real sleeps (otherwise time is virtual: it
    /// moves only by the plugin's own sleeps, which return at once).
    pub clock: bool,
    /// The URLs the plugin may call (`digishare:bot@0.3.0`): scheme, host
    /// (or `*.` and one label), port and path prefix, e.g.
    /// `["https://api.shop.example", "https://*.crm.example/v2/"]`.
    pub http: Vec<HttpGrant>,
    /// Secrets the plugin may use as `{{secret:NAME}}` in the header values
    /// of requests to those URLs; the operator supplies their values.
    pub secrets: Vec<SecretName>,
}

impl Grants {
    /// Whether the plugin may reach the network, so its turns may wait on
    /// remote hosts: its default wall-clock deadline is then
    /// [`RuntimeConfig::network_wall`](crate::RuntimeConfig::network_wall).
    pub fn network(&self) -> bool {
        !self.http.is_empty()
    }
}

/// What one invocation (a turn) may use.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Limits {
    /// Compute budget: the turn's time not spent waiting on a host call
    /// (running its code, instantiation included), checked at each epoch
    /// tick.
    pub compute: Duration,
    /// Wall-clock deadline of the whole turn, host calls included.
    pub wall: Duration,
    /// Linear memory cap, per memory.
    pub memory_bytes: usize,
    /// Table elements cap, per table.
    pub table_elements: usize,
    /// Core instances one component may have (host-wide: the instance
    /// pool is sized by it; not in `NAME.toml`).
    pub core_instances: usize,
    /// Linear memories one component may have (host-wide, as above).
    pub memories: usize,
    /// Tables one component may have (host-wide, as above).
    pub tables: usize,
    pub max_actions: usize,
    /// Total size of the strings in the returned actions.
    pub max_action_bytes: usize,
    /// stdout + stderr + `log` output kept per event.
    pub max_log_bytes: usize,
    /// `log` calls kept per event (each is a line of the host's log).
    pub max_log_lines: usize,
    /// Fuel per invocation when fuel metering is on for the engine.
    pub fuel: Option<u64>,
    /// Outbound HTTP caps (used only with an http grant).
    pub http: HttpLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            compute: Duration::from_millis(100),
            wall: Duration::from_millis(100),
            memory_bytes: 64 << 20,
            table_elements: 20_000,
            // Measured (docs/operations.md): a Rust guest has 3 core
            // instances, 1 memory and 2 tables; componentize-py's Python
            // guest 14, 1, 2; a ComponentizeJS guest 4, 1, 2. Room for a
            // composition of two, not for hundreds.
            core_instances: 32,
            memories: 2,
            tables: 4,
            max_actions: 50,
            max_action_bytes: 256 << 10,
            max_log_bytes: 16 << 10,
            max_log_lines: 100,
            fuel: None,
            http: HttpLimits::default(),
        }
    }
}

/// The most a plugin's own `NAME.toml` may ask for, whatever it says: a
/// plugin folder is not a way to give one plugin minutes of a plugin
/// thread, thousands of replies per event or megabytes of log lines. The
/// host's own defaults are never lowered (a ceiling is the larger of the
/// constant and the default); memory has its own, the pool's slot size.
pub mod ceiling {
    use std::time::Duration;

    /// `compute_ms` (and `timeout_ms` where it stands for it).
    pub const COMPUTE: Duration = Duration::from_secs(10);
    /// `wall_ms` (and `timeout_ms` where it stands for it).
    pub const WALL: Duration = Duration::from_secs(60);
    pub const MAX_ACTIONS: usize = 200;
    pub const MAX_ACTION_BYTES: usize = 4 << 20;
    pub const MAX_LOG_BYTES: usize = 1 << 20;
    pub const MAX_LOG_LINES: usize = 10_000;
    /// Roughly seconds of compute: past the deadline anyway.
    pub const FUEL: u64 = 100_000_000_000;
}

/// A manifest limit lowered to the host's ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capped {
    /// Its `NAME.toml` key, e.g. `timeout_ms`.
    pub limit: &'static str,
    pub asked: u64,
    pub ceiling: u64,
}

impl std::fmt::Display for Capped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "limits.{} = {} is over the host's ceiling of {}; using {}",
            self.limit, self.asked, self.ceiling, self.ceiling
        )
    }
}

impl Limits {
    /// These defaults with a manifest's overrides applied, each at most
    /// its [`ceiling`] (see [`Limits::with_ceilings`]).
    pub fn with(&self, o: &LimitOverrides) -> Limits {
        self.with_ceilings(o, usize::MAX).0
    }

    /// These defaults with a manifest's overrides applied, each capped at
    /// its [`ceiling`] (memory at `max_memory_bytes`), and what was capped.
    pub fn with_ceilings(
        &self,
        o: &LimitOverrides,
        max_memory_bytes: usize,
    ) -> (Limits, Vec<Capped>) {
        let mut capped = Vec::new();
        let mut cap = |limit: &'static str, asked: Option<u64>, ceiling: u64| {
            asked.map(|asked| {
                if asked > ceiling {
                    capped.push(Capped {
                        limit,
                        asked,
                        ceiling,
                    });
                    ceiling
                } else {
                    asked
                }
            })
        };
        let to_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        // `timeout_ms`, the older spelling, stands for either budget not
        // given by its own name.
        let named = |own: Option<u64>, name: &'static str| match own {
            Some(v) => (Some(v), name),
            None => (o.timeout_ms, "timeout_ms"),
        };
        let (asked, name) = named(o.compute_ms, "compute_ms");
        let compute_ms = cap(name, asked, ms(ceiling::COMPUTE.max(self.compute)));
        let (asked, name) = named(o.wall_ms, "wall_ms");
        let wall_ms = cap(name, asked, ms(ceiling::WALL.max(self.wall)));
        let memory_ceiling_mb = to_u64(max_memory_bytes >> 20).max(1);
        let memory_mb = cap("memory_mb", o.memory_mb, memory_ceiling_mb);
        let max_actions = cap(
            "max_actions",
            o.max_actions.map(to_u64),
            to_u64(ceiling::MAX_ACTIONS.max(self.max_actions)),
        );
        let max_action_bytes = cap(
            "max_action_bytes",
            o.max_action_bytes.map(to_u64),
            to_u64(ceiling::MAX_ACTION_BYTES.max(self.max_action_bytes)),
        );
        let max_log_bytes = cap(
            "max_log_bytes",
            o.max_log_bytes.map(to_u64),
            to_u64(ceiling::MAX_LOG_BYTES.max(self.max_log_bytes)),
        );
        let max_log_lines = cap(
            "max_log_lines",
            o.max_log_lines.map(to_u64),
            to_u64(ceiling::MAX_LOG_LINES.max(self.max_log_lines)),
        );
        let fuel = cap("fuel", o.fuel, ceiling::FUEL.max(self.fuel.unwrap_or(0)));
        let limits = Limits {
            compute: compute_ms.map_or(self.compute, Duration::from_millis),
            wall: wall_ms.map_or(self.wall, Duration::from_millis),
            memory_bytes: memory_mb
                .map(|mb| to_usize(mb).saturating_mul(1 << 20))
                .unwrap_or(self.memory_bytes)
                .min(max_memory_bytes),
            max_actions: max_actions.map(to_usize).unwrap_or(self.max_actions),
            max_action_bytes: max_action_bytes
                .map(to_usize)
                .unwrap_or(self.max_action_bytes),
            max_log_bytes: max_log_bytes.map(to_usize).unwrap_or(self.max_log_bytes),
            max_log_lines: max_log_lines.map(to_usize).unwrap_or(self.max_log_lines),
            fuel: fuel.or(self.fuel),
            http: HttpLimits {
                calls: o.http_calls.unwrap_or(self.http.calls),
                request_bytes: o.http_request_bytes.unwrap_or(self.http.request_bytes),
                response_bytes: o.http_response_bytes.unwrap_or(self.http.response_bytes),
                timeout: o
                    .http_timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(self.http.timeout),
                redirects: self.http.redirects,
            },
            ..self.clone()
        };
        (limits, capped)
    }
}

impl Manifest {
    /// Parses `NAME.toml`.
    pub fn parse(text: &str) -> Result<Manifest, toml::de::Error> {
        let manifest: Manifest = toml::from_str(text)?;
        if manifest.debounce_ms.is_some_and(|ms| ms > DEBOUNCE_MAX_MS) {
            return Err(serde::de::Error::custom(format!(
                "debounce_ms is at most {DEBOUNCE_MAX_MS} (every message of a burst waits for it)"
            )));
        }
        if let Some(fallback) = &manifest.fallback
            && let Err(why) = fallback.actions()
        {
            return Err(serde::de::Error::custom(format!("[fallback]: {why}")));
        }
        Ok(manifest)
    }

    /// The debounce window, if the plugin has one.
    pub fn debounce(&self) -> Option<Duration> {
        self.debounce_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms.min(DEBOUNCE_MAX_MS)))
    }

    /// Whether conversations keep the version they started on.
    pub fn pins_conversations(&self) -> bool {
        self.pin == Some(Pin::Conversation)
    }

    pub fn wants(&self, filter: EventFilter) -> bool {
        self.enabled
            && (matches!(filter, EventFilter::Timer | EventFilter::Resume)
                || self.events.contains(&filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_is_conversation_or_nothing() {
        assert!(
            Manifest::parse("pin = \"conversation\"\n")
                .unwrap()
                .pins_conversations()
        );
        assert!(!Manifest::default().pins_conversations());
        for bad in ["pin = \"customer\"\n", "pin = true\n"] {
            assert!(Manifest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_fallback_is_checked_when_read() {
        let m =
            Manifest::parse("[fallback]\naction = \"hand_off\"\nuser_id = \"usr_1\"\n").unwrap();
        let f = m.fallback.unwrap();
        assert_eq!(f.actions().unwrap().len(), 1);
        assert!(f.as_handler);
        let text =
            Manifest::parse("[fallback]\naction = \"text\"\ntext = \"Un instant\"\n").unwrap();
        assert_eq!(text.fallback.unwrap().actions().unwrap().len(), 1);
        for bad in [
            "[fallback]\naction = \"hand_off\"\n",
            "[fallback]\naction = \"text\"\n",
            "[fallback]\naction = \"text\"\ntext = \"\"\n",
            "[fallback]\naction = \"shout\"\n",
        ] {
            assert!(Manifest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Manifest::parse("").unwrap(), Manifest::default());
    }

    #[test]
    fn overrides_apply() {
        let m = Manifest::parse(
            "enabled = true\nevents = [\"message\"]\n[config]\ngreeting = \"Salam\"\n[limits]\ntimeout_ms = 20\nmemory_mb = 8\n",
        )
        .unwrap();
        assert!(m.wants(EventFilter::Message));
        assert!(!m.wants(EventFilter::NewConversation));
        let limits = Limits::default().with(&m.limits);
        assert_eq!(limits.compute, Duration::from_millis(20));
        assert_eq!(limits.wall, Duration::from_millis(20));
        assert_eq!(limits.memory_bytes, 8 << 20);
        assert_eq!(limits.max_actions, 50);
        assert_eq!(m.config["greeting"], "Salam");
        assert!(!m.assist);
        assert!(Manifest::parse("assist = true").unwrap().assist);
    }

    #[test]
    fn http_grants_secrets_and_caps() {
        let m = Manifest::parse(
            r#"
[grants]
http = ["https://api.shop.example", "https://*.crm.example/v2/"]
secrets = ["ORDERS_TOKEN"]
[limits]
http_calls = 3
http_response_bytes = 1000
http_timeout_ms = 250
"#,
        )
        .unwrap();
        assert_eq!(m.grants.http.len(), 2);
        assert_eq!(m.grants.http[1].to_string(), "https://*.crm.example/v2/");
        assert_eq!(m.grants.secrets[0].as_str(), "ORDERS_TOKEN");
        let limits = Limits::default().with(&m.limits);
        assert_eq!(limits.http.calls, 3);
        assert_eq!(limits.http.response_bytes, 1000);
        assert_eq!(limits.http.timeout, Duration::from_millis(250));
        assert_eq!(
            limits.http.request_bytes,
            HttpLimits::default().request_bytes
        );
        // A bad grant or secret name fails the manifest, saying which.
        let e = Manifest::parse("[grants]\nhttp = [\"https://*\"]").unwrap_err();
        assert!(e.to_string().contains("https://*"), "{e}");
        let e = Manifest::parse("[grants]\nsecrets = [\"orders-token\"]").unwrap_err();
        assert!(e.to_string().contains("orders-token"), "{e}");
    }

    #[test]
    fn compute_and_wall_override_the_older_timeout() {
        let m = Manifest::parse("[limits]\ntimeout_ms = 30\nwall_ms = 5000\n").unwrap();
        let limits = Limits::default().with(&m.limits);
        assert_eq!(limits.compute, Duration::from_millis(30));
        assert_eq!(limits.wall, Duration::from_millis(5000));
        let m = Manifest::parse("[limits]\ncompute_ms = 7\n").unwrap();
        let limits = Limits::default().with(&m.limits);
        assert_eq!(limits.compute, Duration::from_millis(7));
        assert_eq!(limits.wall, Limits::default().wall);
    }

    #[test]
    fn a_manifest_cannot_ask_past_the_host_ceilings() {
        let m = Manifest::parse(
            "[limits]\ncompute_ms = 600000\nwall_ms = 600000\nmemory_mb = 18446744073709551615\nmax_actions = 1000000\nmax_action_bytes = 1000000000\nmax_log_bytes = 1000000000\nmax_log_lines = 1000000000\nfuel = 18446744073709551615\n",
        )
        .unwrap();
        let (limits, capped) = Limits::default().with_ceilings(&m.limits, 256 << 20);
        assert_eq!(limits.compute, ceiling::COMPUTE);
        assert_eq!(limits.wall, ceiling::WALL);
        assert_eq!(limits.memory_bytes, 256 << 20);
        assert_eq!(limits.max_actions, ceiling::MAX_ACTIONS);
        assert_eq!(limits.max_action_bytes, ceiling::MAX_ACTION_BYTES);
        assert_eq!(limits.max_log_bytes, ceiling::MAX_LOG_BYTES);
        assert_eq!(limits.max_log_lines, ceiling::MAX_LOG_LINES);
        assert_eq!(limits.fuel, Some(ceiling::FUEL));
        let names: Vec<&str> = capped.iter().map(|c| c.limit).collect();
        assert_eq!(
            names,
            [
                "compute_ms",
                "wall_ms",
                "memory_mb",
                "max_actions",
                "max_action_bytes",
                "max_log_bytes",
                "max_log_lines",
                "fuel"
            ]
        );
        assert_eq!(
            capped[0].to_string(),
            "limits.compute_ms = 600000 is over the host's ceiling of 10000; using 10000"
        );
        // Under the ceilings: as asked, nothing reported.
        let m = Manifest::parse("[limits]\ntimeout_ms = 2000\nmax_actions = 100\n").unwrap();
        let (limits, capped) = Limits::default().with_ceilings(&m.limits, 256 << 20);
        assert_eq!(limits.wall, Duration::from_secs(2));
        assert_eq!(limits.max_actions, 100);
        assert!(capped.is_empty());
        // A host default above a ceiling is the ceiling.
        let generous = Limits {
            compute: Duration::from_secs(60),
            ..Limits::default()
        };
        let m = Manifest::parse("[limits]\ncompute_ms = 45000\n").unwrap();
        assert_eq!(generous.with(&m.limits).compute, Duration::from_secs(45));
        // The older `timeout_ms` is capped under either name it stands for.
        let m = Manifest::parse("[limits]\ntimeout_ms = 600000\n").unwrap();
        let (limits, capped) = Limits::default().with_ceilings(&m.limits, 256 << 20);
        assert_eq!(
            (limits.compute, limits.wall),
            (ceiling::COMPUTE, ceiling::WALL)
        );
        assert_eq!(capped.len(), 2);
        assert!(capped.iter().all(|c| c.limit == "timeout_ms"));
    }

    #[test]
    fn typos_are_errors() {
        assert!(Manifest::parse("enabeld = false").is_err());
    }
}
