//! The dashboard against the real binary: the simulator's turns never reach
//! the outbox or the (fake) Messages API and never share state with a real
//! conversation, even one with the same id; and the page itself, in headless
//! Chromium: sign in through the form, see the plugins and a real
//! conversation, chat with concierge in the simulator, click its buttons and
//! list rows, and keep a screenshot (`target/artifacts/dashboard-simulator.png`).
//!
//! Chromium absent: with `CI` set the browser test fails; elsewhere it is
//! skipped with a loud message on stderr (install `chromium` and
//! `chromium-driver`, as `.ci/run` does).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::support::browser::{Browser, find_chromium};
use crate::support::*;

const C: &str = "conv_dash_Q8x2";

/// POSTs one simulated customer action with the admin token.
async fn simulate(bot: &Digibot, conversation: &str, input: Value) -> Result<Value> {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()?
        .post(format!(
            "{}/admin/simulator/{conversation}/events",
            bot.url()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&input)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status == 200, "simulator answered {status}: {body}");
    Ok(body)
}

/// The actions of concierge's replies in a simulated turn.
fn concierge_actions(turn: &Value) -> Vec<Value> {
    turn["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["plugin"] == "concierge")
        .flat_map(|p| p["replies"].as_array().cloned().unwrap_or_default())
        .map(|r| r["action"].clone())
        .collect()
}

fn topic_note(topic: &str) -> Value {
    json!({"kind": "note", "body": format!("Le client demande un conseiller. Sujet : {topic}.")})
}

/// A real conversation and a simulated one under the same id, interleaved:
/// each keeps its own concierge state, and only the real one reaches the
/// outbox, the store and the Messages API.
#[tokio::test]
async fn simulated_turns_reach_neither_outbox_nor_digishare_nor_real_state() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .start()
        .await?;

    // Real: the customer picks "orders" (concierge stores topic = orders).
    let mut keys = vec![bot.accept(&new_conversation(C, "Salma")).await?];
    keys.push(
        bot.accept(&button_reply(C, "wamid.d1", "orders", "Mes commandes"))
            .await?,
    );
    fake.wait_for_conversation(C, 2, TIMEOUT).await?;

    // Simulated, same name: a state of its own (topic = stores), kept
    // across its turns.
    let stores = simulate(
        &bot,
        C,
        json!({"type": "button_reply", "id": "stores", "title": "Nos magasins"}),
    )
    .await?;
    ensure!(stores["conversation_id"] == format!("sim-{C}"), "{stores}");
    ensure!(
        concierge_actions(&stores)[0]["kind"] == "location_request",
        "{stores}"
    );
    let agent = simulate(&bot, C, json!({"type": "text", "text": "agent"})).await?;
    let actions = concierge_actions(&agent);
    ensure_json_eq(
        &actions[0],
        &topic_note("stores"),
        "simulated hand-off note",
    )?;
    let requests: Vec<&Value> = agent["plugins"][0]["replies"]
        .as_array()
        .context("replies")?
        .iter()
        .map(|r| &r["request"])
        .collect();
    ensure!(requests.len() == 3, "{agent}");
    ensure!(
        requests[1]["path"] == format!("/v1/conversations/sim-{C}/attach/participants"),
        "{agent}"
    );

    // Real again: its own topic, untouched by the simulator.
    keys.push(bot.accept(&customer_text(C, "wamid.d2", "agent")).await?);
    bot.wait_idle(&keys, TIMEOUT).await?;
    let real = fake.wire_for(C);
    ensure!(real.len() == 5, "the fake received:\n{}", fake.dump());
    ensure_json_eq(
        &real[2]["body"],
        &json!({"conversation_id": C, "type": "text", "send_to_third": false,
                "body": "Le client demande un conseiller. Sujet : orders."}),
        "the real hand-off note",
    )?;

    // Nothing simulated reached Digishare, the inbox or the outbox.
    let all = fake.assert_quiet(5, SETTLE).await?;
    ensure!(
        all.iter()
            .all(|r| r.conversation_id().as_deref() == Some(C)),
        "the fake received:\n{}",
        fake.dump()
    );
    let events = bot.events(100).await?;
    ensure!(events.len() == 3, "{events:?}");
    ensure!(
        events.iter().all(|e| e["conversation_id"] == C),
        "{events:?}"
    );
    ensure_json_eq(&bot.outbox().await?, &json!({"sent": 5}), "/admin/outbox")?;

    // The conversation views show the real one only, with its API status.
    let list = bot.admin_get("/admin/conversations").await?;
    let list = list.expect_status(200)?.json()?;
    ensure!(
        list.as_array().map(Vec::len) == Some(1)
            && list[0]["conversation_id"] == C
            && list[0]["events"] == 3
            && list[0]["actions"] == json!({"sent": 5, "pending": 0, "dead": 0}),
        "{list}"
    );
    let detail = bot.admin_get(&format!("/admin/conversations/{C}")).await?;
    let detail = detail.expect_status(200)?.json()?;
    let actions = detail["actions"].as_array().context("actions")?;
    ensure!(actions.len() == 5, "{detail}");
    for (action, sent) in actions.iter().zip(&real) {
        ensure!(action["status"] == "sent", "{action}");
        ensure!(
            action["last_status"]
                .as_i64()
                .is_some_and(|s| (200..300).contains(&s)),
            "{action}"
        );
        ensure!(
            action["path"] == sent["path"] && action["body"] == sent["body"],
            "stored {action} vs sent {sent}"
        );
    }
    Ok(())
}

/// Where test artifacts go: `<target>/artifacts` of the target dir this
/// test binary was built in (`<target>/debug/deps/e2e-HASH`).
fn artifacts_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("the test binary is not under <target>/<profile>/deps")?;
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Chromium and chromedriver, or `None` (skip) when absent outside CI.
fn chromium_or_skip() -> Result<Option<(PathBuf, PathBuf)>> {
    match find_chromium() {
        Some(found) => Ok(Some(found)),
        None if std::env::var_os("CI").is_some() => bail!(
            "CI is set but chromium and chromedriver are not both installed \
             (apt-get install chromium chromium-driver, or set CHROMIUM and CHROMEDRIVER)"
        ),
        None => {
            eprintln!(
                "\n{bar}\nSKIPPED dashboard browser test: chromium and/or chromedriver not found.\n\
                 Install them (apt-get install chromium chromium-driver) to run it;\n\
                 with CI set, this is a failure.\n{bar}\n",
                bar = "!".repeat(72)
            );
            Ok(None)
        }
    }
}

#[tokio::test]
async fn dashboard_in_headless_chromium() -> Result<()> {
    let Some((chromium, driver)) = chromium_or_skip()? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .plugin("echo")
        .start()
        .await?;
    // A real conversation for the conversations view.
    let keys = vec![
        bot.accept(&new_conversation(C, "Salma")).await?,
        bot.accept(&customer_text(C, "wamid.b1", "Bonjour")).await?,
    ];
    bot.wait_idle(&keys, TIMEOUT).await?;
    let sent = fake.successful().len();

    let browser = Browser::start(&chromium, &driver, 1280, 860).await?;
    let result = drive(&browser, &bot).await;
    // A screenshot either way: on failure it shows what the page showed.
    let _ = browser.execute("window.scrollTo(0, 0);", json!([])).await;
    let shot = artifacts_dir()?.join("dashboard-simulator.png");
    match browser.screenshot().await {
        Ok(png) => {
            std::fs::write(&shot, png)?;
            eprintln!("dashboard screenshot: {}", shot.display());
        }
        Err(e) => eprintln!("no screenshot: {e:#}"),
    }
    result.with_context(|| format!("chromedriver log:\n{}", browser.log()))?;
    ensure!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "{} looks empty",
        shot.display()
    );

    // The simulator sent nothing: the fake got only the real replies.
    fake.assert_quiet(sent, SETTLE).await?;
    ensure!(
        bot.events(100).await?.len() == 2,
        "simulated turns were recorded"
    );
    Ok(())
}

/// The browser session: sign in, plugins, a conversation, the simulator.
async fn drive(browser: &Browser, bot: &Digibot) -> Result<()> {
    browser.goto(&format!("{}/admin", bot.url())).await?;

    // A wrong token is refused by the API, and the form says so.
    browser
        .type_into("#token", "not-the-token", TIMEOUT)
        .await?;
    browser.click("#login", TIMEOUT).await?;
    browser
        .wait_text("#login-error", "That token was refused.", TIMEOUT)
        .await?;
    browser
        .execute("document.querySelector('#token').value = '';", json!([]))
        .await?;
    browser.type_into("#token", ADMIN_TOKEN, TIMEOUT).await?;
    browser.click("#login", TIMEOUT).await?;

    // Plugins: both, active, with their invocations and latency.
    let save = async |name: &str| -> Result<()> {
        let png = browser.screenshot().await?;
        std::fs::write(artifacts_dir()?.join(name), png)?;
        Ok(())
    };
    let concierge = browser
        .wait_text("#plugins-table tbody tr", "concierge", TIMEOUT)
        .await?;
    ensure!(concierge.contains("active"), "{concierge}");
    browser
        .wait_text("#plugins-table tbody tr", "echo", TIMEOUT)
        .await?;
    ensure!(
        concierge.contains(" µs") || concierge.contains(" ms"),
        "no latency: {concierge}"
    );
    save("dashboard-plugins.png").await?;

    // Conversations: the real one, its events and the actions' API status.
    browser.click("a[data-view=conversations]", TIMEOUT).await?;
    browser
        .wait_text("#conversations-table tbody tr", C, TIMEOUT)
        .await?;
    browser
        .click(
            &format!("#conversations-table tr[data-conversation='{C}']"),
            TIMEOUT,
        )
        .await?;
    let detail = browser
        .wait_text("#conversation-detail", "new_message", TIMEOUT)
        .await?;
    ensure!(
        detail.contains("POST /v1/messages") && detail.contains("sent"),
        "{detail}"
    );
    save("dashboard-conversations.png").await?;

    // Simulator: concierge greets with buttons.
    browser.click("a[data-view=simulator]", TIMEOUT).await?;
    browser
        .wait_text(
            ".msg.bot[data-plugin=concierge]",
            "Bonjour Salma ! Comment puis-je vous aider ?",
            TIMEOUT,
        )
        .await?;
    // A typed message: concierge points at the menu, echo repeats it.
    browser.type_into("#sim-input", "bonjour", TIMEOUT).await?;
    browser.click("#sim-send", TIMEOUT).await?;
    browser
        .wait_text(".msg.bot[data-plugin=concierge]", "Tapez « menu »", TIMEOUT)
        .await?;
    browser
        .wait_text(".msg.bot[data-plugin=echo]", "bonjour", TIMEOUT)
        .await?;
    // A button: the orders list menu.
    browser
        .click(".msg.bot button[data-choice=orders]", TIMEOUT)
        .await?;
    browser
        .wait_text(".msg.customer", "Mes commandes", TIMEOUT)
        .await?;
    browser
        .wait_text(
            ".msg.bot[data-kind=list]",
            "Que voulez-vous faire ?",
            TIMEOUT,
        )
        .await?;
    // A list row: concierge's answer.
    browser
        .click(".msg.bot button[data-choice=track]", TIMEOUT)
        .await?;
    browser
        .wait_text(
            ".msg.bot[data-plugin=concierge]",
            "Votre colis est en route.",
            TIMEOUT,
        )
        .await?;
    // The turn pane shows the request that was not sent.
    browser
        .wait_text("#sim-turn", "POST /v1/messages", TIMEOUT)
        .await?;

    // The demo's link, /admin#token=TOKEN, signs in by itself, and the
    // token leaves the address bar.
    browser.click("#logout", TIMEOUT).await?;
    browser
        .wait_text("#view-login", "Enter the admin token", TIMEOUT)
        .await?;
    browser
        .goto(&format!("{}/admin#token={ADMIN_TOKEN}", bot.url()))
        .await?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let state = browser
            .execute(
                "return [document.querySelector('#view-login').hidden,
                         document.querySelector('#view-plugins').hidden,
                         location.href];",
                json!([]),
            )
            .await?;
        if state[0] == true && state[1] == false {
            let href = state[2].as_str().unwrap_or_default();
            ensure!(!href.contains(ADMIN_TOKEN), "the token stayed in {href}");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the link did not sign in: {state}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The journal panel: a conversation whose `orders` turn called the order
/// API shows the call on its event, and its "HTTP journal" opens on the
/// request as the plugin wrote it (the secret's placeholder) and the
/// response; the secret itself is nowhere on the page.
#[tokio::test]
async fn the_journal_panel_shows_a_call_and_never_its_secret() -> Result<()> {
    use crate::outbound::{SECRET, orders_bot};
    use crate::support::orders_api::FakeOrderApi;
    let Some((chromium, driver)) = chromium_or_skip()? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_order("4410", "shipped");
    let bot = orders_bot(&fake, &api).start().await?;
    let c = "conv_dash_journal";
    let key = bot
        .accept(&customer_text(c, "wamid.j1", "ma commande 4410 ?"))
        .await?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;

    let browser = Browser::start(&chromium, &driver, 1280, 860).await?;
    let result = async {
        browser
            .goto(&format!("{}/admin#token={ADMIN_TOKEN}", bot.url()))
            .await?;
        browser.click("a[data-view=conversations]", TIMEOUT).await?;
        browser
            .click(
                &format!("#conversations-table tr[data-conversation='{c}']"),
                TIMEOUT,
            )
            .await?;
        // The event's call row: method, URL, status.
        let call = browser
            .wait_text(".call-row", "/orders/4410", TIMEOUT)
            .await?;
        ensure!(
            call.contains(&format!("#0 GET {}/orders/4410", api.url())) && call.contains("200"),
            "{call}"
        );
        // The journal, fetched when opened.
        browser.click("details.journal summary", TIMEOUT).await?;
        let journal = browser
            .wait_text("details.journal", "{{secret:ORDERS_TOKEN}}", TIMEOUT)
            .await?;
        ensure!(
            journal.contains("Bearer {{secret:ORDERS_TOKEN}}")
                && journal.contains("shipped")
                && journal.contains("/orders/4410"),
            "{journal}"
        );
        let page = browser
            .execute("return document.body.innerText;", json!([]))
            .await?;
        let page = page.as_str().unwrap_or_default();
        ensure!(!page.contains(SECRET), "the secret is on the page");
        let png = browser.screenshot().await?;
        std::fs::write(artifacts_dir()?.join("dashboard-journal.png"), png)?;
        anyhow::Ok(())
    }
    .await;
    result.with_context(|| format!("chromedriver log:\n{}", browser.log()))?;
    // The real call was made once, with the secret substituted.
    let requests = api.requests();
    ensure!(
        requests.len() == 1
            && requests[0].authorization.as_deref() == Some(&format!("Bearer {SECRET}")),
        "{requests:?}"
    );
    Ok(())
}

/// `digibot test --record FILE --simulator NAME`: a dashboard session
/// becomes a conversation test that passes against the plugin that
/// answered it, and fails with a diff when its expectation is changed.
#[tokio::test]
async fn a_simulator_session_records_as_a_test_that_passes() -> Result<()> {
    use crate::containment::Admin;
    use crate::support::durable::cli_with;
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .plugin("greeter")
        .start()
        .await?;
    for input in [
        json!({"type": "new_conversation", "customer_name": "Salma"}),
        json!({"type": "text", "text": "bonjour"}),
        json!({"type": "text", "text": "et ma commande ?"}),
    ] {
        simulate(&bot, "rec", input).await?;
    }
    let admin = Admin::new(&bot)?;
    let get = |path: &'static str| admin.send(reqwest::Method::GET, path, Vec::new());
    // Two plugins answered: the test names one.
    let (status, body) = get("/admin/simulator/rec/test").await?;
    ensure!(
        status == 400
            && body["error"]
                .as_str()
                .is_some_and(|e| e.contains("echo, greeter")),
        "{status} {body}"
    );
    let (status, _) = get("/admin/simulator/nobody/test").await?;
    ensure!(status == 404, "an unknown session: {status}");
    let (status, doc) = get("/admin/simulator/rec/test?plugin=echo").await?;
    ensure!(status == 200, "{status} {doc}");
    let turns = doc["turn"].as_array().context("turns")?;
    ensure!(turns.len() == 3, "{doc:#}");
    ensure!(
        turns[1]["requests"]
            == json!([{"method": "POST", "path": "/v1/messages", "body": {
                "conversation_id": "sim-rec", "type": "text", "body": "bonjour", "send_to_third": true}}]),
        "{doc:#}"
    );

    let root = bot.root().to_path_buf();
    let echo = plugin_wasm("echo");
    let echo = echo.to_str().context("path")?;
    let env = [("DIGIBOT_ADMIN_TOKEN", ADMIN_TOKEN)];
    let toml = root.join("rec.toml");
    let toml = toml.to_str().context("path")?;
    let run = cli_with(
        &root,
        &env,
        &[
            "test",
            echo,
            "--record",
            toml,
            "--simulator",
            "rec",
            "--url",
            bot.url(),
        ],
    )
    .await?;
    ensure!(
        run.success
            && run.stdout.contains("3 turns")
            && run.stdout.contains("simulated conversation rec"),
        "{run:?}"
    );
    let written = std::fs::read_to_string(toml)?;
    ensure!(
        written.contains("[[turn]]") && written.contains("bonjour"),
        "{written}"
    );

    // The JSON the dashboard downloads runs as it is; a wrong expectation
    // fails with the difference.
    let json_file = root.join("rec.json");
    std::fs::write(&json_file, serde_json::to_vec_pretty(&doc)?)?;
    let run = cli_with(
        &root,
        &[],
        &["test", echo, json_file.to_str().context("path")?],
    )
    .await?;
    ensure!(run.success, "{run:?}");
    let mut wrong = doc.clone();
    wrong["turn"][1]["requests"][0]["body"]["body"] = json!("au revoir");
    let wrong_file = root.join("wrong.json");
    std::fs::write(&wrong_file, serde_json::to_vec_pretty(&wrong)?)?;
    let run = cli_with(
        &root,
        &[],
        &["test", echo, wrong_file.to_str().context("path")?],
    )
    .await?;
    ensure!(
        !run.success && format!("{}{}", run.stdout, run.stderr).contains("au revoir"),
        "{run:?}"
    );
    // The simulator sent nothing.
    ensure!(fake.received() == 0, "{:?}", fake.requests());
    Ok(())
}
