//! digibot: sandboxed WebAssembly bot plugins in front of a Digishare
//! LiveChat inbox.
//!
//! Data flows one way:
//! [`webhook`] → [`store`] (inbox) → [`dispatch`] → [`runtime`] →
//! [`actions`] → [`store`] (outbox) → [`sender`] → Digishare's Messages API.

pub mod actions;
pub mod event;
pub mod runtime;
pub mod store;
