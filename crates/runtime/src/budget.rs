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
        compute += now - polled;
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
