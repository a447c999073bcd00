//! Demo mode over real HTTP: off by default (no page, no token), and when on, the page
//! and assets with their content types and page CSP, a working token for the demo user
//! only, and the startup checks. Also: the OpenAPI description covers the stream and
//! long-poll, and never the demo routes.

mod common;
mod serve_support;

use serde_json::Value;

use common::TestDb;
use serve_support::{Server, add, args, fixture, ids, now_secs};

const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'none'";

fn demo_args() -> notifyd::serve::ServeArgs {
    let mut a = args();
    a.demo.demo = true;
    a
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn demo_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/serve/demo")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn without_demo_mode_there_is_no_page_and_no_token() {
    let s = Server::start().await;
    for path in [
        "/",
        "/demo",
        "/demo/",
        "/demo/inbox.js",
        "/demo/notifyd-client.js",
        "/demo/token",
    ] {
        assert_eq!(s.error(path, None, 404).await, "not_found", "{path}");
    }
}

#[tokio::test]
async fn demo_mode_serves_the_page_with_its_policy() {
    let s = Server::start_with(TestDb::new().await, demo_args()).await;
    let http = no_redirects();
    for from in ["/", "/demo"] {
        let r = http.get(s.url(from)).send().await.unwrap();
        assert!(r.status().is_redirection(), "{from}: {}", r.status());
        assert_eq!(r.headers()["location"], "/demo/", "{from}");
    }
    for (path, file, content_type) in [
        ("/demo/", "index.html", "text/html; charset=utf-8"),
        (
            "/demo/inbox.js",
            "inbox.js",
            "text/javascript; charset=utf-8",
        ),
        ("/demo/inbox.css", "inbox.css", "text/css; charset=utf-8"),
        (
            "/demo/notifyd-client.js",
            "notifyd-client.js",
            "text/javascript; charset=utf-8",
        ),
    ] {
        let r = http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], content_type, "{path}");
        assert_eq!(r.headers()["content-security-policy"], PAGE_CSP, "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers()["x-frame-options"], "DENY", "{path}");
        assert_eq!(r.text().await.unwrap(), demo_file(file), "{path}");
    }
    // The API keeps its stricter policy in demo mode.
    let r = http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(
        r.headers()["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    let r = http.get(s.url("/demo/token")).send().await.unwrap();
    assert_eq!(
        r.headers()["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn the_demo_token_reads_the_demo_user_only() {
    let mut a = demo_args();
    a.demo.demo_user = "demo-7".into();
    let s = Server::start_with(TestDb::new().await, a).await;
    let mine = add(&s.db, "demo-7", 2).await;
    add(&s.db, "someone-else", 2).await;
    let r = s.get("/demo/token", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["user_id"], "demo-7");
    assert_eq!(body["expires_in"], 3600);
    let token = body["token"].as_str().unwrap();
    let page = s.page("/api/notifications", token).await;
    assert_eq!(ids(&page), mine);

    // Signed with the service's secret, for an hour.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(serve_support::SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "demo-7");
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        (now_secs() + 3500..=now_secs() + 3601).contains(&exp),
        "{exp}"
    );
}

#[tokio::test]
async fn the_demo_token_lifetime_is_a_setting() {
    let mut a = demo_args();
    a.demo.demo_token_ttl_secs = 7;
    let s = Server::start_with(TestDb::new().await, a).await;
    let body: Value = s.get("/demo/token", None).await.json().await.unwrap();
    assert_eq!(body["expires_in"], 7);
    let token = body["token"].as_str().unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(serve_support::SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 7);
}

#[test]
fn demo_mode_needs_a_secret_and_a_valid_user() {
    let mut a = demo_args();
    a.jwt.jwt_secret = None;
    a.jwt.jwt_public_key = Some(fixture("serve_rsa_public.pem"));
    let e = a.settings().unwrap_err().to_string();
    assert!(e.contains("NOTIFYD_JWT_SECRET"), "{e}");
    assert!(e.contains("NOTIFYD_DEMO"), "{e}");

    let mut a = demo_args();
    a.demo.demo_user = "has space".into();
    let e = format!("{:#}", a.settings().unwrap_err());
    assert!(e.contains("NOTIFYD_DEMO_USER"), "{e}");

    // Off, a public key alone is fine.
    let mut a = args();
    a.jwt.jwt_secret = None;
    a.jwt.jwt_public_key = Some(fixture("serve_rsa_public.pem"));
    assert!(a.settings().unwrap().demo.is_none());
}

#[test]
fn the_openapi_description_has_the_stream_and_long_poll_but_no_demo() {
    let doc: Value = serde_json::from_str(&notifyd::serve::openapi::json()).unwrap();
    let stream = &doc["paths"]["/api/notifications/stream"]["get"];
    assert!(stream["responses"]["200"]["content"]["text/event-stream"].is_object());
    for status in ["400", "401", "410", "429", "503"] {
        assert!(stream["responses"][status].is_object(), "{status}");
    }
    let names: Vec<&str> = stream["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["after", "access_token", "Last-Event-ID"]);
    let list = &doc["paths"]["/api/notifications"]["get"];
    let wait = list["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "wait")
        .expect("a wait parameter");
    assert_eq!(wait["schema"]["maximum"], 30);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.keys().all(|p| !p.starts_with("/demo") && p != "/"));
}
