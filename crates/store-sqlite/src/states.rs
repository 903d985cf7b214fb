//! The conversation states this process last committed, kept by the
//! writer thread so a lane reads its conversation's state without a round
//! trip (issue 20: the per-event read and its two thread hops).
//!
//! Every write to the `conversations` table goes through the helpers that
//! [`touch`] or [`fresh`] its row (`update_conversation`, `change_state`,
//! `forget_conversation`); the writer applies what they noted once its
//! transaction committed, so the cache never shows a state a rollback
//! undid. A read that missed fills the cache only if no write landed
//! while it ran ([`States::generation`]). What another process writes
//! (`digibot conversations release` on the same file) is not seen here:
//! the dispatcher says which state it decided a turn in
//! (`ConversationUpdate::expect`), and `complete_event` refuses a
//! completion whose conversation is no longer in it and drops the entry.

use digibot_store::ConversationRecord;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;

/// Entries kept before the cache starts over (a conversation's state is a
/// few hundred bytes: about 20 MiB at most).
const MAX_ENTRIES: usize = 65_536;

/// What a job did to a conversation's row, in the order it did it.
enum Touch {
    /// Changed or deleted: read it again.
    Changed(String),
    /// Its row as this transaction leaves it.
    Fresh(ConversationRecord),
}

thread_local! {
    /// The writer thread's notes for its current transaction.
    static NOTES: RefCell<Vec<Touch>> = const { RefCell::new(Vec::new()) };
}

/// Notes that the transaction changed (or deleted) conversation `id`.
pub(crate) fn touch(id: &str) {
    NOTES.with(|n| n.borrow_mut().push(Touch::Changed(id.to_string())));
}

/// Notes the row the transaction leaves conversation `record.id` in.
pub(crate) fn fresh(record: ConversationRecord) {
    NOTES.with(|n| n.borrow_mut().push(Touch::Fresh(record)));
}

/// Where the notes stand, before a job runs (see [`undo_since`]).
pub(crate) fn mark() -> usize {
    NOTES.with(|n| n.borrow().len())
}

/// A job that failed had its writes rolled back: what it noted as fresh
/// is not, so those rows are read again.
pub(crate) fn undo_since(mark: usize) {
    NOTES.with(|n| {
        for note in n.borrow_mut().iter_mut().skip(mark) {
            if let Touch::Fresh(r) = note {
                *note = Touch::Changed(std::mem::take(&mut r.id));
            }
        }
    });
}

/// The cache itself, shared by the writer and the readers.
#[derive(Default)]
pub(crate) struct States {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    rows: HashMap<String, ConversationRecord>,
    /// Bumped by every change the writer applies.
    generation: u64,
}

impl States {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The conversation's state as last committed here, if kept.
    pub(crate) fn get(&self, id: &str) -> Option<ConversationRecord> {
        self.lock().rows.get(id).cloned()
    }

    /// Taken before a read of the database, given back to [`fill`](Self::fill).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps what a read found, unless a write landed since `generation`
    /// (the read may predate it).
    pub(crate) fn fill(&self, generation: u64, record: &ConversationRecord) {
        let mut inner = self.lock();
        if inner.generation == generation {
            insert(&mut inner, record.clone());
        }
    }

    /// Applies the transaction's notes: `committed` false (the commit
    /// failed, nothing of it stands) drops every row it touched.
    pub(crate) fn apply(&self, committed: bool) {
        let notes = NOTES.with(|n| std::mem::take(&mut *n.borrow_mut()));
        if notes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.generation += 1;
        for note in notes {
            match note {
                Touch::Fresh(r) if committed => insert(&mut inner, r),
                Touch::Fresh(r) => {
                    inner.rows.remove(&r.id);
                }
                Touch::Changed(id) => {
                    inner.rows.remove(&id);
                }
            }
        }
    }
}

fn insert(inner: &mut Inner, record: ConversationRecord) {
    if inner.rows.len() >= MAX_ENTRIES && !inner.rows.contains_key(&record.id) {
        inner.rows.clear();
    }
    inner.rows.insert(record.id.clone(), record);
}

#[cfg(test)]
mod tests {
    use super::*;
    use digibot_domain::event::ConversationState;

    fn record(id: &str, state: ConversationState) -> ConversationRecord {
        ConversationRecord {
            id: id.into(),
            state,
            changed_at: 1,
            reason: "test".into(),
            channel: None,
            last_customer_at: None,
            last_agent_at: None,
            customer_id: None,
        }
    }

    #[test]
    fn a_failed_commit_keeps_nothing_it_touched() {
        let states = States::default();
        fresh(record("a", ConversationState::Bot));
        states.apply(true);
        assert_eq!(states.get("a").unwrap().state, ConversationState::Bot);
        fresh(record("a", ConversationState::Human));
        states.apply(false);
        assert!(states.get("a").is_none());
    }

    #[test]
    fn a_later_change_in_the_same_transaction_wins() {
        let states = States::default();
        fresh(record("a", ConversationState::Bot));
        touch("a");
        states.apply(true);
        assert!(states.get("a").is_none());
    }

    #[test]
    fn a_rolled_back_job_is_read_again() {
        let states = States::default();
        fresh(record("a", ConversationState::Bot));
        states.apply(true);
        let mark = mark();
        fresh(record("a", ConversationState::Human));
        undo_since(mark);
        states.apply(true);
        assert!(states.get("a").is_none());
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let states = States::default();
        let generation = states.generation();
        touch("b");
        states.apply(true);
        states.fill(generation, &record("a", ConversationState::Human));
        assert!(states.get("a").is_none());
        states.fill(states.generation(), &record("a", ConversationState::Human));
        assert_eq!(states.get("a").unwrap().state, ConversationState::Human);
    }
}
