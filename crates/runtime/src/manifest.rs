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

/// The most a plugin's own `NAME.toml` may ask for, whatever it says: a
/// plugin folder is not a way to give one plugin minutes of a plugin
/// thread, thousands of replies per event or megabytes of log lines. The
/// host's own defaults are never lowered (a ceiling is the larger of the
/// constant and the default); memory has its own, the pool's slot size.
pub mod ceiling {
    use std::time::Duration;

    pub const TIMEOUT: Duration = Duration::from_secs(30);
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
        let timeout_ceiling = ceiling::TIMEOUT.max(self.timeout);
        let timeout_ms = cap(
            "timeout_ms",
            o.timeout_ms,
            u64::try_from(timeout_ceiling.as_millis()).unwrap_or(u64::MAX),
        );
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
            timeout: timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(self.timeout),
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
            ..self.clone()
        };
        (limits, capped)
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
    fn a_manifest_cannot_ask_past_the_host_ceilings() {
        let m = Manifest::parse(
            "[limits]\ntimeout_ms = 600000\nmemory_mb = 18446744073709551615\nmax_actions = 1000000\nmax_action_bytes = 1000000000\nmax_log_bytes = 1000000000\nmax_log_lines = 1000000000\nfuel = 18446744073709551615\n",
        )
        .unwrap();
        let (limits, capped) = Limits::default().with_ceilings(&m.limits, 256 << 20);
        assert_eq!(limits.timeout, ceiling::TIMEOUT);
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
                "timeout_ms",
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
            "limits.timeout_ms = 600000 is over the host's ceiling of 30000; using 30000"
        );
        // Under the ceilings: as asked, nothing reported.
        let m = Manifest::parse("[limits]\ntimeout_ms = 2000\nmax_actions = 100\n").unwrap();
        let (limits, capped) = Limits::default().with_ceilings(&m.limits, 256 << 20);
        assert_eq!(limits.timeout, Duration::from_secs(2));
        assert_eq!(limits.max_actions, 100);
        assert!(capped.is_empty());
        // A host default above a ceiling is the ceiling.
        let generous = Limits {
            timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let m = Manifest::parse("[limits]\ntimeout_ms = 45000\n").unwrap();
        assert_eq!(generous.with(&m.limits).timeout, Duration::from_secs(45));
    }

    #[test]
    fn typos_are_errors() {
        assert!(Manifest::parse("enabeld = false").is_err());
    }
}
