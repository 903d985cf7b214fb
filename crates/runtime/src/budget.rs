//! The two budgets of a turn, enforced around its future (instantiation
//! and call): **compute**, the time the turn spends running, and **wall**,
//! the whole turn's time, host calls included.
//!
//! Guest code runs inside the future's `poll` (on a fiber), and every
//! epoch tick the store yields back to the executor (the epoch callback
//! marks the yield in the [`Meter`]). So each time the future returns
//! `Pending` we know why: an epoch yield (the plugin was computing) or a
//! host call that waits (a KV read, a sleep with the clock grant, later
//! the network). Compute is the time spent inside `poll`, plus the wait
//! for a worker after each of its own yields up to one tick (so that a
//! turn computing alone counts its whole time; beyond a tick the wait is
//! other turns' work, and only the wall clock sees it). Waits on host
//! calls are not compute.
//!
//! One poll counts at most [`POLL_CAP`]. Guest code yields at every tick,
//! so a poll that lasts far longer was not this turn computing: the OS ran
//! other threads (a busy machine, a 2-core CI box running many servers),
//! and counting that would stop a plugin that did nothing wrong. The
//! thread's own CPU clock would be exact, but reading it costs a system
//! call (about 600 ns here, against a 3 µs plugin call) twice per poll.
//!
//! Both budgets are checked whenever the future yields, and a timer wakes
//! a waiting turn at its wall deadline. A turn still computing gets a
//! little grace past the wall deadline ([`grace`]): with equal budgets, a
//! busy loop alone is then always stopped by its compute budget, and the
//! reason says what the plugin was doing. A turn over budget is dropped
//! where it stands: the caller must drop its store too (a cancelled
//! instance is never entered again).

use crate::Limits;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Which budget a turn ran out of, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Compute(Duration),
    Wall(Duration),
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Compute(d) => write!(f, "compute budget of {} ms spent", d.as_millis()),
            Budget::Wall(d) => write!(f, "wall-clock deadline of {} ms passed", d.as_millis()),
        }
    }
}

/// Shared between a store's epoch callback and the budget around its turn.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    /// Set by the epoch callback just before the store yields.
    yielded: AtomicBool,
}

impl Meter {
    /// Called by the epoch callback: the coming `Pending` is a yield.
    pub(crate) fn mark_yield(&self) {
        self.yielded.store(true, Ordering::Relaxed);
    }

    fn take_yield(&self) -> bool {
        self.yielded.swap(false, Ordering::Relaxed)
    }
}

/// The most compute one poll counts: five epoch ticks. A poll of guest
/// code runs until the next tick; a longer one was preempted, or spent in
/// host work between ticks (instantiation, a host call's own work), which
/// the wall deadline still bounds.
const POLL_CAP: Duration = crate::EPOCH_TICK.saturating_mul(5);

/// How long past its wall deadline a turn that is computing (not waiting
/// on a host call) may go on before the deadline stops it: five epoch
/// ticks, or a tenth of the deadline if that is longer.
fn grace(wall: Duration) -> Duration {
    (crate::EPOCH_TICK * 5).max(wall / 10)
}

/// Runs `turn` within `limits`' compute and wall budgets; `Err` names the
/// one it ran out of (and `turn` is dropped unfinished). Needs a tokio
/// runtime with timers (the wall deadline of a waiting turn is a timer).
pub(crate) async fn within<F: Future>(
    meter: &Meter,
    limits: &Limits,
    turn: F,
) -> Result<F::Output, Budget> {
    let mut turn = pin!(turn);
    let started = Instant::now();
    let deadline = started + limits.wall;
    let computing_deadline = deadline + grace(limits.wall);
    // Made on the first wait only: a turn that never waits sets no timer.
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut compute = Duration::ZERO;
    // When the turn last yielded at an epoch tick.
    let mut yielded_at: Option<Instant> = None;
    std::future::poll_fn(|cx| {
        let polled = Instant::now();
        if let Some(at) = yielded_at.take() {
            compute += (polled - at).min(crate::EPOCH_TICK);
        }
        if let Poll::Ready(out) = turn.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let now = Instant::now();
        compute += (now - polled).min(POLL_CAP);
        if compute >= limits.compute {
            return Poll::Ready(Err(Budget::Compute(limits.compute)));
        }
        if meter.take_yield() {
            if now >= computing_deadline {
                return Poll::Ready(Err(Budget::Wall(limits.wall)));
            }
            yielded_at = Some(now);
            return Poll::Pending;
        }
        if now >= deadline {
            return Poll::Ready(Err(Budget::Wall(limits.wall)));
        }
        let timer =
            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Budget::Wall(limits.wall)));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn limits(compute_ms: u64, wall_ms: u64) -> Limits {
        Limits {
            compute: Duration::from_millis(compute_ms),
            wall: Duration::from_millis(wall_ms),
            ..Limits::default()
        }
    }

    /// A turn that runs `polls` slices, each holding its thread for
    /// `slice` (as guest code, or a thread the OS took away), then yields
    /// as at an epoch tick.
    fn slices(meter: Arc<Meter>, polls: usize, slice: Duration) -> impl Future<Output = ()> {
        let mut left = polls;
        std::future::poll_fn(move |cx| {
            if left == 0 {
                return Poll::Ready(());
            }
            left -= 1;
            std::thread::sleep(slice);
            meter.mark_yield();
            cx.waker().wake_by_ref();
            Poll::Pending
        })
    }

    /// The thread taken away for longer than the whole budget in one
    /// slice (what a loaded machine does): the turn is not stopped.
    #[tokio::test]
    async fn a_preempted_slice_is_not_counted_as_compute() {
        let meter = Arc::new(Meter::default());
        let turn = slices(meter.clone(), 1, Duration::from_millis(150));
        assert_eq!(within(&meter, &limits(100, 10_000), turn).await, Ok(()));
    }

    /// Slices of a tick each, as a busy loop runs: they add up, and the
    /// compute budget stops the turn long before its wall deadline.
    #[tokio::test]
    async fn ticks_of_compute_add_up_to_the_budget() {
        let meter = Arc::new(Meter::default());
        let turn = slices(meter.clone(), 1_000, crate::EPOCH_TICK);
        let started = Instant::now();
        let spent = within(&meter, &limits(40, 10_000), turn).await;
        assert_eq!(spent, Err(Budget::Compute(Duration::from_millis(40))));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Long slices still count their cap each: a turn whose every poll
    /// overruns is stopped by compute, not left to the wall deadline.
    #[tokio::test]
    async fn long_slices_count_their_cap() {
        let meter = Arc::new(Meter::default());
        let turn = slices(meter.clone(), 1_000, POLL_CAP * 2);
        let spent = within(&meter, &limits(50, 10_000), turn).await;
        assert_eq!(spent, Err(Budget::Compute(Duration::from_millis(50))));
    }
}
