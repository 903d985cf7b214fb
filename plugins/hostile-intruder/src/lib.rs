//! Hostile test plugin: tries to reach beyond its own conversation and
//! configuration. Text commands:
//! - `store X`: keeps `X` under kv `secret` (in this conversation);
//! - `peek`: replies `secret=…` with what kv `secret` holds here, so a test
//!   can check that another conversation's value is invisible;
//! - `config`: replies with what it reads for the host's `api_token` and
//!   another plugin's `greeting` (both must be `None`);
//! - `hijack`: returns hand-built actions aimed at another conversation
//!   (bypassing the SDK's checks), then one valid text; the host must drop
//!   the first two and deliver only `hijack attempted`, here;
//! - `leave M`: writes `M` all over a 4 MiB heap block (past the pages the
//!   host keeps resident between instances) and into a static, and keeps
//!   them, so a later instance reusing this memory slot would find it;
//! - `look R`: `R` is a marker written backwards; it scans all of its
//!   linear memory for the marker and answers `found N` (0 unless memory
//!   leaked from an earlier instance);
//! - `both M`: `leave M`, then looks for it in the same turn (`found N`,
//!   N > 0: the scan sees what an instance wrote).
#![allow(unsafe_code)] // `look` reads its own linear memory raw: that is the test.

use digibot_sdk::{Action, Bot, Message, Result, config, export_bot, kv};

struct HostileIntruder;

impl Bot for HostileIntruder {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        if let Some(marker) = text.strip_prefix("leave ") {
            leave(marker.as_bytes());
            return Ok(vec![Action::text("left")?]);
        }
        if let Some(marker) = text.strip_prefix("both ") {
            leave(marker.as_bytes());
            let reversed: Vec<u8> = marker.bytes().rev().collect();
            return Ok(vec![Action::text(format!("found {}", look(&reversed)))?]);
        }
        if let Some(reversed) = text.strip_prefix("look ") {
            return Ok(vec![Action::text(format!(
                "found {}",
                look(reversed.as_bytes())
            ))?]);
        }
        if let Some(secret) = text.strip_prefix("store ") {
            kv::set("secret", secret)?;
            return Ok(vec![Action::text("stored")?]);
        }
        match text.trim() {
            "peek" => {
                let secret = kv::get("secret").unwrap_or_else(|| "none".to_string());
                Ok(vec![Action::text(format!("secret={secret}"))?])
            }
            "config" => Ok(vec![Action::text(format!(
                "api_token={:?} other={:?}",
                config::get("api_token"),
                config::get("greeting")
            ))?]),
            "hijack" => Ok(vec![
                Action::HandOff {
                    user_id: "../../conversations/conv_victim/attach/participants".into(),
                    as_handler: true,
                },
                Action::Text {
                    body: "quoted".into(),
                    reply_to: Some("../conv_victim".into()),
                },
                Action::text("hijack attempted")?,
            ]),
            _ => Ok(vec![]),
        }
    }
}

/// Where `leave` also writes: a static, in the data segment.
static mut LEFT: [u8; 4096] = [0; 4096];

fn leave(marker: &[u8]) {
    if marker.is_empty() {
        return;
    }
    let block: Vec<u8> = marker.iter().copied().cycle().take(4 << 20).collect();
    // Kept past the turn: nothing frees it before the instance is dropped.
    std::mem::forget(block);
    let left = &raw mut LEFT;
    for (i, b) in marker.iter().cycle().take(4096).enumerate() {
        // SAFETY: one thread, and nothing else holds a reference to LEFT.
        unsafe { (*left)[i] = *b };
    }
}

/// How many times the marker (`reversed`, backwards) is in linear memory,
/// outside the one buffer this call builds it in.
fn look(reversed: &[u8]) -> usize {
    if reversed.is_empty() {
        return 0;
    }
    // Exact capacity: no reallocation leaves a partial copy behind.
    let mut marker: Vec<u8> = Vec::with_capacity(reversed.len());
    marker.extend(reversed.iter().rev());
    let own = marker.as_ptr() as usize..marker.as_ptr() as usize + marker.len();
    #[cfg(target_arch = "wasm32")]
    let size = core::arch::wasm32::memory_size(0) * 65536;
    // Built for the host only by `cargo check --workspace`: nothing to scan.
    #[cfg(not(target_arch = "wasm32"))]
    let size = 0;
    let mut found = 0;
    let mut addr = 1;
    while addr + marker.len() <= size {
        if own.contains(&addr) {
            addr = own.end;
            continue;
        }
        // SAFETY: every address below memory.size is readable wasm memory
        // (address 0 skipped: Rust treats it as null).
        let hit = (0..marker.len())
            .all(|i| unsafe { core::ptr::read_volatile((addr + i) as *const u8) } == marker[i]);
        if hit {
            found += 1;
        }
        addr += 1;
    }
    found
}

export_bot!(HostileIntruder);
