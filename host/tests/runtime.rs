//! The plugin runtime against real components built from plugins/.

use digibot::event::{Event, EventKind};
use digibot::runtime::{Call, Failure, Manifest, MemoryKv, Runtime, RuntimeConfig};
use digibot_protocol::Action;
use std::path::PathBuf;
use std::sync::Arc;

fn wasm(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build-plugins` first", path.display()))
}

fn fixture(name: &str) -> Event {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/webhooks")
        .join(format!("{name}.json"));
    Event::parse(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn echo_answers_a_customer_text() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let echo = runtime
        .load("echo", &wasm("echo"), Manifest::default())
        .unwrap();
    assert_eq!(echo.wit_version, "0.1.0");
    let event = fixture("message_text_customer");
    let call = Call::for_event(&event).unwrap();
    let out = runtime.invoke(&echo, &call, Arc::new(MemoryKv::default()));
    assert_eq!(
        out.outcome.unwrap(),
        vec![Action::text("Bonjour, je voudrais suivre ma commande").unwrap()]
    );
    let EventKind::Message(_) = event.kind else {
        panic!()
    };
}

#[test]
fn a_core_module_is_not_a_component() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let core = b"\0asm\x01\0\0\0".to_vec();
    let err = runtime
        .load("core", &core, Manifest::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("not a WebAssembly component"),
        "{err}"
    );
    let _ = Failure::Timeout;
}
