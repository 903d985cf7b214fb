//! Time as a plugin sees it. With `[grants] clock = true`, the real clocks
//! and real sleeps (which hold no thread: the turn's future waits on a
//! tokio timer, and the wall-clock deadline cuts it). Without the grant, a
//! wall clock frozen at the Unix epoch and *virtual* monotonic time: a
//! per-turn counter that moves only by the plugin's own sleeps, which are
//! ready at once. So a sleeping plugin never waits, and nothing it can
//! observe (instants, sleeps, polls on timers) depends on real time: it
//! cannot measure how long anything took, and replays see the same values.
//!
//! wasmtime-wasi's `subscribe-duration` ignores the clock given to
//! `WasiCtxBuilder::monotonic_clock` (it always sleeps on tokio's real
//! clock) and `subscribe-instant` only uses it to compute a real sleep, so
//! a custom clock alone is not enough: [`shadow_monotonic_clock`] links
//! `wasi:clocks/monotonic-clock` over wasmtime-wasi's own.

use crate::state::HostState;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::clocks::{WasiClocksCtxView, WasiClocksView};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::{self, Host};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// A wall clock stopped at the Unix epoch, for plugins not granted a clock:
/// the time is not theirs to read (and replays stay deterministic).
pub(crate) struct FrozenWallClock;

impl HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// Virtual monotonic time of one turn, in nanoseconds: it starts at 0 and
/// only the plugin's sleeps move it. Shared by the WASI context (for
/// anything in wasmtime-wasi that reads its clock) and the shadowing
/// `monotonic-clock` below.
#[derive(Clone, Default)]
pub(crate) struct VirtualClock(Arc<AtomicU64>);

impl VirtualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves time forward to `instant` (never back).
    fn advance_to(&self, instant: u64) {
        self.0.fetch_max(instant, Ordering::Relaxed);
    }

    fn advance_by(&self, duration: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                Some(now.saturating_add(duration))
            });
    }
}

impl HostMonotonicClock for VirtualClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        VirtualClock::now(self)
    }
}

/// The `HasData` of the shadowing interface.
struct ClockGate;

impl HasData for ClockGate {
    type Data<'a> = ClockView<'a>;
}

/// What `monotonic-clock` calls see of the store.
enum ClockView<'a> {
    Real(WasiClocksCtxView<'a>),
    Virtual {
        clock: &'a VirtualClock,
        table: &'a mut ResourceTable,
    },
}

fn view(state: &mut HostState) -> ClockView<'_> {
    if state.virtual_clock().is_none() {
        return ClockView::Real(state.clocks());
    }
    let (clock, table) = state.virtual_clock_and_table();
    ClockView::Virtual { clock, table }
}

/// Replaces wasmtime-wasi's `wasi:clocks/monotonic-clock` in `linker` (call
/// after `wasmtime_wasi::p2::add_to_linker_async`).
pub(crate) fn shadow_monotonic_clock(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = monotonic_clock::add_to_linker::<HostState, ClockGate>(linker, view);
    linker.allow_shadowing(false);
    linked
}

/// A pollable that is always ready: a virtual sleep.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

fn ready(table: &mut ResourceTable) -> wasmtime::Result<Resource<DynPollable>> {
    let pollable = table.push(Ready)?;
    subscribe(table, pollable)
}

impl Host for ClockView<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        match self {
            ClockView::Real(c) => c.now(),
            ClockView::Virtual { clock, .. } => Ok(clock.now()),
        }
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        match self {
            ClockView::Real(c) => c.resolution(),
            ClockView::Virtual { .. } => Ok(1),
        }
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        match self {
            ClockView::Real(c) => c.subscribe_instant(when),
            ClockView::Virtual { clock, table } => {
                clock.advance_to(when);
                ready(table)
            }
        }
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        match self {
            ClockView::Real(c) => c.subscribe_duration(duration),
            ClockView::Virtual { clock, table } => {
                clock.advance_by(duration);
                ready(table)
            }
        }
    }
}
