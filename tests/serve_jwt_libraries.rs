//! The JWTs Python backends already issue, minted by the real libraries
//! (`tests/jwt/mint.py`: flask-jwt-extended, djangorestframework-simplejwt, PyJWT as
//! FastAPI uses it), against a real `notifyd serve` configured as docs/API.md says for
//! each framework: every access token reads its user's notifications (200, that user's
//! rows only), every refresh token gets 401 `token_claim_mismatch`.
//!
//! The libraries live in the venv `.notifyd/venv`, which scripts/test.sh fills from
//! `tests/jwt/requirements.txt` and exports as `NOTIFYD_JWT_PYTHON`. Without it the tests
//! skip with a loud message, except under CI (`CI` set), where they fail.

mod common;
mod serve_support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use common::TestDb;
use serve_support::{SECRET, Server, add, args, ids};

const PATH: &str = "/api/notifications";
const ORIGIN: &str = "https://app.example.com";

/// The venv's python, or `None` (after saying so) when it is missing outside CI.
fn python() -> Option<PathBuf> {
    let how = "scripts/test.sh installs tests/jwt/requirements.txt into .notifyd/venv and \
               exports NOTIFYD_JWT_PYTHON";
    let candidate = match std::env::var_os("NOTIFYD_JWT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".notifyd/venv/bin/python"),
    };
    let usable = Command::new(&candidate)
        .args([
            "-c",
            "import flask_jwt_extended, rest_framework_simplejwt, jwt, django",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if usable {
        return Some(candidate);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} cannot import the JWT libraries, and CI must not skip this test: {how}",
            candidate.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED: {} cannot import flask_jwt_extended, rest_framework_simplejwt, jwt \
         and django; {how} ***\n",
        candidate.display()
    );
    None
}

/// The tokens of every library, signed with the test servers' secret (once per process).
fn tokens() -> Option<&'static Value> {
    static TOKENS: OnceLock<Option<Value>> = OnceLock::new();
    TOKENS
        .get_or_init(|| {
            let python = python()?;
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/jwt/mint.py");
            let out = Command::new(&python)
                .arg(&script)
                .arg(SECRET)
                .output()
                .expect("run tests/jwt/mint.py");
            assert!(
                out.status.success(),
                "tests/jwt/mint.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(serde_json::from_slice(&out.stdout).expect("mint.py prints JSON"))
        })
        .as_ref()
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no `{key}` in {v}"))
}

/// A server with the test secret and these JWT settings, holding notifications for
/// `user` and for someone else; returns it with `user`'s ids.
async fn server(
    user: &str,
    configure: impl FnOnce(&mut notifyd::serve::ServeArgs),
) -> (Server, Vec<i64>) {
    let mut a = args();
    configure(&mut a);
    let s = Server::start_with(TestDb::new().await, a).await;
    let mine = add(&s.db, user, 3).await;
    add(&s.db, "someone-else", 2).await;
    (s, mine)
}

async fn refused(s: &Server, token: &str) -> String {
    s.error(PATH, Some(token), 401).await
}

#[tokio::test]
async fn flask_jwt_extended_access_tokens_read_refresh_tokens_do_not() {
    let Some(tokens) = tokens() else { return };
    let flask = &tokens["flask"];
    let user = text(flask, "user");
    // docs/API.md, Flask: NOTIFYD_JWT_SECRET = JWT_SECRET_KEY, NOTIFYD_JWT_REQUIRE=type=access.
    let (s, mine) = server(user, |a| {
        a.jwt.jwt_require = Some("type=access".into());
    })
    .await;
    let page = s.page(PATH, text(flask, "access")).await;
    assert_eq!(ids(&page), mine);
    assert_eq!(
        refused(&s, text(flask, "refresh")).await,
        "token_claim_mismatch"
    );

    // Without the setting, the 30-day refresh token would read the inbox: it is the
    // setting that refuses it.
    let (open, mine) = server(user, |_| {}).await;
    assert_eq!(ids(&open.page(PATH, text(flask, "refresh")).await), mine);
}

#[tokio::test]
async fn flask_jwt_extended_cookies() {
    let Some(tokens) = tokens() else { return };
    let flask = &tokens["flask"];
    let user = text(flask, "user");
    // docs/API.md, Flask with JWT_TOKEN_LOCATION=cookies.
    let (s, mine) = server(user, |a| {
        a.jwt.jwt_require = Some("type=access".into());
        a.jwt.jwt_cookie = Some("access_token_cookie".into());
        a.cors_origins = vec![ORIGIN.into()];
    })
    .await;
    // What a browser sends back after the login response: every cookie it set.
    let set_cookie: Vec<&str> = flask["set_cookie"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let pair = |name: &str| -> String {
        set_cookie
            .iter()
            .map(|c| c.split(';').next().unwrap())
            .find(|p| p.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("flask set no {name} cookie: {set_cookie:?}"))
            .to_owned()
    };
    let all = [
        "access_token_cookie",
        "csrf_access_token",
        "refresh_token_cookie",
        "csrf_refresh_token",
    ]
    .map(pair)
    .join("; ");
    let get = |cookie: String| {
        s.http
            .get(s.url(PATH))
            .header("cookie", cookie)
            .header("origin", ORIGIN)
    };

    let r = get(all.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let page: Value = r.json().await.unwrap();
    assert_eq!(ids(&page), mine);

    // The refresh cookie alone is no access token, under its name or under ours.
    let refresh_value = pair("refresh_token_cookie");
    let refresh_value = refresh_value.split_once('=').unwrap().1;
    let r = get(pair("refresh_token_cookie")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_token");
    let r = get(format!("access_token_cookie={refresh_value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "token_claim_mismatch");

    // The header wins over the cookie, even a bad one.
    let r = get(all.clone())
        .header("authorization", "Bearer not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The stream takes the cookie too (EventSource sends cookies; it cannot send headers).
    let r = s
        .http
        .get(s.url("/api/notifications/stream"))
        .header("cookie", all.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    drop(r);

    // Another origin gets no `Access-Control-Allow-Origin`: a browser gives its page no
    // access to the answer (tower-http sends `Allow-Credentials` either way, which grants
    // nothing without a matching origin).
    let r = s
        .http
        .get(s.url(PATH))
        .header("cookie", all)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn simplejwt_access_tokens_read_refresh_tokens_do_not() {
    let Some(tokens) = tokens() else { return };
    let django = &tokens["django"];
    let user = text(django, "user");
    // docs/API.md, Django: NOTIFYD_JWT_SECRET = SIGNING_KEY (SECRET_KEY by default),
    // NOTIFYD_JWT_USER_CLAIM=user_id, NOTIFYD_JWT_REQUIRE=token_type=access.
    let (s, mine) = server(user, |a| {
        a.jwt.jwt_user_claim = "user_id".into();
        a.jwt.jwt_require = Some("token_type=access".into());
    })
    .await;
    let page = s.page(PATH, text(django, "access")).await;
    assert_eq!(ids(&page), mine);
    assert_eq!(
        refused(&s, text(django, "refresh")).await,
        "token_claim_mismatch"
    );

    // With the default user claim, simplejwt's tokens name no user: the 401.
    let (plain, _) = server(user, |_| {}).await;
    assert_eq!(
        refused(&plain, text(django, "access")).await,
        "invalid_user_claim"
    );
}

#[tokio::test]
async fn pyjwt_fastapi_tokens_including_a_numeric_sub() {
    let Some(tokens) = tokens() else { return };
    let pyjwt = &tokens["pyjwt"];
    let user = text(pyjwt, "user");
    // docs/API.md, FastAPI with PyJWT: NOTIFYD_JWT_REQUIRE=type=access.
    let (s, mine) = server(user, |a| {
        a.jwt.jwt_require = Some("type=access".into());
    })
    .await;
    let page = s.page(PATH, text(pyjwt, "access")).await;
    assert_eq!(ids(&page), mine);
    assert_eq!(
        refused(&s, text(pyjwt, "refresh")).await,
        "token_claim_mismatch"
    );

    // `"sub": 7` reads user "7".
    let numeric_user = text(pyjwt, "numeric_user");
    let theirs = add(&s.db, numeric_user, 2).await;
    let page = s.page(PATH, text(pyjwt, "numeric")).await;
    assert_eq!(ids(&page), theirs);
}
