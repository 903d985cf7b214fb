//! `NAME.toml`, the optional file beside a plugin's `NAME.wasm`: whether it
//! is enabled, which events it wants, its private configuration, its limits,
//! the capabilities it is granted, and whether it assists human agents.

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

/// The most a plugin's `[limits]` may ask for; a larger value is cut to
/// it (as `memory_mb` is cut to the runtime's `max_memory_bytes`): a
/// manifest cannot buy a turn that holds a lane for minutes or floods the
/// outbox or the host's log.
pub mod ceiling {
    use std::time::Duration;
    /// `timeout_ms`.
    pub const TIMEOUT: Duration = Duration::from_secs(30);
    /// `fuel` (about the work of the 30 s deadline on a fast core).
    pub const FUEL: u64 = 100_000_000_000;
    /// `max_actions`.
    pub const ACTIONS: usize = 200;
    /// `max_action_bytes`.
    pub const ACTION_BYTES: usize = 1 << 20;
    /// `max_log_bytes`.
    pub const LOG_BYTES: usize = 1 << 20;
    /// `max_log_lines`.
    pub const LOG_LINES: usize = 10_000;
}

/// Per-plugin overrides of [`Limits`]; unset fields keep the host default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitOverrides {
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub max_actions: Option<usize>,
    pub max_action_bytes: Option<usize>,
    pub max_log_bytes: Option<usize>,
    pub max_log_lines: Option<usize>,
    pub fuel: Option<u64>,
}

/// Capabilities beyond the default sandbox. All off by default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// See the real wall clock (otherwise it reads as the Unix epoch).
    pub clock: bool,
}

/// What one invocation may use.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Limits {
    /// Wall-clock deadline, enforced by epoch interruption.
    pub timeout: Duration,
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(100),
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
        }
    }
}

impl Limits {
    /// These defaults with a manifest's overrides applied, each cut to its
    /// [`ceiling`].
    pub fn with(&self, o: &LimitOverrides) -> Limits {
        Limits {
            timeout: o
                .timeout_ms
                .map(|ms| Duration::from_millis(ms).min(ceiling::TIMEOUT))
                .unwrap_or(self.timeout),
            // The runtime cuts memory to its `max_memory_bytes`.
            memory_bytes: o
                .memory_mb
                .map(|mb| usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX))
                .unwrap_or(self.memory_bytes),
            max_actions: o
                .max_actions
                .map_or(self.max_actions, |n| n.min(ceiling::ACTIONS)),
            max_action_bytes: o
                .max_action_bytes
                .map_or(self.max_action_bytes, |n| n.min(ceiling::ACTION_BYTES)),
            max_log_bytes: o
                .max_log_bytes
                .map_or(self.max_log_bytes, |n| n.min(ceiling::LOG_BYTES)),
            max_log_lines: o
                .max_log_lines
                .map_or(self.max_log_lines, |n| n.min(ceiling::LOG_LINES)),
            fuel: o.fuel.map(|f| f.min(ceiling::FUEL)).or(self.fuel),
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
        assert_eq!(limits.timeout, Duration::from_millis(20));
        assert_eq!(limits.memory_bytes, 8 << 20);
        assert_eq!(limits.max_actions, 50);
        assert_eq!(m.config["greeting"], "Salam");
        assert!(!m.assist);
        assert!(Manifest::parse("assist = true").unwrap().assist);
    }

    #[test]
    fn overrides_are_cut_to_the_host_ceilings() {
        let m = Manifest::parse(
            "[limits]\ntimeout_ms = 18446744073709551615\nmemory_mb = 18446744073709551615\nmax_actions = 100000\nmax_action_bytes = 1000000000\nmax_log_bytes = 1000000000\nmax_log_lines = 1000000000\nfuel = 18446744073709551615\n",
        )
        .unwrap();
        let limits = Limits::default().with(&m.limits);
        assert_eq!(limits.timeout, ceiling::TIMEOUT);
        assert_eq!(limits.memory_bytes, usize::MAX);
        assert_eq!(limits.max_actions, ceiling::ACTIONS);
        assert_eq!(limits.max_action_bytes, ceiling::ACTION_BYTES);
        assert_eq!(limits.max_log_bytes, ceiling::LOG_BYTES);
        assert_eq!(limits.max_log_lines, ceiling::LOG_LINES);
        assert_eq!(limits.fuel, Some(ceiling::FUEL));
        let within = Manifest::parse("[limits]\ntimeout_ms = 30000\nmax_log_lines = 5\n").unwrap();
        let limits = Limits::default().with(&within.limits);
        assert_eq!(limits.timeout, Duration::from_secs(30));
        assert_eq!(limits.max_log_lines, 5);
    }

    #[test]
    fn typos_are_errors() {
        assert!(Manifest::parse("enabeld = false").is_err());
    }
}
