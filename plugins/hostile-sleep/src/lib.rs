//! Hostile test plugin: waits on WASI clocks in `on_message`.
//!
//! - By default it sleeps forever (`std::thread::sleep`, a WASI
//!   `monotonic-clock.subscribe-duration` and a `poll`, again and again):
//!   the turn's deadline must cut it, and no thread may be held meanwhile.
//! - With `[config] nap_ms = "N"` it sleeps N ms once, then answers the
//!   customer's text (a plugin waiting on something slow).
//! - The text `spy` makes it try to measure time without the clock: an
//!   `Instant` around a 50 ms sleep, the spins until a 20 ms timer is
//!   ready, and how many 1 ms timers expire during a fixed CPU loop. It
//!   answers with what it saw.
use digibot_sdk::{Action, Bot, Message, Result, config, export_bot};
use std::time::{Duration, Instant};
use wasip2::clocks::monotonic_clock;

struct HostileSleep;

fn spy() -> String {
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    let slept = started.elapsed();
    // A timer as a clock: spin until a 20 ms pollable is ready.
    let timer = monotonic_clock::subscribe_duration(20_000_000);
    let mut spins: u64 = 0;
    while !timer.ready() {
        spins += 1;
    }
    // Count 1 ms timer expiries during a fixed amount of work.
    let mut ticks = 0u64;
    let mut tick = monotonic_clock::subscribe_duration(1_000_000);
    let mut x: u64 = 0;
    for i in 0..3_000_000u64 {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        if i % 1_000 == 0 && tick.ready() {
            ticks += 1;
            tick = monotonic_clock::subscribe_duration(1_000_000);
        }
    }
    format!(
        "slept_ns={} spins_until_20ms={spins} ms_ticks_in_loop={ticks} now_ns={}",
        slept.as_nanos(),
        monotonic_clock::now()
    )
}

impl Bot for HostileSleep {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let text = message.text().unwrap_or_default();
        if text == "spy" {
            return Ok(vec![Action::text(spy())?]);
        }
        match config::get("nap_ms").and_then(|ms| ms.parse::<u64>().ok()) {
            Some(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(vec![Action::text(text)?])
            }
            None => loop {
                std::thread::sleep(Duration::from_secs(10));
            },
        }
    }
}

export_bot!(HostileSleep);
