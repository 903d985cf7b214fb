//! The webhook parser on arbitrary bytes (seeded with every fixture, in
//! `corpus/event_parse/`): it never panics, and an event it accepts is
//! stored and read back unchanged (the inbox keeps events as JSON).

#![no_main]

use digibot_domain::event::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(event) = Event::parse(body) else {
        return;
    };
    assert!(!event.key.is_empty(), "an event without a dedup key");
    assert!(!event.name.is_empty());
    if let Some(conversation) = event.conversation_id() {
        assert!(!conversation.is_empty(), "an empty conversation id");
    }
    let _ = (
        event.dispatched(),
        event.invokes_plugins(),
        event.created_at(),
    );
    let stored = serde_json::to_string(&event).expect("an event serializes");
    let back: Event = serde_json::from_str(&stored).expect("a stored event reads back");
    assert_eq!(back, event, "the stored event reads back different");
});
