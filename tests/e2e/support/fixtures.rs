//! Webhook payloads (from tests/fixtures/webhooks) and builders for new
//! ones, plus the plugin .wasm files built by `cargo build-plugins`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// tests/fixtures/webhooks
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/webhooks")
}

/// The fixture `name` (with or without `.json`) as JSON. Panics when it is
/// missing or not JSON: a broken fixture is a bug in the suite.
pub fn fixture(name: &str) -> Value {
    let file = if name.ends_with(".json") {
        name.to_string()
    } else {
        format!("{name}.json")
    };
    let path = fixtures_dir().join(&file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {file} is not JSON: {e}"))
}

/// Every fixture, as (file stem, JSON), sorted by name.
pub fn all_fixtures() -> Vec<(String, Value)> {
    let dir = fixtures_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let value = fixture(&name);
            (name.trim_end_matches(".json").to_string(), value)
        })
        .collect()
}

/// The dedup key digibot must answer for this envelope: `event_id` when
/// present, else `{event}:{data.id}`, and for `conversation_archived`
/// `{event}:{conversation_id}:{archived_at}`.
pub fn event_key(envelope: &Value) -> String {
    if let Some(id) = envelope.get("event_id").and_then(Value::as_str) {
        return id.to_string();
    }
    let event = envelope["event"].as_str().unwrap_or_default();
    let data = &envelope["data"];
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_default();
    if event == "live_chat.conversation_archived" {
        format!(
            "{event}:{}:{}",
            s(&data["conversation_id"]),
            s(&data["archived_at"])
        )
    } else {
        format!("{event}:{}", s(&data["id"]))
    }
}

/// `live_chat.new_message` from the customer (Salma, sender
/// `model_type = "third"`), built from message_text_customer.json, with a
/// new message id, conversation and text.
pub fn customer_text(conversation_id: &str, message_id: &str, text: &str) -> Value {
    let mut v = fixture("message_text_customer");
    v["data"]["id"] = json!(message_id);
    v["data"]["data"]["conversation_id"] = json!(conversation_id);
    v["data"]["data"]["body"] = json!(text);
    v
}

/// The same, written by an agent (from message_agent.json).
pub fn agent_text(conversation_id: &str, message_id: &str, text: &str) -> Value {
    let mut v = fixture("message_agent");
    v["data"]["id"] = json!(message_id);
    v["data"]["data"]["conversation_id"] = json!(conversation_id);
    v["data"]["data"]["body"] = json!(text);
    v
}

/// The customer tapped reply button `id` (from message_button_reply.json).
pub fn button_reply(conversation_id: &str, message_id: &str, id: &str, title: &str) -> Value {
    let mut v = fixture("message_button_reply");
    v["data"]["id"] = json!(message_id);
    v["data"]["data"]["conversation_id"] = json!(conversation_id);
    v["data"]["data"]["body"] =
        json!({"type": "button_reply", "button_reply": {"id": id, "title": title}});
    v
}

/// The customer picked list row `id` (from message_list_reply.json).
pub fn list_reply(conversation_id: &str, message_id: &str, id: &str, title: &str) -> Value {
    let mut v = fixture("message_list_reply");
    v["data"]["id"] = json!(message_id);
    v["data"]["data"]["conversation_id"] = json!(conversation_id);
    v["data"]["data"]["body"] =
        json!({"type": "list_reply", "list_reply": {"id": id, "title": title}});
    v
}

/// The customer shared a location (from message_location.json).
pub fn customer_location(
    conversation_id: &str,
    message_id: &str,
    latitude: f64,
    longitude: f64,
) -> Value {
    let mut v = fixture("message_location");
    v["data"]["id"] = json!(message_id);
    v["data"]["data"]["conversation_id"] = json!(conversation_id);
    v["data"]["data"]["body"] = json!({"latitude": latitude, "longitude": longitude});
    v
}

/// `live_chat.new_conversation` (from new_conversation.json) for a new
/// conversation id and customer name.
pub fn new_conversation(conversation_id: &str, customer_name: &str) -> Value {
    let mut v = fixture("new_conversation");
    v["data"]["id"] = json!(conversation_id);
    v["data"]["data"]["third"]["name"] = json!(customer_name);
    v
}

/// target/wasm32-wasip2/release/NAME.wasm of the target dir this test was
/// built in (or $DIGIBOT_E2E_PLUGINS, if set); cargo writes a crate
/// `hostile-fetch` as `hostile_fetch.wasm`, so either spelling is found.
/// Panics when missing.
pub fn plugin_wasm(name: &str) -> PathBuf {
    let dir = match std::env::var_os("DIGIBOT_E2E_PLUGINS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // CARGO_BIN_EXE_digibot = <target>/<profile>/digibot
            let exe = Path::new(env!("CARGO_BIN_EXE_digibot"));
            let target = exe
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
            target.join("wasm32-wasip2/release")
        }
    };
    let mut path = dir.join(format!("{name}.wasm"));
    if !path.is_file() {
        path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    }
    // The Python and TypeScript guests (NAME_py, NAME_ts), built by
    // scripts/build-python-plugins and scripts/build-typescript-plugins.
    if !path.is_file() && (name.ends_with("_py") || name.ends_with("_ts")) {
        path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/guests")
            .join(format!("{name}.wasm"));
    }
    assert!(
        path.is_file(),
        "plugin {} not found: run `cargo build-plugins` (or scripts/build-python-plugins, scripts/build-typescript-plugins) first",
        path.display()
    );
    path
}

/// `ms` since the epoch as Digishare writes times
/// (`2026-03-14T09:12:55.000000Z`), for payloads dated relative to now.
pub fn rfc3339(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let secs = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000 * 1000
    )
}

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
