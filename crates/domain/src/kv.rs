//! A plugin's KV: its scopes, the writes made during a turn (committed with
//! its event), how much it holds (its usage, kept by the store), and the
//! quotas that bound it, with the one rule that judges a write against
//! them.
//!
//! A plugin's entries live in one of three scopes, always its own (plugin
//! A never reaches plugin B's entries, in any scope):
//! - `conversation`: (plugin, the event's conversation), what `kv.get`,
//!   `kv.set` and `kv.delete` use; serialised by the conversation's lane;
//! - `customer`: (plugin, the event's customer, Digishare's third id),
//!   across that customer's conversations;
//! - `plugin`: (plugin), shared by all of its conversations.
//!
//! Customer and plugin entries can be written by two conversations at
//! once: each turn's last write of a key is applied at its commit, and
//! the last committed write wins. The store counts usage from the rows as
//! they are in that commit, so the counts stay exact; a turn is judged
//! against what was committed when it first wrote plus its own writes.
//!
//! Sizes are bytes of key plus value (UTF-8), the same in every back end.
//! A quota applies to each scope (one conversation, one customer, the
//! plugin's shared entries) and to the plugin as a whole (every scope).

use serde::Serialize;

/// The scope a plugin names in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Conversation,
    Customer,
    Plugin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Conversation => "conversation",
            Scope::Customer => "customer",
            Scope::Plugin => "plugin",
        }
    }

    /// How a quota refusal names it.
    pub fn whose(self) -> &'static str {
        match self {
            Scope::Conversation => "this conversation's",
            Scope::Customer => "this customer's",
            Scope::Plugin => "this plugin's shared",
        }
    }
}

/// A scope resolved for one turn by the host, never by the plugin: the
/// conversation is the one of its [`KvChanges`] (the event's), the
/// customer the event's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KvScope {
    Conversation,
    Customer(String),
    Plugin,
}

impl KvScope {
    pub fn scope(&self) -> Scope {
        match self {
            KvScope::Conversation => Scope::Conversation,
            KvScope::Customer(_) => Scope::Customer,
            KvScope::Plugin => Scope::Plugin,
        }
    }

    /// Whose entries within the scope, as the store keys them: the
    /// customer id, or `""` for the plugin's shared entries (unused for
    /// the conversation, keyed by its id).
    pub fn owner(&self) -> &str {
        match self {
            KvScope::Customer(id) => id,
            KvScope::Conversation | KvScope::Plugin => "",
        }
    }
}

/// The longest time-to-live a value may be given: a year.
pub const TTL_MAX_MS: u64 = 365 * 24 * 3_600_000;

/// One KV write of a plugin, applied with the event it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    Set {
        scope: KvScope,
        key: String,
        value: String,
        /// When the value stops being read (ms since the epoch); `None`:
        /// kept until deleted (or its scope's retention).
        expires_at: Option<i64>,
    },
    Delete {
        scope: KvScope,
        key: String,
    },
}

impl KvWrite {
    /// A conversation-scoped set without a TTL: what `kv.set` writes.
    pub fn set(key: impl Into<String>, value: impl Into<String>) -> KvWrite {
        KvWrite::Set {
            scope: KvScope::Conversation,
            key: key.into(),
            value: value.into(),
            expires_at: None,
        }
    }

    /// A conversation-scoped delete: what `kv.delete` writes.
    pub fn delete(key: impl Into<String>) -> KvWrite {
        KvWrite::Delete {
            scope: KvScope::Conversation,
            key: key.into(),
        }
    }

    pub fn scope(&self) -> &KvScope {
        match self {
            KvWrite::Set { scope, .. } | KvWrite::Delete { scope, .. } => scope,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            KvWrite::Set { key, .. } | KvWrite::Delete { key, .. } => key,
        }
    }
}

/// The KV writes of one plugin for one event: in its conversation and in
/// the other scopes each write names.
#[derive(Debug, Clone)]
pub struct KvChanges {
    pub plugin: String,
    pub conversation_id: String,
    pub writes: Vec<KvWrite>,
}

impl KvChanges {
    /// Each (scope, key)'s last write, in first-written order: what the
    /// commit applies (the last write is what the plugin meant).
    pub fn last_writes(&self) -> Vec<&KvWrite> {
        let mut last: Vec<&KvWrite> = Vec::new();
        for w in &self.writes {
            match last
                .iter_mut()
                .find(|l| l.scope() == w.scope() && l.key() == w.key())
            {
                Some(slot) => *slot = w,
                None => last.push(w),
            }
        }
        last
    }
}

/// The stored size of one entry: its key's bytes plus its value's.
pub fn entry_bytes(key: &str, value: &str) -> i64 {
    (key.len() + value.len()) as i64
}

/// How much KV something holds (or how much a write changes it by).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KvSize {
    pub keys: i64,
    pub bytes: i64,
}

impl std::ops::Add for KvSize {
    type Output = KvSize;
    fn add(self, o: KvSize) -> KvSize {
        KvSize {
            keys: self.keys + o.keys,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl std::ops::AddAssign for KvSize {
    fn add_assign(&mut self, o: KvSize) {
        *self = *self + o;
    }
}

/// What a plugin holds, as committed: in one scope (a conversation, a
/// customer, its shared entries) and in all of its scopes together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KvUsage {
    pub scope: KvSize,
    pub plugin: KvSize,
}

/// The most a scope (or a plugin) may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvQuota {
    pub keys: i64,
    pub bytes: i64,
}

/// The quotas of a plugin's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvQuotas {
    /// Per conversation, per plugin.
    pub conversation: KvQuota,
    /// Per customer, per plugin.
    pub customer: KvQuota,
    /// The plugin's shared (`plugin` scope) entries.
    pub shared: KvQuota,
    /// Per plugin, over all of its scopes.
    pub plugin: KvQuota,
}

impl KvQuotas {
    /// The quota of one scope.
    pub fn of(&self, scope: Scope) -> KvQuota {
        match scope {
            Scope::Conversation => self.conversation,
            Scope::Customer => self.customer,
            Scope::Plugin => self.shared,
        }
    }
}

impl Default for KvQuotas {
    fn default() -> Self {
        KvQuotas {
            conversation: KvQuota {
                keys: 1_000,
                bytes: 1 << 20,
            },
            customer: KvQuota {
                keys: 100,
                bytes: 64 << 10,
            },
            shared: KvQuota {
                keys: 10_000,
                bytes: 16 << 20,
            },
            plugin: KvQuota {
                keys: 1_000_000,
                bytes: 256 << 20,
            },
        }
    }
}

/// A write refused because it would take its scope or its plugin over a
/// quota. Its text is what the plugin receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{whose} kv would hold {would} {what}, the quota is {quota}")]
pub struct OverQuota {
    /// `this conversation's`, `this customer's`, `this plugin's shared`
    /// or (all scopes) `this plugin's`.
    pub whose: &'static str,
    /// `keys` or `bytes`.
    pub what: &'static str,
    pub would: i64,
    pub quota: i64,
}

/// Judges a write that changes `usage` (committed, plus what the turn
/// already wrote) by `delta`, for a scope under `scope_quota`. A write
/// that does not grow what is over a quota is always allowed, so a plugin
/// over a (lowered) quota can still shrink its state.
pub fn judge(
    usage: KvUsage,
    delta: KvSize,
    scope_quota: KvQuota,
    plugin_quota: KvQuota,
    scope_name: &'static str,
) -> Result<(), OverQuota> {
    let checks = [
        (
            scope_name,
            "keys",
            usage.scope.keys,
            delta.keys,
            scope_quota.keys,
        ),
        (
            scope_name,
            "bytes",
            usage.scope.bytes,
            delta.bytes,
            scope_quota.bytes,
        ),
        (
            "this plugin's",
            "keys",
            usage.plugin.keys,
            delta.keys,
            plugin_quota.keys,
        ),
        (
            "this plugin's",
            "bytes",
            usage.plugin.bytes,
            delta.bytes,
            plugin_quota.bytes,
        ),
    ];
    for (whose, what, now, delta, quota) in checks {
        let would = now.saturating_add(delta);
        if delta > 0 && would > quota {
            return Err(OverQuota {
                whose,
                what,
                would,
                quota,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUOTA: KvQuota = KvQuota {
        keys: 2,
        bytes: 100,
    };
    const ROOMY: KvQuota = KvQuota {
        keys: 1_000,
        bytes: 10_000,
    };

    fn usage(keys: i64, bytes: i64) -> KvUsage {
        KvUsage {
            scope: KvSize { keys, bytes },
            plugin: KvSize { keys, bytes },
        }
    }

    #[test]
    fn a_write_within_the_quota_passes_and_one_past_it_is_refused_with_numbers() {
        let c = "this conversation's";
        let grow = KvSize { keys: 1, bytes: 60 };
        assert_eq!(judge(usage(0, 0), grow, QUOTA, ROOMY, c), Ok(()));
        let refused = judge(usage(1, 60), grow, QUOTA, ROOMY, c).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "this conversation's kv would hold 120 bytes, the quota is 100"
        );
        let keys = judge(usage(2, 10), KvSize { keys: 1, bytes: 1 }, QUOTA, ROOMY, c);
        assert_eq!(
            keys.unwrap_err().to_string(),
            "this conversation's kv would hold 3 keys, the quota is 2"
        );
    }

    #[test]
    fn the_plugin_quota_counts_every_conversation() {
        let mut u = usage(1, 10);
        u.plugin = KvSize {
            keys: 999,
            bytes: 9_990,
        };
        let grow = KvSize { keys: 1, bytes: 20 };
        let refused = judge(u, grow, ROOMY, ROOMY, "this conversation's").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "this plugin's kv would hold 10010 bytes, the quota is 10000"
        );
    }

    #[test]
    fn shrinking_is_allowed_even_over_the_quota() {
        let shrink = KvSize {
            keys: 0,
            bytes: -50,
        };
        assert_eq!(
            judge(usage(5, 500), shrink, QUOTA, QUOTA, "this conversation's"),
            Ok(())
        );
        let delete = KvSize {
            keys: -1,
            bytes: -100,
        };
        assert_eq!(
            judge(usage(5, 500), delete, QUOTA, QUOTA, "this conversation's"),
            Ok(())
        );
    }

    #[test]
    fn the_last_write_of_each_scope_and_key_is_applied() {
        let customer = KvScope::Customer("thd_1".into());
        let changes = KvChanges {
            plugin: "p".into(),
            conversation_id: "c".into(),
            writes: vec![
                KvWrite::set("a", "1"),
                KvWrite::Set {
                    scope: customer.clone(),
                    key: "a".into(),
                    value: "x".into(),
                    expires_at: Some(5),
                },
                KvWrite::delete("a"),
                KvWrite::Set {
                    scope: KvScope::Plugin,
                    key: "a".into(),
                    value: "y".into(),
                    expires_at: None,
                },
            ],
        };
        let last = changes.last_writes();
        assert_eq!(last.len(), 3);
        assert_eq!(*last[0], KvWrite::delete("a"));
        assert_eq!(last[1].scope(), &customer);
        assert_eq!(last[2].scope(), &KvScope::Plugin);
    }

    #[test]
    fn entries_are_measured_in_utf8_bytes() {
        assert_eq!(entry_bytes("clé", "été"), 9);
    }
}
