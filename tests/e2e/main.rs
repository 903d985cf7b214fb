//! End-to-end tests: the real `digibot serve` binary, with real plugins
//! (built by `cargo build-plugins`), against a fake Digishare API.

mod support;

mod authoring;
mod containment;
mod core_flow;
mod dashboard;
mod dead_letters;
mod debounce;
mod delivery;
mod durability;
mod edge;
mod fake_selftest;
mod hot_swap;
mod lifecycle;
mod memory;
mod oauth;
mod observability;
mod outbound;
mod pending;
mod replicas;
mod rollout;
mod sandbox;
mod scripts;
mod sender;
mod settings;
mod startup;
mod timers;
mod waiting_turns;
mod webhook;
