//! The Python echo (guests/python/echo, built by scripts/build-python-plugins)
//! and the TypeScript echo (guests/typescript/echo, scripts/build-typescript-plugins)
//! through the real host runtime and through `digibot replay`: they must load
//! like any plugin and answer every shared webhook fixture exactly as the
//! Rust echo does.

use anyhow::{Context, Result, bail};
use digibot_domain::actions::{self, ApiRequest};
use digibot_domain::event::{Content, ConversationState, Event, EventKind};
use digibot_protocol::Action;
use digibot_runtime::{Call, Manifest, MemoryKv, Plugin, Runtime, RuntimeConfig};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const RUST_ECHO: &str = "target/wasm32-wasip2/release/echo.wasm";
const PYTHON_ECHO: &str = "target/guests/echo_py.wasm";
const TYPESCRIPT_ECHO: &str = "target/guests/echo_ts.wasm";

/// The path of a built component, or an error naming what builds it.
fn component(relative: &str) -> Result<PathBuf> {
    let path = root().join(relative);
    if path.is_file() {
        return Ok(path);
    }
    let built_by = if relative.ends_with("_ts.wasm") {
        "scripts/build-typescript-plugins"
    } else if relative.starts_with("target/guests/") {
        "scripts/build-python-plugins"
    } else {
        "cargo build-plugins"
    };
    bail!("{} is missing: build it with `{built_by}`", path.display())
}

/// A runtime whose compile cache lives under target/: compiling the 18 MB
/// Python component takes seconds, loading it from the cache does not.
fn runtime() -> Result<Runtime> {
    Runtime::new(RuntimeConfig {
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-cache")),
        ..RuntimeConfig::default()
    })
    .map_err(|e| anyhow::anyhow!("engine: {e}"))
}

/// The three echoes, loaded the way the server loads a plugin. The timeout
/// is raised from its 100 ms default only so a loaded CI machine cannot
/// fail the test; a Python or TypeScript call takes about a millisecond.
fn echoes(runtime: &Runtime) -> Result<(Plugin, Plugin, Plugin)> {
    let manifest = Manifest::parse("[limits]\ntimeout_ms = 5000\n")?;
    let load = |name: &str, path: &str| -> Result<Plugin> {
        Ok(runtime.load(name, &std::fs::read(component(path)?)?, manifest.clone())?)
    };
    Ok((
        load("echo", RUST_ECHO)?,
        load("echo_py", PYTHON_ECHO)?,
        load("echo_ts", TYPESCRIPT_ECHO)?,
    ))
}

fn fixture_paths() -> Result<Vec<PathBuf>> {
    let dir = root().join("tests/fixtures/webhooks");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    Ok(paths)
}

fn fixtures() -> Result<Vec<(String, Event)>> {
    fixture_paths()?
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let event =
                Event::parse(&std::fs::read(&path)?).with_context(|| format!("fixture {name}"))?;
            Ok((name, event))
        })
        .collect()
}

/// What an echo must answer, worked out from the event alone.
fn expected(event: &Event) -> Vec<Action> {
    match &event.kind {
        EventKind::Message(m) if event.invokes_plugins() => match &m.content {
            Content::Text { text } => vec![Action::Text {
                body: text.clone(),
                reply_to: None,
            }],
            _ => vec![],
        },
        _ => vec![],
    }
}

/// Runs `plugin` on `event` as the dispatcher does: no call for events that
/// do not invoke plugins, and every action turned into its API request.
fn run(
    runtime: &Runtime,
    plugin: &Plugin,
    event: &Event,
) -> Result<(Vec<Action>, Vec<ApiRequest>)> {
    let Some(call) = Call::for_event(event, ConversationState::Bot) else {
        return Ok((vec![], vec![]));
    };
    let invocation = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(runtime.invoke(plugin, &call, Arc::new(MemoryKv::default())));
    let actions = match invocation.outcome {
        Ok(actions) => actions,
        Err(failure) => bail!(
            "{} failed: {failure}; output: {}",
            plugin.name,
            invocation.output
        ),
    };
    let requests = actions
        .iter()
        .enumerate()
        .map(|(i, a)| actions::to_request(&plugin.name, i, call.conversation_id(), a))
        .collect::<Result<_, _>>()?;
    Ok((actions, requests))
}

/// Every language's echo gives the same actions and the same Messages API
/// requests on every shared fixture.
#[test]
fn every_languages_echo_answers_every_fixture_like_the_rust_echo() -> Result<()> {
    let runtime = runtime()?;
    let (rust, python, typescript) = echoes(&runtime)?;
    assert_eq!(typescript.wit_version, "0.3.0");
    eprintln!(
        "echo_py: {} bytes, {} imports, compiled in {:?} (from cache: {})",
        python.size,
        python.imports.len(),
        python.compile_time,
        python.cached
    );
    assert_eq!(python.wit_version, "0.1.0");
    // componentize-py pulls in WASI filesystem and sockets, which the host
    // links with nothing granted; `load` refuses anything else.
    assert!(
        python
            .imports
            .iter()
            .any(|i| i == "digishare:bot/types@0.1.0"),
        "{:?}",
        python.imports
    );

    let fixtures = fixtures()?;
    let mut replies = 0;
    for (name, event) in &fixtures {
        let want = expected(event);
        let (rust_actions, rust_requests) = run(&runtime, &rust, event)?;
        let (py_actions, py_requests) = run(&runtime, &python, event)?;
        let (ts_actions, ts_requests) = run(&runtime, &typescript, event)?;
        assert_eq!(rust_actions, want, "rust echo on {name}");
        assert_eq!(py_actions, want, "python echo on {name}");
        assert_eq!(ts_actions, want, "typescript echo on {name}");
        assert_eq!(py_requests, rust_requests, "python requests on {name}");
        assert_eq!(ts_requests, rust_requests, "typescript requests on {name}");
        replies += want.len();
    }
    // The fixtures hold customer texts, agent texts and non-text messages;
    // an empty comparison would prove nothing.
    assert!(replies >= 2, "only {replies} echoed texts in the fixtures");
    assert!(
        fixtures
            .iter()
            .any(|(_, e)| matches!(e.kind, EventKind::Message(_)) && !e.invokes_plugins()),
        "no agent message among the fixtures"
    );
    Ok(())
}

/// The requests `digibot replay` printed for `plugin` on one event (none
/// when the plugin did not run), after checking that it did not fail.
fn replayed_requests(event: &Value, plugin: &str) -> Result<Vec<Value>> {
    let file = event["file"].as_str().unwrap_or("?");
    let Some(report) = event["plugins"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["plugin"] == plugin))
    else {
        return Ok(vec![]);
    };
    if report["outcome"] != "ok" {
        bail!("{plugin} on {file}: {report}");
    }
    Ok(report["requests"].as_array().cloned().unwrap_or_default())
}

#[test]
fn digibot_replay_prints_the_same_requests_for_every_languages_echo() -> Result<()> {
    // Without the agent's message: replay follows who is in charge, and
    // after it both echoes would be skipped in that conversation.
    let paths: Vec<_> = fixture_paths()?
        .into_iter()
        .filter(|p| !p.ends_with("message_agent.json"))
        .collect();
    let output = Command::new(env!("CARGO_BIN_EXE_digibot"))
        .arg("replay")
        .args(&paths)
        .arg("--plugin")
        .arg(component(RUST_ECHO)?)
        .arg("--plugin")
        .arg(component(PYTHON_ECHO)?)
        .arg("--plugin")
        .arg(component(TYPESCRIPT_ECHO)?)
        .env("RUST_LOG", "warn")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "digibot replay failed: {stderr}");
    let events: Vec<Value> = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("replay printed no JSON; stderr: {stderr}"))?;
    assert_eq!(events.len(), paths.len(), "one report per fixture");

    let mut echoed = 0;
    for event in &events {
        let rust = replayed_requests(event, "echo")?;
        let python = replayed_requests(event, "echo_py")?;
        let typescript = replayed_requests(event, "echo_ts")?;
        assert_eq!(python, rust, "python requests for {}", event["file"]);
        assert_eq!(
            typescript, rust,
            "typescript requests for {}",
            event["file"]
        );
        if event["dispatched"] == true {
            let ran: Vec<&Value> = event["plugins"]
                .as_array()
                .map(|all| all.iter().map(|p| &p["plugin"]).collect())
                .unwrap_or_default();
            assert_eq!(
                ran,
                ["echo", "echo_py", "echo_ts"],
                "plugins on {}",
                event["file"]
            );
        }
        echoed += rust.len();
    }
    assert!(echoed >= 2, "only {echoed} echo requests in the replay");
    Ok(())
}

const PYTHON_ORDERS: &str = "target/guests/orders_py.wasm";
const ORDERS_SECRET: &str = "py-orders-token-7731";

/// A local order API: `/orders/{n}` answers `delivered`, recording each
/// request's `Authorization` and `Idempotency-Key`.
async fn order_api() -> Result<(String, Arc<std::sync::Mutex<Vec<(String, String, String)>>>)> {
    use axum::http::HeaderMap;
    let seen: Arc<std::sync::Mutex<Vec<(String, String, String)>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/orders/{n}",
        axum::routing::get(
            move |axum::extract::Path(n): axum::extract::Path<String>, h: HeaderMap| async move {
                let get = |name: &str| {
                    h.get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                record.lock().unwrap().push((
                    n.clone(),
                    get("authorization"),
                    get("idempotency-key"),
                ));
                axum::Json(serde_json::json!({"order": n, "status": "delivered"}))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, seen))
}

/// The Python orders (guests/python/orders, on 0.3.0) makes its request
/// through `wasi:http` and the pipeline's outbound HTTP, against a real
/// order API on loopback: the secret substituted at send time (the plugin
/// only wrote its placeholder), the status answered; aimed outside its
/// grant, it is refused and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_orders_calls_the_order_api_through_its_grant() -> Result<()> {
    use digibot_pipeline::outbound::secrets::Secrets;
    use digibot_pipeline::outbound::{Outbound, OutboundConfig};
    let (url, seen) = order_api().await?;
    let bytes =
        std::fs::read(component(PYTHON_ORDERS).context("built by scripts/build-python-plugins")?)?;
    let runtime = Arc::new(runtime()?);
    let manifest = |api: &str| {
        Manifest::parse(&format!(
            "[config]\norders_api = \"{api}\"\n[grants]\nhttp = [\"{url}/orders/\"]\nsecrets = [\"ORDERS_TOKEN\"]\n[limits]\ntimeout_ms = 10000\n"
        ))
    };
    let plugin = Arc::new(runtime.load("orders_py", &bytes, manifest(&url)?)?);
    assert_eq!(plugin.wit_version, "0.3.0");
    let elsewhere =
        Arc::new(runtime.load("orders_py", &bytes, manifest("https://evil.example")?)?);
    let outbound = Arc::new(Outbound::new(
        OutboundConfig {
            secrets: Secrets::load(
                [(
                    "DIGIBOT_SECRET_ORDERS_TOKEN".to_string(),
                    ORDERS_SECRET.to_string(),
                )],
                None,
            )?,
            ..OutboundConfig::default()
        },
        None,
    ));
    let event = Event::parse(
        br#"{"event":"live_chat.new_message","data":{"id":"msg_py_1","data":{"conversation_id":"conv_py","body":"ma commande 4410 ?","sender":{"model_type":"third"}}}}"#,
    )?;
    let key = event.key.clone();
    let turn = |plugin: Arc<Plugin>| {
        let (runtime, outbound, event) = (runtime.clone(), outbound.clone(), event.clone());
        tokio::spawn(async move {
            let call = Call::for_event(&event, ConversationState::Bot).unwrap();
            runtime
                .invoke_with_http(&plugin, &call, Arc::new(MemoryKv::default()), outbound)
                .await
        })
    };
    let invocation = turn(plugin).await?;
    let actions = invocation
        .outcome
        .map_err(|f| anyhow::anyhow!("{f}; output: {}", invocation.output))?;
    assert_eq!(
        actions,
        [Action::text("Votre commande 4410 est livrée.").unwrap()]
    );
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [(
            "4410".to_string(),
            format!("Bearer {ORDERS_SECRET}"),
            format!("{key}/orders_py/0")
        )]
    );
    assert_eq!(invocation.calls.len(), 1);
    assert_eq!(invocation.calls[0].status, Some(200));

    let refused = turn(elsewhere).await?;
    assert_eq!(
        refused.outcome.map_err(|f| anyhow::anyhow!("{f}"))?,
        [Action::text(
            "Le suivi des commandes est indisponible pour le moment, réessayez plus tard."
        )
        .unwrap()]
    );
    assert_eq!(
        refused.calls[0].refused.as_ref().map(|r| r.kind),
        Some("not-granted")
    );
    // The plugin logged the refusal it was given, in words.
    assert!(
        refused.logs.iter().any(|l| l
            .message
            .contains("not-granted: https://evil.example/orders/4410 is outside")),
        "{:?}",
        refused.logs
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing reached the API");
    Ok(())
}
