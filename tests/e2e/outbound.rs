//! Plugins that call other services: `orders` against a fake order API on
//! loopback (the secret substituted at send time and found nowhere else),
//! `hostile-fetch` refused by each rule (grant, SSRF with `DIGIBOT_RESOLVE`
//! pins, redirects, caps) while echo beside it answers every event, and the
//! call journal across a kill -9: completed calls are not made again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::support::orders_api::FakeOrderApi;
use crate::support::procfs::threads;
use crate::support::*;

/// The operator's order API token: must reach the order API, and nothing
/// else (no log line, event, journal entry, action).
pub(crate) const SECRET: &str = "tok_9f3c2a7e-SECRET-5b1d";

/// `orders.toml` for the fake API (granted by its literal loopback
/// address, the only way a plugin may reach 127.0.0.1). No `[limits]`: a
/// plugin with an http grant gets the 10 s wall-clock default.
pub(crate) fn orders_toml(api: &FakeOrderApi) -> String {
    format!(
        r#"[config]
orders_api = "{url}"
[grants]
http = ["{url}/orders/"]
secrets = ["ORDERS_TOKEN"]
"#,
        url = api.url()
    )
}

/// A digibot serving `orders` against `api`, its secret set.
pub(crate) fn orders_bot(fake: &FakeDigishare, api: &FakeOrderApi) -> DigibotBuilder {
    Digibot::builder()
        .fake(fake)
        .plugin_toml("orders", &orders_toml(api))
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
}

/// One request the order API received: method, path, Authorization,
/// Idempotency-Key.
type OrderCall = (String, String, Option<String>, Option<String>);

/// What the order API received, as [`OrderCall`]s.
fn order_calls(api: &FakeOrderApi) -> Vec<OrderCall> {
    api.requests()
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.path.clone(),
                r.authorization.clone(),
                r.idempotency_key.clone(),
            )
        })
        .collect()
}

/// The `GET /orders/N` that `plugin`'s turn of `event` makes, the secret
/// substituted: one per `(event, N)`.
fn expected_order_calls(plugin: &str, calls: &[(&str, &str)]) -> Vec<OrderCall> {
    calls
        .iter()
        .map(|(event, number)| {
            (
                "GET".to_string(),
                format!("/orders/{number}"),
                Some(format!("Bearer {SECRET}")),
                Some(format!("{event}/{plugin}/0")),
            )
        })
        .collect()
}

/// Fails if `text` holds the secret, saying where.
fn ensure_no_secret(text: &str, what: &str) -> Result<()> {
    if let Some(i) = text.find(SECRET) {
        let start = i.saturating_sub(200);
        bail!(
            "the secret leaked into {what}: ...{}...",
            &text[start..(i + SECRET.len() + 50).min(text.len())]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_answers_the_status_and_the_secret_goes_only_to_the_order_api() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("12345", "shipped");
    let bot = orders_bot(&fake, &api)
        .env("RUST_LOG", "debug")
        .start()
        .await?;
    let c = "conv_orders_1";
    let first = bot
        .accept(&customer_text(c, "msg_o_1", "Bonjour, ma commande 12345 ?"))
        .await?;
    let second = bot
        .accept(&customer_text(c, "msg_o_2", "et la #99999"))
        .await?;
    // No order number: orders stays silent.
    let third = bot.accept(&customer_text(c, "msg_o_3", "merci")).await?;
    bot.wait_idle(&[first.clone(), second.clone(), third], TIMEOUT)
        .await?;
    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[
            wire_text(c, "Votre commande 12345 est en route."),
            wire_text(
                c,
                "Je ne trouve pas la commande 99999. Vérifiez le numéro ?",
            ),
        ],
        "replies",
    )?;

    // The order API got exactly the two requests, the secret substituted.
    assert_eq!(
        order_calls(&api),
        expected_order_calls("orders", &[(&first, "12345"), (&second, "99999")])
    );
    let requests = api.requests();
    let accept = requests[0]
        .headers
        .iter()
        .find(|(n, _)| n == "accept")
        .map(|(_, v)| v.as_str());
    assert_eq!(accept, Some("application/json"));

    // The event records the call (no header), the journal keeps it with
    // the placeholder; the secret is in neither, nor in the log, the
    // conversation view, the dashboard or the outbox.
    let events = bot.events(50).await?;
    let event = events
        .iter()
        .find(|e| e["key"] == first.as_str())
        .context("first event")?;
    let calls = &event["plugins"][0]["calls"];
    assert_eq!(calls[0]["url"], format!("{}/orders/12345", api.url()));
    assert_eq!(calls[0]["status"], 200);
    let journal = bot
        .admin_get(&format!("/admin/events/{first}/journal"))
        .await?;
    journal.expect_status(200)?;
    let journal = journal.json()?;
    assert_eq!(journal["calls"][0]["plugin"], "orders");
    assert_eq!(journal["calls"][0]["response"]["status"], 200);
    assert_eq!(
        journal["calls"][0]["response"]["body"],
        r#"{"order":"12345","status":"shipped"}"#
    );
    let auth = journal["calls"][0]["request"]["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h[0] == "authorization"))
        .context("authorization in the journal")?;
    assert_eq!(auth[1], "Bearer {{secret:ORDERS_TOKEN}}");

    ensure_no_secret(&serde_json::to_string(&events)?, "/admin/events")?;
    ensure_no_secret(&journal.to_string(), "the journal")?;
    let conversation = bot.admin_get(&format!("/admin/conversations/{c}")).await?;
    ensure_no_secret(&conversation.body, "/admin/conversations")?;
    let plugins = bot.admin_get("/admin/plugins").await?;
    ensure_no_secret(&plugins.body, "/admin/plugins")?;
    let dashboard = bot.get("/admin").await?;
    ensure_no_secret(&dashboard.body, "the dashboard")?;
    for r in fake.requests() {
        ensure_no_secret(&r.summary(), "a Messages API request")?;
    }
    let logs = bot.logs();
    ensure!(
        logs.contains("plugin http call"),
        "the call is logged:\n{logs}"
    );
    ensure_no_secret(&logs, "the log")?;
    Ok(())
}

/// The TypeScript orders (guests/typescript/orders) calls the granted fake
/// order API with `fetch()`: the same replies as the Rust and Python
/// twins, and exactly one request per lookup at the API, the secret
/// substituted by the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_orders_fetches_the_granted_api_and_answers() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("12345", "shipped");
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("orders_ts", &orders_toml(&api))
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
        .spawn()?;
    // A 13 MB StarlingMonkey component compiles in 10-20 s on a loaded
    // machine, before the server answers.
    bot.wait_healthy(Duration::from_secs(120)).await?;
    let c = "conv_orders_ts";
    let first = bot
        .accept(&customer_text(
            c,
            "msg_ts_1",
            "Bonjour, ma commande 12345 ?",
        ))
        .await?;
    let second = bot
        .accept(&customer_text(c, "msg_ts_2", "et la #99999"))
        .await?;
    let third = bot.accept(&customer_text(c, "msg_ts_3", "merci")).await?;
    bot.wait_idle(&[first.clone(), second.clone(), third], TIMEOUT)
        .await?;
    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[
            wire_text(c, "Votre commande 12345 est en route."),
            wire_text(
                c,
                "Je ne trouve pas la commande 99999. Vérifiez le numéro ?",
            ),
        ],
        "replies",
    )?;
    assert_eq!(
        order_calls(&api),
        expected_order_calls("orders_ts", &[(&first, "12345"), (&second, "99999")])
    );
    ensure_no_secret(&bot.logs(), "the log")?;
    Ok(())
}

/// The concierge's « Suivre un colis » with `orders_api` configured: it
/// asks for the order number, looks it up at the order API (the secret
/// substituted there, and only there) and answers its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concierge_tracks_a_parcel_through_the_order_api() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("4410", "out_for_delivery");
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("concierge", &orders_toml(&api))
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
        .start()
        .await?;
    let c = "conv_concierge_track";
    let track = bot
        .accept(&list_reply(c, "msg_ct_1", "track", "Suivre un colis"))
        .await?;
    bot.wait_idle(std::slice::from_ref(&track), TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;
    ensure!(api.requests().is_empty(), "nothing to look up yet");
    let number = bot
        .accept(&customer_text(c, "msg_ct_2", "commande n°4410, merci !"))
        .await?;
    bot.wait_idle(std::slice::from_ref(&number), TIMEOUT)
        .await?;
    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[
            wire_text(
                c,
                "Quel est votre numéro de commande ? Tapez-le ici (par exemple 12345).",
            ),
            wire_text(c, "Votre commande 4410 est en cours de livraison."),
        ],
        "replies",
    )?;
    let seen: Vec<_> = api
        .requests()
        .into_iter()
        .map(|r| (r.path, r.authorization, r.idempotency_key))
        .collect();
    assert_eq!(
        seen,
        [(
            "/orders/4410".to_string(),
            Some(format!("Bearer {SECRET}")),
            Some(format!("{number}/concierge/0"))
        )]
    );
    ensure_no_secret(&bot.logs(), "the log")?;
    ensure_no_secret(
        &serde_json::to_string(&bot.events(10).await?)?,
        "/admin/events",
    )?;
    for r in fake.requests() {
        ensure_no_secret(&r.summary(), "a Messages API request")?;
    }
    Ok(())
}

/// hostile-fetch's grant: the fake API by its literal address, and two
/// names the operator pinned to loopback and to the metadata address.
fn hostile_toml(api: &FakeOrderApi) -> String {
    let port = api.port();
    format!(
        r#"[grants]
http = ["{url}/", "http://api.shop.example:{port}/", "http://metadata.shop.example:{port}/"]
secrets = ["ORDERS_TOKEN"]
[limits]
http_calls = 3
http_response_bytes = 65536
http_timeout_ms = 1500
"#,
        url = api.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fetch_is_refused_by_every_rule_and_echo_answers_beside_it() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    let port = api.port();
    let base = api.url();
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .plugin_toml("hostile-fetch", &hostile_toml(&api))
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
        .env(
            "DIGIBOT_RESOLVE",
            &format!(
                "api.shop.example:{port}:127.0.0.1,metadata.shop.example:{port}:169.254.169.254"
            ),
        )
        .start()
        .await?;
    let ok = format!("{base}/ok");
    let cases: Vec<(String, String)> = vec![
        (ok.clone(), "status 200".into()),
        (
            "https://evil.example/steal".into(),
            "refused: not-granted: https://evil.example/steal is outside this plugin's http grant"
                .into(),
        ),
        (
            format!("http://api.shop.example:{port}/ok"),
            "refused: address-prohibited: api.shop.example resolves to 127.0.0.1, a loopback address"
                .into(),
        ),
        (
            format!("http://metadata.shop.example:{port}/latest/meta-data/"),
            "refused: address-prohibited: metadata.shop.example resolves to 169.254.169.254, a cloud metadata address"
                .into(),
        ),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "refused: not-granted: http://169.254.169.254/latest/meta-data/ is outside this plugin's http grant"
                .into(),
        ),
        (
            format!("{base}/redirect?to=https://evil.example/steal"),
            "refused: redirect-not-granted: redirect to https://evil.example/steal leaves this plugin's http grant"
                .into(),
        ),
        (
            format!("{base}/redirect?to=http://api.shop.example:{port}/ok"),
            "refused: address-prohibited: api.shop.example resolves to 127.0.0.1, a loopback address"
                .into(),
        ),
        (
            format!("{base}/huge"),
            "refused: response-too-large: response body over 65536 bytes".into(),
        ),
        (
            format!("{base}/forever"),
            "refused: timeout: no complete response within 1500 ms".into(),
        ),
        (
            format!("{ok} {ok} {ok} {ok}"),
            "status 200\nstatus 200\nstatus 200\nrefused: too-many-calls: more than 3 requests in one turn"
                .into(),
        ),
    ];
    let mut keys = Vec::new();
    for (i, (message, _)) in cases.iter().enumerate() {
        let c = format!("conv_hostile_{i}");
        keys.push(
            bot.accept(&customer_text(&c, &format!("msg_h_{i}"), message))
                .await?,
        );
    }
    bot.wait_idle(&keys, Duration::from_secs(60)).await?;
    // Every event: echo's reply, then hostile-fetch's (plugins run in name order).
    fake.settle(cases.len() * 2, TIMEOUT).await?;
    for (i, (message, answer)) in cases.iter().enumerate() {
        let c = format!("conv_hostile_{i}");
        ensure_all_eq(
            &fake.wire_for(&c),
            &[wire_text(&c, message), wire_text(&c, answer)],
            &format!("replies to {message:?}"),
        )?;
    }

    // The order API saw only what was allowed: 1 + 3 /ok, the two redirect
    // hops, /huge and /forever once each. Nothing else reached it.
    let mut paths: HashMap<String, usize> = HashMap::new();
    for r in api.requests() {
        *paths.entry(r.path.clone()).or_default() += 1;
        // A granted host got the secret; nothing else could have.
        assert_eq!(
            r.authorization.as_deref(),
            Some(&format!("Bearer {SECRET}")[..])
        );
    }
    let want: HashMap<String, usize> = [
        ("/ok".to_string(), 4),
        ("/redirect?to=https://evil.example/steal".to_string(), 1),
        (format!("/redirect?to=http://api.shop.example:{port}/ok"), 1),
        ("/huge".to_string(), 1),
        ("/forever".to_string(), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(paths, want);

    // Each refusal is recorded on its event, with its kind.
    let events = bot.events(100).await?;
    let kinds: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let e = events.iter().find(|e| e["key"] == k.as_str()).unwrap();
            let hostile = e["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["plugin"] == "hostile-fetch")
                .unwrap();
            hostile["calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    c["refused"]["kind"]
                        .as_str()
                        .map_or_else(|| format!("{}", c["status"]), str::to_string)
                })
                .collect()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            vec!["200"],
            vec!["not-granted"],
            vec!["address-prohibited"],
            vec!["address-prohibited"],
            vec!["not-granted"],
            vec!["redirect-not-granted"],
            vec!["address-prohibited"],
            vec!["response-too-large"],
            vec!["timeout"],
            vec!["200", "200", "200", "too-many-calls"],
        ]
    );
    ensure_no_secret(&bot.logs(), "the log")?;
    ensure_no_secret(&serde_json::to_string(&events)?, "/admin/events")?;
    Ok(())
}

/// `hostile-fetch` granted the fake order API, with room for slow calls.
fn waiting_toml(api: &FakeOrderApi) -> String {
    format!(
        "[grants]\nhttp = [\"{}/\"]\nsecrets = [\"ORDERS_TOKEN\"]\n[limits]\nwall_ms = 20000\nhttp_timeout_ms = 15000\n",
        api.url()
    )
}

/// Posts one message to each of `n` conversations: a quick call, then a
/// slow one. Returns the event keys.
async fn post_waiting_turns(
    bot: &Digibot,
    api: &FakeOrderApi,
    n: usize,
    tag: &str,
) -> Result<Vec<String>> {
    let base = api.url();
    let message = format!("{base}/ok {base}/slow?ms=4000");
    let mut keys = Vec::new();
    for i in 0..n {
        let c = format!("conv_{tag}_{i}");
        keys.push(
            bot.accept(&customer_text(&c, &format!("msg_{tag}_{i}"), &message))
                .await?,
        );
    }
    Ok(keys)
}

/// Waits until the turns that run wait on their slow call and no quick
/// call is under way (the number waiting held still for 500 ms).
async fn wait_turns_on_slow_call(api: &FakeOrderApi) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    let mut waiting = (0, Instant::now());
    loop {
        ensure!(
            Instant::now() < deadline,
            "the turns never settled on their slow call"
        );
        let now = api.in_flight();
        if now != waiting.0 {
            waiting = (now, Instant::now());
        } else if now >= 2 && waiting.1.elapsed() >= Duration::from_millis(500) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After the kill and the re-run: each conversation got exactly one reply;
/// each quick call reached the API once (those completed before the kill
/// were answered from the journal, which `bot`'s events show), each slow
/// call at most once more than before the kill.
async fn check_no_completed_call_repeated(
    bot: &Digibot,
    fake: &FakeDigishare,
    api: &FakeOrderApi,
    keys: &[String],
    tag: &str,
    before: &HashMap<String, usize>,
) -> Result<()> {
    fake.settle(keys.len(), Duration::from_secs(30)).await?;
    let counts = api.count_by_key();
    for (i, key) in keys.iter().enumerate() {
        let c = format!("conv_{tag}_{i}");
        ensure_all_eq(
            &fake.wire_for(&c),
            &[wire_text(&c, "status 200\nstatus 200")],
            "exactly one reply",
        )?;
        let quick = counts
            .get(&format!("{key}/hostile-fetch/0"))
            .copied()
            .unwrap_or(0);
        let slow = counts
            .get(&format!("{key}/hostile-fetch/1"))
            .copied()
            .unwrap_or(0);
        ensure!(quick == 1, "{key}: the quick call was made {quick} times");
        let slow_before = before
            .get(&format!("{key}/hostile-fetch/1"))
            .copied()
            .unwrap_or(0);
        ensure!(
            slow >= 1 && slow <= slow_before + 1,
            "{key}: the slow call: {slow_before} before the kill, {slow} in all"
        );
    }
    let completed_before = before.keys().filter(|k| k.ends_with("/0")).count();
    ensure!(
        completed_before > 0,
        "no call had completed before the kill"
    );
    let events = bot.events(keys.len() + 50).await?;
    let replayed = events
        .iter()
        .filter(|e| keys.iter().any(|k| e["key"] == k.as_str()))
        .filter(|e| e["plugins"][0]["calls"][0]["replayed"] == true)
        .count();
    ensure!(
        replayed == completed_before,
        "{replayed} re-runs were answered from the journal, {completed_before} calls had completed"
    );
    Ok(())
}

/// kill -9 while turns wait on the order API: each turn makes a quick call
/// (completed, journaled) and then a slow one (in flight at the kill).
/// After the restart every turn runs again: the completed call is answered
/// from the journal (its Idempotency-Key reached the API once), the one in
/// flight is made at most once more, and each customer gets exactly one
/// reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_turns_wait_repeats_no_completed_call() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("hostile-fetch", &waiting_toml(&api))
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
        .start()
        .await?;
    let keys = post_waiting_turns(&bot, &api, 12, "k9").await?;
    wait_turns_on_slow_call(&api).await?;
    bot.kill9()?;
    let before = api.count_by_key();
    bot.restart().await?;
    bot.wait_idle(&keys, Duration::from_secs(90)).await?;
    check_no_completed_call_repeated(&bot, &fake, &api, &keys, "k9", &before).await
}

/// The same on PostgreSQL with two replicas: the one the turns run on is
/// killed while they wait; the other takes their conversations over once
/// the leases run out and re-runs the turns from the shared journal. The
/// lease (8 s) outlasts a turn (4 s of waiting), so only the kill moves a
/// conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_while_turns_wait_repeats_no_completed_call() -> Result<()> {
    let Some(database) = crate::support::pg::fresh_database("outbound_kill").await? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    let mut bots = Digibot::builder()
        .fake(&fake)
        .plugin_toml("hostile-fetch", &waiting_toml(&api))
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
        .database(&database)
        .env("DIGIBOT_LEASE_MS", "8000")
        .start_replicas(2)
        .await?;
    let keys = post_waiting_turns(&bots[0], &api, 12, "pg").await?;
    wait_turns_on_slow_call(&api).await?;
    bots[0].kill9()?;
    let before = api.count_by_key();
    bots[1].wait_idle(&keys, Duration::from_secs(90)).await?;
    check_no_completed_call_repeated(&bots[1], &fake, &api, &keys, "pg", &before).await
}

/// A thousand conversations whose turns each wait 2 s on the order API
/// (two messages each, so two waits in a row): every one answered, in
/// order per conversation (the second request of a conversation leaves
/// only once the first was answered), on a bounded number of threads,
/// while echo's replies to other conversations are not held behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_conversations_waiting_on_the_api_hold_no_thread_and_delay_no_echo() -> Result<()>
{
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    const CONVERSATIONS: usize = 1000;
    const WAIT_MS: u64 = 2000;
    const ECHOES: usize = 20;
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .plugin_toml(
            "hostile-fetch",
            &format!(
                "[grants]\nhttp = [\"{}/\"]\nsecrets = [\"ORDERS_TOKEN\"]\n[limits]\nwall_ms = 30000\nhttp_timeout_ms = 15000\n",
                api.url()
            ),
        )
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", SECRET)
        // Every conversation at once: lanes and turns bounded above the
        // thousand; a small resident set per pooled memory.
        .env("DIGIBOT_CONCURRENCY", "1200")
        .env("DIGIBOT_POOL_INSTANCES", "2200")
        .env("DIGIBOT_KEEP_RESIDENT_KB", "64")
        // Echo's turns among a thousand waiting ones, on a loaded 2-core
        // machine: past 100 ms of wall clock is containment, not this test.
        .long_deadline()
        .start()
        .await?;
    let pid = bot.pid().context("digibot's pid")?;
    let idle_threads = threads(pid)?;
    let base = api.url();
    let url = |c: usize, m: usize| format!("{base}/slow?ms={WAIT_MS}&c={c}&m={m}");
    let started = Instant::now();
    let post_round = |m: usize| {
        let bot = &bot;
        stream::iter(0..CONVERSATIONS)
            .map(move |c| async move {
                let conversation = format!("conv_wait_{c}");
                bot.accept(&customer_text(
                    &conversation,
                    &format!("msg_wait_{c}_{m}"),
                    &url(c, m),
                ))
                .await
            })
            .buffer_unordered(64)
            .try_collect::<Vec<String>>()
    };
    post_round(0).await?;
    post_round(1).await?;

    // While the turns wait, other conversations' messages: echo answers
    // them at once (their turns are not queued behind the waiting ones).
    let deadline = Instant::now() + TIMEOUT;
    while api.in_flight() < CONVERSATIONS / 2 {
        ensure!(
            Instant::now() < deadline,
            "the turns never waited together: {} in flight",
            api.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut max_threads = threads(pid)?;
    let mut quick = Vec::new();
    for k in 0..ECHOES {
        let c = format!("conv_quick_{k}");
        quick.push(
            bot.accept(&customer_text(
                &c,
                &format!("msg_quick_{k}"),
                &format!("bonjour {k}"),
            ))
            .await?,
        );
    }
    let waiting = api.in_flight();
    ensure!(
        waiting >= CONVERSATIONS / 2,
        "only {waiting} turns were still waiting when the others were posted"
    );

    // Every waiting conversation: echo's reply and the status, twice, in order.
    let total = CONVERSATIONS * 4 + ECHOES;
    let deadline = Instant::now() + crate::support::burst::LONG;
    while fake.successful().len() < total {
        if Instant::now() >= deadline {
            let short: Vec<String> = (0..CONVERSATIONS)
                .map(|c| (format!("conv_wait_{c}"), 4))
                .chain((0..ECHOES).map(|k| (format!("conv_quick_{k}"), 1)))
                .filter_map(|(c, n)| {
                    let got = fake.wire_for(&c).len();
                    (got < n).then(|| format!("{c}: {got} of {n}"))
                })
                .collect();
            let metrics = crate::observability::scrape(&bot).await.unwrap_or_default();
            let failures: Vec<String> = metrics
                .iter()
                .filter(|(k, _)| k.starts_with("digibot_plugin_failures_total"))
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            bail!(
                "{} of {total} replies; short: {}; {}",
                fake.successful().len(),
                short.join(", "),
                failures.join(", ")
            );
        }
        max_threads = max_threads.max(threads(pid)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    fake.settle(total, TIMEOUT).await?;
    for c in 0..CONVERSATIONS {
        let conversation = format!("conv_wait_{c}");
        ensure_all_eq(
            &fake.wire_for(&conversation),
            &[
                wire_text(&conversation, &url(c, 0)),
                wire_text(&conversation, "status 200"),
                wire_text(&conversation, &url(c, 1)),
                wire_text(&conversation, "status 200"),
            ],
            &conversation,
        )?;
    }
    for k in 0..ECHOES {
        let c = format!("conv_quick_{k}");
        ensure_all_eq(
            &fake.wire_for(&c),
            &[wire_text(&c, &format!("bonjour {k}"))],
            &c,
        )?;
    }
    // Each conversation's second call left after its first was answered.
    let requests = api.requests();
    ensure!(
        requests.len() == CONVERSATIONS * 2,
        "{} calls reached the API",
        requests.len()
    );
    let at = |c: usize, m: usize| {
        let path = format!("/slow?ms={WAIT_MS}&c={c}&m={m}");
        requests.iter().find(|r| r.path == path).map(|r| r.at)
    };
    for c in 0..CONVERSATIONS {
        let (first, second) = (
            at(c, 0).context("first call")?,
            at(c, 1).context("second call")?,
        );
        ensure!(
            second.duration_since(first) >= Duration::from_millis(WAIT_MS),
            "conversation {c}: its second call left {:?} after the first",
            second.saturating_duration_since(first)
        );
    }
    // From receipt to handled (its reply committed to the outbox): the
    // quick events' turns did not wait for the slow ones.
    let events = bot.events(CONVERSATIONS * 2 + ECHOES + 10).await?;
    let mut slowest_echo = Duration::ZERO;
    for key in &quick {
        let e = events
            .iter()
            .find(|e| e["key"] == key.as_str())
            .with_context(|| format!("event {key}"))?;
        let (received, handled) = (e["received_at"].as_i64(), e["handled_at"].as_i64());
        let (Some(received), Some(handled)) = (received, handled) else {
            bail!("{key}: not handled: {e}");
        };
        slowest_echo = slowest_echo.max(Duration::from_millis((handled - received).max(0) as u64));
    }
    eprintln!(
        "{CONVERSATIONS} conversations × 2 waits of {WAIT_MS} ms: {took:?}; {waiting} calls waiting \
         when the echo conversations were posted; slowest echo turn {slowest_echo:?}; threads {idle_threads} idle, {max_threads} at most"
    );
    ensure!(
        slowest_echo < Duration::from_millis(WAIT_MS / 2),
        "an echo turn waited {slowest_echo:?} behind the waiting turns"
    );
    // A thread per waiting turn would be a thousand more.
    ensure!(
        max_threads <= idle_threads + 16,
        "threads grew from {idle_threads} to {max_threads} with {waiting} turns waiting"
    );
    // Two waits per conversation back to back: about 4 s, not 2,000 × 2 s.
    ensure!(took < Duration::from_secs(120), "the waits took {took:?}");
    Ok(())
}

/// `digibot test --record`: a production conversation of `orders` (its
/// order-API call journaled) becomes a test file, its request the
/// expectation and the API's answer a `[[http]]` stub; the file passes when
/// run again, offline (the API now answers otherwise), and in YAML too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_production_conversation_passes_as_a_test() -> Result<()> {
    use crate::support::durable::cli;
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("12345", "shipped");
    let bot = orders_bot(&fake, &api).start().await?;
    let c = "conv_record_1";
    let mut keys = Vec::new();
    for (id, text) in [
        ("msg_rec_1", "bonjour"),
        ("msg_rec_2", "ma commande 12345 ?"),
    ] {
        keys.push(bot.accept(&customer_text(c, id, text)).await?);
    }
    bot.wait_idle(&keys, TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;
    api.set_order("12345", "lost");

    let orders = bot.plugins_dir.join("orders.wasm");
    let data = bot.data_dir.clone();
    let tmp = tempfile::tempdir()?;
    for name in ["recorded.toml", "recorded.yaml"] {
        let file = tmp.path().join(name);
        let run = cli(
            &data,
            &[
                "test",
                &orders.to_string_lossy(),
                "--record",
                &file.to_string_lossy(),
                "--conversation",
                c,
                "--db",
                &data.to_string_lossy(),
            ],
        )
        .await?
        .ok()?;
        ensure!(
            run.stdout
                == format!(
                    "recorded {f} (2 turns, 1 [[http]] stubs) from conversation {c}\n\
                     {f} (recorded conversation {c}) ... ok (2 turns)\n\
                     1 test file: 1 passed, 0 failed\n",
                    f = file.display()
                ),
            "{}",
            run.stdout
        );
        let text = std::fs::read_to_string(&file)?;
        ensure!(
            text.contains("Votre commande 12345 est en route.")
                && text.contains(&format!("{}/orders/12345", api.url()))
                && text.contains("shipped"),
            "{text}"
        );
        ensure_no_secret(&text, "the recorded test")?;
    }
    ensure!(
        api.requests().len() == 1,
        "the recorded test called the API"
    );
    Ok(())
}

/// `digibot replay --event KEY`: a production turn of `orders` runs again
/// from the store, its order-API call answered from the event's journal
/// (the API now says something else, and is not called), and gives the
/// same request it queued then. A version whose call the journal does not
/// hold (echo-v2 makes none; hostile-fetch's would be another) differs and
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_production_turn_gives_identical_actions_from_its_journal() -> Result<()> {
    use crate::support::durable::cli;
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("12345", "shipped");
    let bot = orders_bot(&fake, &api).start().await?;
    let c = "conv_replay_1";
    let key = bot
        .accept(&customer_text(c, "msg_r_1", "ma commande 12345 ?"))
        .await?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;
    // A real call now would answer otherwise.
    api.set_order("12345", "lost");

    let orders = bot.plugins_dir.join("orders.wasm");
    let data = bot.data_dir.clone();
    let run = cli(
        &data,
        &[
            "replay",
            "--event",
            &key,
            "--plugin",
            &orders.to_string_lossy(),
        ],
    )
    .await?
    .ok()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .with_context(|| format!("replay output: {}", run.stdout))?;
    let sent = fake.wire_for(c);
    ensure!(report["same"] == true, "{report:#}");
    let plugin = &report["plugins"][0];
    ensure!(
        plugin["plugin"] == "orders"
            && plugin["calls_answered"] == 1
            && plugin["calls_refused"] == 0,
        "{report:#}"
    );
    ensure!(
        plugin["replayed"][0]["body"]["body"] == "Votre commande 12345 est en route."
            && plugin["recorded"] == plugin["replayed"],
        "{report:#}"
    );
    ensure!(sent.len() == 1, "{sent:?}");
    ensure!(api.requests().len() == 1, "the replay called the API");
    ensure_no_secret(&run.stdout, "the replay's output")?;

    // Another version: echo-v2 answers otherwise and calls nothing.
    let run = cli(
        &data,
        &[
            "replay",
            "--event",
            &key,
            "--plugin",
            &plugin_wasm("echo_v2").to_string_lossy(),
        ],
    )
    .await?
    .ok()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout)?;
    ensure!(report["same"] == false, "{report:#}");
    let names: Vec<&str> = report["plugins"]
        .as_array()
        .context("plugins")?
        .iter()
        .filter_map(|p| p["plugin"].as_str())
        .collect();
    ensure!(
        names.contains(&"orders"),
        "the stored turn's plugin listed: {report:#}"
    );

    // An unknown key is a clear error.
    let run = cli(&data, &["replay", "--event", "live_chat.new_message:nope"]).await?;
    ensure!(
        !run.success
            && run
                .stderr
                .contains("no event live_chat.new_message:nope in the store"),
        "{}",
        run.stderr
    );
    Ok(())
}
