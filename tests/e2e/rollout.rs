//! Safe rollouts on the real server: a candidate shadowing `echo` on live
//! messages (its replies compared, never sent), an identical build
//! compared the same, promotion on evidence, a trapping canary rolled back
//! on its own, and two PostgreSQL replicas reporting one rollout.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::containment::Admin;
use crate::support::durable::{Poster, cli_with};
use crate::support::pg::fresh_database;
use crate::support::*;

fn wasm(name: &str) -> Result<Vec<u8>> {
    let path = plugin_wasm(name);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// The conversation's canary bucket, as digibot computes it
/// (`digibot_pipeline::rollout::canary_bucket`: FNV-1a, mod 100).
fn bucket(conversation_id: &str) -> u8 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in conversation_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % 100) as u8
}

/// `PUT /admin/plugins/NAME?QUERY` with `bytes`: the rollout record.
async fn start(admin: &Admin, name: &str, query: &str, bytes: Vec<u8>) -> Result<Value> {
    let (status, body) = admin
        .send(
            reqwest::Method::PUT,
            &format!("/admin/plugins/{name}?{query}"),
            bytes,
        )
        .await?;
    ensure!(status == 201, "starting the rollout: {status} {body}");
    Ok(body["rollout"].clone())
}

async fn report(admin: &Admin, name: &str) -> Result<Value> {
    let (status, body) = admin
        .send(
            reqwest::Method::GET,
            &format!("/admin/plugins/{name}/rollout?limit=1000"),
            Vec::new(),
        )
        .await?;
    ensure!(status == 200, "GET rollout: {status} {body}");
    Ok(body)
}

/// Polls the rollout report until `done` holds.
async fn wait_report(
    admin: &Admin,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = report(admin, name).await?;
        if done(&r) {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}; the report: {r:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post(admin: &Admin, path: &str) -> Result<(u16, Value)> {
    admin.send(reqwest::Method::POST, path, Vec::new()).await
}

/// The text of the one message in a comparison's request list.
fn text_of(requests: &Value) -> Option<&str> {
    match requests.as_array().map(Vec::as_slice) {
        Some([one]) => one["body"]["body"].as_str(),
        _ => None,
    }
}

/// Posts `per` customer texts to each of `conversations`; returns the
/// texts by conversation, in order.
async fn chat(
    bot: &Digibot,
    tag: &str,
    conversations: &[String],
    per: usize,
) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for round in 0..per {
        for (c, conversation) in conversations.iter().enumerate() {
            let text = format!("{tag} c{c} m{round}");
            bot.accept(&customer_text(
                conversation,
                &format!("{tag}_{c}_{round}"),
                &text,
            ))
            .await?;
            texts.push(text);
        }
    }
    Ok(texts)
}

fn conversations(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("conv_{tag}_{i}")).collect()
}

/// The bodies of every message the fake received, as a set.
fn sent_texts(fake: &FakeDigishare) -> BTreeSet<String> {
    fake.successful()
        .iter()
        .filter_map(|r| r.body["body"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn shadowing_echo_v2_sends_only_echo_and_reports_50_different() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    let rollout = start(&admin, "echo", "mode=shadow", wasm("echo_v2")?).await?;
    ensure!(
        rollout["mode"] == "shadow" && rollout["state"] == "active",
        "{rollout}"
    );

    let texts = chat(&bot, "sh", &conversations("sh", 5), 10).await?;
    ensure!(texts.len() == 50);
    // The customers get echo's 50 replies and nothing of the candidate's.
    fake.settle(50, TIMEOUT).await?;
    let sent = sent_texts(&fake);
    let expected: BTreeSet<String> = texts.iter().cloned().collect();
    ensure!(sent == expected, "sent: {sent:?}");

    let r = wait_report(&admin, "echo", "50 comparisons", |r| {
        r["totals"]["compared"] == 50
    })
    .await?;
    ensure!(
        r["totals"]["different"] == 50 && r["totals"]["same"] == 0 && r["totals"]["failed"] == 0,
        "{:#}",
        r["totals"]
    );
    let events = r["events"].as_array().context("events")?;
    ensure!(events.len() == 50, "{} events reported", events.len());
    let mut compared = BTreeSet::new();
    for e in events {
        ensure!(e["verdict"] == "different", "{e}");
        let serving = text_of(&e["serving"]).with_context(|| format!("serving of {e}"))?;
        let candidate = text_of(&e["candidate"]).with_context(|| format!("candidate of {e}"))?;
        ensure!(candidate == format!("v2: {serving}"), "{e}");
        compared.insert(serving.to_string());
    }
    ensure!(compared == expected, "every message compared once");
    // Nothing more went out meanwhile, and echo's breaker saw no failure.
    fake.assert_quiet(50, SETTLE).await?;
    let echo = admin.plugin("echo").await?;
    ensure!(
        echo["failures"] == 0 && echo["consecutive_failures"] == 0,
        "{echo}"
    );
    Ok(())
}

#[tokio::test]
async fn a_shadowed_identical_build_is_the_same_50_times_and_promotes() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    start(&admin, "echo", "mode=shadow", wasm("echo")?).await?;
    chat(&bot, "id", &conversations("id", 5), 10).await?;
    fake.settle(50, TIMEOUT).await?;
    let r = wait_report(&admin, "echo", "50 comparisons", |r| {
        r["totals"]["compared"] == 50
    })
    .await?;
    ensure!(r["totals"]["same"] == 50, "{:#}", r["totals"]);
    let events = r["events"].as_array().context("events")?;
    ensure!(
        events.len() == 50
            && events
                .iter()
                .all(|e| e["verdict"] == "same" && e["serving"] == e["candidate"]),
        "{events:#?}"
    );
    // More evidence asked for than there is: refused.
    let (status, body) = post(&admin, "/admin/plugins/echo/promote?require_same=51").await?;
    ensure!(status == 409, "{status} {body}");
    let (status, body) = post(&admin, "/admin/plugins/echo/promote?require_same=50").await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(body["rollout"]["state"] == "promoted", "{body}");
    // The newest 20 production turns replayed against it first, the same.
    ensure!(
        body["replay"]["compared"] == 20 && body["replay"]["same"] == 20,
        "{body:#}"
    );
    Ok(())
}

#[tokio::test]
async fn promote_switches_new_events_and_needs_evidence_or_acceptance() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    let v2 = wasm("echo_v2")?;
    let plain_hash = admin.plugin("echo").await?["version"].clone();
    start(&admin, "echo", "mode=shadow", v2).await?;
    let before = chat(&bot, "pr", &conversations("pr", 2), 2).await?;
    fake.settle(4, TIMEOUT).await?;
    wait_report(&admin, "echo", "4 comparisons", |r| {
        r["totals"]["compared"] == 4
    })
    .await?;

    // Differences: refused without acceptance, the serving version stays.
    let (status, body) = post(&admin, "/admin/plugins/echo/promote?require_same=1").await?;
    ensure!(status == 409, "{status} {body}");
    let (status, body) = post(&admin, "/admin/plugins/echo/promote").await?;
    ensure!(status == 409, "{status} {body}");
    let (status, body) = post(
        &admin,
        "/admin/plugins/echo/promote?accept_differences=true",
    )
    .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(body["rollout"]["state"] == "promoted", "{body}");

    let after = chat(&bot, "pr2", &conversations("pr", 2), 1).await?;
    let replies = fake.settle(6, TIMEOUT).await?;
    let texts: Vec<&str> = replies
        .iter()
        .filter_map(|r| r.body["body"].as_str())
        .collect();
    for t in &before {
        ensure!(
            texts.contains(&t.as_str()),
            "{t} answered by echo: {texts:?}"
        );
    }
    for t in &after {
        let v2 = format!("v2: {t}");
        ensure!(
            texts.contains(&v2.as_str()),
            "{t} answered by the candidate: {texts:?}"
        );
    }
    // Installed through the registry: the old version is a rollback away.
    let echo = admin.plugin("echo").await?;
    ensure!(
        echo["version"] != plain_hash && echo["previous_versions"] == 1,
        "{echo}"
    );
    let (status, body) = post(&admin, "/admin/plugins/echo/rollback").await?;
    ensure!(
        status == 200 && body["version"] == plain_hash,
        "{status} {body}"
    );
    // No rollout left to promote or abort.
    let (status, _) = post(&admin, "/admin/plugins/echo/abort").await?;
    ensure!(status == 404, "abort after promotion: {status}");
    Ok(())
}

#[tokio::test]
async fn a_trapping_canary_is_rolled_back_and_its_conversations_served_by_echo() -> Result<()> {
    const CANARY: usize = 5;
    const SERVING: usize = 6;
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    // Conversations in the candidate's half and in the serving version's.
    let all = conversations("can", 200);
    let canaried: Vec<String> = all
        .iter()
        .filter(|c| bucket(c) < 50)
        .take(CANARY)
        .cloned()
        .collect();
    let served: Vec<String> = all
        .iter()
        .filter(|c| bucket(c) >= 50)
        .take(SERVING)
        .cloned()
        .collect();
    ensure!(canaried.len() == CANARY && served.len() == SERVING);
    start(
        &admin,
        "echo",
        "mode=canary&percent=50",
        wasm("hostile_trap")?,
    )
    .await?;

    // The serving half is answered; the candidate traps on the other.
    let first_served = chat(&bot, "s1", &served, 1).await?;
    chat(&bot, "c1", &canaried, 1).await?;
    let r = wait_report(&admin, "echo", "the canary rolled back", |r| {
        r["rollout"]["state"] == "rolled_back"
    })
    .await?;
    let reason = r["rollout"]["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("canary failure rate 100%"), "{reason}");
    fake.settle(SERVING, TIMEOUT).await?;
    let sent = sent_texts(&fake);
    ensure!(sent == first_served.iter().cloned().collect(), "{sent:?}");
    for c in &canaried {
        ensure!(
            fake.messages_for(c).is_empty(),
            "{c} got a reply from the trap"
        );
    }

    // Afterwards every conversation, the canaried ones too, is echo's.
    let second: Vec<String> = chat(&bot, "c2", &canaried, 1)
        .await?
        .into_iter()
        .chain(chat(&bot, "s2", &served, 1).await?)
        .collect();
    fake.settle(SERVING + CANARY + SERVING, TIMEOUT).await?;
    for (c, text) in canaried.iter().zip(&second) {
        let got = fake.messages_for(c);
        ensure!(
            got.len() == 1 && got[0]["body"] == text.as_str(),
            "{c}: {got:?}"
        );
    }
    let r = report(&admin, "echo").await?;
    ensure!(r["running_here"] == false, "{r}");
    // The serving version's breaker never saw the candidate's failures.
    let echo = admin.plugin("echo").await?;
    ensure!(
        echo["failures"] == 0 && echo["consecutive_failures"] == 0,
        "{echo}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_replicas_report_the_same_rollout() -> Result<()> {
    const MESSAGES: usize = 20;
    let Some(database) = fresh_database("rollout_replicas").await? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let bots = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .database(&database)
        .start_replicas(2)
        .await?;
    let admins = [Admin::new(&bots[0])?, Admin::new(&bots[1])?];
    let rollout = start(&admins[0], "echo", "mode=shadow", wasm("echo_v2")?).await?;
    // The second replica loads the candidate from the shared record.
    wait_report(&admins[1], "echo", "the candidate on replica 2", |r| {
        r["running_here"] == true && r["rollout"]["id"] == rollout["id"]
    })
    .await?;

    let poster = Poster::round_robin(&[&bots[0], &bots[1]])?;
    let mut texts = BTreeSet::new();
    for i in 0..MESSAGES {
        let text = format!("rr m{i}");
        let reply = poster
            .post(&customer_text(
                &format!("conv_rr_{}", i % 4),
                &format!("rr_{i}"),
                &text,
            ))
            .await?;
        reply.expect_status(200)?;
        texts.insert(text);
    }
    fake.settle(MESSAGES, TIMEOUT).await?;
    ensure!(sent_texts(&fake) == texts, "only echo's replies were sent");
    let one = wait_report(&admins[0], "echo", "every message compared", |r| {
        r["totals"]["compared"] == MESSAGES
    })
    .await?;
    let two = report(&admins[1], "echo").await?;
    ensure!(
        one["totals"] == two["totals"],
        "{:#} / {:#}",
        one["totals"],
        two["totals"]
    );
    ensure!(
        one["events"] == two["events"],
        "both replicas list the same comparisons"
    );
    ensure!(
        one["totals"]["different"] == MESSAGES,
        "{:#}",
        one["totals"]
    );

    // Aborted on one, ended on both.
    let (status, body) = post(&admins[1], "/admin/plugins/echo/abort").await?;
    ensure!(status == 200, "{status} {body}");
    wait_report(&admins[0], "echo", "replica 1 to drop the candidate", |r| {
        r["rollout"]["state"] == "aborted" && r["running_here"] == false
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_cli_shadows_reports_refuses_and_aborts_through_the_admin_api() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let root = bot.root().to_path_buf();
    let rollout = |args: &[&str]| {
        let mut all = vec!["rollout", "--url", bot.url()];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(str::to_string).collect();
        let root = root.clone();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            cli_with(&root, &[("DIGIBOT_ADMIN_TOKEN", ADMIN_TOKEN)], &args).await
        }
    };
    let v2 = plugin_wasm("echo_v2");
    let started = rollout(&["shadow", "echo", v2.to_str().context("path")?])
        .await?
        .ok()?;
    let started: Value = serde_json::from_str(&started.stdout)?;
    ensure!(started["rollout"]["mode"] == "shadow", "{started}");

    chat(&bot, "cli", &conversations("cli", 1), 3).await?;
    fake.settle(3, TIMEOUT).await?;
    let admin = Admin::new(&bot)?;
    wait_report(&admin, "echo", "3 comparisons", |r| {
        r["totals"]["compared"] == 3
    })
    .await?;
    let status = rollout(&["status", "echo"]).await?.ok()?;
    let status: Value = serde_json::from_str(&status.stdout)?;
    ensure!(status["totals"]["different"] == 3, "{status}");

    // Differences and no --accept-differences: refused, exit code 1.
    let refused = rollout(&["promote", "echo", "--require-same", "3"]).await?;
    ensure!(
        !refused.success && refused.stderr.contains("409"),
        "{refused:?}"
    );
    let aborted = rollout(&["abort", "echo"]).await?.ok()?;
    let aborted: Value = serde_json::from_str(&aborted.stdout)?;
    ensure!(aborted["rollout"]["state"] == "aborted", "{aborted}");
    // The serving version never changed.
    let sent = sent_texts(&fake);
    ensure!(sent.iter().all(|t| !t.starts_with("v2: ")), "{sent:?}");
    Ok(())
}

#[tokio::test]
async fn promotion_replays_recent_turns_and_refuses_on_differences() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    // Production turns of `echo` before any rollout: no shadow evidence,
    // only what the replay finds.
    let texts = chat(&bot, "rp", &conversations("rp", 3), 2).await?;
    fake.settle(6, TIMEOUT).await?;
    start(&admin, "echo", "mode=shadow", wasm("echo_v2")?).await?;
    let plain = admin.plugin("echo").await?["version"].clone();

    let (status, body) = post(&admin, "/admin/plugins/echo/promote").await?;
    ensure!(status == 409, "{status} {body}");
    let replay = &body["replay"];
    ensure!(
        replay["compared"] == 6 && replay["different"] == 6 && replay["same"] == 0,
        "{body:#}"
    );
    let differences = replay["differences"].as_array().context("differences")?;
    ensure!(differences.len() == 6, "{body:#}");
    for d in differences {
        let (recorded, candidate) = (
            text_of(&d["recorded"]).context("recorded")?,
            text_of(&d["candidate"]).context("candidate")?,
        );
        ensure!(
            texts.iter().any(|t| t == recorded) && candidate == format!("v2: {recorded}"),
            "{d:#}"
        );
    }
    // Newest first: the last message sent is the first replayed.
    ensure!(
        text_of(&differences[0]["recorded"]) == texts.last().map(String::as_str),
        "{body:#}"
    );
    // Fewer asked for, fewer replayed; too many is a bad request.
    let (status, body) = post(&admin, "/admin/plugins/echo/promote?replay=2").await?;
    ensure!(
        status == 409 && body["replay"]["compared"] == 2,
        "{status} {body:#}"
    );
    let (status, body) = post(&admin, "/admin/plugins/echo/promote?replay=201").await?;
    ensure!(status == 400, "{status} {body:#}");
    ensure!(
        admin.plugin("echo").await?["version"] == plain,
        "a refused promotion changed nothing"
    );
    // The replay sent nothing.
    fake.assert_quiet(6, SETTLE).await?;

    let (status, body) = post(
        &admin,
        "/admin/plugins/echo/promote?accept_differences=true",
    )
    .await?;
    ensure!(
        status == 200 && body["rollout"]["state"] == "promoted" && body["replay"]["different"] == 6,
        "{status} {body:#}"
    );
    ensure!(admin.plugin("echo").await?["version"] != plain);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_replays_outbound_calls_from_the_journal_and_calls_nothing() -> Result<()> {
    use crate::outbound::orders_bot;
    use crate::support::orders_api::FakeOrderApi;
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("12345", "shipped");
    let bot = orders_bot(&fake, &api).start().await?;
    let admin = Admin::new(&bot)?;
    for c in 0..3 {
        bot.accept(&customer_text(
            &format!("conv_rj_{c}"),
            &format!("msg_rj_{c}"),
            "ma commande 12345 ?",
        ))
        .await?;
    }
    fake.settle(3, TIMEOUT).await?;
    ensure!(api.requests().len() == 3, "{:?}", api.requests());
    // A real call now would answer otherwise.
    api.set_order("12345", "lost");
    start(&admin, "orders", "mode=shadow", wasm("orders")?).await?;
    let (status, body) = post(&admin, "/admin/plugins/orders/promote").await?;
    ensure!(
        status == 200
            && body["replay"]["compared"] == 3
            && body["replay"]["same"] == 3
            && body["replay"]["differences"] == serde_json::json!([]),
        "{status} {body:#}"
    );
    ensure!(
        api.requests().len() == 3,
        "the replay called the order API: {:?}",
        api.requests()
    );
    fake.assert_quiet(3, SETTLE).await?;
    Ok(())
}

/// `pin = "conversation"`: a conversation that started on a version keeps
/// it through a hot swap and a restart, new conversations get the new
/// one, and archiving ends the pin.
#[tokio::test]
async fn a_pinned_conversation_finishes_on_its_version_across_a_swap_and_a_restart() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("echo", "pin = \"conversation\"\n")
        .start()
        .await?;
    let plain = Admin::new(&bot)?.plugin("echo").await?["version"]
        .as_str()
        .context("version")?
        .to_string();
    let (old, new) = ("conv_pin_old", "conv_pin_new");
    bot.accept(&customer_text(old, "msg_pin_1", "one")).await?;
    fake.settle(1, TIMEOUT).await?;

    let (status, body) = Admin::new(&bot)?
        .send(
            reqwest::Method::PUT,
            "/admin/plugins/echo",
            wasm("echo_v2")?,
        )
        .await?;
    ensure!(status == 200, "hot swap: {status} {body}");
    bot.accept(&customer_text(old, "msg_pin_2", "two")).await?;
    bot.accept(&customer_text(new, "msg_pin_3", "three"))
        .await?;
    fake.settle(3, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(old),
        &[wire_text(old, "one"), wire_text(old, "two")],
        "the pinned conversation",
    )?;
    ensure_all_eq(
        &fake.wire_for(new),
        &[wire_text(new, "v2: three")],
        "a new conversation",
    )?;
    let detail = bot
        .admin_get(&format!("/admin/conversations/{old}"))
        .await?;
    let detail = detail.json()?;
    ensure!(detail["pins"]["echo"] == plain.as_str(), "{detail:#}");

    // After a restart the earlier version comes back from the history.
    bot.restart().await?;
    bot.accept(&customer_text(old, "msg_pin_4", "four")).await?;
    fake.settle(4, TIMEOUT).await?;
    ensure!(
        fake.wire_for(old).last() == Some(&wire_text(old, "four")),
        "{:#?}",
        fake.wire_for(old)
    );

    // Archived, then reopened: it starts on the serving version.
    bot.accept(&crate::lifecycle::archived(old)).await?;
    bot.accept(&customer_text(old, "msg_pin_5", "five")).await?;
    fake.settle(5, TIMEOUT).await?;
    ensure!(
        fake.wire_for(old).last() == Some(&wire_text(old, "v2: five")),
        "{:#?}",
        fake.wire_for(old)
    );
    fake.assert_quiet(5, SETTLE).await?;
    Ok(())
}
