//! WhatsApp's 24-hour window as the dispatcher warns about it: once per
//! conversation while its window stays closed, not once per reply or per
//! event (a replay of old events would otherwise write one per event).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Conversations seen last with their window closed; bounded, since a
/// forgotten one only costs a repeated warning.
#[derive(Default)]
pub struct WindowWarnings {
    closed: Mutex<HashSet<String>>,
    /// `closed.len()`, so that the usual case (no closed window anywhere)
    /// takes no lock on every event.
    len: AtomicUsize,
}

/// Conversations remembered at most (then forgotten all at once).
const REMEMBERED: usize = 10_000;

impl WindowWarnings {
    /// `conversation` is being answered outside its window: whether this is
    /// the first time since its window was last seen open.
    pub fn closed(&self, conversation: &str) -> bool {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if closed.contains(conversation) {
            return false;
        }
        if closed.len() >= REMEMBERED {
            closed.clear();
        }
        closed.insert(conversation.to_string());
        self.len.store(closed.len(), Ordering::Release);
        true
    }

    /// `conversation`'s window is open (the customer wrote): a later
    /// closure is worth a warning again.
    pub fn open(&self, conversation: &str) {
        // A conversation's events are handled one after the other, so its
        // own `closed` is seen here.
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if closed.remove(conversation) {
            self.len.store(closed.len(), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_closure() {
        let w = WindowWarnings::default();
        assert!(w.closed("a"));
        assert!(!w.closed("a"), "the same closed window again");
        assert!(w.closed("b"), "another conversation");
        w.open("a");
        assert!(w.closed("a"), "closed again after the customer wrote");
    }

    #[test]
    fn bounded() {
        let w = WindowWarnings::default();
        for i in 0..REMEMBERED * 2 {
            w.closed(&i.to_string());
        }
        assert!(w.closed.lock().unwrap().len() <= REMEMBERED);
    }
}
