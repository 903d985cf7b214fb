//! The fake Digishare itself, without digibot: the other tests trust it.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::support::*;

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(fake: &FakeDigishare) -> Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder().no_proxy().build()?,
            base: fake.url(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> Result<(u16, Option<String>, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("Idempotency-Key", "k-1")
            .json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, retry_after, body))
    }

    async fn message(&self, conversation: &str) -> Result<(u16, Option<String>, Value)> {
        self.call(
            reqwest::Method::POST,
            "/v1/messages",
            Some("t"),
            json!({"conversation_id": conversation, "type": "text", "body": "hi", "send_to_third": true}),
        )
        .await
    }
}

#[tokio::test]
async fn fake_routes_and_records() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let c = Client::new(&fake)?;
    use reqwest::Method;

    let (s, _, b) = c.message("conv_1").await?;
    ensure!(s == 201 && b == json!({"id": "msg_bot_1", "status": "sent"}));
    let (s, _, b) = c.message("conv_2").await?;
    ensure!(s == 201 && b["id"] == "msg_bot_2");
    let body = json!({"users": ["u"], "bots": []});
    let (s, _, _) = c
        .call(
            Method::PUT,
            "/v1/conversations/conv_1/attach/participants",
            Some("t"),
            body.clone(),
        )
        .await?;
    ensure!(s == 200);
    let (s, _, _) = c
        .call(
            Method::POST,
            "/v1/conversations/conv_1/attach/participants",
            Some("t"),
            body.clone(),
        )
        .await?;
    ensure!(s == 405, "POST on attach must be 405, got {s}");
    let (s, _, _) = c
        .call(
            Method::DELETE,
            "/v1/conversations/conv_1/users/usr_1",
            None,
            Value::Null,
        )
        .await?;
    ensure!(s == 200);
    let (s, _, _) = c
        .call(Method::GET, "/v1/nothing", None, Value::Null)
        .await?;
    ensure!(s == 404);

    let all = fake.requests();
    ensure!(all.len() == 6, "{}", fake.dump());
    ensure!(all[0].authorization.as_deref() == Some("Bearer t"));
    ensure!(all[0].idempotency_key.as_deref() == Some("k-1"));
    ensure!(fake.successful().len() == 4);
    ensure!(fake.messages_for("conv_1").len() == 1);
    ensure!(fake.requests_for("conv_1").len() == 3, "{}", fake.dump());
    ensure!(fake.wait_for(5, Duration::from_millis(100)).await.is_err());
    fake.settle(4, Duration::from_secs(1)).await?;
    Ok(())
}

#[tokio::test]
async fn fake_programmable_failures() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let c = Client::new(&fake)?;

    fake.script([Scripted::status(429).retry_after(2), Scripted::status(503)]);
    let (s, ra, _) = c.message("c").await?;
    ensure!(s == 429 && ra.as_deref() == Some("2"));
    let (s, ra, _) = c.message("c").await?;
    ensure!(s == 503 && ra.is_none());
    ensure!(c.message("c").await?.0 == 201);
    ensure!(fake.scripted_left() == 0);

    fake.fail_every(Some((3, 500)));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(c.message("c").await?.0);
    }
    // The failable counter started with the 201 above.
    ensure!(
        statuses == [201, 500, 201, 201, 500, 201],
        "fail_every: {statuses:?}"
    );
    fake.fail_every(None);

    fake.reject_when(|b| b["conversation_id"] == "bad");
    ensure!(c.message("bad").await?.0 == 400);
    ensure!(c.message("good").await?.0 == 201);
    fake.set_reject_enabled(false);
    ensure!(c.message("bad").await?.0 == 201);

    fake.fail_fraction(Some((42, 0.5, 502)));
    let mut failed = 0;
    for _ in 0..40 {
        if c.message("r").await?.0 == 502 {
            failed += 1;
        }
    }
    ensure!(
        (8..=32).contains(&failed),
        "fraction 0.5 failed {failed}/40"
    );
    fake.fail_fraction(None);

    fake.require_token(Some("right"));
    ensure!(c.message("c").await?.0 == 401);
    fake.require_token(None);
    ensure!(c.message("c").await?.0 == 201);
    Ok(())
}

#[tokio::test]
async fn fake_oauth() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let c = Client::new(&fake)?;
    use reqwest::Method;
    fake.oauth_client("id", "secret");
    fake.oauth_expires_in(60);
    fake.require_issued_token(true);

    let creds =
        json!({"grant_type": "client_credentials", "client_id": "id", "client_secret": "secret"});
    let (s, _, b) = c
        .call(Method::POST, "/v1/oauth/token", None, creds.clone())
        .await?;
    ensure!(
        s == 200 && b == json!({"token_type": "Bearer", "expires_in": 60, "access_token": "tok-1"}),
        "{s} {b}"
    );
    let wrong =
        json!({"grant_type": "client_credentials", "client_id": "id", "client_secret": "no"});
    let (s, _, _) = c.call(Method::POST, "/v1/oauth/token", None, wrong).await?;
    ensure!(s == 401);

    let msg = json!({"conversation_id": "c", "type": "text", "body": "x", "send_to_third": true});
    let (s, _, _) = c
        .call(Method::POST, "/v1/messages", Some("tok-1"), msg.clone())
        .await?;
    ensure!(s == 201);
    fake.revoke_tokens();
    let (s, _, _) = c
        .call(Method::POST, "/v1/messages", Some("tok-1"), msg.clone())
        .await?;
    ensure!(s == 401);
    let (s, _, b) = c.call(Method::POST, "/v1/oauth/token", None, creds).await?;
    ensure!(s == 200 && b["access_token"] == "tok-2");
    let (s, _, _) = c
        .call(Method::POST, "/v1/messages", Some("tok-2"), msg)
        .await?;
    ensure!(s == 201);
    ensure!(fake.tokens_issued() == ["tok-1", "tok-2"]);
    Ok(())
}
