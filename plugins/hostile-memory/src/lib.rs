//! Hostile test plugin: in `on_message`, allocates 1 MiB chunks and writes to
//! every page of each one, forever. Once the host refuses to grow memory the
//! allocation fails, Rust aborts and the instance traps.
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

const CHUNK: usize = 1 << 20;

struct HostileMemory;

impl Bot for HostileMemory {
    fn on_message(_message: &Message) -> Result<Vec<Action>> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK];
            // Write every 4 KiB so the memory is really used, not just reserved.
            for byte in chunk.iter_mut().step_by(4096) {
                *byte = 0xA5;
            }
            hoard.push(std::hint::black_box(chunk));
        }
    }
}

export_bot!(HostileMemory);
