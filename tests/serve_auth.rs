//! The read service's authentication, over real HTTP: every way a token can be wrong is
//! a 401 with a JSON body (never a 500), and bad key settings fail at startup.

mod common;
mod serve_support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use common::TestDb;
use serve_support::{SECRET, Server, add, args, fixture, hs256, now_secs, token};

const PATH: &str = "/api/notifications";

fn b64(v: &Value) -> String {
    // Unpadded base64url, enough for hand-made tokens.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("serve_rsa_private.pem")).unwrap();
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

fn es256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("serve_ec_private.pem")).unwrap();
    jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        claims,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap()
}

fn valid_claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_secs() + 600})
}

/// GET with a raw Authorization header value; expect 401 and return the error code.
async fn rejected(s: &Server, authorization: Option<&str>) -> String {
    let mut req = s.http.get(s.url(PATH));
    if let Some(v) = authorization {
        req = req.header("authorization", v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 401, "Authorization: {authorization:?}");
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    let text = body.to_string();
    if let Some(v) = authorization {
        // The token is never echoed.
        if let Some(t) = v.split(' ').nth(1).filter(|t| t.len() > 8) {
            assert!(!text.contains(t), "token echoed in {text}");
        }
    }
    body["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_bad_token_is_a_401_with_json() {
    let s = Server::start().await;
    add(&s.db, "alice", 1).await;
    let now = now_secs();

    // Baseline: the right token works.
    s.page(PATH, &token("alice")).await;

    assert_eq!(rejected(&s, None).await, "missing_token");

    // Malformed.
    for bad in [
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6c2VjcmV0",
        "Token abc",
        "Bearer abc",
        "Bearer a.b",
        "Bearer a.b.c",
        "Bearer a.b.c.d",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.%%%",
        "Bearer ....",
    ] {
        assert_eq!(rejected(&s, Some(bad)).await, "invalid_token", "{bad:?}");
    }
    let huge = format!("Bearer {}.{}.{}", "a".repeat(5000), "b".repeat(5000), "c");
    assert_eq!(rejected(&s, Some(&huge)).await, "invalid_token");

    // Expired (the test server allows no leeway).
    let expired = hs256(SECRET.as_bytes(), &json!({"sub": "alice", "exp": now - 5}));
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {expired}"))).await,
        "token_expired"
    );

    // Wrong signature: another secret, and a payload swapped under a valid signature.
    let other = hs256(
        b"another-secret-another-secret-another!!",
        &valid_claims("alice"),
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {other}"))).await,
        "invalid_token"
    );
    let good = token("alice");
    let mallory = token("mallory");
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        mallory.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {forged}"))).await,
        "invalid_token"
    );

    // alg: none, with and without a signature part.
    for alg in ["none", "None", "NONE"] {
        let header = b64(&json!({"alg": alg, "typ": "JWT"}));
        let payload = b64(&valid_claims("alice"));
        for t in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.{}", parts[2]),
        ] {
            assert_eq!(
                rejected(&s, Some(&format!("Bearer {t}"))).await,
                "invalid_token",
                "{alg}"
            );
        }
    }

    // Other algorithms than the configured one.
    for t in [rs256(&valid_claims("alice")), es256(&valid_claims("alice"))] {
        assert_eq!(
            rejected(&s, Some(&format!("Bearer {t}"))).await,
            "invalid_token"
        );
    }
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &valid_claims("alice"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {hs512}"))).await,
        "invalid_token"
    );

    // The user claim (`sub` here): missing, not a string or an integer, empty, odd.
    for claims in [
        json!({"exp": now + 600}),
        json!({"sub": 4.2, "exp": now + 600}),
        json!({"sub": 42.0, "exp": now + 600}),
        json!({"sub": true, "exp": now + 600}),
        json!({"sub": "", "exp": now + 600}),
        json!({"sub": null, "exp": now + 600}),
        json!({"sub": "a b", "exp": now + 600}),
        json!({"sub": "x".repeat(129), "exp": now + 600}),
    ] {
        let t = hs256(SECRET.as_bytes(), &claims);
        assert_eq!(
            rejected(&s, Some(&format!("Bearer {t}"))).await,
            "invalid_user_claim",
            "{claims}"
        );
    }
    // An object or array `sub` already fails jsonwebtoken's own parse of `sub`.
    for claims in [
        json!({"sub": {"id": 1}, "exp": now + 600}),
        json!({"sub": ["alice"], "exp": now + 600}),
    ] {
        let t = hs256(SECRET.as_bytes(), &claims);
        let code = rejected(&s, Some(&format!("Bearer {t}"))).await;
        assert!(
            ["invalid_token", "invalid_user_claim"].contains(&code.as_str()),
            "{claims}: {code}"
        );
    }
    // A numeric `sub` (older PyJWT, many Node backends) is its decimal text.
    add(&s.db, "42", 3).await;
    let numeric = hs256(SECRET.as_bytes(), &json!({"sub": 42, "exp": now + 600}));
    let page = s.page(PATH, &numeric).await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 3);

    // Missing exp, future nbf, an audience nobody configured.
    for claims in [
        json!({"sub": "alice"}),
        json!({"sub": "alice", "exp": "tomorrow"}),
        json!({"sub": "alice", "exp": now + 600, "nbf": now + 300}),
        json!({"sub": "alice", "exp": now + 600, "aud": "someone-else"}),
    ] {
        let t = hs256(SECRET.as_bytes(), &claims);
        assert_eq!(
            rejected(&s, Some(&format!("Bearer {t}"))).await,
            "invalid_token",
            "{claims}"
        );
    }

    // Two Authorization headers.
    let r = s
        .http
        .get(s.url(PATH))
        .header("authorization", format!("Bearer {good}"))
        .header("authorization", format!("Bearer {mallory}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A token in the query string is not a token.
    let code = s
        .error(&format!("{PATH}?access_token={good}"), None, 401)
        .await;
    assert_eq!(code, "missing_token");

    // The scheme is case-insensitive.
    let r = s
        .http
        .get(s.url(PATH))
        .header("authorization", format!("bearer {good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn rs256_key_rejects_algorithm_confusion() {
    let mut a = args();
    a.jwt.jwt_secret = None;
    a.jwt.jwt_public_key = Some(fixture("serve_rsa_public.pem"));
    let s = Server::start_with(TestDb::new().await, a).await;
    add(&s.db, "alice", 2).await;

    let page = s.page(PATH, &rs256(&valid_claims("alice"))).await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 2);

    // The classic confusion: an HS256 token whose HMAC key is the public key PEM.
    let public_pem = std::fs::read(fixture("serve_rsa_public.pem")).unwrap();
    let confused = hs256(&public_pem, &valid_claims("alice"));
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {confused}"))).await,
        "invalid_token"
    );
    // Any HS token, an ES token, an expired RS token, an RS token without sub.
    let hs = token("alice");
    let es = es256(&valid_claims("alice"));
    let expired = rs256(&json!({"sub": "alice", "exp": now_secs() - 5}));
    let no_sub = rs256(&json!({"exp": now_secs() + 600}));
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {hs}"))).await,
        "invalid_token"
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {es}"))).await,
        "invalid_token"
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {expired}"))).await,
        "token_expired"
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {no_sub}"))).await,
        "invalid_user_claim"
    );
}

#[tokio::test]
async fn es256_key_accepts_es256_only() {
    let mut a = args();
    a.jwt.jwt_secret = None;
    a.jwt.jwt_public_key = Some(fixture("serve_ec_public.pem"));
    let s = Server::start_with(TestDb::new().await, a).await;
    s.page(PATH, &es256(&valid_claims("alice"))).await;
    let rs = rs256(&valid_claims("alice"));
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {rs}"))).await,
        "invalid_token"
    );
    let public_pem = std::fs::read(fixture("serve_ec_public.pem")).unwrap();
    let confused = hs256(&public_pem, &valid_claims("alice"));
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {confused}"))).await,
        "invalid_token"
    );
}

#[tokio::test]
async fn issuer_and_audience_when_configured() {
    let mut a = args();
    a.jwt.jwt_issuer = Some("https://backend.example".into());
    a.jwt.jwt_audience = vec!["notifyd".into(), "other".into()];
    let s = Server::start_with(TestDb::new().await, a).await;
    let exp = now_secs() + 600;
    let ok = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "alice", "exp": exp, "iss": "https://backend.example", "aud": "notifyd"}),
    );
    s.page(PATH, &ok).await;
    for claims in [
        json!({"sub": "alice", "exp": exp, "aud": "notifyd"}),
        json!({"sub": "alice", "exp": exp, "iss": "https://backend.example"}),
        json!({"sub": "alice", "exp": exp, "iss": "https://evil.example", "aud": "notifyd"}),
        json!({"sub": "alice", "exp": exp, "iss": "https://backend.example", "aud": "evil"}),
    ] {
        let t = hs256(SECRET.as_bytes(), &claims);
        assert_eq!(
            rejected(&s, Some(&format!("Bearer {t}"))).await,
            "invalid_token",
            "{claims}"
        );
    }
}

#[test]
fn key_settings_are_checked_at_startup() {
    let message = |f: &dyn Fn(&mut notifyd::serve::ServeArgs)| {
        let mut a = args();
        f(&mut a);
        a.settings().unwrap_err().to_string()
    };
    let m = message(&|a| a.jwt.jwt_secret = Some("too-short-secret".into()));
    assert!(m.contains("NOTIFYD_JWT_SECRET") && m.contains("32"), "{m}");
    let m = message(&|a| a.jwt.jwt_secret = None);
    assert!(
        m.contains("NOTIFYD_JWT_SECRET") && m.contains("NOTIFYD_JWT_PUBLIC_KEY"),
        "{m}"
    );
    let m = message(&|a| a.jwt.jwt_public_key = Some(fixture("serve_rsa_public.pem")));
    assert!(m.contains("exactly one"), "{m}");
    let m = message(&|a| {
        a.jwt.jwt_secret = None;
        a.jwt.jwt_public_key = Some(fixture("serve_rsa_private.pem"));
    });
    assert!(m.contains("private key"), "{m}");
    let m = message(&|a| {
        a.jwt.jwt_secret = None;
        a.jwt.jwt_public_key = Some(fixture("does-not-exist.pem"));
    });
    assert!(m.contains("NOTIFYD_JWT_PUBLIC_KEY"), "{m}");
    let m = message(&|a| {
        a.jwt.jwt_secret = None;
        a.jwt.jwt_public_key = Some(fixture("../../Cargo.toml"));
    });
    assert!(m.contains("not a PEM"), "{m}");
}

#[test]
fn token_command_signs_with_the_secret_or_refuses() {
    let bin = env!("CARGO_BIN_EXE_notifyd");
    let out = std::process::Command::new(bin)
        .args(["token", "--sub", "42", "--ttl-secs", "120"])
        .env_clear()
        .env("NOTIFYD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap();
    let t = t.trim();
    let v = notifyd::serve::auth::Verifier::from_args(&args().jwt).unwrap();
    assert_eq!(v.verify(t).unwrap().as_str(), "42");

    let out = std::process::Command::new(bin)
        .args(["token", "--sub", "42"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOTIFYD_JWT_SECRET"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rs256_with(private: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private)).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

#[tokio::test]
async fn two_secrets_during_a_rotation() {
    let old = "the-previous-secret-of-the-backend-0123456789";
    let mut a = args();
    a.jwt.jwt_previous_secrets = Some(old.into());
    let s = Server::start_with(TestDb::new().await, a).await;
    let mine = add(&s.db, "alice", 2).await;
    for secret in [SECRET, old] {
        let t = hs256(secret.as_bytes(), &valid_claims("alice"));
        assert_eq!(serve_support::ids(&s.page(PATH, &t).await), mine);
    }
    let other = hs256(
        b"a-third-secret-nobody-configured-0123456789",
        &valid_claims("alice"),
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {other}"))).await,
        "invalid_token"
    );
    // alg: none and another HMAC size still fail with several keys (the header is read
    // first then).
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&valid_claims("alice"))
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {none}"))).await,
        "invalid_token"
    );
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &valid_claims("alice"),
        &EncodingKey::from_secret(old.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {hs512}"))).await,
        "invalid_token"
    );
    // An expired token under the old secret says so.
    let expired = hs256(
        old.as_bytes(),
        &json!({"sub": "alice", "exp": now_secs() - 5}),
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {expired}"))).await,
        "token_expired"
    );
    // `notifyd token`/demo sign with the current secret, which is still accepted alone.
    let minted =
        notifyd::serve::auth::mint(&args().jwt, "alice", std::time::Duration::from_secs(60))
            .unwrap();
    s.page(PATH, &minted).await;
}

#[tokio::test]
async fn jwks_keys_are_chosen_by_kid() {
    let mut a = args();
    a.jwt.jwt_secret = None;
    a.jwt.jwt_jwks_file = Some(fixture("serve_jwks.json"));
    let s = Server::start_with(TestDb::new().await, a).await;
    let mine = add(&s.db, "alice", 2).await;
    let claims = valid_claims("alice");

    // Each key of the set, by its kid, and without a kid (each key of the algorithm is tried).
    for (private, kid) in [
        ("serve_rsa_private.pem", Some("rsa-2026-01")),
        ("serve_rsa2_private.pem", Some("rsa-2026-02")),
        ("serve_rsa_private.pem", None),
        ("serve_rsa2_private.pem", None),
    ] {
        let t = rs256_with(private, kid, &claims);
        assert_eq!(
            serve_support::ids(&s.page(PATH, &t).await),
            mine,
            "{private} {kid:?}"
        );
    }
    let pem = std::fs::read(fixture("serve_ec_private.pem")).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec-2026-01".into());
    let es =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap();
    s.page(PATH, &es).await;

    // An unknown kid, a kid of the other key, a kid of a key of another algorithm.
    for (private, kid) in [
        ("serve_rsa_private.pem", "rsa-2025-12"),
        ("serve_rsa_private.pem", "rsa-2026-02"),
        ("serve_rsa_private.pem", "ec-2026-01"),
    ] {
        let t = rs256_with(private, Some(kid), &claims);
        assert_eq!(
            rejected(&s, Some(&format!("Bearer {t}"))).await,
            "invalid_token",
            "{private} {kid}"
        );
    }
    // No algorithm confusion with any key of the set.
    for public in ["serve_rsa_public.pem", "serve_rsa2_public.pem"] {
        let confused = hs256(&std::fs::read(fixture(public)).unwrap(), &claims);
        assert_eq!(
            rejected(&s, Some(&format!("Bearer {confused}"))).await,
            "invalid_token"
        );
    }
    let expired = rs256_with(
        "serve_rsa2_private.pem",
        None,
        &json!({"sub": "alice", "exp": now_secs() - 5}),
    );
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {expired}"))).await,
        "token_expired"
    );
}

#[tokio::test]
async fn required_claims_and_user_claim_over_http() {
    let mut a = args();
    a.jwt.jwt_user_claim = "uid".into();
    a.jwt.jwt_require = Some("type=access,env=prod".into());
    let s = Server::start_with(TestDb::new().await, a).await;
    let mine = add(&s.db, "9", 1).await;
    let exp = now_secs() + 600;
    let ok = hs256(
        SECRET.as_bytes(),
        &json!({"uid": 9, "type": "access", "env": "prod", "exp": exp}),
    );
    assert_eq!(serve_support::ids(&s.page(PATH, &ok).await), mine);
    for (claims, code) in [
        (
            json!({"uid": 9, "type": "refresh", "env": "prod", "exp": exp}),
            "token_claim_mismatch",
        ),
        (
            json!({"uid": 9, "type": "access", "exp": exp}),
            "token_claim_mismatch",
        ),
        (
            json!({"sub": "9", "type": "access", "env": "prod", "exp": exp}),
            "invalid_user_claim",
        ),
        (
            json!({"uid": 9.5, "type": "access", "env": "prod", "exp": exp}),
            "invalid_user_claim",
        ),
    ] {
        let t = hs256(SECRET.as_bytes(), &claims);
        let r = s.get(PATH, Some(&t)).await;
        assert_eq!(r.status(), 401, "{claims}");
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="notifyd", error="invalid_token""#
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{claims}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains('`'),
            "the message names the claim: {message}"
        );
    }
}

#[test]
fn jwt_settings_are_checked_at_startup() {
    let message = |f: &dyn Fn(&mut notifyd::serve::ServeArgs)| {
        let mut a = args();
        f(&mut a);
        format!("{:#}", a.settings().unwrap_err())
    };
    let m = message(&|a| a.jwt.jwt_require = Some("type".into()));
    assert!(m.starts_with("NOTIFYD_JWT_REQUIRE"), "{m}");
    let m = message(&|a| a.jwt.jwt_require = Some("type=access,,env=prod".into()));
    assert!(m.starts_with("NOTIFYD_JWT_REQUIRE"), "{m}");
    let m = message(&|a| a.jwt.jwt_user_claim = "user id".into());
    assert!(m.starts_with("NOTIFYD_JWT_USER_CLAIM"), "{m}");
    let m = message(&|a| {
        a.jwt.jwt_previous_secrets = Some(format!("{},", "o".repeat(40)));
    });
    assert!(
        m.starts_with("NOTIFYD_JWT_PREVIOUS_SECRETS") && m.contains("empty"),
        "{m}"
    );
    let m = message(&|a| {
        a.jwt.jwt_secret = None;
        a.jwt.jwt_jwks_file = Some(fixture("does-not-exist.json"));
    });
    assert!(m.contains("NOTIFYD_JWT_JWKS_FILE"), "{m}");
    let m = message(&|a| {
        a.jwt.jwt_secret = None;
        a.jwt.jwt_jwks_file = Some(fixture("serve_rsa_public.pem"));
    });
    assert!(
        m.starts_with("NOTIFYD_JWT_JWKS_FILE") && m.contains("not a JWKS"),
        "{m}"
    );
    let m = message(&|a| a.jwt.jwt_cookie = Some("a;b".into()));
    assert!(m.starts_with("NOTIFYD_JWT_COOKIE"), "{m}");
}

/// The real binary: each bad setting stops `notifyd serve` before it connects anywhere,
/// with a non-zero exit and a message naming the variable.
#[test]
fn serve_refuses_to_start_with_bad_jwt_settings() {
    let bin = env!("CARGO_BIN_EXE_notifyd");
    let jwks = fixture("does-not-exist.json");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("NOTIFYD_JWT_SECRET", SECRET),
                ("NOTIFYD_JWT_REQUIRE", "type:access"),
            ],
            "NOTIFYD_JWT_REQUIRE",
        ),
        (
            &[
                ("NOTIFYD_JWT_SECRET", SECRET),
                (
                    "NOTIFYD_JWT_PREVIOUS_SECRETS",
                    "the-previous-secret-of-the-backend-0123,",
                ),
            ],
            "NOTIFYD_JWT_PREVIOUS_SECRETS",
        ),
        (
            &[("NOTIFYD_JWT_JWKS_FILE", jwks.to_str().unwrap())],
            "NOTIFYD_JWT_JWKS_FILE",
        ),
        (
            &[
                ("NOTIFYD_JWT_SECRET", SECRET),
                ("NOTIFYD_JWT_USER_CLAIM", "exp"),
            ],
            "NOTIFYD_JWT_USER_CLAIM",
        ),
    ];
    for (env, variable) in cases {
        let out = std::process::Command::new(bin)
            .arg("serve")
            .env_clear()
            // Nothing listens there: the settings must fail before any connection.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("NOTIFYD_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} started: {stderr}");
        assert!(stderr.contains(variable), "{env:?}: {stderr}");
        assert!(!stderr.contains(SECRET), "the secret in stderr: {stderr}");
        assert!(
            !stderr.contains("connect") && !stderr.contains("127.0.0.1:1"),
            "{env:?} got as far as the database: {stderr}"
        );
    }
}

/// A JWKS file is re-read on SIGHUP: a key published there is accepted without a
/// restart, and a broken file changes nothing.
#[tokio::test]
async fn jwks_is_reread_on_sighup() {
    let jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("serve_jwks.json")).unwrap())
            .unwrap();
    let dir = std::env::temp_dir().join(format!("notifyd-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    let write = |keys: &[&Value]| {
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
    };
    write(&[&jwks["keys"][0]]);
    let mut a = args();
    a.jwt.jwt_secret = None;
    a.jwt.jwt_jwks_file = Some(path.clone());
    let s = Server::start_with(TestDb::new().await, a).await;
    add(&s.db, "alice", 1).await;
    let old = rs256_with(
        "serve_rsa_private.pem",
        Some("rsa-2026-01"),
        &valid_claims("alice"),
    );
    let new = rs256_with(
        "serve_rsa2_private.pem",
        Some("rsa-2026-02"),
        &valid_claims("alice"),
    );
    s.page(PATH, &old).await;
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {new}"))).await,
        "invalid_token"
    );

    let hangup = |s: &Server| {
        let before = s.state.verifier().jwks_reloads();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        before
    };
    let reread = |s: &Server, before: u64| {
        let v = s.state.clone();
        serve_support::eventually(std::time::Duration::from_secs(10), move || {
            let done = v.verifier().jwks_reloads() > before;
            async move { done.then_some(()) }
        })
    };

    // Publish the new key: both are accepted.
    write(&[&jwks["keys"][0], &jwks["keys"][1]]);
    let before = hangup(&s);
    reread(&s, before).await;
    s.page(PATH, &old).await;
    s.page(PATH, &new).await;

    // A broken file keeps the keys in use.
    std::fs::write(&path, "{ broken").unwrap();
    let before = hangup(&s);
    reread(&s, before).await;
    s.page(PATH, &old).await;
    s.page(PATH, &new).await;

    // Retire the old key.
    write(&[&jwks["keys"][1]]);
    let before = hangup(&s);
    reread(&s, before).await;
    s.page(PATH, &new).await;
    assert_eq!(
        rejected(&s, Some(&format!("Bearer {old}"))).await,
        "invalid_token"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
