//! Retention and the dead-tuple safety net: what a cleanup pass deletes, and, with
//! autovacuum off for a table (as it is on some servers for all of them), the worker's own
//! check vacuums it once dead tuples pile up.

mod common;

use std::time::{Duration, Instant};

use common::{TestDb, process};

async fn dead_tuples(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'notify' AND relname = 'events'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// 2,000 events in a `notify.events` that autovacuum leaves alone.
async fn events_without_autovacuum(pool: &sqlx::PgPool) {
    sqlx::query("ALTER TABLE notify.events SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT 'u' || g, 'new_message', 'hello ' || g FROM generate_series(1, 2000) AS g",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Two row versions die per event (what recording outcomes does to the table); returns
/// once the statistics show the 4,000 dead tuples.
async fn kill_each_row_twice(pool: &sqlx::PgPool) {
    for _ in 0..2 {
        sqlx::query("UPDATE notify.events SET processed_at = now()")
            .execute(pool)
            .await
            .unwrap();
    }
    // Statistics reach pg_stat_user_tables within about a second.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dead_tuples(pool).await < 4000 {
        assert!(
            Instant::now() < deadline,
            "the dead tuples never showed in the statistics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn dead_tuples_are_vacuumed_even_without_autovacuum() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    events_without_autovacuum(pool).await;
    kill_each_row_twice(pool).await;

    // Below the threshold: nothing happens.
    let none = notifyd::cleanup::vacuum_if_needed(pool, 1_000_000)
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
    assert!(dead_tuples(pool).await >= 4000);

    let vacuumed = notifyd::cleanup::vacuum_if_needed(pool, 1000)
        .await
        .unwrap();
    assert!(
        vacuumed.contains(&"notify.events".to_owned()),
        "{vacuumed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while dead_tuples(pool).await > 0 {
        assert!(Instant::now() < deadline, "the vacuum left dead tuples");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Behind a held snapshot a VACUUM removes nothing, so the net leaves the table alone for a
/// while instead of scanning it again every pass; once the snapshot ends, the next try
/// after the hold removes the dead tuples.
#[tokio::test]
async fn a_vacuum_that_a_held_snapshot_defeats_is_not_repeated_every_pass() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    events_without_autovacuum(pool).await;
    // A snapshot taken before the rows die: it may still see them.
    let mut held = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *held)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM notify.events")
        .execute(&mut *held)
        .await
        .unwrap();
    kill_each_row_twice(pool).await;

    let hold = Duration::from_millis(1500);
    let mut net = notifyd::cleanup::VacuumNet::new(hold);
    let first = net.run(pool, 1000).await.unwrap();
    assert!(first.contains(&"notify.events".to_owned()), "{first:?}");
    assert!(
        dead_tuples(pool).await >= 4000,
        "the held snapshot should have kept the dead tuples"
    );
    // The next passes, still within the hold: the table is left alone.
    for _ in 0..3 {
        let again = net.run(pool, 1000).await.unwrap();
        assert!(!again.contains(&"notify.events".to_owned()), "{again:?}");
    }

    held.rollback().await.unwrap();
    // After the hold, the next pass vacuums again, and this time the tuples go.
    let started = Instant::now();
    let done = loop {
        let r = net.run(pool, 1000).await.unwrap();
        if r.contains(&"notify.events".to_owned()) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the net never tried again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        done + Duration::from_millis(200) >= hold / 2,
        "tried again too soon: {done:?}"
    );
    assert!(
        dead_tuples(pool).await < 4000,
        "the second vacuum removed nothing"
    );
}

/// Rows of `notify.rate_windows` that can no longer change a decision are deleted: no stamp
/// at all (a user whose batches stored nothing still gets a row, which is the store's lock)
/// or only stamps older than the longest window. A recent one stays.
#[tokio::test]
async fn rate_windows_rows_that_cannot_count_are_deleted() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO notify.rate_windows (user_id, stamps, counts) VALUES
             ('empty', '{}', '{}'),
             ('old', ARRAY[now() - interval '8 days'], ARRAY[3]),
             ('recent', ARRAY[now() - interval '1 hour'], ARRAY[2])",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let report = notifyd::cleanup::run_once(&db.pool, notifyd::cleanup::Retention::default())
        .await
        .unwrap();
    assert_eq!(report.rate_windows, 2);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM notify.rate_windows ORDER BY user_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, vec!["recent".to_owned()]);
}

/// Retention: events processed before the window go, whether their record is an outcome
/// on the row (suppressed) or a notification (stored, even one that is itself recent), and
/// so do old notifications; an event never processed stays twice as long; recent ones stay.
#[tokio::test]
async fn retention_deletes_processed_events_and_old_notifications() {
    let db = TestDb::new().await;
    let stored = db.enqueue("r", "new_message", "stored").await;
    let invalid = db.enqueue("r", "new_message", "<script>x</script>").await;
    let pending = db.enqueue("r", "new_message", "never processed").await;
    let ancient = db
        .enqueue("r", "new_message", "never processed, long ago")
        .await;
    let fresh = db.enqueue("r", "new_message", "stored today").await;
    // Enqueued long ago, delivered recently (a delay, or a long outage): the event goes
    // with the retention window, its notification stays for its own.
    let delayed = db.enqueue("r", "new_message", "delivered late").await;
    process(&db.pipeline(), &[stored, invalid, fresh, delayed]).await;
    for (ids, age) in [
        (vec![stored, invalid, pending, delayed], "8 days"),
        (vec![ancient], "15 days"),
    ] {
        sqlx::query(
            "UPDATE notify.events SET created_at = now() - $2::text::interval WHERE id = ANY($1)",
        )
        .bind(&ids)
        .bind(age)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "UPDATE notify.notifications SET created_at = now() - interval '8 days'
         WHERE event_id = $1",
    )
    .bind(stored)
    .execute(&db.pool)
    .await
    .unwrap();
    let report = notifyd::cleanup::run_once(&db.pool, notifyd::cleanup::Retention::default())
        .await
        .unwrap();
    assert_eq!((report.events, report.notifications), (4, 1), "{report:?}");
    let left: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT event_id, outcome FROM notify.event_outcomes ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, vec![(pending, None), (fresh, Some("stored".into()))]);
    let kept: Vec<i64> =
        sqlx::query_scalar("SELECT event_id FROM notify.notifications ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(kept, vec![fresh, delayed]);
}
