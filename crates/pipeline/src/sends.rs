//! Conversations with a Messages API request in flight.
//!
//! The echo race: a message sent through the Messages API comes back as a
//! `new_message` from the API user (`model_type = user`), possibly before
//! the API call that created it has returned, so before its id is stored.
//! [`Sends`] knows which conversations have a request in flight; an agent
//! message arriving while one is in flight waits (bounded) for it to settle
//! before it is judged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Conversations with a Messages API request in flight. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sends {
    inner: Arc<SendsInner>,
}

#[derive(Default)]
struct SendsInner {
    /// Requests in flight per conversation.
    busy: Mutex<HashMap<String, usize>>,
    settled: Notify,
}

impl Sends {
    /// A request for `conversation` is about to start.
    pub fn begin(&self, conversation: &str) {
        let mut busy = self.inner.busy.lock().unwrap_or_else(|e| e.into_inner());
        *busy.entry(conversation.to_string()).or_insert(0) += 1;
    }

    /// A request for `conversation` has ended and its result is committed.
    pub fn end(&self, conversation: &str) {
        let mut busy = self.inner.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = busy.get_mut(conversation) {
            *n -= 1;
            if *n == 0 {
                busy.remove(conversation);
            }
        }
        drop(busy);
        self.inner.settled.notify_waiters();
    }

    /// Whether a request for `conversation` is in flight.
    pub fn busy(&self, conversation: &str) -> bool {
        self.inner
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(conversation)
    }

    /// Waits until no request for `conversation` is in flight. Returns how
    /// long it waited, or `None` if `limit` passed first.
    pub async fn settled(&self, conversation: &str, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so an `end` in between is seen.
            let notified = self.inner.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.busy(conversation) {
                return Some(start.elapsed());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_sends_in_flight_and_gives_up_at_the_limit() {
        let sends = Sends::default();
        // Nothing in flight: no wait.
        assert!(sends.settled("c", Duration::ZERO).await.is_some());
        sends.begin("c");
        sends.begin("c");
        assert!(sends.busy("c") && !sends.busy("other"));
        // Still in flight: the wait ends at the limit.
        assert_eq!(sends.settled("c", Duration::from_millis(30)).await, None);
        let waiter = tokio::spawn({
            let sends = sends.clone();
            async move { sends.settled("c", Duration::from_secs(30)).await }
        });
        sends.end("c");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one of two requests still in flight");
        sends.end("c");
        assert!(waiter.await.unwrap().is_some());
        assert!(!sends.busy("c"));
    }
}
