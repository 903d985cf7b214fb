//! `digibot test --record FILE --conversation ID`: a conversation test
//! from a stored production conversation, read from the store as `digibot
//! replay --event` reads it. Each stored event becomes a turn (`event`:
//! digibot's stored form, so every kind of event, an agent's message or an
//! archiving included, runs as it did; a timer that came due becomes a
//! `timer` turn, fired only if the plugin schedules it again), expecting
//! the Messages API requests the plugin queued then; the turn's journaled
//! outbound calls become `[[http]]` stubs. `--simulator NAME` records the
//! dashboard simulator's conversation instead (the server's `GET
//! /admin/simulator/NAME/test`). The file is TOML, YAML or JSON by its
//! extension; `digibot test` then runs it.

use crate::config::Settings;
use anyhow::{Context, bail};
use digibot_domain::event::EventKind;
use digibot_store::JournalOutcome;
use serde_json::{Map, Value, json};
use std::path::Path;

/// What was recorded: the number of turns and of stubs.
pub struct Recorded {
    pub turns: usize,
    pub stubs: usize,
}

/// Writes to `file` the test of `conversation` for the plugin named
/// `plugin`, from the store `settings` name.
pub fn record(
    settings: &Settings,
    conversation: &str,
    plugin: &str,
    file: &Path,
) -> anyhow::Result<Recorded> {
    let doc = crate::cli::block_on(read(settings, conversation, plugin))??;
    write(
        file,
        doc,
        &format!(
            "# Recorded by `digibot test --record` from conversation {conversation} (plugin {plugin}).\n"
        ),
    )
}

/// Writes to `file` the test of the dashboard simulator's conversation
/// `name` for `plugin`, read from a running server's admin API (`GET
/// /admin/simulator/NAME/test`).
pub fn record_simulated(
    settings: &Settings,
    url: Option<&str>,
    name: &str,
    plugin: &str,
    file: &Path,
) -> anyhow::Result<Recorded> {
    let token = settings
        .admin_token
        .as_ref()
        .context("DIGIBOT_ADMIN_TOKEN is not set: the admin API needs it")?;
    let base = super::rollout::base_url(url, settings);
    let doc = crate::cli::block_on(async {
        let answer = reqwest::Client::new()
            // Both are plain names (letters, digits, '-', '_').
            .get(format!(
                "{base}/admin/simulator/{name}/test?plugin={plugin}"
            ))
            .bearer_auth(token.expose())
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {base}"))?;
        let status = answer.status();
        let body: Value = answer.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "the admin API answered {status}: {}",
                body["error"].as_str().unwrap_or("no reason given")
            );
        }
        anyhow::Ok(body)
    })??;
    write(
        file,
        doc,
        &format!(
            "# Recorded by `digibot test --record` from simulated conversation {name} (plugin {plugin}).\n"
        ),
    )
}

/// Writes `doc` to `file` as TOML, YAML or JSON by its extension.
fn write(file: &Path, mut doc: Value, header: &str) -> anyhow::Result<Recorded> {
    strip_nulls(&mut doc);
    let recorded = Recorded {
        turns: doc["turn"].as_array().map_or(0, Vec::len),
        stubs: doc
            .get("http")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
    };
    let text =
        match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => header.to_string() + &serde_yaml_ng::to_string(&doc)?,
            // JSON has no comments.
            Some("json") => serde_json::to_string_pretty(&doc)? + "\n",
            _ => header.to_string()
                + &toml::to_string(&doc).with_context(
                    || "the conversation does not fit TOML (a null value?): record to a .yaml file",
                )?,
        };
    std::fs::write(file, text).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(recorded)
}

async fn read(settings: &Settings, conversation: &str, plugin: &str) -> anyhow::Result<Value> {
    let store = crate::config::open_store(settings).await?;
    let detail = store.conversation(conversation).await?;
    if detail.events.is_empty() {
        store.close();
        bail!("no event of conversation {conversation} in the store");
    }
    let mut turns = Vec::new();
    let mut stubs: Vec<Value> = Vec::new();
    let mut events = detail.events.clone();
    events.sort_by_key(|e| e.seq);
    for summary in &events {
        let Some(stored) = store.event(&summary.key).await? else {
            continue;
        };
        let mut turn = Map::new();
        match &stored.event.kind {
            EventKind::Timer(t) if t.plugin != plugin => continue,
            EventKind::Timer(t) => {
                let mut timer = json!({"name": t.name, "conversation": t.conversation_id});
                if t.outside_window {
                    timer["outside_window"] = Value::Bool(true);
                }
                turn.insert("timer".into(), timer);
            }
            _ => {
                turn.insert("event".into(), serde_json::to_value(&stored.event)?);
            }
        }
        if stored.event.invokes_plugins() {
            let requests: Vec<Value> = detail
                .actions
                .iter()
                .filter(|a| a.event_seq == stored.seq && a.plugin == plugin)
                .map(|a| json!({"method": a.method, "path": a.path, "body": a.body}))
                .collect();
            turn.insert("requests".into(), Value::Array(requests));
        }
        for entry in store.journal(&summary.key, Some(plugin)).await? {
            let JournalOutcome::Response {
                status,
                headers,
                body,
            } = entry.outcome
            else {
                continue;
            };
            let stub = json!({
                "url": entry.request.url,
                "method": entry.request.method,
                "status": status,
                "headers": headers
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect::<Map<String, Value>>(),
                "body": String::from_utf8_lossy(&body),
            });
            // One stub per URL and method: the first answer recorded.
            if !stubs
                .iter()
                .any(|s| s["url"] == stub["url"] && s["method"] == stub["method"])
            {
                stubs.push(stub);
            }
        }
        turns.push(Value::Object(turn));
    }
    store.close();
    let mut doc = Map::new();
    doc.insert(
        "name".into(),
        Value::from(format!("recorded conversation {conversation}")),
    );
    if !stubs.is_empty() {
        doc.insert("http".into(), Value::Array(stubs));
    }
    doc.insert("turn".into(), Value::Array(turns));
    Ok(Value::Object(doc))
}

/// Drops the null fields of an event (TOML has no null; an absent optional
/// field reads back as none).
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}
