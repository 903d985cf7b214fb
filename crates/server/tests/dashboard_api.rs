//! The dashboard's JSON endpoints and page through the real router
//! (`server::app`, driven with `oneshot`), on a real store and registry
//! holding real plugins (run `cargo build-plugins` first): the token is
//! required, the shapes are what the page reads, and the simulator runs the
//! live plugins without queuing anything.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use digibot_pipeline::dispatch::{Breaker, Dispatcher};
use digibot_pipeline::sender::Outbox;
use digibot_runtime::registry::Registry;
use digibot_runtime::{Limits, Runtime, RuntimeConfig};
use digibot_server::{AppState, Parts, WebhookAuth, app};
use digibot_store::{Inserted, NewAction, Store};
use digibot_store_sqlite::Durability;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const TOKEN: &str = "dash-test-token";

struct Fixture {
    state: AppState,
    store: Store,
    _dir: tempfile::TempDir,
}

/// A server state with `plugins` (built names, e.g. `echo`) in its folder.
async fn fixture(plugins: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    for (name, built) in plugins {
        let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/wasm32-wasip2/release")
            .join(format!("{built}.wasm"));
        std::fs::copy(&wasm, plugins_dir.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build-plugins` first", wasm.display()));
    }
    let data_dir = dir.path().join("data");
    let store = digibot_store_sqlite::open(&data_dir, Durability::Normal).unwrap();
    // A generous deadline: a loaded CI machine must not turn echo into a
    // timeout. The real limit's enforcement is the runtime tests' job.
    let runtime = Runtime::new(RuntimeConfig {
        // Several tests at once: no pool reservation each.
        pooling: false,
        warm_instances: 0,
        defaults: Limits {
            compute: Duration::from_secs(5),
            wall: Duration::from_secs(5),
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    })
    .unwrap();
    let registry = Arc::new(Registry::new(
        Arc::new(runtime),
        Some(plugins_dir),
        &data_dir,
    ));
    let errors = registry.load_dir().await;
    assert!(errors.is_empty(), "{errors:?}");
    let outbox = Outbox::default();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let dispatcher = Dispatcher::new(
        store.clone(),
        registry.clone(),
        outbox.clone(),
        4,
        2,
        Breaker {
            failures: 3,
            cooldown: Duration::from_secs(60),
        },
        digibot_domain::lifecycle::Rules::new("/bot", 0, Duration::from_secs(10)),
        stop_rx,
    );
    Fixture {
        state: AppState::new(Parts {
            store: store.clone(),
            dispatcher,
            registry,
            outbox,
            webhook_auth: WebhookAuth::Token("hook".into()),
            webhook_max_bytes: 1 << 20,
            admin_token: Some(TOKEN.into()),
            allowed_hosts: Vec::new(),
            max_in_flight: 64,
        }),
        store,
        _dir: dir,
    }
}

/// Sends one request; returns the status, the content type and the body
/// (JSON when it parses, else a string).
async fn call(
    state: &AppState,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String, Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let response = app(state.clone())
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, content_type, value)
}

async fn admin(state: &AppState, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, _, value) = call(state, method, path, Some(TOKEN), body).await;
    assert_eq!(status, StatusCode::OK, "{method} {path}: {value}");
    value
}

async fn simulate(state: &AppState, conversation: &str, input: Value) -> Value {
    admin(
        state,
        "POST",
        &format!("/admin/simulator/{conversation}/events"),
        Some(input),
    )
    .await
}

fn message(id: &str, conversation: &str) -> digibot_domain::event::Event {
    digibot_domain::event::Event::parse(
        json!({"event": "live_chat.new_message", "data": {"id": id, "data": {
            "conversation_id": conversation, "body": "hi", "sender": {"model_type": "third"}}}})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

#[tokio::test]
async fn every_data_endpoint_requires_the_token_and_the_page_does_not() {
    let f = fixture(&[("echo", "echo")]).await;
    let data = [
        ("GET", "/admin/conversations"),
        ("GET", "/admin/conversations/conv_1"),
        ("GET", "/admin/plugins"),
        ("GET", "/admin/dead-letters"),
        ("POST", "/admin/simulator/web-1/events"),
        ("DELETE", "/admin/simulator/web-1"),
    ];
    for (method, path) in data {
        for token in [None, Some("wrong")] {
            let body = (method == "POST").then(|| json!({"type": "text", "text": "hi"}));
            let (status, _, value) = call(&f.state, method, path, token, body).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}"
            );
            assert_eq!(value, json!({"error": "admin token required"}));
        }
    }
    // The page and its assets hold no data: served without the token, with
    // a policy that allows only same-origin scripts.
    for (path, kind) in [
        ("/admin", "text/html"),
        ("/admin/", "text/html"),
        ("/admin/dashboard.js", "text/javascript"),
        ("/admin/dashboard.css", "text/css"),
    ] {
        let (status, content_type, _) = call(&f.state, "GET", path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
    }
    let (_, _, page) = call(&f.state, "GET", "/admin", None, None).await;
    let page = page.as_str().unwrap();
    assert!(page.contains(r#"<form id="login-form""#) && page.contains("/admin/dashboard.js"));

    // No admin token configured: neither the API nor the page exists.
    let mut off = f.state.clone();
    off.admin_auth = digibot_server::AdminAuth(None);
    for path in ["/admin", "/admin/dashboard.js", "/admin/conversations"] {
        let (status, _, _) = call(&off, "GET", path, Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn conversations_list_and_detail_show_events_actions_and_api_status() {
    let f = fixture(&[("echo", "echo")]).await;
    let store = &f.store;
    let Inserted::New(seq) = store.insert_event(message("m1", "conv_a")).await.unwrap() else {
        panic!("duplicate")
    };
    let outcomes = json!([{"plugin": "echo", "version": "0123456789ab", "outcome": "ok",
                           "actions": 1, "elapsed_us": 420}]);
    let action = NewAction {
        plugin: "echo".into(),
        idempotency_key: "live_chat.new_message:m1/echo/0".into(),
        method: "POST".into(),
        path: "/v1/messages".into(),
        body: json!({"conversation_id": "conv_a", "type": "text", "send_to_third": true, "body": "hi"}),
    };
    store
        .complete_event(
            seq,
            "conv_a".into(),
            outcomes.clone(),
            vec![action],
            vec![],
            digibot_store::ConversationUpdate::default(),
        )
        .await
        .unwrap();
    let detail = admin(&f.state, "GET", "/admin/conversations/conv_a", None).await;
    let id = detail["actions"][0]["id"].as_i64().unwrap();
    store.mark_sent(id, 201, None, false).await.unwrap();
    store.insert_event(message("m2", "conv_b")).await.unwrap();

    let list = admin(&f.state, "GET", "/admin/conversations", None).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["conversation_id"], "conv_b");
    assert_eq!(list[0]["pending_events"], 1);
    let a = &list[1];
    assert_eq!(a["conversation_id"], "conv_a");
    assert_eq!(a["events"], 1);
    assert_eq!(a["last_event"], "live_chat.new_message");
    assert_eq!(a["actions"], json!({"sent": 1, "pending": 0, "dead": 0}));
    assert!(a["last_event_at"].as_i64().unwrap() > 0);
    let limited = admin(&f.state, "GET", "/admin/conversations?limit=1", None).await;
    assert_eq!(limited.as_array().unwrap().len(), 1);

    let detail = admin(&f.state, "GET", "/admin/conversations/conv_a", None).await;
    assert_eq!(detail["conversation_id"], "conv_a");
    let events = detail["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["key"], "live_chat.new_message:m1");
    assert_eq!(events[0]["status"], "handled");
    assert_eq!(events[0]["plugins"], outcomes);
    let actions = detail["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0]["event_seq"], seq);
    assert_eq!(actions[0]["status"], "sent");
    assert_eq!(actions[0]["last_status"], 201);
    assert_eq!(actions[0]["body"]["body"], "hi");

    let (status, _, value) = call(
        &f.state,
        "GET",
        "/admin/conversations/nope",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(value["error"].is_string());
}

#[tokio::test]
async fn plugins_carry_their_latency_from_recorded_invocations() {
    let f = fixture(&[("echo", "echo")]).await;
    let before = admin(&f.state, "GET", "/admin/plugins", None).await;
    let echo = &before["plugins"][0];
    assert_eq!(echo["name"], "echo");
    assert_eq!(echo["state"], "active");
    assert_eq!(echo["latency"], Value::Null, "no invocation recorded yet");
    let version: String = echo["version"].as_str().unwrap().chars().take(12).collect();
    for (i, us) in [300, 100, 200].into_iter().enumerate() {
        let Inserted::New(seq) = f
            .store
            .insert_event(message(&format!("m{i}"), "c"))
            .await
            .unwrap()
        else {
            panic!()
        };
        let outcomes = json!([{"plugin": "echo", "version": version, "outcome": "ok",
                               "actions": 0, "elapsed_us": us}]);
        f.store
            .complete_event(
                seq,
                "c".into(),
                outcomes,
                vec![],
                vec![],
                digibot_store::ConversationUpdate::default(),
            )
            .await
            .unwrap();
    }
    let after = admin(&f.state, "GET", "/admin/plugins", None).await;
    assert_eq!(
        after["plugins"][0]["latency"],
        json!({"samples": 3, "p50_us": 200, "p99_us": 300})
    );
}

/// The requests of a simulated turn, per plugin: `[(plugin, outcome,
/// [request])]`.
fn requests(turn: &Value) -> Vec<(String, String, Vec<Value>)> {
    turn["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["plugin"].as_str().unwrap().to_string(),
                p["outcome"].as_str().unwrap().to_string(),
                p["replies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["request"].clone())
                    .collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn simulator_runs_echo_and_queues_nothing() {
    let f = fixture(&[("echo", "echo")]).await;
    let turn = simulate(&f.state, "t1", json!({"type": "text", "text": "Salut !"})).await;
    assert_eq!(turn["conversation_id"], "sim-t1");
    assert_eq!(turn["event"], "live_chat.new_message");
    let echo = &turn["plugins"][0];
    assert_eq!(echo["plugin"], "echo");
    assert_eq!(echo["outcome"], "ok");
    assert_eq!(
        echo["replies"],
        json!([{
            "action": {"kind": "text", "body": "Salut !"},
            "request": {"method": "POST", "path": "/v1/messages", "body": {
                "conversation_id": "sim-t1", "type": "text", "send_to_third": true, "body": "Salut !"}}
        }])
    );
    // Nothing was recorded, queued or counted against the live plugin.
    assert!(f.store.recent_events(10).await.unwrap().is_empty());
    assert!(f.store.outbox_counts().await.unwrap().is_empty());
    let plugins = admin(&f.state, "GET", "/admin/plugins", None).await;
    assert_eq!(plugins["plugins"][0]["invocations"], 0);
}

#[tokio::test]
async fn simulator_keeps_concierge_state_across_turns_until_reset() {
    let f = fixture(&[("concierge", "concierge")]).await;
    let start = simulate(
        &f.state,
        "flow",
        json!({"type": "new_conversation", "customer_name": "Salma"}),
    )
    .await;
    assert_eq!(start["event"], "live_chat.new_conversation");
    let welcome = &start["plugins"][0]["replies"][0]["action"];
    assert_eq!(welcome["kind"], "buttons");
    assert_eq!(
        welcome["body"],
        "Bonjour Salma ! Comment puis-je vous aider ?"
    );
    assert_eq!(
        welcome["buttons"][0],
        json!({"id": "orders", "title": "Mes commandes"})
    );

    // The button reply continues the flow: the orders menu.
    let menu = simulate(
        &f.state,
        "flow",
        json!({"type": "button_reply", "id": "orders", "title": "Mes commandes"}),
    )
    .await;
    let list = &menu["plugins"][0]["replies"][0];
    assert_eq!(list["action"]["kind"], "list");
    assert_eq!(list["action"]["header"], "Commandes");
    assert_eq!(list["request"]["body"]["type"], "interactive");
    assert_eq!(list["request"]["body"]["conversation_id"], "sim-flow");

    // A list row, then the hand-off, whose note reads the topic the button
    // stored: the KV state was kept across turns.
    let row = simulate(
        &f.state,
        "flow",
        json!({"type": "list_reply", "id": "track", "title": "Suivre un colis"}),
    )
    .await;
    assert_eq!(
        row["plugins"][0]["replies"][0]["action"]["body"],
        "Votre colis est en route. Tapez « agent » pour parler à un conseiller."
    );
    let hand_off = simulate(&f.state, "flow", json!({"type": "text", "text": "agent"})).await;
    let replies = &hand_off["plugins"][0]["replies"];
    assert_eq!(
        replies[0]["action"],
        json!({"kind": "note", "body": "Le client demande un conseiller. Sujet : orders."})
    );
    assert_eq!(replies[0]["request"]["body"]["send_to_third"], false);
    assert_eq!(
        replies[1]["action"],
        json!({"kind": "hand_off", "user_id": "usr_17", "as_handler": true})
    );
    assert_eq!(
        replies[1]["request"]["path"],
        "/v1/conversations/sim-flow/attach/participants"
    );

    // Another simulated conversation does not see that state.
    let other = simulate(&f.state, "other", json!({"type": "text", "text": "agent"})).await;
    assert_eq!(
        other["plugins"][0]["replies"][0]["action"]["body"],
        "Le client demande un conseiller. Sujet : aucun."
    );

    // After a reset the topic is gone.
    let reset = admin(&f.state, "DELETE", "/admin/simulator/flow", None).await;
    assert_eq!(reset, json!({"reset": "sim-flow", "existed": true}));
    let fresh = simulate(&f.state, "flow", json!({"type": "text", "text": "agent"})).await;
    assert_eq!(
        fresh["plugins"][0]["replies"][0]["action"]["body"],
        "Le client demande un conseiller. Sujet : aucun."
    );
    // Still nothing in the store.
    assert!(f.store.outbox_counts().await.unwrap().is_empty());
    assert!(
        f.store
            .kv_get("concierge", "sim-flow", "topic")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn simulator_shows_failures_without_touching_the_live_breaker() {
    let f = fixture(&[("bad-trap", "hostile_trap"), ("echo", "echo")]).await;
    for _ in 0..4 {
        let turn = simulate(&f.state, "t", json!({"type": "text", "text": "hi"})).await;
        let by_plugin = requests(&turn);
        assert_eq!(by_plugin[0].0, "bad-trap");
        assert_eq!(by_plugin[0].1, "failed");
        let reason = turn["plugins"][0]["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("trap: ") && reason.contains("boom: hostile-trap panicked"),
            "{reason}"
        );
        // The neighbour still answers.
        assert_eq!(by_plugin[1].0, "echo");
        assert_eq!(by_plugin[1].2[0]["body"]["body"], "hi");
    }
    // Four failures (over the breaker's three) quarantined nothing live.
    let plugins = admin(&f.state, "GET", "/admin/plugins", None).await;
    let trap = &plugins["plugins"][0];
    assert_eq!(trap["name"], "bad-trap");
    assert_eq!(trap["state"], "active");
    assert_eq!(trap["failures"], 0);
    // Nor do they show on /metrics as customer traffic (no other test of
    // this binary runs bad-trap or echo through the dispatcher).
    let metrics = admin(&f.state, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap();
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("digibot_plugin_invocation_seconds")
                || l.starts_with("digibot_plugin_failures_total")
                || l.starts_with("digibot_actions_")
        })
        .collect();
    assert!(counted.is_empty(), "{counted:?}");
    assert!(metrics.contains(r#"digibot_plugin_state{plugin="bad-trap",state="active"} 1"#));
}

#[tokio::test]
async fn simulator_refuses_bad_input_clearly() {
    let f = fixture(&[("echo", "echo")]).await;
    let cases = [
        (
            "bad%20name",
            json!({"type": "text", "text": "hi"}),
            "bad simulated conversation name",
        ),
        ("t", json!({"type": "text", "text": "  "}), "empty message"),
        (
            "t",
            json!({"type": "location", "latitude": 95.0, "longitude": 0.0}),
            "bad location",
        ),
        ("t", json!({"type": "sticker"}), "unknown variant"),
        ("t", json!({"text": "no type"}), "missing field `type`"),
    ];
    for (name, body, reason) in cases {
        let (status, _, value) = call(
            &f.state,
            "POST",
            &format!("/admin/simulator/{name}/events"),
            Some(TOKEN),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {value}");
        let error = value["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{body}: {error}");
    }
}
