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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFilter {
    NewConversation,
    Message,
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
    /// Core instances, memories and tables a component may create.
    pub instances: usize,
    pub max_actions: usize,
    /// Total size of the strings in the returned actions.
    pub max_action_bytes: usize,
    /// stdout + stderr + `log` output kept per event.
    pub max_log_bytes: usize,
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
            instances: 32,
            max_actions: 50,
            max_action_bytes: 256 << 10,
            max_log_bytes: 16 << 10,
            fuel: None,
            http: HttpLimits::default(),
        }
    }
}

impl Limits {
    /// These defaults with a manifest's overrides applied.
    pub fn with(&self, o: &LimitOverrides) -> Limits {
        let ms = |v: Option<u64>, default: Duration| {
            v.or(o.timeout_ms).map_or(default, Duration::from_millis)
        };
        Limits {
            compute: ms(o.compute_ms, self.compute),
            wall: ms(o.wall_ms, self.wall),
            memory_bytes: o
                .memory_mb
                .map(|mb| (mb as usize) << 20)
                .unwrap_or(self.memory_bytes),
            max_actions: o.max_actions.unwrap_or(self.max_actions),
            max_action_bytes: o.max_action_bytes.unwrap_or(self.max_action_bytes),
            max_log_bytes: o.max_log_bytes.unwrap_or(self.max_log_bytes),
            fuel: o.fuel.or(self.fuel),
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
        }
    }
}

impl Manifest {
    /// Parses `NAME.toml`.
    pub fn parse(text: &str) -> Result<Manifest, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn wants(&self, filter: EventFilter) -> bool {
        self.enabled && self.events.contains(&filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn typos_are_errors() {
        assert!(Manifest::parse("enabeld = false").is_err());
    }
}
