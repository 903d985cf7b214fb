//! digibot's domain, pure: no I/O, no async runtime, no Wasm.
//!
//! - [`event`]: the webhook body parsed once into typed Digishare events;
//! - [`actions`]: a plugin's [`Action`](digibot_protocol::Action) to the
//!   exact Messages API request, the one place that knows their shapes;
//! - [`answer`]: what the Messages API's answer to a request means
//!   (delivered, retry and when, refused);
//! - [`lifecycle`]: who is in charge of a conversation, and the rules that
//!   move it between the bot and a human (WhatsApp's 24-hour window too);
//! - [`kv`]: a plugin's KV writes, committed with the event they came from;
//! - [`outbound`]: outbound HTTP by grant: targets, grants, prohibited
//!   addresses, name pins, secret placeholders, caps and refusals;
//! - [`time`]: the clock the rest of digibot reads;
//! - [`timer`]: durable timers: what a turn schedules, what fires;
//! - [`resume`]: hand-back, the event a release back to the bot becomes.
//!
//! Every other crate depends on this one; it depends on none of them, so
//! its rules are unit-tested without a runtime, a socket or a database.

pub mod actions;
pub mod answer;
pub mod event;
pub mod history;
pub mod kv;
pub mod lifecycle;
pub mod outbound;
pub mod resume;
pub mod time;
pub mod timer;
