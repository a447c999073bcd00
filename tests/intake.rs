//! The intake (`claim::intake`, migration 20261208000001): with the enqueue trigger off,
//! workers take committed events into the queue. What must hold: every committed event is
//! queued exactly once, whatever ran beside it (rolled-back transactions and savepoints,
//! a transaction held open, a big one, two workers taking in at once, the rotation, the
//! switch both ways); nothing of an uncommitted transaction is walked; the checks at
//! INSERT are unchanged.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::TestDb;
use notifyd::claim::Step;
use notifyd::claim::intake;
use notifyd::claim::rotation;
use notifyd::store::RateLimit;
use sqlx::{Connection, PgConnection, PgPool};

/// Queued jobs: (all rows, distinct event ids).
async fn queued(pool: &PgPool) -> (i64, BTreeSet<i64>) {
    let ids: Vec<i64> = sqlx::query_scalar("SELECT event_id FROM notify.queue")
        .fetch_all(pool)
        .await
        .unwrap();
    (ids.len() as i64, ids.into_iter().collect())
}

async fn all_events(pool: &PgPool) -> BTreeSet<i64> {
    sqlx::query_scalar::<_, i64>("SELECT id FROM notify.events")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn switch(pool: &PgPool, to: &str) {
    assert_eq!(intake::switch(pool, to).await.expect("switch"), to);
    assert_eq!(intake::mode(pool).await.unwrap(), to);
}

/// One inserting client: transactions of every shape, until `stop`. Returns the ids it
/// committed.
async fn insert_until(url: String, client: u32, stop: Arc<AtomicBool>) -> Vec<i64> {
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut committed = Vec::new();
    let mut round: u32 = 0;
    while !stop.load(Ordering::Relaxed) || round < 20 {
        round += 1;
        let user = format!("c{client}-{}", round % 7);
        let mut tx = conn.begin().await.unwrap();
        let kind = (round + client) % 6;
        let rows = match kind {
            0 | 1 => 1,
            2 => 3,
            3 => 2,                               // rolled back
            4 => 2,                               // one row kept, one in a rolled-back savepoint
            _ if round.is_multiple_of(25) => 700, // a big transaction (above the chunk size)
            _ => 1,
        };
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO notify.events (user_id, event_type, body)
             SELECT $1, CASE WHEN g % 2 = 0 THEN 'new_message' ELSE 'system_alert' END, 'b ' || g
             FROM generate_series(1, $2) AS g RETURNING id",
        )
        .bind(&user)
        .bind(if kind == 4 { 1 } else { rows })
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        if kind == 4 {
            sqlx::query("SAVEPOINT s").execute(&mut *tx).await.unwrap();
            sqlx::query("INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', 'gone')")
                .bind(&user)
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("ROLLBACK TO SAVEPOINT s")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        if kind == 3 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.extend(ids);
        }
    }
    committed
}

/// `rows` system_alert events for users `{prefix}1..`, in one transaction (a broadcast).
async fn broadcast(pool: &PgPool, prefix: &str, rows: i64) {
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT $2 || g, 'system_alert', 'broadcast' FROM generate_series(1, $1) AS g",
    )
    .bind(rows)
    .bind(prefix)
    .execute(pool)
    .await
    .unwrap();
}

/// Take in until `stop`, as a worker does beside the inserts; the rows taken in. (The
/// sleeps in these tests pace the load that runs beside the inserts; no assertion waits
/// on one: the tests end with `take_in_all`, which takes in until nothing waits.)
async fn take_in_until(pool: PgPool, stop: Arc<AtomicBool>) -> u64 {
    let mut rows = 0;
    while !stop.load(Ordering::Relaxed) {
        rows += intake::take_in(&pool).await.expect("take in").rows;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_event_is_queued_exactly_once() {
    let db = TestDb::new().await;
    switch(&db.pool, "intake").await;
    sqlx::query("UPDATE notify.queue_settings SET slot_secs = 1")
        .execute(&db.pool)
        .await
        .unwrap();

    // A transaction that wrote an event and stays open throughout.
    let mut held = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut held).await.unwrap();
    let held_id: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ('held', 'new_message', 'held') RETURNING id",
    )
    .fetch_one(&mut held)
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let inserters: Vec<_> = (0..4)
        .map(|c| tokio::spawn(insert_until(db.url.clone(), c, stop.clone())))
        .collect();
    let takers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(take_in_until(db.pool.clone(), stop.clone())))
        .collect();
    let rotating = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rotated = 0;
            while !stop.load(Ordering::Relaxed) {
                if rotation::tick(&pool).await.unwrap().rotated_to.is_some() {
                    rotated += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            rotated
        })
    };
    // Let the inserts, intakes and rotations interleave for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut committed = BTreeSet::new();
    for i in inserters {
        committed.extend(i.await.unwrap());
    }
    let mut taken_by_workers = 0;
    for t in takers {
        taken_by_workers += t.await.unwrap();
    }
    let rotated = rotating.await.unwrap();
    intake::take_in_all(&db.pool).await.unwrap();

    // Everything committed is queued once; the held transaction's event is not.
    let (rows, ids) = queued(&db.pool).await;
    assert!(
        committed.len() > 100,
        "the inserters committed {} events",
        committed.len()
    );
    assert!(taken_by_workers > 0);
    assert!(rotated >= 1, "the slots rotated during the run");
    assert_eq!(rows as usize, ids.len(), "an event was queued twice");
    assert_eq!(
        ids, committed,
        "queued events differ from the committed ones"
    );
    assert_eq!(all_events(&db.pool).await, committed);
    assert!(!ids.contains(&held_id));
    let waiting: i64 = sqlx::query_scalar("SELECT waiting FROM notify.intake_backlog()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(waiting, 0);

    // The held transaction ends: its event is taken in by the next call.
    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    assert_eq!(intake::take_in_all(&db.pool).await.unwrap(), 1);
    let (rows, ids) = queued(&db.pool).await;
    assert_eq!(rows as usize, committed.len() + 1);
    assert!(ids.contains(&held_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_both_ways_under_inserts_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let stop = Arc::new(AtomicBool::new(false));
    let inserters: Vec<_> = (0..3)
        .map(|c| tokio::spawn(insert_until(db.url.clone(), c, stop.clone())))
        .collect();
    let taker = tokio::spawn(take_in_until(db.pool.clone(), stop.clone()));
    for to in ["intake", "trigger", "intake", "trigger", "intake"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        switch(&db.pool, to).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let mut committed = BTreeSet::new();
    for i in inserters {
        committed.extend(i.await.unwrap());
    }
    assert!(
        taker.await.unwrap() > 0,
        "the intake took events in between the switches"
    );
    intake::take_in_all(&db.pool).await.unwrap();
    let (rows, ids) = queued(&db.pool).await;
    assert_eq!(rows as usize, ids.len(), "an event was queued twice");
    assert_eq!(ids, committed);

    // And back to the trigger: what the intake had not taken in yet is queued by the switch.
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ('last', 'new_message', 'x')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    switch(&db.pool, "trigger").await;
    let (rows, ids) = queued(&db.pool).await;
    assert_eq!(rows as usize, committed.len() + 1);
    assert_eq!(ids, all_events(&db.pool).await);
    // Trigger mode: a call takes nothing, and an INSERT is queued at once.
    assert_eq!(
        intake::take_in(&db.pool).await.unwrap(),
        intake::Taken::default()
    );
    db.enqueue("u", "new_message", "now").await;
    assert_eq!(queued(&db.pool).await.0 as usize, committed.len() + 2);
}

#[tokio::test]
async fn a_big_transaction_is_taken_in_chunks_after_the_small_ones() {
    let db = TestDb::new().await;
    switch(&db.pool, "intake").await;
    let big = 3 * intake::CHUNK as i64 + intake::MAX_ROWS as i64;
    broadcast(&db.pool, "u", big).await;
    let first = intake::take_in(&db.pool).await.unwrap();
    assert_eq!(first.rows, intake::MAX_ROWS as u64);
    assert!(first.more);
    // An interactive event committed after the broadcast goes in within two calls (the
    // first finishes the step the broadcast was in), long before the broadcast is in.
    let late = db.enqueue("late", "new_message", "hello").await;
    let second = intake::take_in(&db.pool).await.unwrap();
    let third = intake::take_in(&db.pool).await.unwrap();
    assert_eq!(second.rows + third.rows, 1 + 2 * intake::CHUNK as u64);
    assert!(third.more);
    assert!(queued(&db.pool).await.1.contains(&late));
    let rest = intake::take_in_all(&db.pool).await.unwrap();
    assert_eq!(
        rest,
        (big - intake::MAX_ROWS as i64 - 2 * intake::CHUNK as i64) as u64
    );
    let (rows, ids) = queued(&db.pool).await;
    assert_eq!(rows, big + 1);
    assert_eq!(ids.len() as i64, big + 1);
}

#[tokio::test]
async fn a_worker_drains_in_intake_mode() {
    let db = TestDb::new().await;
    switch(&db.pool, "intake").await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(
            db.enqueue(&format!("user{}", i % 5), "new_message", &format!("m {i}"))
                .await,
        );
    }
    let worker = common::processor(&db.pool, RateLimit::default(), "intake-test").await;
    let mut steps = 0;
    while !matches!(worker.run_once(20).await.unwrap(), Step::EmptyQueue) {
        steps += 1;
        assert!(steps < 100);
    }
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT event_id) FROM notify.notifications WHERE event_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 50);
    assert_eq!(db.live_jobs().await, 0);
}

#[tokio::test]
async fn take_in_refuses_a_snapshot_older_than_its_lock() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = sqlx::query("SELECT * FROM notify.take_in()")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("runs at READ COMMITTED, not REPEATABLE READ"),
        "{err}"
    );
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    let err = sqlx::query("SELECT notify.enqueue_by('sometimes')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("'trigger' or 'intake'"), "{err}");
}

#[tokio::test]
async fn the_type_check_follows_event_types_in_both_modes() {
    let db = TestDb::new().await;
    for mode in ["trigger", "intake"] {
        switch(&db.pool, mode).await;
        let err = sqlx::query("INSERT INTO notify.events (user_id, event_type, body) VALUES ('u', 'parcel_shipped', 'x')")
            .execute(&db.pool)
            .await
            .unwrap_err();
        let e = err.as_database_error().expect("a database error");
        assert_eq!(e.code().as_deref(), Some("23503"), "{mode}");
        assert_eq!(e.constraint(), Some("events_event_type_known"), "{mode}");
        assert!(
            e.message()
                .contains("violates foreign key constraint \"events_event_type_known\"")
        );
        sqlx::query("INSERT INTO notify.event_types (name) VALUES ('parcel_shipped')")
            .execute(&db.pool)
            .await
            .unwrap();
        db.enqueue("u", "parcel_shipped", "on its way").await;
        // Emptied of its events, the type can go, and the check follows.
        sqlx::query("DELETE FROM notify.events WHERE event_type = 'parcel_shipped'")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM notify.event_types WHERE name = 'parcel_shipped'")
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_backend_cannot_write_the_intake_column() {
    let db = TestDb::new().await;
    let roles = db.grant_roles().await;
    let backend = PgPool::connect(&db.login_as(&roles.backend).await)
        .await
        .unwrap();
    let err = sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, txid) VALUES ('u', 'new_message', 'x', '1')",
    )
    .execute(&backend)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("permission denied for table events"),
        "{err}"
    );
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ('u', 'new_message', 'x')",
    )
    .execute(&backend)
    .await
    .unwrap();
    // The worker role takes it in.
    switch(&db.pool, "intake").await;
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ('u', 'new_message', 'y')",
    )
    .execute(&backend)
    .await
    .unwrap();
    let worker = PgPool::connect(&db.login_as(&roles.worker).await)
        .await
        .unwrap();
    assert_eq!(intake::take_in_all(&worker).await.unwrap(), 1);
    assert_eq!(db.live_jobs().await, 2);
}

#[tokio::test]
async fn several_big_transactions_at_once_are_each_taken_in_whole() {
    let db = TestDb::new().await;
    switch(&db.pool, "intake").await;
    let big = intake::MAX_ROWS as i64;
    // Bigger than one call's budget, and met while another is still taken in by chunks.
    for (rows, user) in [
        (big + 500, "a"),
        (big + 1000, "b"),
        (3, "small"),
        (big / 2 + 100, "c"),
    ] {
        broadcast(&db.pool, user, rows).await;
    }
    intake::take_in_all(&db.pool).await.unwrap();
    let (rows, ids) = queued(&db.pool).await;
    assert_eq!(rows as usize, ids.len(), "an event was queued twice");
    assert_eq!(ids, all_events(&db.pool).await, "an event was not queued");
}

#[tokio::test]
async fn the_switch_runs_in_a_transaction_of_its_own() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ('u', 'new_message', 'x')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let err = sqlx::query("SELECT notify.enqueue_by('intake')")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("a transaction of its own"),
        "{err}"
    );
    drop(tx);
    // And a step cannot be called around the intake's lock.
    let err = sqlx::query("SELECT * FROM notify.take_in_step(10, 10)")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("call notify.take_in()"), "{err}");
}
