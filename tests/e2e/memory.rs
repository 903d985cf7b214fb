//! Memory beyond one conversation, end to end, with `plugins/memory`: a
//! `customer` key written in one conversation is read in the same
//! customer's next conversation (and not in another customer's), a
//! `plugin`-scope counter counts across conversations, and a quota refusal
//! reaches the plugin (which answers with it) and the event's outcome.
//! Every step checks the exact requests that reach the fake Messages API.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::lifecycle::{outcome, step};
use crate::support::*;

/// `live_chat.new_conversation` of customer `third` (Digishare's id).
fn opened_by(conversation: &str, third: &str) -> Value {
    let mut v = new_conversation(conversation, "Salma Idrissi");
    v["data"]["data"]["third"]["id"] = json!(third);
    v
}

const HELLO: &str = "Hello! Say `lang XX` and I will remember it.";

#[tokio::test]
async fn a_customer_key_written_in_one_conversation_is_read_in_their_next_one() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("memory")
        .start()
        .await?;
    // Salma (the fixtures' third, thd_4Kd8sPq2) opens a conversation and
    // says her language.
    let (c1, c2, c3) = ("conv_mem_1", "conv_mem_2", "conv_mem_3");
    let first = wire_text(c1, &format!("Conversation #1. {HELLO}"));
    step(
        &bot,
        &fake,
        c1,
        opened_by(c1, "thd_4Kd8sPq2"),
        std::slice::from_ref(&first),
    )
    .await?;
    step(
        &bot,
        &fake,
        c1,
        customer_text(c1, "msg_mem_1", "lang fr"),
        &[first, wire_text(c1, "Noted: fr.")],
    )
    .await?;
    // Her next conversation remembers it; the plugin's shared counter
    // counted both.
    step(
        &bot,
        &fake,
        c2,
        opened_by(c2, "thd_4Kd8sPq2"),
        &[wire_text(
            c2,
            "Conversation #2. Welcome back, your language is fr.",
        )],
    )
    .await?;
    // Another customer has no memory of Salma's; the counter goes on.
    step(
        &bot,
        &fake,
        c3,
        opened_by(c3, "thd_someone_else"),
        &[wire_text(c3, &format!("Conversation #3. {HELLO}"))],
    )
    .await?;
    ensure!(
        fake.wire_for(c1).len() == 2 && fake.wire_for(c2).len() == 1,
        "the fake received:\n{}",
        fake.dump()
    );
    Ok(())
}

#[tokio::test]
async fn a_customer_quota_refusal_reaches_the_plugin_and_the_outcome() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("memory")
        .arg("--kv-customer-keys")
        .arg("3")
        .start()
        .await?;
    let c = "conv_mem_quota";
    let first = wire_text(c, &format!("Conversation #1. {HELLO}"));
    step(
        &bot,
        &fake,
        c,
        opened_by(c, "thd_quota"),
        std::slice::from_ref(&first),
    )
    .await?;
    // `fill` writes fill-0, fill-1, fill-2; the fourth key is refused, and
    // the plugin answers with the refusal.
    let refusal = "quota: this customer's kv would hold 4 keys, the quota is 3";
    let key = step(
        &bot,
        &fake,
        c,
        customer_text(c, "msg_mem_fill", "fill"),
        &[first, wire_text(c, &format!("Refused: {refusal}"))],
    )
    .await?;
    let memory = outcome(&bot, &key, "memory").await?;
    ensure!(
        memory["outcome"] == "ok" && memory["refused"] == json!([refusal]),
        "outcome: {memory:#}"
    );
    Ok(())
}
