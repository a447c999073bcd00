//! The committed `openapi.json` is exactly what the code generates, and it is what the
//! service serves. To regenerate it after changing the API:
//!
//! ```text
//! NOTIFYD_UPDATE_OPENAPI=1 cargo test --test serve_openapi
//! ```

mod common;
mod serve_support;

use std::path::PathBuf;

use serve_support::Server;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
}

#[test]
fn committed_openapi_json_matches_the_code() {
    let generated = notifyd::serve::openapi::json();
    let path = committed_path();
    if std::env::var_os("NOTIFYD_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json is out of date with the code: regenerate it with \
         `NOTIFYD_UPDATE_OPENAPI=1 cargo test --test serve_openapi` and commit it"
    );
}

#[test]
fn the_description_covers_the_contract() {
    let doc: serde_json::Value = serde_json::from_str(&notifyd::serve::openapi::json()).unwrap();
    for path in [
        "/api/notifications",
        "/api/notifications/unread",
        "/healthz",
        "/readyz",
        "/api/openapi.json",
    ] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
    let list = &doc["paths"]["/api/notifications"]["get"];
    for status in ["200", "400", "401", "410", "429", "503"] {
        assert!(list["responses"][status].is_object(), "{status}");
    }
    assert_eq!(list["security"][0]["bearer"], serde_json::json!([]));
    let page = &doc["components"]["schemas"]["NotificationPage"]["properties"];
    for field in ["notifications", "next_after", "unread_count"] {
        assert!(page[field].is_object(), "{field}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn the_service_serves_the_same_description() {
    let s = Server::start().await;
    let r = s.get("/api/openapi.json", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), notifyd::serve::openapi::json());
}
