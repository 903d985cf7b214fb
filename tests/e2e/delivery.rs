//! Delivery smoke tests: the fake's programmable failures against the real
//! sender (the full retry suite builds on these).

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::support::*;

/// 503, 500 and 429 are retried, every attempt with the same body and the
/// same Idempotency-Key, until Digishare accepts.
#[tokio::test]
async fn transient_failures_are_retried_with_the_same_key() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    fake.script([
        Scripted::status(503),
        Scripted::status(500),
        Scripted::status(429),
    ]);
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;

    let key = bot.accept(&fixture("message_text_minimal")).await?;
    bot.wait_idle(&[key], TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;

    let all = fake.requests();
    let statuses: Vec<u16> = all.iter().map(|r| r.status).collect();
    ensure!(statuses == [503, 500, 429, 201], "{}", fake.dump());
    let expected = json!({"conversation_id": "conv_min_01", "type": "text", "body": "/info", "send_to_third": true});
    for r in &all {
        ensure_json_eq(&r.body, &expected, "retried body")?;
        ensure!(
            r.idempotency_key == all[0].idempotency_key && r.idempotency_key.is_some(),
            "the Idempotency-Key changed between attempts:\n{}",
            fake.dump()
        );
    }
    Ok(())
}

/// A 400 is final: one attempt, a dead letter, and the conversation's next
/// reply still goes out.
#[tokio::test]
async fn client_errors_are_not_retried() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    fake.reject_when(|body| body["body"] == "rejet");
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let c = "conv_reject_1";

    let keys = vec![
        bot.accept(&customer_text(c, "msg_rj_1", "rejet")).await?,
        bot.accept(&customer_text(c, "msg_rj_2", "suite")).await?,
    ];
    bot.wait_idle(&keys, TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;

    let wire: Vec<(u16, Value)> = fake
        .requests()
        .iter()
        .map(|r| (r.status, r.body["body"].clone()))
        .collect();
    ensure!(
        wire == [(400, json!("rejet")), (201, json!("suite"))],
        "{}",
        fake.dump()
    );
    let dead = bot.admin_get("/admin/dead-letters").await?;
    dead.expect_status(200)?;
    let dead = dead.json()?;
    ensure!(
        dead.as_array().is_some_and(|d| d.len() == 1),
        "expected one dead letter, got {dead}"
    );
    Ok(())
}
