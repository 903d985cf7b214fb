//! Hostile test plugin: attacks the host through `kv` and `config`. Text
//! commands:
//! - `fill`: writes 64 KiB values under new keys (`MESSAGE_ID/NNN`) until
//!   the host refuses one (or the per-event write cap), and answers
//!   `stored N, refused: REASON`, so a test sees what the plugin was told;
//! - `fill-strict`: the same, but gives up with `?` at the first
//!   refusal (its writes are then discarded, the reason is the host's);
//! - `huge-set`, `huge-value`: `kv.set` with a 16 MiB key, a 16 MiB value;
//!   answers `refused: REASON`;
//! - `huge-get`, `huge-delete`, `huge-config`: `kv.get`, `kv.delete`,
//!   `config.get` with a 16 MiB key (calls with no error to return: the
//!   host must stop the turn without copying the key);
//! - `many-reads`: reads 10,000 distinct keys (the per-turn KV view);
//! - `huge-timer`, `huge-timer-payload`: `timers.schedule` with a 16 MiB
//!   name, a 16 MiB payload; answers `refused: REASON`;
//! - `huge-get-in`, `huge-set-in`, `huge-value-in`, `huge-delete-in`,
//!   `huge-ttl`: the scoped calls (`kv::customer()`, `kv::plugin()`) with a
//!   16 MiB key or value, or a TTL of `Duration::MAX`; answers `refused:
//!   REASON` (the scoped calls have an error to return).
use digibot_sdk::{Action, Bot, Message, Result, config, export_bot, kv, timers};

const VALUE: usize = 64 << 10;
const HUGE: usize = 16 << 20;

struct HostileKv;

impl Bot for HostileKv {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let huge = || "k".repeat(HUGE);
        let answer = match message.text().unwrap_or_default().trim() {
            "fill" => {
                let value = "v".repeat(VALUE);
                let mut stored = 0;
                let mut refused = String::from("none");
                for i in 0..1000 {
                    match kv::set(&format!("{}/{i:03}", message.id), &value) {
                        Ok(()) => stored += 1,
                        Err(e) => {
                            refused = e.to_string();
                            break;
                        }
                    }
                }
                format!("stored {stored}, refused: {refused}")
            }
            "fill-strict" => {
                let value = "v".repeat(VALUE);
                for i in 0..1000 {
                    kv::set(&format!("{}/{i:03}", message.id), &value)?;
                }
                "stored all".to_string()
            }
            "huge-set" => refusal(kv::set(&huge(), "v")),
            "huge-value" => refusal(kv::set("k", &"v".repeat(HUGE))),
            "huge-get" => format!("got {:?}", kv::get(&huge()).map(|v| v.len())),
            "huge-delete" => {
                kv::delete(&huge());
                "deleted".to_string()
            }
            "huge-config" => format!("config {:?}", config::get(&huge()).map(|v| v.len())),
            "huge-timer" => refusal(timers::schedule(&huge(), 1000, "p").map(drop)),
            "huge-timer-payload" => {
                refusal(timers::schedule("t", 1000, &"p".repeat(HUGE)).map(drop))
            }
            "huge-get-in" => refusal(kv::customer().get(&huge()).map(drop)),
            "huge-set-in" => refusal(kv::plugin().set(&huge(), "v")),
            "huge-value-in" => refusal(kv::customer().set("k", &"v".repeat(HUGE))),
            "huge-delete-in" => refusal(kv::plugin().delete(&huge())),
            "huge-ttl" => refusal(kv::customer().set_with_ttl("k", "v", std::time::Duration::MAX)),
            "many-reads" => {
                let found = (0..10_000)
                    .filter(|i| kv::get(&format!("key-{i}")).is_some())
                    .count();
                format!("found {found}")
            }
            _ => return Ok(vec![]),
        };
        Ok(vec![Action::text(answer)?])
    }
}

fn refusal(result: Result<()>) -> String {
    match result {
        Ok(()) => "accepted".to_string(),
        Err(e) => format!("refused: {e}"),
    }
}

export_bot!(HostileKv);
