//! Hostile test plugin: spins forever in `on_message`, so the host's
//! execution limits (fuel or epoch deadline) must stop it.
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

struct HostileLoop;

impl Bot for HostileLoop {
    fn on_message(_message: &Message) -> Result<Vec<Action>> {
        let mut counter: u64 = 0;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }
}

export_bot!(HostileLoop);
