//! A plugin's KV: the writes made during a turn (committed with its event),
//! how much it holds (its usage, kept by the store), and the quotas that
//! bound it, with the one rule that judges a write against them.
//!
//! Sizes are bytes of key plus value (UTF-8), the same in every back end.
//! A quota applies to a *scope* (today the conversation: a plugin's state
//! in one conversation) and to the plugin as a whole (every scope it
//! writes); the scopes the next issue adds (`customer`, `plugin`) reuse
//! [`KvQuota`] and [`judge`].

use serde::Serialize;

/// One KV write of a plugin, applied with the event it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    Set { key: String, value: String },
    Delete { key: String },
}

/// The KV writes of one plugin for one conversation.
#[derive(Debug, Clone)]
pub struct KvChanges {
    pub plugin: String,
    pub conversation_id: String,
    pub writes: Vec<KvWrite>,
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

/// What a plugin holds, as committed: in the scope a turn writes (its
/// conversation) and in all of its scopes together.
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
    /// Per plugin, over all of its conversations.
    pub plugin: KvQuota,
}

impl Default for KvQuotas {
    fn default() -> Self {
        KvQuotas {
            conversation: KvQuota {
                keys: 1_000,
                bytes: 1 << 20,
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
    /// `this conversation's` or `this plugin's`.
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
    fn entries_are_measured_in_utf8_bytes() {
        assert_eq!(entry_bytes("clé", "été"), 9);
    }
}
