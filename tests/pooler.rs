//! notifyd behind a real PgBouncer (Debian's 1.18, a private instance per test): the worker
//! and the read service through transaction pooling (`NOTIFYD_DB_POOLER=transaction`) and
//! session pooling, the session settings read back through it, and kill -9 of a worker.
//!
//! The pgbouncers here have fewer server connections than notifyd opens client
//! connections, so server connections really are shared between clients and transactions.

#[path = "pooler/bouncer.rs"]
mod bouncer;
mod common;
#[path = "faults/support.rs"]
mod support;

use std::time::{Duration, Instant};

use bouncer::Bouncer;
use common::TestDb;
use notifyd::db::{self, Pooler};
use sqlx::Connection;
use support::*;

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn get_json(port: u16, path: &str, token: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the read API answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Nothing in a log mentions a prepared statement or a pooler error.
fn assert_clean(proc: &Proc) {
    let log = proc.log_text();
    for bad in [
        "prepared statement",
        "unsupported startup parameter",
        "pooler error",
    ] {
        assert!(!log.contains(bad), "{} logged {bad:?}:\n{log}", proc.name);
    }
}

/// A long-poll for `user` past its newest notification, answered by a notification enqueued
/// while it waits: the time from the enqueue's commit to the answer.
async fn long_poll_wake(pool: &sqlx::PgPool, port: u16, user: &str, body: &str) -> Duration {
    let t = token(user);
    let (status, page) = get_json(port, "/api/notifications?limit=1", &t).await;
    assert_eq!(status, 200, "{page}");
    let after = page["next_after"].as_i64().unwrap_or(0);
    let path = format!("/api/notifications?after={after}&wait=20");
    let poll = tokio::spawn(async move { get_json(port, &path, &t).await });
    // The long-poll registers within a few ms; an enqueue before that only makes the
    // answer come sooner (the first read finds it).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = Instant::now();
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', $2)",
    )
    .bind(user)
    .bind(body)
    .execute(pool)
    .await
    .unwrap();
    let (status, page) = poll.await.unwrap();
    let woke = sent.elapsed();
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["notifications"][0]["body"], body, "{page}");
    woke
}

/// An SSE stream for `user` from its newest notification: the time from an enqueue's
/// commit to the stream's event for it.
async fn stream_wake(pool: &sqlx::PgPool, port: u16, user: &str, body: &str) -> Duration {
    let t = token(user);
    let (_, page) = get_json(port, "/api/notifications?limit=1", &t).await;
    let after = page["next_after"].as_i64().unwrap_or(0);
    let response = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/api/notifications/stream?after={after}"
        ))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut response = response;
    // The stream's first bytes (the retry hint) say it is open.
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("the stream opens")
        .unwrap()
        .expect("a first chunk");
    let mut seen = String::from_utf8_lossy(&first).into_owned();
    let sent = Instant::now();
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', $2)",
    )
    .bind(user)
    .bind(body)
    .execute(pool)
    .await
    .unwrap();
    while !seen.contains(body) {
        let chunk = tokio::time::timeout(Duration::from_secs(20), response.chunk())
            .await
            .expect("the stream sends the new notification")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    sent.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_read_api_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    // 5 server connections for the worker's 10 and two read services' 5 + 5 clients.
    let pgb = Bouncer::start("transaction", 5, &[]).await;
    let through = pgb.url(&db.name, "postgres");
    let pooled = [("NOTIFYD_DB_POOLER", "transaction".to_owned())];

    // Many users, few events each: batches of 200 seldom wait on each other's user locks.
    const USERS: i64 = 2000;
    const PER_USER: i64 = 4; // under the rate limit: every event is stored
    const N: i64 = USERS * PER_USER;
    enqueue(pool, "pgb", USERS, PER_USER).await;
    let mut worker = Proc::worker(
        &through,
        "pgb-w",
        &[
            pooled[0].clone(),
            ("NOTIFYD_DB_POOL", "10".into()),
            ("NOTIFYD_CLEANUP_INTERVAL_SECS", "1".into()),
        ],
    );
    let started = Instant::now();
    wait_drained(pool, N, Duration::from_secs(120), &mut [&mut worker]).await;
    let drained = started.elapsed();
    let d = delivery(pool).await;
    assert_exactly_once(&d, N);
    assert_eq!(d.stored, N, "{d:?}");
    assert!(worker.is_running(), "{}", worker.log_tail());

    // The read service through the pooler, LISTEN past it.
    let mut serve = Proc::serve(
        &through,
        "pgb-serve",
        &[
            pooled[0].clone(),
            ("NOTIFYD_LISTEN_DATABASE_URL", db.url.clone()),
        ],
    );
    serve.wait_listening(Duration::from_secs(20)).await;
    let port = serve.http_port.unwrap();
    let (status, page) = get_json(port, "/api/notifications?limit=100", &token("user-7")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["notifications"].as_array().map(Vec::len),
        Some(PER_USER as usize),
        "{page}"
    );
    assert_eq!(page["unread_count"], PER_USER, "{page}");
    let (status, _) = get_json(port, "/readyz", "").await;
    assert_eq!(status, 200);
    // With LISTEN, long-polls and streams wake on the worker's announcement.
    let poll = long_poll_wake(pool, port, "user-7", "wake-poll").await;
    let stream = stream_wake(pool, port, "user-8", "wake-stream").await;
    assert!(
        poll < Duration::from_secs(2),
        "long-poll woke after {poll:?}"
    );
    assert!(
        stream < Duration::from_secs(2),
        "stream woke after {stream:?}"
    );

    // Without a LISTEN URL: one warning, polling, and the same answers within the
    // fallback's bound (a re-read every 1-2 s).
    let mut polling = Proc::serve(&through, "pgb-serve-poll", &pooled);
    polling.wait_listening(Duration::from_secs(20)).await;
    let port2 = polling.http_port.unwrap();
    let (status, page) = get_json(port2, "/api/notifications?limit=100", &token("user-7")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["notifications"].as_array().map(Vec::len),
        Some(PER_USER as usize + 1)
    );
    let poll_fallback = long_poll_wake(pool, port2, "user-9", "wake-poll-fallback").await;
    let stream_fallback = stream_wake(pool, port2, "user-10", "wake-stream-fallback").await;
    for (what, took) in [("long-poll", poll_fallback), ("stream", stream_fallback)] {
        assert!(
            took < Duration::from_millis(3500),
            "{what} without LISTEN woke after {took:?}"
        );
    }
    let warned = polling
        .log_text()
        .matches("NOTIFYD_LISTEN_DATABASE_URL is not set")
        .count();
    assert_eq!(warned, 1, "{}", polling.log_text());

    let d = delivery(pool).await;
    assert_exactly_once(&d, N + 4);
    for p in [&worker, &serve, &polling] {
        assert_clean(p);
    }
    assert!(serve.is_running() && polling.is_running() && worker.is_running());
    println!(
        "FIGURES pgbouncer transaction mode: {N} events drained in {:.2} s through 5 server \
         connections; wake-ups with LISTEN: long-poll {:.0} ms, stream {:.0} ms; without: \
         long-poll {:.0} ms, stream {:.0} ms",
        drained.as_secs_f64(),
        poll.as_secs_f64() * 1e3,
        stream.as_secs_f64() * 1e3,
        poll_fallback.as_secs_f64() * 1e3,
        stream_fallback.as_secs_f64() * 1e3,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_behind_pgbouncer_loses_nothing() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let pgb = Bouncer::start("transaction", 4, &[]).await;
    let through = pgb.url(&db.name, "postgres");
    let pooled = [("NOTIFYD_DB_POOLER", "transaction".to_owned())];
    const USERS: i64 = 2000;
    const PER_USER: i64 = 5;
    const N: i64 = USERS * PER_USER;
    enqueue(pool, "pgb-kill", USERS, PER_USER).await;

    let mut a = Proc::worker(&through, "pgb-kill-a", &pooled);
    wait_for(Duration::from_secs(60), "the victim mid-drain", || async {
        let done = done_events(pool).await;
        ((N / 10..N / 2).contains(&done)).then_some(())
    })
    .await;
    a.kill9();
    assert!(done_events(pool).await < N, "the kill came after the drain");
    // PgBouncer closes the server connections the dead client had inside a transaction,
    // so the server rolls them back and the claimed jobs are free again.
    let mut b = Proc::worker(&through, "pgb-kill-b", &pooled);
    wait_drained(pool, N, Duration::from_secs(120), &mut [&mut b]).await;
    let d = delivery(pool).await;
    assert_exactly_once(&d, N);
    assert_eq!(d.stored, N, "{d:?}");
    assert_eq!(
        b.metric("notifyd_events_total{outcome=\"duplicate\"}")
            .await,
        0.0,
        "{}",
        b.log_tail()
    );
    assert_clean(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_read_api_through_pgbouncer_in_session_mode() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let pgb = Bouncer::start("session", 20, &[]).await;
    let through = pgb.url(&db.name, "postgres");
    let session = [("NOTIFYD_DB_POOLER", "session".to_owned())];
    const N: i64 = 1000 * 2;
    enqueue(pool, "pgb-session", 1000, 2).await;
    let mut worker = Proc::worker(&through, "pgb-s-w", &session);
    wait_drained(pool, N, Duration::from_secs(120), &mut [&mut worker]).await;
    assert_exactly_once(&delivery(pool).await, N);
    // LISTEN through a session pooler holds its server connection: the cache goes live.
    let mut serve = Proc::serve(&through, "pgb-s-serve", &session);
    serve.wait_listening(Duration::from_secs(20)).await;
    let port = serve.http_port.unwrap();
    let poll = long_poll_wake(pool, port, "user-3", "session-wake").await;
    assert!(
        poll < Duration::from_secs(2),
        "long-poll woke after {poll:?}"
    );
    assert!(
        serve.log_text().contains("cache on"),
        "{}",
        serve.log_text()
    );
    assert_clean(&worker);
    assert_clean(&serve);
}

/// The settings the worker relies on reach the server through transaction pooling, as
/// `SET LOCAL` inside each transaction, and do not stay on the shared server connection;
/// and the reason the mode exists: sqlx's default named statements break there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_survive_transaction_pooling_and_named_statements_do_not() {
    let db = TestDb::new().await;
    // One server connection: every client below shares it.
    let pgb = Bouncer::start("transaction", 1, &[]).await;
    let through = pgb.url(&db.name, "postgres");

    // notifyd's way: the worker's settings, set as `notifyd worker` sets them.
    db::set_pooler(Pooler::Transaction);
    db::set_session_settings(vec![
        ("lock_timeout", "10000".into()),
        ("idle_in_transaction_session_timeout", "5000".into()),
    ]);
    assert!(!db::persistent());
    let a = db::connect(&through, 4, "settings-a").await.unwrap();
    let b = db::connect(&through, 4, "settings-b").await.unwrap();
    for round in 0..20 {
        let pool = if round % 2 == 0 { &a } else { &b };
        // The worker's kind of transaction (the claim's): SHOW inside it.
        let mut tx = db::begin(pool).await.unwrap();
        for (name, want) in [
            ("lock_timeout", "10s"),
            ("idle_in_transaction_session_timeout", "5s"),
            ("client_connection_check_interval", "1s"),
        ] {
            let got: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                .persistent(false)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(got, want, "{name} in round {round}");
        }
        tx.commit().await.unwrap();
        // Statements outside a transaction, with parameters, from both pools in turn.
        let n: i64 = db::fetch_one(pool, sqlx::query_scalar("SELECT $1::int8 * 2").bind(round))
            .await
            .unwrap();
        assert_eq!(n, round * 2);
        db::execute(pool, sqlx::query("SELECT $1::text").bind("x"))
            .await
            .unwrap();
    }
    // Nothing stayed on the shared server connection for other clients.
    let mut other = sqlx::PgConnection::connect(&through).await.unwrap();
    let leaked: Vec<(String,)> = sqlx::query_as(
        "SELECT setting FROM pg_settings
         WHERE name IN ('lock_timeout', 'idle_in_transaction_session_timeout') AND setting <> '0'",
    )
    .persistent(false)
    .fetch_all(&mut other)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(leaked.is_empty(), "settings leaked: {leaked:?}");
    let prepared: String = sqlx::raw_sql("SELECT count(*)::text FROM pg_prepared_statements")
        .fetch_one(&mut other)
        .await
        .map(|row| sqlx::Row::get(&row, 0))
        .unwrap();
    assert_eq!(prepared, "0", "a named statement outlived its transaction");
    assert!(!pgb.log_text().contains("unsupported startup parameter"));
    drop(other);

    // The failure this guards against, with sqlx's defaults: two clients, each preparing
    // its first statement as sqlx_s_1 on the one server connection.
    let mut c1 = sqlx::PgConnection::connect(&through).await.unwrap();
    let mut c2 = sqlx::PgConnection::connect(&through).await.unwrap();
    let _: i32 = sqlx::query_scalar("SELECT $1::int4")
        .bind(1)
        .fetch_one(&mut c1)
        .await
        .unwrap();
    let clash = sqlx::query_scalar::<_, i32>("SELECT $1::int4 + 1")
        .bind(1)
        .fetch_one(&mut c2)
        .await;
    let clash = clash.expect_err("named statements collide on a shared server connection");
    assert!(clash.to_string().contains("prepared statement"), "{clash}");
    drop((c1, c2));
}
