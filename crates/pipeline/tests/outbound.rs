//! `Outbound`, the pipeline's outbound HTTP, against real HTTP servers on
//! loopback: the grant, secrets, the SSRF rules (with `DIGIBOT_RESOLVE`
//! pins), redirects hop by hop, the caps, and the journal on SQLite.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use digibot_domain::outbound::{
    HttpGrant, HttpLimits, HttpPolicy, Prohibited, Refusal, ResolveOverrides, SecretName,
};
use digibot_pipeline::outbound::secrets::Secrets;
use digibot_pipeline::outbound::{Outbound, OutboundConfig};
use digibot_runtime::{OutboundHttp, OutboundRequest, Sent};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret-orders-token";

/// What the upstream saw: (path, authorization, idempotency-key).
type Seen = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;

/// An upstream on 127.0.0.1 with the routes the tests need; `other` is the
/// port of a second server (for cross-origin redirects).
async fn upstream(other: Option<u16>) -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let record = {
        let seen = seen.clone();
        move |path: &str, h: &HeaderMap| {
            let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap_or("?").to_string());
            seen.lock().unwrap().push((
                path.to_string(),
                get("authorization"),
                get("idempotency-key"),
            ));
        }
    };
    let r = record.clone();
    let r2 = record.clone();
    let r3 = record.clone();
    let app = Router::new()
        .route(
            "/api/orders/{n}",
            get(move |axum::extract::Path(n): axum::extract::Path<String>, h: HeaderMap| async move {
                r(&format!("/api/orders/{n}"), &h);
                let auth = h.get("authorization").map(|v| v.to_str().unwrap_or("").to_string());
                // Echoes the header back, as some APIs do.
                (
                    [("x-echo", auth.clone().unwrap_or_default())],
                    format!(r#"{{"order":"{n}","status":"shipped","auth":"{}"}}"#, auth.unwrap_or_default()),
                )
            }),
        )
        .route(
            "/api/redirect/{to}",
            any(move |axum::extract::Path(to): axum::extract::Path<String>, h: HeaderMap| async move {
                r2(&format!("/api/redirect/{to}"), &h);
                let location = match to.as_str() {
                    "inside" => "/api/orders/7".to_string(),
                    "outside" => "/private/x".to_string(),
                    "loop" => "/api/redirect/loop".to_string(),
                    "other-origin" => format!("http://127.0.0.1:{}/api/orders/8", other.unwrap_or(1)),
                    "pinned-loopback" => "http://pinned.shop.example:80/api/x".to_string(),
                    _ => "/".to_string(),
                };
                (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
            }),
        )
        .route("/api/big", get(|| async { vec![b'x'; 64 << 10] }))
        .route(
            "/api/chunked-big",
            get(|| async {
                let chunks = (0..100).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 1024])));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/api/forever",
            get(|| async { Response::new(Body::from_stream(forever())) }),
        )
        .route(
            "/api/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/api/post",
            axum::routing::post(move |h: HeaderMap, body: Bytes| async move {
                r3("/api/post", &h);
                format!("got {} bytes", body.len())
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, seen)
}

/// A body that sends a byte every 10 ms, forever.
fn forever() -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Some((Ok(Bytes::from_static(b".")), ()))
    })
}

fn policy(grants: &[String], secrets: &[&str], limits: HttpLimits) -> Arc<HttpPolicy> {
    Arc::new(HttpPolicy {
        grants: grants
            .iter()
            .map(|g| HttpGrant::parse(g).unwrap())
            .collect(),
        secrets: secrets
            .iter()
            .map(|s| SecretName::parse(s).unwrap())
            .collect::<BTreeSet<_>>(),
        limits,
    })
}

fn limits() -> HttpLimits {
    HttpLimits {
        calls: 3,
        request_bytes: 1024,
        response_bytes: 32 << 10,
        timeout: Duration::from_millis(800),
        redirects: 3,
    }
}

fn request(
    policy: &Arc<HttpPolicy>,
    url: &str,
    call: u32,
    headers: &[(&str, &str)],
) -> OutboundRequest {
    let (scheme, rest) = url.split_once("://").unwrap();
    let cut = rest.find('/').unwrap_or(rest.len());
    OutboundRequest {
        plugin: Arc::from("orders"),
        event_id: Arc::from("live_chat.new_message:m1"),
        call,
        policy: policy.clone(),
        method: "GET".into(),
        scheme: scheme.into(),
        authority: rest[..cut].into(),
        path_and_query: if cut == rest.len() {
            "/".into()
        } else {
            rest[cut..].into()
        },
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: Ok(Bytes::new()),
        timeout: None,
    }
}

fn outbound(resolve: &str, store: Option<digibot_store::Store>) -> Outbound {
    let secrets = Secrets::load(
        [
            ("DIGIBOT_SECRET_ORDERS_TOKEN".to_string(), TOKEN.to_string()),
            (
                "DIGIBOT_SECRET_OTHER_TOKEN".to_string(),
                "other-token-value".to_string(),
            ),
        ],
        None,
    )
    .unwrap();
    Outbound::new(
        OutboundConfig {
            resolve: ResolveOverrides::parse(resolve).unwrap(),
            secrets,
        },
        store,
    )
}

fn refusal(sent: &Sent) -> &Refusal {
    match &sent.result {
        Err(r) => r,
        Ok(r) => panic!("expected a refusal, got {} {:?}", r.status, r.body),
    }
}

fn body(sent: &Sent) -> String {
    match &sent.result {
        Ok(r) => String::from_utf8_lossy(&r.body).into_owned(),
        Err(e) => panic!("expected a response, got {e}"),
    }
}

#[tokio::test]
async fn a_granted_call_gets_its_secret_and_key_and_never_sees_the_value() {
    let (port, seen) = upstream(None).await;
    let base = format!("http://127.0.0.1:{port}");
    let p = policy(&[format!("{base}/api/")], &["ORDERS_TOKEN"], limits());
    let out = outbound("", None);
    let sent = out
        .send(request(
            &p,
            &format!("{base}/api/orders/42"),
            0,
            &[
                ("authorization", "Bearer {{secret:ORDERS_TOKEN}}"),
                ("idempotency-key", "forged"),
            ],
        ))
        .await;
    assert!(!sent.replayed);
    // The upstream echoed the header: the plugin gets the placeholder back.
    assert_eq!(
        body(&sent),
        r#"{"order":"42","status":"shipped","auth":"Bearer {{secret:ORDERS_TOKEN}}"}"#
    );
    let response = sent.result.unwrap();
    let echo = response
        .headers
        .iter()
        .find(|(n, _)| n == "x-echo")
        .unwrap();
    assert_eq!(echo.1, b"Bearer {{secret:ORDERS_TOKEN}}");
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [(
            "/api/orders/42".to_string(),
            Some(format!("Bearer {TOKEN}")),
            Some("live_chat.new_message:m1/orders/0".to_string())
        )]
    );
}

#[tokio::test]
async fn the_grant_and_the_secrets_grant_are_enforced_before_sending() {
    let (port, seen) = upstream(None).await;
    let base = format!("http://127.0.0.1:{port}");
    let p = policy(&[format!("{base}/api/")], &["ORDERS_TOKEN"], limits());
    let out = outbound("", None);
    // (URL, headers, the refusal's kind)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (format!("{base}/private/x"), vec![], "not-granted"),
        (
            format!("http://127.0.0.1:{}/api/x", port + 1),
            vec![],
            "not-granted",
        ),
        (
            format!("https://127.0.0.1:{port}/api/x"),
            vec![],
            "not-granted",
        ),
        (format!("{base}/api/../private"), vec![], "invalid-url"),
        (
            format!("http://user@127.0.0.1:{port}/api/x"),
            vec![],
            "invalid-url",
        ),
        (
            format!("{base}/api/orders/1"),
            vec![("authorization", "Bearer {{secret:OTHER_TOKEN}}")],
            "secret-not-granted",
        ),
        (
            format!("{base}/api/orders/1"),
            vec![("x-token", "{{secret:ORDERS_TOKEN")],
            "bad-placeholder",
        ),
    ];
    for (url, headers, kind) in cases {
        let sent = out.send(request(&p, &url, 0, &headers)).await;
        assert_eq!(refusal(&sent).kind(), kind, "{url}: {}", refusal(&sent));
    }
    let missing = policy(&[format!("{base}/api/")], &["MISSING_TOKEN"], limits());
    let sent = out
        .send(request(
            &missing,
            &format!("{base}/api/orders/1"),
            0,
            &[("authorization", "{{secret:MISSING_TOKEN}}")],
        ))
        .await;
    assert_eq!(
        refusal(&sent),
        &Refusal::SecretMissing {
            name: "MISSING_TOKEN".into()
        }
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing may reach the upstream"
    );
}

#[tokio::test]
async fn ssrf_names_pinned_or_resolved_to_special_addresses_are_refused() {
    let (port, seen) = upstream(None).await;
    let out = outbound(
        &format!(
            "api.shop.example:{port}:127.0.0.1,meta.shop.example:80:169.254.169.254,v6.shop.example:80:[::ffff:10.0.0.1]"
        ),
        None,
    );
    let p = policy(
        &[
            "http://*.shop.example".to_string(),
            format!("http://api.shop.example:{port}"),
            format!("http://localhost:{port}"),
        ],
        &[],
        limits(),
    );
    for (url, class) in [
        (
            format!("http://api.shop.example:{port}/api/orders/1"),
            Prohibited::Loopback,
        ),
        (
            "http://meta.shop.example/latest/meta-data".to_string(),
            Prohibited::CloudMetadata,
        ),
        ("http://v6.shop.example/".to_string(), Prohibited::Private),
        (
            format!("http://localhost:{port}/api/orders/1"),
            Prohibited::Loopback,
        ),
    ] {
        let sent = out.send(request(&p, &url, 0, &[])).await;
        match refusal(&sent) {
            Refusal::AddressProhibited { class: c, .. } => assert_eq!(*c, class, "{url}"),
            other => panic!("{url}: {other}"),
        }
    }
    // An IP literal the grant does not name is refused too.
    let sent = out
        .send(request(
            &p,
            &format!("http://127.0.0.1:{port}/api/orders/1"),
            0,
            &[],
        ))
        .await;
    assert_eq!(refusal(&sent).kind(), "not-granted");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn redirects_are_followed_inside_the_grant_and_checked_hop_by_hop() {
    let (other_port, other_seen) = upstream(None).await;
    let (port, seen) = upstream(Some(other_port)).await;
    let base = format!("http://127.0.0.1:{port}");
    let out = outbound("pinned.shop.example:80:127.0.0.1", None);
    let p = policy(
        &[
            format!("{base}/api/"),
            format!("http://127.0.0.1:{other_port}/api/"),
            "http://pinned.shop.example/api/".to_string(),
        ],
        &["ORDERS_TOKEN"],
        limits(),
    );
    let auth = [("authorization", "Bearer {{secret:ORDERS_TOKEN}}")];
    let inside = out
        .send(request(
            &p,
            &format!("{base}/api/redirect/inside"),
            0,
            &auth,
        ))
        .await;
    assert!(
        body(&inside).contains(r#""order":"7""#),
        "{}",
        body(&inside)
    );

    let outside = out
        .send(request(
            &p,
            &format!("{base}/api/redirect/outside"),
            1,
            &auth,
        ))
        .await;
    assert_eq!(
        refusal(&outside),
        &Refusal::RedirectNotGranted {
            location: format!("{base}/private/x")
        }
    );
    let looping = out
        .send(request(&p, &format!("{base}/api/redirect/loop"), 2, &[]))
        .await;
    assert_eq!(refusal(&looping), &Refusal::TooManyRedirects { max: 3 });

    let pinned = out
        .send(request(
            &p,
            &format!("{base}/api/redirect/pinned-loopback"),
            0,
            &[],
        ))
        .await;
    assert!(
        matches!(
            refusal(&pinned),
            Refusal::AddressProhibited {
                class: Prohibited::Loopback,
                ..
            }
        ),
        "{}",
        refusal(&pinned)
    );

    // To another granted origin: followed, without the secret.
    let cross = out
        .send(request(
            &p,
            &format!("{base}/api/redirect/other-origin"),
            1,
            &auth,
        ))
        .await;
    assert!(body(&cross).contains(r#""order":"8""#), "{}", body(&cross));
    assert_eq!(
        other_seen.lock().unwrap().as_slice(),
        [(
            "/api/orders/8".to_string(),
            None,
            Some("live_chat.new_message:m1/orders/1".to_string())
        )]
    );
    let seen = seen.lock().unwrap();
    // Each hop carried the key; the first origin got the secret.
    assert!(seen.iter().all(|(_, _, key)| key.is_some()));
    assert!(
        seen.iter()
            .filter(|(path, _, _)| path == "/api/orders/7")
            .all(|(_, a, _)| a.as_deref() == Some(&format!("Bearer {TOKEN}")[..]))
    );
    // The loop stopped after 1 + 3 requests.
    assert_eq!(
        seen.iter()
            .filter(|(p, _, _)| p == "/api/redirect/loop")
            .count(),
        4
    );
}

#[tokio::test]
async fn caps_calls_sizes_and_time() {
    let (port, seen) = upstream(None).await;
    let base = format!("http://127.0.0.1:{port}");
    let p = policy(&[format!("{base}/api/")], &[], limits());
    let out = outbound("", None);
    let big = out
        .send(request(&p, &format!("{base}/api/big"), 0, &[]))
        .await;
    assert_eq!(refusal(&big), &Refusal::ResponseTooLarge { max: 32 << 10 });
    let chunked = out
        .send(request(&p, &format!("{base}/api/chunked-big"), 0, &[]))
        .await;
    assert_eq!(
        refusal(&chunked),
        &Refusal::ResponseTooLarge { max: 32 << 10 }
    );

    let started = Instant::now();
    let forever = out
        .send(request(&p, &format!("{base}/api/forever"), 0, &[]))
        .await;
    assert_eq!(
        refusal(&forever),
        &Refusal::Timeout {
            after: Duration::from_millis(800)
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut slow = request(&p, &format!("{base}/api/slow"), 0, &[]);
    // The plugin's own timeout only shortens the host's.
    slow.timeout = Some(Duration::from_millis(100));
    let started = Instant::now();
    let slow = out.send(slow).await;
    assert_eq!(
        refusal(&slow),
        &Refusal::Timeout {
            after: Duration::from_millis(100)
        }
    );
    assert!(started.elapsed() < Duration::from_millis(700));

    // Call 3 of a turn capped at 3 (0, 1, 2) is refused.
    let fourth = out
        .send(request(&p, &format!("{base}/api/orders/1"), 3, &[]))
        .await;
    assert_eq!(refusal(&fourth), &Refusal::TooManyCalls { max: 3 });
    let mut large = request(&p, &format!("{base}/api/post"), 0, &[]);
    large.method = "POST".into();
    large.body = Err(Refusal::RequestTooLarge { max: 1024 });
    assert_eq!(refusal(&out.send(large).await).kind(), "request-too-large");
    let mut post = request(&p, &format!("{base}/api/post"), 1, &[]);
    post.method = "POST".into();
    post.body = Ok(Bytes::from_static(b"{\"n\":1}"));
    assert_eq!(body(&out.send(post).await), "got 7 bytes");
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|(p, _, _)| p == "/api/orders/1"),
        "the capped call was not sent"
    );
}

#[tokio::test]
async fn the_journal_answers_a_rerun_and_keeps_no_secret() {
    let (port, seen) = upstream(None).await;
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let store =
        digibot_store_sqlite::open(dir.path(), digibot_store_sqlite::Durability::Full).unwrap();
    let p = policy(&[format!("{base}/api/")], &["ORDERS_TOKEN"], limits());
    let auth = [("authorization", "Bearer {{secret:ORDERS_TOKEN}}")];
    let first = outbound("", Some(store.clone()));
    let a = first
        .send(request(&p, &format!("{base}/api/orders/5"), 0, &auth))
        .await;
    let slow = first
        .send(request(&p, &format!("{base}/api/forever"), 1, &[]))
        .await;
    assert!(!a.replayed && !slow.replayed);
    assert_eq!(seen.lock().unwrap().len(), 1);

    // A new process (the same store): the same calls are replayed.
    let rerun = outbound("", Some(store.clone()));
    let a2 = rerun
        .send(request(&p, &format!("{base}/api/orders/5"), 0, &auth))
        .await;
    assert!(a2.replayed);
    assert_eq!(body(&a2), body(&a));
    let slow2 = rerun
        .send(request(&p, &format!("{base}/api/forever"), 1, &[]))
        .await;
    assert!(slow2.replayed);
    assert_eq!(refusal(&slow2).kind(), "timeout");
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing called again");
    // A call that asks for something else is made again.
    let other = rerun
        .send(request(&p, &format!("{base}/api/orders/6"), 0, &auth))
        .await;
    assert!(!other.replayed);
    assert_eq!(seen.lock().unwrap().len(), 2);

    let journal = store
        .journal("live_chat.new_message:m1", None)
        .await
        .unwrap();
    assert_eq!(journal.len(), 2);
    let text = serde_json::to_string(&journal).unwrap();
    assert!(
        !text.contains(TOKEN),
        "the journal holds the secret: {text}"
    );
    assert!(text.contains("{{secret:ORDERS_TOKEN}}"), "{text}");
}
