//! Digests, critical types and per-type caps through the real pipeline and the real sweep
//! (`notifyd::digest::run_once`), against Postgres. Time is injected wherever a test is
//! about the window; the race tests use the database clock, as production does.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use common::{Runner, TestDb, process};
use notifyd::claim::Step;
use notifyd::digest;
use notifyd::pipeline::Outcome;
use notifyd::store::RateLimit;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Barrier;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).unwrap()
}

fn minutes(m: i64) -> chrono::Duration {
    chrono::Duration::minutes(m)
}

fn hourly(limit: u32) -> RateLimit {
    RateLimit {
        limit,
        window: Duration::from_secs(3600),
    }
}

fn at(db: &TestDb, limit: u32, now: DateTime<Utc>) -> Runner {
    let mut p = db.pipeline();
    p.rate = hourly(limit);
    p.now = Some(now);
    p
}

/// `n` events for one user with one INSERT ... SELECT; ids ascending.
async fn enqueue_n(db: &TestDb, user: &str, event_type: &str, n: i64) -> Vec<i64> {
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT $1, $2, 'event ' || g FROM generate_series(1, $3) AS g
         RETURNING id",
    )
    .bind(user)
    .bind(event_type)
    .bind(n)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    ids.sort_unstable();
    ids
}

fn count(outcomes: &[Outcome], label: &str) -> usize {
    outcomes.iter().filter(|o| o.label() == label).count()
}

async fn sweep(db: &TestDb, limit: u32, now: DateTime<Utc>) -> digest::Report {
    digest::run_once(&db.pool, hourly(limit), Some(now))
        .await
        .expect("the sweep commits")
}

/// The user's digests: `(body, digest)`, oldest first.
async fn digests(pool: &PgPool, user: &str) -> Vec<(String, serde_json::Value)> {
    sqlx::query_as(
        "SELECT body, digest FROM notify.notifications
         WHERE user_id = $1 AND event_type = 'digest' ORDER BY id",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn pending(pool: &PgPool, user: &str) -> Vec<(String, i32)> {
    sqlx::query_as(
        "SELECT event_type, suppressed FROM notify.digest_pending
         WHERE user_id = $1 ORDER BY event_type",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn scalar(pool: &PgPool, sql: &str, user: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The most notifications of `user` matching `filter` (a condition on `m`, the rows
/// counted) in any window of `window` length (windows ending at each of them).
async fn max_in_any_window(pool: &PgPool, user: &str, filter: &str, window: Duration) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COALESCE(max(c), 0) FROM (
             SELECT (SELECT count(*) FROM notify.notifications AS m
                     WHERE m.user_id = n.user_id AND ({filter})
                       AND m.created_at > n.created_at - $2::interval
                       AND m.created_at <= n.created_at) AS c
             FROM notify.notifications AS n WHERE n.user_id = $1) AS w"
    )))
    .bind(user)
    .bind(sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: window.as_micros() as i64,
    })
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn exec(pool: &PgPool, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .map(|_| ())
}

/// The constraint name and SQLSTATE of a refused statement.
async fn refused(pool: &PgPool, sql: &str) -> (String, String) {
    let e = exec(pool, sql).await.expect_err(sql);
    let db = e.as_database_error().expect("a database error");
    (
        db.constraint().unwrap_or_default().to_owned(),
        db.code().unwrap_or_default().into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_suppressed_run_becomes_one_digest_once_the_window_has_room() {
    let db = TestDb::new().await;
    let first = enqueue_n(&db, "42", "new_message", 5).await;
    assert_eq!(
        count(&process(&at(&db, 5, t0()), &first).await, "stored"),
        5
    );
    let mut held = enqueue_n(&db, "42", "new_message", 9).await;
    held.extend(enqueue_n(&db, "42", "status_change", 3).await);
    let out = process(&at(&db, 5, t0() + minutes(1)), &held).await;
    assert_eq!(count(&out, "rate_limited"), 12, "{out:?}");
    assert_eq!(
        pending(&db.pool, "42").await,
        [("new_message".into(), 9), ("status_change".into(), 3)]
    );

    // No room yet: nothing is sent, nothing is lost.
    let r = sweep(&db, 5, t0() + minutes(59)).await;
    assert_eq!((r.users, r.digests), (1, 0));
    assert!(digests(&db.pool, "42").await.is_empty());
    // Looked at once: the next sweeps skip the user until the oldest delivery leaves the
    // window (t0 + 60 min).
    assert_eq!(sweep(&db, 5, t0() + minutes(59)).await.users, 0);

    // The first five have left the window: exactly one digest, and no event arrived.
    let r = sweep(&db, 5, t0() + minutes(61)).await;
    assert_eq!((r.digests, r.events), (1, 12));
    let sent = digests(&db.pool, "42").await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].0,
        "12 more notifications while you were away: 9 new messages, 3 status changes"
    );
    assert_eq!(sent[0].1["total"], 12);
    assert_eq!(sent[0].1["counts"]["new_message"], 9);
    assert_eq!(sent[0].1["counts"]["status_change"], 3);
    assert!(pending(&db.pool, "42").await.is_empty());
    // A second sweep sends nothing more.
    assert_eq!(sweep(&db, 5, t0() + minutes(62)).await.digests, 0);
    assert_eq!(digests(&db.pool, "42").await.len(), 1);

    // The suppressed events stay readable as such.
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM notify.event_outcomes
             WHERE user_id = $1 AND outcome = 'rate_limited'",
            "42"
        )
        .await,
        12
    );
    // The digest counted one against the limit: four new events fit, not five.
    let later = enqueue_n(&db, "42", "new_message", 5).await;
    let out = process(&at(&db, 5, t0() + minutes(62)), &later).await;
    assert_eq!(count(&out, "stored"), 4, "{out:?}");
    assert!(
        max_in_any_window(&db.pool, "42", "true", Duration::from_secs(3600)).await <= 5,
        "the digest is inside the limit"
    );
}

#[tokio::test]
async fn a_job_run_twice_and_a_rolled_back_batch_count_nothing() {
    let db = TestDb::new().await;
    let full = enqueue_n(&db, "42", "new_message", 2).await;
    process(&at(&db, 2, t0()), &full).await;
    let held = enqueue_n(&db, "42", "new_message", 3).await;
    assert_eq!(
        count(&process(&at(&db, 2, t0()), &held).await, "rate_limited"),
        3
    );
    // The same jobs again (a second queue row for each event): duplicates, no count.
    let again = process(&at(&db, 2, t0()), &held).await;
    assert!(again.iter().all(|o| *o == Outcome::Duplicate), "{again:?}");
    assert_eq!(pending(&db.pool, "42").await, [("new_message".into(), 3)]);

    // A batch decided and then rolled back (a crash before commit) leaves no trace.
    let lost = enqueue_n(&db, "42", "status_change", 2).await;
    let pipeline = at(&db, 2, t0());
    let mut tx = db.pool.begin().await.unwrap();
    let answers = pipeline.process_in(&mut tx, &lost).await.unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().unwrap().label() == "rate_limited")
    );
    tx.rollback().await.unwrap();
    assert_eq!(pending(&db.pool, "42").await, [("new_message".into(), 3)]);
    // Processed for real, they count once.
    process(&pipeline, &lost).await;
    assert_eq!(
        pending(&db.pool, "42").await,
        [("new_message".into(), 3), ("status_change".into(), 2)]
    );
    // A sweep that fails after deciding (here: the digest insert refused) commits
    // nothing: the counts wait for the next sweep, which sends them once.
    exec(
        &db.pool,
        "CREATE FUNCTION public.refuse_digest() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
         CREATE TRIGGER refuse_digest BEFORE INSERT ON notify.notifications
             FOR EACH ROW WHEN (NEW.event_type = 'digest')
             EXECUTE FUNCTION public.refuse_digest();",
    )
    .await
    .unwrap();
    assert!(
        digest::run_once(&db.pool, hourly(2), Some(t0() + minutes(61)))
            .await
            .is_err()
    );
    assert_eq!(pending(&db.pool, "42").await.len(), 2);
    exec(
        &db.pool,
        "DROP TRIGGER refuse_digest ON notify.notifications",
    )
    .await
    .unwrap();
    assert_eq!(sweep(&db, 2, t0() + minutes(61)).await.events, 5);
    let sent = digests(&db.pool, "42").await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].0,
        "5 more notifications while you were away: 3 new messages, 2 status changes"
    );
}

#[tokio::test]
async fn opted_out_events_are_never_digested() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'system_alert', false)",
    )
    .await
    .unwrap();
    let full = enqueue_n(&db, "42", "new_message", 2).await;
    process(&at(&db, 2, t0()), &full).await;
    let mut mixed = enqueue_n(&db, "42", "system_alert", 4).await;
    mixed.extend(enqueue_n(&db, "42", "status_change", 2).await);
    mixed.extend(enqueue_n(&db, "42", "new_message", 1).await);
    let out = process(&at(&db, 2, t0()), &mixed).await;
    assert_eq!(count(&out, "opted_out"), 4);
    assert_eq!(count(&out, "rate_limited"), 3);
    assert_eq!(
        pending(&db.pool, "42").await,
        [("new_message".into(), 1), ("status_change".into(), 2)]
    );
    // Switched off after they were held back: dropped from the digest as well.
    exec(
        &db.pool,
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'status_change', false)",
    )
    .await
    .unwrap();
    sweep(&db, 2, t0() + minutes(61)).await;
    let sent = digests(&db.pool, "42").await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].0,
        "1 more notification while you were away: 1 new message"
    );
    assert_eq!(sent[0].1["counts"], serde_json::json!({"new_message": 1}));
}

#[tokio::test]
async fn a_pending_digest_is_not_starved_by_a_steady_stream() {
    let db = TestDb::new().await;
    let full = enqueue_n(&db, "42", "new_message", 3).await;
    process(&at(&db, 3, t0()), &full).await;
    let held = enqueue_n(&db, "42", "new_message", 2).await;
    process(&at(&db, 3, t0() + minutes(1)), &held).await;
    // The window has room for three again; new events take two of them and leave one for
    // the digest, which the sweep then sends with nothing new arriving.
    let stream = enqueue_n(&db, "42", "new_message", 5).await;
    let out = process(&at(&db, 3, t0() + minutes(61)), &stream).await;
    assert_eq!(count(&out, "stored"), 2, "{out:?}");
    let r = sweep(&db, 3, t0() + minutes(61)).await;
    assert_eq!((r.digests, r.events), (1, 5));
    assert_eq!(
        max_in_any_window(&db.pool, "42", "true", Duration::from_secs(3600)).await,
        3
    );
}

// ---------------------------------------------------------------------------------------
// Critical types and per-type caps
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_security_alert_gets_through_after_100_chat_messages_used_the_budget() {
    let db = TestDb::new().await;
    let chat = enqueue_n(&db, "42", "new_message", 101).await;
    let out = process(&at(&db, 100, t0()), &chat).await;
    assert_eq!(count(&out, "stored"), 100);
    assert_eq!(count(&out, "rate_limited"), 1);
    let alert = enqueue_n(&db, "42", "security_alert", 1).await;
    let out = process(&at(&db, 100, t0() + minutes(1)), &alert).await;
    assert!(
        matches!(out[0], Outcome::Stored { critical: true, .. }),
        "{out:?}"
    );
    // And chat is still held back: the alert used its own budget, not the total.
    let more = enqueue_n(&db, "42", "new_message", 1).await;
    assert_eq!(
        count(
            &process(&at(&db, 100, t0() + minutes(2)), &more).await,
            "rate_limited"
        ),
        1
    );
}

#[tokio::test]
async fn the_critical_cap_still_bounds_a_loop() {
    let db = TestDb::new().await;
    // security_alert is seeded critical with a cap of 20 per window.
    let burst = enqueue_n(&db, "42", "security_alert", 30).await;
    let out = process(&at(&db, 100, t0()), &burst).await;
    assert_eq!(count(&out, "stored"), 20);
    assert_eq!(count(&out, "rate_limited"), 10);
    for m in 1..=5 {
        let more = enqueue_n(&db, "42", "security_alert", 3).await;
        let out = process(&at(&db, 100, t0() + minutes(m * 10)), &more).await;
        assert_eq!(count(&out, "rate_limited"), 3, "minute {}", m * 10);
    }
    // The window has passed: the cap again, less the one place kept for the digest of the
    // alerts held back (it waits for the type to have room).
    let later = enqueue_n(&db, "42", "security_alert", 25).await;
    let out = process(&at(&db, 100, t0() + minutes(61)), &later).await;
    assert_eq!(count(&out, "stored"), 19, "{out:?}");
    assert_eq!(
        max_in_any_window(
            &db.pool,
            "42",
            "m.event_type = 'security_alert'",
            Duration::from_secs(3600)
        )
        .await,
        20
    );
    // Held back alerts are digested like any other suppressed event.
    assert_eq!(
        pending(&db.pool, "42").await,
        [("security_alert".into(), 31)]
    );
    // It goes out once the alerts have room, which the kept place gives at once.
    let r = sweep(&db, 100, t0() + minutes(61)).await;
    assert_eq!((r.digests, r.events), (1, 31));
}

/// A type held back by its cap while the user's total has room: one digest for the run,
/// once the type has room again, not one per held back event.
#[tokio::test]
async fn a_capped_type_gets_one_digest_for_its_run() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "UPDATE notify.event_types SET max_per_window = 2 WHERE name = 'status_change'",
    )
    .await
    .unwrap();
    for m in 0..6 {
        let one = enqueue_n(&db, "42", "status_change", 1).await;
        process(&at(&db, 100, t0() + minutes(m)), &one).await;
        assert_eq!(
            sweep(&db, 100, t0() + minutes(m)).await.digests,
            0,
            "minute {m}"
        );
    }
    assert_eq!(pending(&db.pool, "42").await, [("status_change".into(), 4)]);
    // +61 min: the status changes of minutes 0 and 1 have left the window.
    let r = sweep(&db, 100, t0() + minutes(61)).await;
    assert_eq!((r.digests, r.events), (1, 4));
    assert_eq!(
        digests(&db.pool, "42").await[0].0,
        "4 more notifications while you were away: 4 status changes"
    );
}

/// Retention keeps a rate row that holds only critical deliveries (no stamp in the total):
/// deleting it would reset the critical cap.
#[tokio::test]
async fn cleanup_keeps_the_stamps_of_critical_deliveries() {
    let db = TestDb::new().await;
    let mut p = db.pipeline();
    p.rate = hourly(100);
    let alerts = enqueue_n(&db, "42", "security_alert", 20).await;
    assert_eq!(count(&process(&p, &alerts).await, "stored"), 20);
    notifyd::cleanup::run_once(&db.pool, notifyd::cleanup::Retention::default())
        .await
        .unwrap();
    let one_more = enqueue_n(&db, "42", "security_alert", 1).await;
    assert_eq!(
        count(&process(&p, &one_more).await, "rate_limited"),
        1,
        "the cap still counts the 20"
    );
}

#[tokio::test]
async fn a_per_type_cap_is_exact_and_does_not_use_the_total() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "UPDATE notify.event_types SET max_per_window = 3 WHERE name = 'status_change'",
    )
    .await
    .unwrap();
    // Interleaved: the cap takes the 4th and later status changes, and those do not use
    // the user's total, so every chat message fits (limit 8 = 3 + 5).
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.extend(enqueue_n(&db, "42", "status_change", 2).await);
        ids.extend(enqueue_n(&db, "42", "new_message", 1).await);
    }
    let out = process(&at(&db, 8, t0()), &ids).await;
    assert_eq!(count(&out, "stored"), 8, "{out:?}");
    assert_eq!(pending(&db.pool, "42").await, [("status_change".into(), 7)]);
    // Across batches and time: still full at +59 min, room again at +61 min.
    let more = enqueue_n(&db, "42", "status_change", 1).await;
    assert_eq!(
        count(
            &process(&at(&db, 100, t0() + minutes(59)), &more).await,
            "rate_limited"
        ),
        1
    );
    // Room again at +61 min: three places, one kept for the digest of the held back
    // status changes.
    let later = enqueue_n(&db, "42", "status_change", 5).await;
    assert_eq!(
        count(
            &process(&at(&db, 100, t0() + minutes(61)), &later).await,
            "stored"
        ),
        2
    );
    assert_eq!(
        max_in_any_window(
            &db.pool,
            "42",
            "m.event_type = 'status_change'",
            Duration::from_secs(3600)
        )
        .await,
        3
    );
    // A cap set later counts from the moment it is set (jobs/README.md): the 4 chat
    // messages before it are not counted, the ones after it are, exactly.
    let chat = enqueue_n(&db, "42", "new_message", 4).await;
    process(&at(&db, 100, t0() + minutes(62)), &chat).await;
    exec(
        &db.pool,
        "UPDATE notify.event_types SET max_per_window = 5 WHERE name = 'new_message'",
    )
    .await
    .unwrap();
    let chat = enqueue_n(&db, "42", "new_message", 3).await;
    let out = process(&at(&db, 100, t0() + minutes(63)), &chat).await;
    assert_eq!(
        count(&out, "stored"),
        3,
        "0 counted + 3 <= the new cap: {out:?}"
    );
    let chat = enqueue_n(&db, "42", "new_message", 4).await;
    let out = process(&at(&db, 100, t0() + minutes(64)), &chat).await;
    assert_eq!(count(&out, "stored"), 2, "3 + 2 = the new cap: {out:?}");
}

/// Three worker replicas (three processors on their own pools, each driving the worker's
/// claim to an empty queue) and a digest sweep, racing on a few users with a mix of capped,
/// critical and plain types, on the database clock. Every cap holds, and every suppressed
/// event is in exactly one digest or still pending.
#[tokio::test]
async fn three_replicas_racing_keep_every_cap_exact() {
    const LIMIT: u32 = 30;
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "UPDATE notify.event_types SET max_per_window = 7 WHERE name = 'status_change';
         UPDATE notify.event_types SET max_per_window = 5 WHERE name = 'security_alert';",
    )
    .await
    .unwrap();
    let users = ["alice", "bob", "carol"];
    // Interleaved types per user, so batches mix them.
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT u, (ARRAY['new_message', 'status_change', 'security_alert', 'new_message'])[1 + g % 4],
                'event ' || g
         FROM unnest($1::text[]) AS u, generate_series(1, 120) AS g
         ORDER BY g, u",
    )
    .bind(&users[..])
    .execute(&db.pool)
    .await
    .unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let mut replicas = Vec::new();
    for r in 0..3 {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db.url)
            .await
            .unwrap();
        let p = common::processor(&pool, hourly(LIMIT), &format!("replica-{r}")).await;
        let barrier = barrier.clone();
        replicas.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut answers = Vec::new();
            loop {
                match p.run_once(13).await.expect("a batch commits") {
                    Step::Processed(a) => answers.extend(a.into_iter().map(|a| a.unwrap())),
                    Step::EmptyQueue => return answers,
                }
            }
        }));
    }
    let sweeper = {
        let pool = db.pool.clone();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            for _ in 0..20 {
                digest::run_once(&pool, hourly(LIMIT), None).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut all = Vec::new();
    for r in replicas {
        all.extend(r.await.unwrap());
    }
    sweeper.await.unwrap();
    // Once the queue is empty, one more sweep: it sends nothing, since every user's held
    // back types are still at their caps for the hour.
    digest::run_once(&db.pool, hourly(LIMIT), None)
        .await
        .unwrap();
    assert_eq!(all.len(), 360);
    assert_eq!(db.live_jobs().await, 0);
    let hour = Duration::from_secs(3600);
    for user in users {
        // 60 chat, 30 status changes, 30 alerts offered per user.
        let by_type = |t: &'static str| {
            let pool = db.pool.clone();
            async move {
                scalar(
                    &pool,
                    &format!(
                        "SELECT count(*) FROM notify.notifications
                         WHERE user_id = $1 AND event_type = '{t}'"
                    ),
                    user,
                )
                .await
            }
        };
        let (chat, status, alerts, sent) = (
            by_type("new_message").await,
            by_type("status_change").await,
            by_type("security_alert").await,
            by_type("digest").await,
        );
        assert!(status <= 7, "{user}: {status} status changes");
        assert_eq!(alerts, 5, "{user}");
        // The total: the limit of non-critical notifications, or one less when a digest
        // became pending (a cap held back status changes) before the total was full: its
        // place is kept, and it waits for the status cap's window (an hour here).
        let total = chat + status + sent;
        assert!(
            total == i64::from(LIMIT) || total == i64::from(LIMIT) - 1,
            "{user}: {total}"
        );
        assert_eq!(
            sent, 0,
            "{user}: the held back types are still at their caps"
        );
        assert!(
            max_in_any_window(&db.pool, user, "m.event_type <> 'security_alert'", hour).await
                <= i64::from(LIMIT)
        );
        assert!(
            max_in_any_window(&db.pool, user, "m.event_type = 'status_change'", hour).await <= 7
        );
        let suppressed = scalar(
            &db.pool,
            "SELECT count(*) FROM notify.events WHERE user_id = $1 AND outcome = 'rate_limited'",
            user,
        )
        .await;
        let waiting = scalar(
            &db.pool,
            "SELECT COALESCE(sum(suppressed), 0)::bigint FROM notify.digest_pending
             WHERE user_id = $1",
            user,
        )
        .await;
        let digested = scalar(
            &db.pool,
            "SELECT COALESCE(sum((digest->>'total')::bigint), 0)::bigint
             FROM notify.notifications WHERE user_id = $1 AND event_type = 'digest'",
            user,
        )
        .await;
        assert_eq!(suppressed, 120 - (chat + status + alerts), "{user}");
        assert_eq!(
            waiting + digested,
            suppressed,
            "{user}: every suppressed event is pending or digested, once"
        );
    }
    assert_eq!(
        all.iter()
            .filter(|o| matches!(o, Outcome::Stored { critical: true, .. }))
            .count(),
        15
    );
}

/// Store batches and digest sweeps racing for one user on the database clock with a short
/// window, so that room opens again and again while events keep coming: the limit holds
/// with the digests counted, and every suppressed event ends in exactly one digest.
#[tokio::test]
async fn the_sweep_racing_the_store_keeps_the_limit_and_the_counts() {
    const LIMIT: u32 = 4;
    let window = Duration::from_millis(400);
    let rate = RateLimit {
        limit: LIMIT,
        window,
    };
    let db = TestDb::new().await;
    let ids = enqueue_n(&db, "racer", "new_message", 150).await;
    let barrier = Arc::new(Barrier::new(3));
    let mut tasks = Vec::new();
    for t in 0..2 {
        let mine: Vec<i64> = ids.iter().skip(t).step_by(2).copied().collect();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db.url)
            .await
            .unwrap();
        let p = Runner::new(pool, rate);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for chunk in mine.chunks(3) {
                process(&p, chunk).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeper = {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db.url)
            .await
            .unwrap();
        let barrier = barrier.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += digest::run_once(&pool, rate, None).await.unwrap().digests;
            }
            sent
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent_while_racing = sweeper.await.unwrap();
    // The last run's digest: room opens once the window has passed (polled, not guessed).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pending(&db.pool, "racer").await.is_empty() {
        digest::run_once(&db.pool, rate, None).await.unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "the digest never went out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let suppressed = scalar(
        &db.pool,
        "SELECT count(*) FROM notify.events WHERE user_id = $1 AND outcome = 'rate_limited'",
        "racer",
    )
    .await;
    let digested = scalar(
        &db.pool,
        "SELECT COALESCE(sum((digest->>'total')::bigint), 0)::bigint FROM notify.notifications
         WHERE user_id = $1 AND event_type = 'digest'",
        "racer",
    )
    .await;
    assert!(suppressed > 0, "the test must push past the limit");
    assert!(sent_while_racing > 0, "the sweep must have raced the store");
    assert_eq!(
        digested, suppressed,
        "every suppressed event in exactly one digest"
    );
    assert!(max_in_any_window(&db.pool, "racer", "true", window).await <= i64::from(LIMIT));
}

// ---------------------------------------------------------------------------------------
// Bad values: named constraints
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_values_fail_with_named_constraints() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let check = "23514".to_owned();
    assert_eq!(
        refused(
            p,
            "UPDATE notify.event_types SET max_per_window = -1 WHERE name = 'new_message'"
        )
        .await,
        (
            "event_types_max_per_window_not_negative".into(),
            check.clone()
        )
    );
    assert_eq!(
        refused(
            p,
            "UPDATE notify.event_types SET critical = true WHERE name = 'new_message'"
        )
        .await,
        ("event_types_critical_needs_cap".into(), check.clone())
    );
    assert_eq!(
        refused(
            p,
            "UPDATE notify.event_types SET critical = true, max_per_window = 0
             WHERE name = 'new_message'"
        )
        .await,
        ("event_types_critical_needs_cap".into(), check.clone())
    );
    assert_eq!(
        refused(
            p,
            "UPDATE notify.event_types SET max_per_window = 5 WHERE name = 'digest'"
        )
        .await,
        ("event_types_digest_fixed".into(), check.clone())
    );
    assert_eq!(
        refused(
            p,
            "UPDATE notify.event_types SET digest_label = '<b>x</b>' WHERE name = 'new_message'"
        )
        .await,
        ("event_types_digest_label_format".into(), check.clone())
    );
    // A critical type (or digests) cannot be switched off, by INSERT or by the documented
    // upsert; an unknown type is refused by its foreign key.
    for sql in [
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'security_alert', false)",
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'security_alert', true)
         ON CONFLICT (user_id, event_type) DO UPDATE SET enabled = EXCLUDED.enabled;
         INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'security_alert', false)
         ON CONFLICT (user_id, event_type) DO UPDATE SET enabled = EXCLUDED.enabled",
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'security_alert', true);
         UPDATE notify.preferences SET enabled = false WHERE user_id = '42'",
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'digest', false)",
    ] {
        assert_eq!(
            refused(p, sql).await,
            ("preferences_type_always_on".into(), check.clone()),
            "{sql}"
        );
    }
    assert_eq!(
        refused(
            p,
            "INSERT INTO notify.preferences (user_id, event_type, enabled)
             VALUES ('42', 'no_such_type', false)"
        )
        .await,
        ("preferences_event_type_known".into(), "23503".into())
    );
    // The backend cannot enqueue a digest: the worker writes them.
    assert_eq!(
        refused(
            p,
            "INSERT INTO notify.events (user_id, event_type, body) VALUES ('42', 'digest', 'x')"
        )
        .await,
        ("events_event_type_not_digest".into(), check.clone())
    );
    // A switch that was off before its type became critical is ignored.
    exec(
        p,
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ('42', 'system_alert', false);
         UPDATE notify.event_types SET critical = true, max_per_window = 10
         WHERE name = 'system_alert'",
    )
    .await
    .unwrap();
    let id = db
        .enqueue("42", "system_alert", "Maintenance tonight")
        .await;
    let out = process(&db.pipeline(), &[id]).await;
    assert!(
        matches!(out[0], Outcome::Stored { critical: true, .. }),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Operators: `notifyd status` and /metrics
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn status_and_metrics_show_held_back_events_digests_and_critical_deliveries() {
    notifyd::telemetry::series::install();
    let db = TestDb::new().await;
    let mut p = db.pipeline();
    p.rate = hourly(1);
    let mut ids = enqueue_n(&db, "ops", "new_message", 3).await;
    ids.extend(enqueue_n(&db, "ops", "status_change", 1).await);
    ids.extend(enqueue_n(&db, "ops", "security_alert", 1).await);
    let out = process(&p, &ids).await;
    assert_eq!(count(&out, "rate_limited"), 3, "{out:?}");

    let s = notifyd::ops::queries::digest_stats(&db.pool).await.unwrap();
    assert_eq!(s.suppressed_last_hour["new_message"], 2);
    assert_eq!(s.suppressed_last_hour["status_change"], 1);
    assert_eq!((s.pending_users, s.pending_events), (1, 3));
    assert_eq!(s.critical_last_hour["security_alert"], 1);
    assert_eq!(s.digests_last_hour, 0);

    // The window has passed for the sweep: the digest goes out.
    digest::run_once(&db.pool, hourly(1), Some(Utc::now() + minutes(61)))
        .await
        .unwrap();
    let status = notifyd::ops::queries::status(&db.pool, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(status.digests.digests_last_hour, 1);
    assert_eq!(status.digests.pending_events, 0);
    let text = notifyd::ops::render_status(&status);
    println!("FIGURES `notifyd status`:\n{text}");
    for want in [
        "held back",
        "new_message",
        "digests sent",
        "critical delivered",
        "security_alert",
        "waiting for room: 0 digests",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.contains("digests sent") && l.trim_end().ends_with(" 1")),
        "{text}"
    );

    let metrics = notifyd::telemetry::series::render();
    for want in [
        "notifyd_suppressed_total{event_type=\"new_message\"}",
        "notifyd_suppressed_total{event_type=\"status_change\"}",
        "notifyd_critical_deliveries_total",
        "notifyd_digests_sent_total",
        "notifyd_digest_events_total",
    ] {
        assert!(
            metrics.contains(want),
            "{want} missing from /metrics:\n{metrics}"
        );
    }
}
