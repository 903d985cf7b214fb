//! Replacing plugins while customers chat: `echo` swapped for `echo-v2`
//! (by upload, by a renamed file, by a slow in-place write) under a steady
//! stream of webhooks, with zero failed or skipped events and exactly one
//! reply per message; a broken upload keeps the old version; rollback and
//! delete; compiled plugins cached on disk across a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::containment::Admin;
use crate::support::*;

/// Messages in a stream, conversations they are spread over, and the pause
/// between two posts: about four seconds of steady traffic.
const STREAM: usize = 300;
const CONVERSATIONS: usize = 6;
const PACE: Duration = Duration::from_millis(10);
/// Messages posted after a swap completed, at least.
const AFTER_SWAP: usize = 30;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn wasm(name: &str) -> Result<Vec<u8>> {
    let path = plugin_wasm(name);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// One message of a stream.
struct Sent {
    index: usize,
    conversation: String,
    text: String,
    key: String,
}

/// How far the stream had got when the swap started and when it was known
/// to be done.
#[derive(Default)]
struct SwapMarks {
    /// Replies the fake had received when the swap started: all old.
    replies_before: usize,
    /// Messages whose POST started after this are served by the new
    /// version.
    posted_after: usize,
}

/// Posts customer texts over [`CONVERSATIONS`] conversations, one every
/// [`PACE`]: at least [`STREAM`], and on until [`AFTER_SWAP`] more were
/// posted after the swap completed (a slow machine may take a while to
/// compile). Once the fake has `swap_after` replies, runs `swap`
/// concurrently; it completes once the new version is known to serve.
async fn stream_with_swap(
    bot: &Digibot,
    fake: &FakeDigishare,
    tag: &str,
    swap_after: usize,
    swap: impl Future<Output = Result<()>>,
) -> Result<(Vec<Sent>, SwapMarks)> {
    // Messages started so far; and 1 + that count when the swap completed.
    let started = AtomicUsize::new(0);
    let swapped_at = AtomicUsize::new(0);
    let poster = async {
        let mut sent = Vec::with_capacity(STREAM);
        for index in 0.. {
            let done = swapped_at.load(Ordering::SeqCst);
            if index >= STREAM && done > 0 && index >= done - 1 + AFTER_SWAP {
                break;
            }
            ensure!(index < 20 * STREAM, "the swap never completed");
            let conversation = format!("conv_{tag}_{}", index % CONVERSATIONS);
            let text = format!("{tag} m{index:04}");
            started.store(index + 1, Ordering::SeqCst);
            let key = bot
                .accept(&customer_text(
                    &conversation,
                    &format!("{tag}_{index}"),
                    &text,
                ))
                .await?;
            sent.push(Sent {
                index,
                conversation,
                text,
                key,
            });
            tokio::time::sleep(PACE).await;
        }
        anyhow::Ok(sent)
    };
    let swapper = async {
        fake.wait_for(swap_after, TIMEOUT).await?;
        let replies_before = fake.successful().len();
        let result = swap.await;
        let posted_after = started.load(Ordering::SeqCst);
        swapped_at.store(posted_after + 1, Ordering::SeqCst);
        result?;
        anyhow::Ok(SwapMarks {
            replies_before,
            posted_after,
        })
    };
    let (sent, marks) = tokio::join!(poster, swapper);
    Ok((sent?, marks?))
}

/// Everything a swap under load must show: every event handled with
/// `echo` ok; exactly one reply per message; per conversation, replies in
/// message order, old before new; both versions seen; replies received
/// before the swap started are old, messages posted after it completed are
/// answered by the new version.
async fn check_swap(
    bot: &Digibot,
    fake: &FakeDigishare,
    sent: &[Sent],
    marks: &SwapMarks,
    old: impl Fn(&str) -> String,
    new: impl Fn(&str) -> String,
) -> Result<()> {
    let keys: Vec<String> = sent.iter().map(|s| s.key.clone()).collect();
    let events = bot.wait_handled(&keys, TIMEOUT).await?;
    let mut versions = BTreeSet::new();
    for event in &events {
        let plugins = event["plugins"].as_array().cloned().unwrap_or_default();
        ensure!(
            plugins.len() == 1
                && plugins[0]["plugin"] == "echo"
                && plugins[0]["outcome"] == "ok"
                && plugins[0]["actions"] == 1,
            "every event served by echo, ok: {event}"
        );
        versions.insert(
            plugins[0]["version"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    ensure!(versions.len() == 2, "two versions served: {versions:?}");

    let replies = fake.settle(sent.len(), TIMEOUT).await?;
    // Reply body -> (is new, arrival order).
    let mut by_body: BTreeMap<String, usize> = BTreeMap::new();
    for r in &replies {
        ensure!(r.path == "/v1/messages", "unexpected {}", r.summary());
        let body = r.body["body"].as_str().unwrap_or_default().to_string();
        ensure!(
            by_body.insert(body.clone(), r.seq).is_none(),
            "two replies {body:?}"
        );
    }
    let mut olds = 0;
    for s in sent {
        let (o, n) = (old(&s.text), new(&s.text));
        let is_new = match (by_body.contains_key(&o), by_body.contains_key(&n)) {
            (true, false) => false,
            (false, true) => true,
            (a, b) => bail!("message {:?}: old reply {a}, new reply {b}", s.text),
        };
        olds += usize::from(!is_new);
        if s.index >= marks.posted_after {
            ensure!(
                is_new,
                "message {} was posted after the swap completed but got the old reply",
                s.text
            );
        }
    }
    for r in &replies[..marks.replies_before] {
        let body = r.body["body"].as_str().unwrap_or_default();
        ensure!(
            sent.iter().any(|s| old(&s.text) == body),
            "a reply received before the swap started is not the old version's: {body}"
        );
    }
    ensure!(
        olds > 0 && olds < sent.len(),
        "the switch is visible: {olds} old of {}",
        sent.len()
    );

    // Per conversation: one reply per message, in message order, and no
    // old reply after a new one.
    for c in 0..CONVERSATIONS {
        let conversation = &sent[c].conversation;
        let expected: Vec<&Sent> = sent
            .iter()
            .filter(|s| &s.conversation == conversation)
            .collect();
        let got: Vec<String> = fake
            .messages_for(conversation)
            .iter()
            .map(|b| b["body"].as_str().unwrap_or_default().to_string())
            .collect();
        ensure!(
            got.len() == expected.len(),
            "{conversation}: {} replies for {} messages",
            got.len(),
            expected.len()
        );
        let mut seen_new = false;
        for (reply, s) in got.iter().zip(&expected) {
            let is_new = *reply == new(&s.text);
            ensure!(
                is_new || *reply == old(&s.text),
                "{conversation}: reply {reply:?} out of order (expected the answer to {:?})",
                s.text
            );
            ensure!(
                is_new || !seen_new,
                "{conversation}: old reply {reply:?} after a new one"
            );
            seen_new |= is_new;
        }
    }
    Ok(())
}

fn plain(text: &str) -> String {
    text.to_string()
}

fn v2(text: &str) -> String {
    format!("v2: {text}")
}

/// Polls /admin/plugins until `echo` has `version`.
async fn wait_version(admin: &Admin, version: &str) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if admin.plugin("echo").await?["version"] == version {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("echo never reached version {version}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn echo_bot(fake: &FakeDigishare) -> Result<Digibot> {
    Digibot::builder().fake(fake).plugin("echo").start().await
}

#[tokio::test]
async fn swap_by_upload_under_load() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let admin = Admin::new(&bot)?;
    let v2_bytes = wasm("echo_v2")?;
    let v2_hash = sha256(&v2_bytes);

    let (sent, marks) = stream_with_swap(&bot, &fake, "up", 60, async {
        let (status, body) = admin.put("echo", v2_bytes.clone()).await?;
        ensure!(status == 200, "upload: {status} {body}");
        ensure!(body["version"] == v2_hash.as_str(), "{body}");
        Ok(())
    })
    .await?;
    check_swap(&bot, &fake, &sent, &marks, plain, v2).await?;
    ensure!(
        std::fs::read(bot.plugins_dir.join("echo.wasm"))? == v2_bytes,
        "the upload replaced echo.wasm in the plugins folder"
    );
    Ok(())
}

#[tokio::test]
async fn swap_by_renamed_file_under_load() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let admin = Admin::new(&bot)?;
    let v2_bytes = wasm("echo_v2")?;
    let v2_hash = sha256(&v2_bytes);

    let dir = bot.plugins_dir.clone();
    let (sent, marks) = stream_with_swap(&bot, &fake, "mv", 60, async {
        // How deployment tools write: a temporary name, then a rename.
        let tmp = dir.join("echo.wasm.tmp");
        std::fs::write(&tmp, &v2_bytes)?;
        std::fs::rename(&tmp, dir.join("echo.wasm"))?;
        wait_version(&admin, &v2_hash).await
    })
    .await?;
    check_swap(&bot, &fake, &sent, &marks, plain, v2).await?;
    Ok(())
}

/// A copy that writes the file in place, slowly, with a long pause in the
/// middle: the watcher sees half a component, refuses it, and the old
/// version keeps serving until the file is complete.
#[tokio::test]
async fn a_half_written_file_is_never_loaded() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let admin = Admin::new(&bot)?;
    let v2_bytes = wasm("echo_v2")?;
    let v2_hash = sha256(&v2_bytes);

    let path = bot.plugins_dir.join("echo.wasm");
    let (sent, marks) = stream_with_swap(&bot, &fake, "slow", 60, async {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)?;
        let half = v2_bytes.len() / 2;
        for chunk in v2_bytes[..half].chunks(8 << 10) {
            file.write_all(chunk)?;
            file.flush()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Hold the half file until the watcher has tried it.
        bot.wait_for_log(TIMEOUT, "a refused hot reload of echo", |l| {
            l.contains("hot reload refused") && l.contains("plugin echo")
        })
        .await?;
        for chunk in v2_bytes[half..].chunks(8 << 10) {
            file.write_all(chunk)?;
            file.flush()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(file);
        wait_version(&admin, &v2_hash).await
    })
    .await?;
    check_swap(&bot, &fake, &sent, &marks, plain, v2).await?;
    Ok(())
}

/// Polls /admin/plugins until `done` holds for the list.
async fn wait_plugins(admin: &Admin, what: &str, done: impl Fn(&[Value]) -> bool) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let plugins = admin.plugins().await?;
        if done(&plugins) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("/admin/plugins never showed {what}: {plugins:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The folder watcher picks up a new plugin, a changed NAME.toml and a
/// removed plugin, without a restart.
#[tokio::test]
async fn the_folder_adds_configures_and_removes_plugins() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let admin = Admin::new(&bot)?;
    let dir = bot.plugins_dir.clone();
    let c = "conv_folder";
    let mut n = 0;
    let mut say = async |text: &str, replies: usize| -> Result<Vec<String>> {
        n += 1;
        let before = fake.messages_for(c).len();
        bot.accept(&customer_text(c, &format!("folder_{n}"), text))
            .await?;
        fake.wait_for_conversation(c, before + replies, TIMEOUT)
            .await?;
        fake.assert_quiet(fake.successful().len(), SETTLE).await?;
        Ok(fake.messages_for(c)[before..]
            .iter()
            .map(|b| b["body"].as_str().unwrap_or_default().to_string())
            .collect())
    };

    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    };
    write("greeter.wasm", &wasm("greeter")?)?;
    wait_plugins(&admin, "greeter", |ps| {
        ps.iter().any(|p| p["name"] == "greeter")
    })
    .await?;
    ensure!(say("a", 2).await? == ["a", "Hello a"]);

    write(
        "greeter.toml",
        b"[config]\ngreeting = \"Salam\"\n[limits]\nmax_actions = 7\n",
    )?;
    wait_plugins(&admin, "greeter's new limits", |ps| {
        ps.iter()
            .any(|p| p["name"] == "greeter" && p["limits"]["max_actions"] == 7)
    })
    .await?;
    ensure!(say("b", 2).await? == ["b", "Salam b"]);

    std::fs::remove_file(dir.join("greeter.wasm"))?;
    wait_plugins(&admin, "greeter gone", |ps| {
        ps.iter().all(|p| p["name"] != "greeter")
    })
    .await?;
    ensure!(say("c", 1).await? == ["c"]);
    Ok(())
}

/// The life of a plugin through the admin API: upload, a broken upload
/// refused while the current version serves on, rollback, delete.
#[tokio::test]
async fn broken_upload_rollback_and_delete() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let admin = Admin::new(&bot)?;
    let c = "conv_admin_life";
    let mut expected: Vec<&str> = Vec::new();
    let mut n = 0;
    let mut say = async |text: &str| -> Result<Value> {
        n += 1;
        let key = bot
            .accept(&customer_text(c, &format!("life_{n}"), text))
            .await?;
        Ok(bot.wait_handled(&[key], TIMEOUT).await?.remove(0))
    };
    let replies = |fake: &FakeDigishare| -> Vec<String> {
        fake.messages_for(c)
            .iter()
            .map(|b| b["body"].as_str().unwrap_or_default().to_string())
            .collect()
    };

    let v1_hash = sha256(&wasm("echo")?);
    let v2_bytes = wasm("echo_v2")?;
    let v2_hash = sha256(&v2_bytes);
    ensure!(admin.plugin("echo").await?["version"] == v1_hash.as_str());
    let (status, body) = admin
        .send(
            reqwest::Method::POST,
            "/admin/plugins/echo/rollback",
            Vec::new(),
        )
        .await?;
    ensure!(
        status == 404,
        "nothing to roll back to yet: {status} {body}"
    );

    say("one").await?;
    expected.push("one");
    let (status, body) = admin.put("echo", v2_bytes.clone()).await?;
    ensure!(status == 200, "{status} {body}");
    say("two").await?;
    expected.push("v2: two");
    fake.settle(expected.len(), TIMEOUT).await?;
    ensure!(replies(&fake) == expected, "{:?}", replies(&fake));

    // Broken: a component cut short. Refused; v2 keeps serving.
    let (status, body) = admin
        .put("echo", v2_bytes[..v2_bytes.len() / 2].to_vec())
        .await?;
    ensure!(
        status == 422
            && body["error"]
                .as_str()
                .is_some_and(|e| e.contains("plugin echo") && e.contains("does not compile")),
        "a broken component is refused with a clear error: {status} {body}"
    );
    let report = admin.plugin("echo").await?;
    ensure!(
        report["version"] == v2_hash.as_str() && report["previous_versions"] == 1,
        "{report}"
    );
    ensure!(std::fs::read(bot.plugins_dir.join("echo.wasm"))? == v2_bytes);
    say("three").await?;
    expected.push("v2: three");
    fake.settle(expected.len(), TIMEOUT).await?;
    ensure!(replies(&fake) == expected, "{:?}", replies(&fake));

    // Rollback: v1 again, on disk too; nothing further back.
    let (status, body) = admin
        .send(
            reqwest::Method::POST,
            "/admin/plugins/echo/rollback",
            Vec::new(),
        )
        .await?;
    ensure!(
        status == 200 && body["version"] == v1_hash.as_str(),
        "{status} {body}"
    );
    say("four").await?;
    expected.push("four");
    fake.settle(expected.len(), TIMEOUT).await?;
    ensure!(replies(&fake) == expected, "{:?}", replies(&fake));
    ensure!(sha256(&std::fs::read(bot.plugins_dir.join("echo.wasm"))?) == v1_hash);
    let (status, _) = admin
        .send(
            reqwest::Method::POST,
            "/admin/plugins/echo/rollback",
            Vec::new(),
        )
        .await?;
    ensure!(
        status == 404,
        "the version rolled back from is not a target"
    );

    // Delete: no longer answers, gone from the folder and the list.
    let (status, body) = admin
        .send(reqwest::Method::DELETE, "/admin/plugins/echo", Vec::new())
        .await?;
    ensure!(status == 200, "{status} {body}");
    let event = say("five").await?;
    ensure!(
        event["plugins"] == json!([]),
        "no plugin ran after the delete: {event}"
    );
    fake.assert_quiet(expected.len(), SETTLE).await?;
    ensure!(!bot.plugins_dir.join("echo.wasm").exists());
    ensure!(admin.plugins().await?.is_empty());
    let (status, _) = admin
        .send(reqwest::Method::DELETE, "/admin/plugins/echo", Vec::new())
        .await?;
    ensure!(status == 404, "deleting twice");
    Ok(())
}

/// Compiled components are written to DATA_DIR/cache, named by the
/// component's hash (and the engine's); a restart loads them from there.
#[tokio::test]
async fn a_restart_loads_compiled_plugins_from_the_cache() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .plugin("greeter")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    let first = admin.plugins().await?;
    ensure!(first.len() == 2, "{first:?}");
    let cache = bot.data_dir.join("cache");
    for p in &first {
        ensure!(p["cached"] == false, "nothing cached on a first start: {p}");
        let version = p["version"].as_str().unwrap_or_default();
        let entries: Vec<String> = std::fs::read_dir(&cache)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{version}-")) && n.ends_with(".cwasm"))
            .collect();
        ensure!(
            entries.len() == 1,
            "cache file for {}: {entries:?}",
            p["name"]
        );
    }

    bot.restart().await?;
    let second = admin.plugins().await?;
    for p in &second {
        ensure!(
            p["cached"] == true,
            "loaded from the cache after a restart: {p}"
        );
    }
    let cached_lines = bot
        .logs()
        .lines()
        .filter(|l| l.contains("plugin loaded") && l.contains("cached=true"))
        .count();
    ensure!(
        cached_lines == 2,
        "two `plugin loaded ... cached=true` lines"
    );

    // And they serve.
    let key = bot
        .accept(&customer_text("conv_cache", "cache_1", "encore"))
        .await?;
    bot.wait_handled(&[key], TIMEOUT).await?;
    fake.settle(2, TIMEOUT).await?;
    let bodies: Vec<Value> = fake
        .messages_for("conv_cache")
        .iter()
        .map(|b| b["body"].clone())
        .collect();
    ensure!(
        bodies == [json!("encore"), json!("Hello encore")],
        "{bodies:?}"
    );
    Ok(())
}
