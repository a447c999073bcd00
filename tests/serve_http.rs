//! HTTP hygiene of the read service over real HTTP: probes, security headers, CORS,
//! the per-user request limit, size limits, JSON errors everywhere, graceful shutdown.

mod common;
mod serve_support;

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use common::TestDb;
use serve_support::{Server, add, args, eventually, token};

const LIST: &str = "/api/notifications";

fn assert_security_headers(r: &reqwest::Response, what: &str) {
    let h = r.headers();
    assert_eq!(h["cache-control"], "no-store", "{what}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(
        h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'",
        "{what}"
    );
    assert_eq!(h["x-frame-options"], "DENY", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
}

#[tokio::test]
async fn probes_need_no_token() {
    let s = Server::start().await;
    let r = s.get("/healthz", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
    let r = s.get("/readyz", None).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["cache"], "live");
    let r = s.http.head(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn readyz_is_503_when_the_database_is_unreachable() {
    // Nothing listens on port 1: every connection attempt is refused at once.
    let options: sqlx::postgres::PgConnectOptions =
        "postgres://postgres@127.0.0.1:1/nowhere".parse().unwrap();
    let state = notifyd::serve::AppState::new(options, args().settings().unwrap());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", tcp.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(tcp, notifyd::serve::app(state)).await.unwrap();
    });
    let http = reqwest::Client::new();

    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "liveness does not touch the database");
    let r = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    let r = http
        .get(format!("{base}{LIST}?after=0"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no internals: {body}"
    );
    server.abort();
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let s = Server::start().await;
    add(&s.db, "alice", 1).await;
    let t = token("alice");
    let cases = [
        (s.get(LIST, Some(&t)).await, "200"),
        (s.get(LIST, None).await, "401"),
        (s.get(&format!("{LIST}?limit=0"), Some(&t)).await, "400"),
        (s.get("/nope", None).await, "404"),
        (s.get("/healthz", None).await, "healthz"),
        (s.get("/readyz", None).await, "readyz"),
        (s.get("/api/openapi.json", None).await, "openapi"),
    ];
    for (r, what) in &cases {
        assert_security_headers(r, what);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{what}"
        );
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let s = Server::start().await;
    assert_eq!(s.error("/nope", None, 404).await, "not_found");
    assert_eq!(
        s.error("/api/notifications/42", None, 404).await,
        "not_found"
    );
    let r = s
        .http
        .post(s.url(LIST))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let s = Server::start().await;
    let t = token("alice");
    let r = s
        .http
        .get(s.url(LIST))
        .header("origin", "https://app.example.com")
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = s
        .http
        .request(Method::OPTIONS, s.url(LIST))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(r.headers().get("access-control-allow-headers").is_none());
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let mut a = args();
    a.cors_origins = vec![
        "https://app.example.com".into(),
        "http://localhost:3000".into(),
    ];
    let s = Server::start_with(TestDb::new().await, a).await;
    let t = token("alice");
    for origin in ["https://app.example.com", "http://localhost:3000"] {
        let r = s
            .http
            .get(s.url(LIST))
            .header("origin", origin)
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["access-control-allow-origin"], origin);
        assert!(
            r.headers()
                .get("access-control-allow-credentials")
                .is_none()
        );
        let vary: Vec<_> = r.headers().get_all("vary").iter().collect();
        assert!(
            vary.iter()
                .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("origin")),
            "{vary:?}"
        );
    }
    let r = s
        .http
        .get(s.url(LIST))
        .header("origin", "https://evil.example.com")
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let r = s
        .http
        .request(Method::OPTIONS, s.url(LIST))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        methods.contains("GET") && !methods.contains("POST"),
        "{methods}"
    );
    assert!(
        r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    assert_security_headers(&r, "preflight");
}

#[tokio::test]
async fn the_per_user_limit_answers_429_then_resets() {
    let mut a = args();
    a.user_requests_per_minute = 3;
    a.user_rate_window_secs = 1;
    let s = Server::start_with(TestDb::new().await, a).await;
    let (alice, bob) = (token("alice"), token("bob"));
    for _ in 0..3 {
        s.page(LIST, &alice).await;
    }
    let r = s.get(LIST, Some(&alice)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    // Alice's flood does not touch Bob.
    for _ in 0..3 {
        s.page(LIST, &bob).await;
    }
    // Unauthenticated requests do not count against anyone.
    for _ in 0..10 {
        assert_eq!(s.get(LIST, None).await.status(), 401);
    }

    // The budget refills (a third of the window per request here).
    eventually(Duration::from_secs(5), || async {
        (s.get(LIST, Some(&alice)).await.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let s = Server::start().await;
    let t = token("alice");
    let r = s
        .http
        .get(s.url(LIST))
        .bearer_auth(&t)
        .body("{\"user\":\"bob\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "body_too_large"
    );

    let mut req = s.http.get(s.url(LIST)).bearer_auth(&t);
    for i in 0..20 {
        req = req.header(format!("x-filler-{i}"), "x".repeat(1000));
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 431);

    let long = format!("{LIST}?after={}", "1".repeat(3000));
    let r = s.get(&long, Some(&t)).await;
    assert_eq!(r.status(), 414);
}

#[tokio::test]
async fn shutdown_is_graceful_and_prompt() {
    let s = Server::start().await;
    let base = s.base.clone();
    assert_eq!(s.get("/healthz", None).await.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), s.stop())
        .await
        .expect("stops within the drain bound")
        .expect("stops cleanly");
    let after = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "still serving after shutdown");
}
