//! Shared by the `serve_*` tests: a real `notifyd serve` (the full router, the LISTEN
//! task, graceful shutdown) on 127.0.0.1:0 against a fresh test database, reached over
//! real HTTP with reqwest.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use notifyd::serve::auth::JwtArgs;
use notifyd::serve::{AppState, ServeArgs, Service};

use crate::common::TestDb;

/// The HS256 secret of the default test server (40 bytes).
pub const SECRET: &str = "serve-tests-secret-0123456789abcdefghijk";

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Serve settings as `notifyd serve` would have them with no environment at all, with
/// the test secret.
pub fn args() -> ServeArgs {
    ServeArgs {
        listen: None,
        port: None,
        jwt: JwtArgs {
            jwt_secret: Some(SECRET.to_owned()),
            jwt_leeway_secs: 0,
            ..JwtArgs::default()
        },
        metrics: Default::default(),
        user_requests_per_minute: 100_000,
        user_rate_window_secs: 60,
        cors_origins: Vec::new(),
        db_pool: 5,
        request_timeout_secs: 10,
        shutdown_timeout_secs: 5,
        cache_ttl_secs: 300,
        cache_max_users: 100_000,
        stream: Default::default(),
        demo: Default::default(),
        session: Default::default(),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Sign arbitrary claims with HS256 and `secret`.
pub fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A valid token for `sub` under the default test secret.
pub fn token(sub: &str) -> String {
    hs256(
        SECRET.as_bytes(),
        &json!({"sub": sub, "exp": now_secs() + 3600}),
    )
}

pub struct Server {
    pub db: TestDb,
    pub base: String,
    pub http: reqwest::Client,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// A server with the default test settings on a fresh database.
    pub async fn start() -> Self {
        Self::start_with(TestDb::new().await, args()).await
    }

    /// The service connects as the reader role of `notifyd grants` (SELECT on the two
    /// tables it reads, nothing else), as in production; tests write through `db.pool`.
    pub async fn start_with(db: TestDb, args: ServeArgs) -> Self {
        let settings = args.settings().expect("valid test settings");
        let roles = db.grant_roles().await;
        let reader_url = db.login_as(&roles.reader).await;
        let listen_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&reader_url)
            .await
            .unwrap();
        let (tx, rx) = watch::channel(false);
        let service = Service::start(listen_pool, settings, rx.clone());
        let state = service.state().clone();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", tcp.local_addr().unwrap());
        let task = tokio::spawn(service.serve(tcp, rx));
        let server = Server {
            db,
            base,
            http: reqwest::Client::new(),
            state,
            shutdown: tx,
            task: Some(task),
        };
        server.wait_until_cache_live().await;
        server
    }

    /// Bounded wait for the LISTEN connection, so that tests see the cached paths.
    pub async fn wait_until_cache_live(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.state.cache().is_live() {
            assert!(Instant::now() < deadline, "the listener never connected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// GET with a token, expect 200, return the JSON.
    pub async fn page(&self, path: &str, token: &str) -> Value {
        let r = self.get(path, Some(token)).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// GET with a token, expect `status`, return the error code.
    pub async fn error(&self, path: &str, token: Option<&str>, status: u16) -> String {
        let r = self.get(path, token).await;
        assert_eq!(r.status().as_u16(), status, "GET {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "GET {path}"
        );
        let body: Value = r.json().await.unwrap();
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {body}"));
        assert!(body["error"]["message"].is_string(), "{body}");
        code.to_owned()
    }

    /// Signal shutdown and wait for the server to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Store `n` notifications for `user` in one transaction, announced as the worker's
/// store does (ids drawn under a per-user lock, NOTIFY in the transaction; the lock here
/// is an advisory one of its own, enough for tests without a worker). Returns
/// their ids, ascending.
pub async fn add(db: &TestDb, user: &str, n: i32) -> Vec<i64> {
    add_on(&db.pool, user, n).await
}

/// [`add`] through a given pool (for example one whose connection must not change).
pub async fn add_on(pool: &sqlx::PgPool, user: &str, n: i32) -> Vec<i64> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(user)
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO notify.notifications (user_id, event_id, event_type, body, link, created_at)
         SELECT $1, nextval(pg_get_serial_sequence('notify.events', 'id')),
                'new_message', 'note ' || g, '/n/' || g, now()
         FROM generate_series(1, $2) AS g
         ORDER BY g
         RETURNING id",
    )
    .bind(user)
    .bind(n)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    ids.sort_unstable();
    if let Some(newest) = ids.last() {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(notifyd::contract::ANNOUNCE_CHANNEL)
            .bind(json!([[user, newest]]).to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    ids
}

/// Ids in a page's `notifications`.
pub fn ids(page: &Value) -> Vec<i64> {
    page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_i64().unwrap())
        .collect()
}

/// Poll `f` until it returns `Some`, at most `limit` (no guessed sleeps: a bounded loop).
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
