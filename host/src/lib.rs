//! digibot: sandboxed WebAssembly bot plugins in front of a Digishare
//! LiveChat inbox.
//!
//! Data flows one way:
//! [`webhook`] → [`store`] (inbox) → [`dispatch`] → [`runtime`] →
//! [`actions`] → [`store`] (outbox) → [`sender`] → Digishare's Messages API.

pub mod actions;
pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod dispatch;
pub mod event;
pub mod lifecycle;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod sender;
pub mod server;
pub mod simulator;
pub mod store;
pub mod testing;
pub mod watch;
pub mod webhook;
