//! Policy through the real pipeline: preferences, and the per-user rolling-window rate
//! limit, including its exactness when several pipelines (replicas) race on one user.
//! Time is injected (`Runner`'s `now`) wherever the test is about the window.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use common::{Runner, TestDb, process};
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

/// Enqueue `n` events for one user with one INSERT ... SELECT; ids in ascending order.
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

fn pipeline_at(db: &TestDb, limit: u32, now: DateTime<Utc>) -> Runner {
    let mut p = db.pipeline();
    p.rate = RateLimit {
        limit,
        window: Duration::from_secs(3600),
    };
    p.now = Some(now);
    p
}

/// A `new_message` held back by the limit.
fn limited() -> Outcome {
    Outcome::RateLimited {
        event_type: "new_message".into(),
    }
}

fn labels(outcomes: &[Outcome]) -> Vec<&'static str> {
    outcomes.iter().map(Outcome::label).collect()
}

fn count(outcomes: &[Outcome], label: &str) -> usize {
    outcomes.iter().filter(|o| o.label() == label).count()
}

/// Each id's outcome (`notify.event_outcomes`), in the order of `ids`.
async fn recorded(pool: &PgPool, ids: &[i64]) -> Vec<Option<String>> {
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT event_id, outcome FROM notify.event_outcomes WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap();
    let map: HashMap<i64, Option<String>> = rows.into_iter().collect();
    ids.iter().map(|id| map[id].clone()).collect()
}

async fn stored_for(db: &TestDb, user: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notify.notifications WHERE user_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The most notifications the user has in any window of `window` length (windows ending at
/// each of the user's notifications, which is where the maximum is reached).
async fn max_in_any_window(db: &TestDb, user: &str, window: Duration) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(max(c), 0) FROM (
             SELECT (SELECT count(*) FROM notify.notifications AS m
                     WHERE m.user_id = n.user_id
                       AND m.created_at > n.created_at - $2::interval
                       AND m.created_at <= n.created_at) AS c
             FROM notify.notifications AS n WHERE n.user_id = $1) AS w",
    )
    .bind(user)
    .bind(sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: window.as_micros() as i64,
    })
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn set_preference(db: &TestDb, user: &str, event_type: &str, enabled: bool) {
    // The upsert documented in jobs/README.md.
    sqlx::query(
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         VALUES ($1, $2, $3)
         ON CONFLICT (user_id, event_type)
         DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now()",
    )
    .bind(user)
    .bind(event_type)
    .bind(enabled)
    .execute(&db.pool)
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Preferences
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn preferences_missing_row_means_enabled_and_switches_apply_per_type() {
    let db = TestDb::new().await;
    let p = db.pipeline();

    // No preference rows at all: every type is delivered.
    let mut ids = Vec::new();
    for ty in ["new_message", "status_change", "system_alert"] {
        ids.push(db.enqueue("42", ty, "hello").await);
    }
    assert_eq!(
        labels(&process(&p, &ids).await),
        ["stored", "stored", "stored"]
    );

    // Switched off: that type is opted_out (recorded, not delivered), other types and other
    // users are untouched.
    set_preference(&db, "42", "new_message", false).await;
    let off = db.enqueue("42", "new_message", "muted").await;
    let other_type = db.enqueue("42", "status_change", "still delivered").await;
    let other_user = db.enqueue("43", "new_message", "other user").await;
    let out = process(&p, &[off, other_type, other_user]).await;
    assert_eq!(labels(&out), ["opted_out", "stored", "stored"]);
    assert_eq!(
        recorded(&db.pool, &[off, other_type, other_user]).await,
        [
            Some("opted_out".into()),
            Some("stored".into()),
            Some("stored".into())
        ]
    );
    let muted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notify.notifications WHERE event_id = $1")
            .bind(off)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(muted, 0);
    let (outcome_reason, processed): (Option<String>, bool) = sqlx::query_as(
        "SELECT outcome_reason, processed_at IS NOT NULL FROM notify.event_outcomes WHERE event_id = $1",
    )
    .bind(off)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((outcome_reason, processed), (None, true));

    // An explicit `enabled = true` row is the same as no row; switching back on works, and
    // the upsert really updates the existing row.
    set_preference(&db, "42", "new_message", true).await;
    set_preference(&db, "42", "status_change", true).await;
    let on_again = db.enqueue("42", "new_message", "unmuted").await;
    let explicit = db.enqueue("42", "status_change", "explicitly on").await;
    assert_eq!(
        labels(&process(&p, &[on_again, explicit]).await),
        ["stored", "stored"]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.preferences WHERE user_id = '42'")
            .await,
        2
    );

    // A switch turned off after enqueue but before processing applies (it is read when the
    // event is processed).
    let queued = db
        .enqueue("42", "system_alert", "queued before the switch")
        .await;
    set_preference(&db, "42", "system_alert", false).await;
    assert_eq!(labels(&process(&p, &[queued]).await), ["opted_out"]);
}

// ---------------------------------------------------------------------------------------
// Rate limit
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_101st_in_one_batch_is_rate_limited() {
    let db = TestDb::new().await;
    let p = pipeline_at(&db, 100, t0());
    let mut ids = enqueue_n(&db, "42", "new_message", 101).await;
    let other = enqueue_n(&db, "43", "new_message", 5).await;
    ids.extend(&other);
    let out = process(&p, &ids).await;
    // Admitted in event order: the first 100 of user 42, then the 101st is refused.
    assert!(out[..100].iter().all(|o| o.label() == "stored"), "{out:?}");
    assert_eq!(out[100], limited());
    assert!(
        out[101..].iter().all(|o| o.label() == "stored"),
        "user 43 is not limited by 42"
    );
    let rec = recorded(&db.pool, &ids[..101]).await;
    assert_eq!(
        rec.iter()
            .filter(|o| o.as_deref() == Some("stored"))
            .count(),
        100
    );
    assert_eq!(rec[100].as_deref(), Some("rate_limited"));
    assert_eq!(stored_for(&db, "42").await, 100);
    assert_eq!(stored_for(&db, "43").await, 5);
    // The suppressed event is visible to an operator, not dropped.
    let suppressed = db
        .count(
            "SELECT count(*) FROM notify.events
             WHERE outcome = 'rate_limited' AND user_id = '42' AND processed_at IS NOT NULL",
        )
        .await;
    assert_eq!(suppressed, 1);
}

#[tokio::test]
async fn the_101st_across_batches_is_rate_limited_until_the_window_passes() {
    let db = TestDb::new().await;
    let ids = enqueue_n(&db, "42", "new_message", 100).await;
    // 100 in three batches a minute apart: all stored.
    for (i, chunk) in [&ids[..30], &ids[30..60], &ids[60..]]
        .into_iter()
        .enumerate()
    {
        let p = pipeline_at(&db, 100, t0() + minutes(i as i64));
        let out = process(&p, chunk).await;
        assert_eq!(count(&out, "stored"), chunk.len());
    }
    // The 101st, a little later, in its own batch.
    let extra = enqueue_n(&db, "42", "new_message", 2).await;
    let out = process(&pipeline_at(&db, 100, t0() + minutes(3)), &extra[..1]).await;
    assert_eq!(out, vec![limited()]);
    assert_eq!(
        recorded(&db.pool, &extra[..1]).await,
        [Some("rate_limited".into())]
    );
    // 59 minutes after the first batch: still full.
    let out = process(&pipeline_at(&db, 100, t0() + minutes(59)), &extra[1..]).await;
    assert_eq!(out, vec![limited()]);
    // 60½ minutes after the first batch its 30 have left the window, the second batch's
    // have not (it was a minute later): exactly 30 more fit, of which one is kept for the
    // digest of the two held back (the digest sweep sends it; none runs here).
    let more = enqueue_n(&db, "42", "new_message", 31).await;
    let at = t0() + minutes(60) + chrono::Duration::seconds(30);
    let out = process(&pipeline_at(&db, 100, at), &more).await;
    assert_eq!(count(&out, "stored"), 29, "{:?}", labels(&out));
    assert_eq!(out[29], limited());
    assert_eq!(out[30], limited());
    assert_eq!(stored_for(&db, "42").await, 129);
    assert_eq!(
        max_in_any_window(&db, "42", Duration::from_secs(3600)).await,
        100
    );
}

#[tokio::test]
async fn the_window_slides_rather_than_resetting() {
    let db = TestDb::new().await;
    let first = enqueue_n(&db, "42", "new_message", 50).await;
    let second = enqueue_n(&db, "42", "new_message", 50).await;
    assert_eq!(
        count(
            &process(&pipeline_at(&db, 100, t0()), &first).await,
            "stored"
        ),
        50
    );
    assert_eq!(
        count(
            &process(&pipeline_at(&db, 100, t0() + minutes(30)), &second).await,
            "stored"
        ),
        50
    );
    // At t0+59min all 100 are inside the window.
    let a = enqueue_n(&db, "42", "new_message", 1).await;
    assert_eq!(
        process(&pipeline_at(&db, 100, t0() + minutes(59)), &a).await,
        vec![limited()]
    );
    // At t0+61min the first 50 have left; the 50 from t0+30min have not.
    let b = enqueue_n(&db, "42", "new_message", 1).await;
    assert!(matches!(
        process(&pipeline_at(&db, 100, t0() + minutes(61)), &b).await[0],
        Outcome::Stored { .. }
    ));
    // So at t0+61min there is room for 49 more, not 99 (a fixed hourly bucket would allow
    // it), one of which is kept for the digest of the event held back at t0+59min.
    let c = enqueue_n(&db, "42", "new_message", 60).await;
    let out = process(&pipeline_at(&db, 100, t0() + minutes(61)), &c).await;
    assert_eq!(count(&out, "stored"), 48, "{:?}", labels(&out));
    assert_eq!(count(&out, "rate_limited"), 12);
    // At t0+91min the t0+30min batch has left too: 50 more fit.
    let d = enqueue_n(&db, "42", "new_message", 51).await;
    let out = process(&pipeline_at(&db, 100, t0() + minutes(91)), &d).await;
    assert_eq!(count(&out, "stored"), 50, "{:?}", labels(&out));
    assert_eq!(out[50], limited());
    assert_eq!(
        max_in_any_window(&db, "42", Duration::from_secs(3600)).await,
        100
    );
}

#[tokio::test]
async fn the_limit_and_the_window_are_configurable() {
    let db = TestDb::new().await;
    let rate = RateLimit {
        limit: 3,
        window: Duration::from_secs(600),
    };
    let at = |t| {
        let mut p = db.pipeline();
        p.rate = rate;
        p.now = Some(t);
        p
    };
    let ids = enqueue_n(&db, "42", "new_message", 5).await;
    let out = process(&at(t0()), &ids).await;
    assert_eq!(
        labels(&out),
        ["stored", "stored", "stored", "rate_limited", "rate_limited"]
    );
    let one = enqueue_n(&db, "42", "new_message", 1).await;
    assert_eq!(process(&at(t0() + minutes(9)), &one).await, vec![limited()]);
    // The window has passed: 3 fit, one kept for the pending digest of the three held back.
    let three = enqueue_n(&db, "42", "new_message", 4).await;
    let out = process(&at(t0() + minutes(11)), &three).await;
    assert_eq!(
        labels(&out),
        ["stored", "stored", "rate_limited", "rate_limited"]
    );
    assert_eq!(
        max_in_any_window(&db, "42", Duration::from_secs(600)).await,
        3
    );
}

#[tokio::test]
async fn rate_limited_events_do_not_consume_the_limit() {
    let db = TestDb::new().await;
    let first = enqueue_n(&db, "42", "new_message", 3).await;
    assert_eq!(
        count(&process(&pipeline_at(&db, 3, t0()), &first).await, "stored"),
        3
    );
    // Five refused half an hour later ...
    let refused = enqueue_n(&db, "42", "new_message", 5).await;
    assert_eq!(
        count(
            &process(&pipeline_at(&db, 3, t0() + minutes(30)), &refused).await,
            "rate_limited"
        ),
        5
    );
    // ... do not count: at t0+61min the window holds none of the stored ones, so three fit
    // (if refusals counted, the five from t0+30min would fill it): their one digest and two
    // of the new events.
    let later = enqueue_n(&db, "42", "new_message", 3).await;
    assert_eq!(
        labels(&process(&pipeline_at(&db, 3, t0() + minutes(61)), &later).await),
        ["stored", "stored", "rate_limited"]
    );
}

#[tokio::test]
async fn opted_out_and_invalid_events_do_not_consume_the_limit() {
    let db = TestDb::new().await;
    set_preference(&db, "42", "new_message", false).await;
    // Interleave, so the refused events have lower ids than the ones that should be stored.
    let mut ids = Vec::new();
    ids.push(db.enqueue("42", "new_message", "muted 1").await);
    ids.push(db.enqueue("42", "new_message", "muted 2").await);
    ids.push(db.enqueue("42", "status_change", "one").await);
    ids.push(
        db.enqueue("42", "system_alert", "<script>alert(1)</script>")
            .await,
    );
    ids.push(db.enqueue("42", "new_message", "muted 3").await);
    ids.push(db.enqueue("42", "status_change", "two").await);
    ids.push(db.enqueue("42", "status_change", "three").await);
    ids.push(db.enqueue("42", "status_change", "four").await);
    let out = process(&pipeline_at(&db, 3, t0()), &ids).await;
    assert_eq!(
        labels(&out),
        [
            "opted_out",
            "opted_out",
            "stored",
            "invalid",
            "opted_out",
            "stored",
            "stored",
            "rate_limited"
        ]
    );
    // In a later batch too: opted-out and invalid events before it did not use up the limit,
    // and the stored three did.
    let muted_again = db.enqueue("42", "new_message", "muted 4").await;
    let late = db.enqueue("42", "status_change", "five").await;
    assert_eq!(
        labels(
            &process(
                &pipeline_at(&db, 3, t0() + minutes(1)),
                &[muted_again, late]
            )
            .await
        ),
        ["opted_out", "rate_limited"]
    );
    assert_eq!(stored_for(&db, "42").await, 3);
}

/// N pipelines, each with its own connection pool (like replicas), process disjoint sets of
/// one user's events at the same moment, in small batches. The database clock is used, as in
/// production. The limit holds exactly: never more, and no fewer when more are offered.
#[tokio::test]
async fn racing_pipelines_never_store_more_than_the_limit() {
    const TASKS: usize = 4;
    const PER_TASK: usize = 60;
    const LIMIT: u32 = 100;
    let db = TestDb::new().await;
    let hot = enqueue_n(&db, "racer", "new_message", (TASKS * PER_TASK) as i64).await;
    let calm = enqueue_n(&db, "calm", "status_change", (TASKS * 10) as i64).await;
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        // Disjoint, interleaved sets: task t gets every TASKS-th event.
        let mine: Vec<i64> = hot
            .iter()
            .chain(&calm)
            .enumerate()
            .filter(|(i, _)| i % TASKS == t)
            .map(|(_, id)| *id)
            .collect();
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&db.url)
            .await
            .unwrap();
        let p = Runner::new(
            pool,
            RateLimit {
                limit: LIMIT,
                window: Duration::from_secs(3600),
            },
        );
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut outcomes = Vec::new();
            for chunk in mine.chunks(7) {
                outcomes.extend(process(&p, chunk).await);
            }
            outcomes
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), TASKS * PER_TASK + TASKS * 10);
    assert_eq!(stored_for(&db, "racer").await, i64::from(LIMIT));
    assert_eq!(stored_for(&db, "calm").await, (TASKS * 10) as i64);
    assert_eq!(count(&all, "stored"), LIMIT as usize + TASKS * 10);
    assert_eq!(
        count(&all, "rate_limited"),
        TASKS * PER_TASK - LIMIT as usize
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.event_outcomes WHERE outcome IS NULL")
            .await,
        0,
        "every event has an outcome"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.events
             WHERE user_id = 'racer' AND outcome = 'rate_limited'"
        )
        .await,
        (TASKS * PER_TASK) as i64 - i64::from(LIMIT)
    );
    assert!(max_in_any_window(&db, "racer", Duration::from_secs(3600)).await <= i64::from(LIMIT));
}

/// The same events processed by two pipelines at the same moment (a job run twice, e.g.
/// adopted from apalis.jobs by `notifyd migrate` while a worker of an older release still
/// ran it): exactly one notification per event, and exactly one of the two runs reports it
/// stored. Each round hands both pipelines the whole set as one batch, so both
/// load the events before either has committed, and the second decides under the lock
/// after the first committed.
#[tokio::test]
async fn the_same_events_processed_concurrently_are_stored_once() {
    const ROUNDS: usize = 5;
    let db = TestDb::new().await;
    let mut pipelines = Vec::new();
    for _ in 0..2 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&db.url)
            .await
            .unwrap();
        pipelines.push(Runner::new(pool, RateLimit::default()));
    }
    let mut total = 0;
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for u in 0..5 {
            ids.extend(enqueue_n(&db, &format!("user-{round}-{u}"), "new_message", 20).await);
        }
        total += ids.len();
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for p in &pipelines {
            let p = p.clone();
            let ids = ids.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                process(&p, &ids).await
            }));
        }
        let a = tasks.remove(0).await.unwrap();
        let b = tasks.remove(0).await.unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let stored = [x, y]
                .iter()
                .filter(|o| matches!(o, Outcome::Stored { .. }))
                .count();
            let dup = [x, y]
                .iter()
                .filter(|o| matches!(o, Outcome::Duplicate))
                .count();
            assert_eq!(
                (stored, dup),
                (1, 1),
                "round {round}, event {}: {x:?} / {y:?}",
                ids[i]
            );
        }
    }
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        total as i64
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM (SELECT event_id FROM notify.notifications
             GROUP BY event_id HAVING count(*) > 1) AS d"
        )
        .await,
        0
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.event_outcomes WHERE outcome IS DISTINCT FROM 'stored'"
        )
        .await,
        0
    );
}
