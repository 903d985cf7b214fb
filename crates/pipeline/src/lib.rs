//! digibot's event pipeline, from a stored event to Digishare's Messages
//! API: the [`dispatch`]er's per-conversation lanes run each event's plugin
//! turn and commit what it produced with the event, the lifecycle rules
//! decide who is in charge, and the [`sender`] delivers the outbox. The
//! one crate that makes outgoing HTTP requests (Cargo says so: nothing
//! else depends on an HTTP client).
//!
//! - [`dispatch`]: lanes, ordering, the turn of every plugin on an event,
//!   the completion that commits it;
//! - [`sender`]: outbox delivery, retries, OAuth, dead letters;
//! - [`sends`]: which conversations have a request in flight (the echo race);
//! - [`outbound`]: plugins' outbound HTTP: grant, SSRF rules, caps,
//!   secrets, redirects, the call journal;
//! - [`pin`]: conversations that keep the plugin version they started on;
//! - [`rollout`]: a candidate version in shadow or canary beside the
//!   serving one, promoted or aborted on evidence;
//! - [`window`]: warning once per conversation about WhatsApp's 24-hour
//!   window;
//! - [`cluster`]: plugins shared by replicas, kept in step with the store's
//!   record;
//! - [`metrics`]: the metrics the pipeline updates.

pub mod cluster;
pub mod dispatch;
pub mod metrics;
pub mod outbound;
pub mod pin;
pub mod rollout;
pub mod sender;
pub mod sends;
pub mod window;
