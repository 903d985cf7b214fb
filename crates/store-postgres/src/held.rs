//! What this replica remembers of the conversations it handles, so that a
//! webhook costs one statement per stage instead of one per question:
//!
//! - [`Claims`]: the lease a webhook's insert took in its own statement,
//!   kept until the dispatcher's lane claims the conversation, which then
//!   needs no statement of its own; and the conversations whose last
//!   completion gave their lease back, whose lane then releases nothing.
//! - [`Records`]: each conversation's record at the highest `version` this
//!   replica has read or written (the column a trigger bumps on every
//!   update, migration 12), so a newer read never loses to an older one
//!   that answered later. A turn decided on a record another replica has
//!   changed since is refused at completion (`expect`), as on SQLite.
//!
//! Both are hints: a missing or expired entry costs a statement, never a
//! wrong answer. Both are bounded.

use digibot_store::{ConversationRecord, StoredEvent};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Beyond this many entries, a map drops what it can (claims past their
/// age) or starts afresh (records): a replica handles far fewer
/// conversations at once.
const BOUND: usize = 16_384;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an insert's lease claim found.
#[derive(Debug, Clone)]
pub(crate) enum Claim {
    /// Ours now, with the conversation's other pending events (those that
    /// reached other replicas first).
    Held(Vec<StoredEvent>),
    /// Another replica holds it and was told an event waits.
    Elsewhere,
}

#[derive(Default)]
pub(crate) struct Claims {
    taken: Mutex<HashMap<String, (Instant, Claim)>>,
    /// Conversations whose last completion released the lease.
    released: Mutex<HashSet<String>>,
}

impl Claims {
    /// An insert's claim of `conversation`; a later one replaces it (it
    /// saw everything the earlier one did).
    pub(crate) fn taken(&self, conversation: &str, claim: Claim, max_age: Duration) {
        lock(&self.released).remove(conversation);
        let mut taken = lock(&self.taken);
        if taken.len() >= BOUND {
            taken.retain(|_, (at, _)| at.elapsed() < max_age);
        }
        taken.insert(conversation.to_string(), (Instant::now(), claim));
    }

    /// The insert's claim of `conversation`, if one is young enough to
    /// stand for a claim made now (its lease has most of its time left).
    pub(crate) fn take(&self, conversation: &str, max_age: Duration) -> Option<Claim> {
        let (at, claim) = lock(&self.taken).remove(conversation)?;
        (at.elapsed() < max_age).then_some(claim)
    }

    /// A completion gave the lease back.
    pub(crate) fn released(&self, conversation: &str) {
        let mut released = lock(&self.released);
        if released.len() >= BOUND {
            released.clear();
        }
        released.insert(conversation.to_string());
    }

    /// Whether a completion already gave the lease back (and nothing took
    /// it again since), forgetting it: the lane's release is then done.
    pub(crate) fn was_released(&self, conversation: &str) -> bool {
        lock(&self.released).remove(conversation)
    }

    /// A claim of this replica's own statement: an earlier release is void.
    pub(crate) fn claimed(&self, conversation: &str) {
        lock(&self.released).remove(conversation);
    }
}

#[derive(Default)]
pub(crate) struct Records {
    by_id: Mutex<HashMap<String, (i64, ConversationRecord)>>,
}

impl Records {
    /// `record` as read or written at `version`, unless a newer one is
    /// known.
    pub(crate) fn seen(&self, version: i64, record: ConversationRecord) {
        let mut by_id = lock(&self.by_id);
        if by_id.len() >= BOUND {
            by_id.clear();
        }
        match by_id.get_mut(&record.id) {
            Some((known, _)) if *known > version => {}
            Some(entry) => *entry = (version, record),
            None => {
                by_id.insert(record.id.clone(), (version, record));
            }
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<ConversationRecord> {
        lock(&self.by_id).get(id).map(|(_, r)| r.clone())
    }

    /// Read afresh next time: the row is gone, or changed in a way this
    /// replica did not see the version of.
    pub(crate) fn forget(&self, id: &str) {
        lock(&self.by_id).remove(id);
    }

    pub(crate) fn clear(&self) {
        lock(&self.by_id).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digibot_domain::event::ConversationState;

    fn record(id: &str, state: ConversationState) -> ConversationRecord {
        ConversationRecord {
            id: id.into(),
            state,
            changed_at: 0,
            reason: String::new(),
            channel: None,
            last_customer_at: None,
            last_agent_at: None,
            customer_id: None,
        }
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let records = Records::default();
        records.seen(3, record("c", ConversationState::Human));
        records.seen(2, record("c", ConversationState::Bot));
        assert_eq!(records.get("c").unwrap().state, ConversationState::Human);
        records.seen(3, record("c", ConversationState::Closed));
        assert_eq!(records.get("c").unwrap().state, ConversationState::Closed);
        records.forget("c");
        assert!(records.get("c").is_none());
    }

    #[test]
    fn a_claim_is_taken_once_and_only_while_young() {
        let claims = Claims::default();
        claims.taken("c", Claim::Elsewhere, Duration::from_secs(10));
        assert!(matches!(
            claims.take("c", Duration::from_secs(10)),
            Some(Claim::Elsewhere)
        ));
        assert!(claims.take("c", Duration::from_secs(10)).is_none());
        claims.taken("c", Claim::Held(vec![]), Duration::from_secs(10));
        assert!(claims.take("c", Duration::ZERO).is_none());
    }

    #[test]
    fn a_release_is_void_once_the_lease_is_taken_again() {
        let claims = Claims::default();
        claims.released("c");
        claims.taken("c", Claim::Held(vec![]), Duration::from_secs(10));
        assert!(!claims.was_released("c"));
        claims.released("c");
        assert!(claims.was_released("c"));
        assert!(!claims.was_released("c"));
    }
}
