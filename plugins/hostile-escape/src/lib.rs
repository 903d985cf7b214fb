//! Hostile test plugin: tries the ambient authority a WASI program may ask
//! for (files, directories, environment, the host's API token, the network,
//! the wall clock) and reports what it got in one text reply:
//! `fs:err dir:err env:0 token:absent net:err clock:0` when the host grants
//! nothing (and freezes the clock at the epoch).
//!
//! Config: `port`, the local TCP port to try (default 80).
use digibot_sdk::{Action, Bot, Message, Result, config, export_bot};
use std::net::TcpStream;
use std::time::{SystemTime, UNIX_EPOCH};

struct HostileEscape;

fn outcome<T, E>(result: std::result::Result<T, E>) -> &'static str {
    if result.is_ok() { "ok" } else { "err" }
}

impl Bot for HostileEscape {
    fn on_message(_message: &Message) -> Result<Vec<Action>> {
        let fs = outcome(std::fs::read_to_string("/etc/passwd"));
        let dir = outcome(std::fs::read_dir("/"));
        let env = std::env::vars().count();
        let token = match std::env::var("DIGIBOT_API_TOKEN") {
            Ok(_) => "present",
            Err(_) => "absent",
        };
        let port = config::get("port")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(80);
        let net = outcome(TcpStream::connect(("127.0.0.1", port)));
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let report = format!("fs:{fs} dir:{dir} env:{env} token:{token} net:{net} clock:{clock}");
        Ok(vec![Action::text(report)?])
    }
}

export_bot!(HostileEscape);
