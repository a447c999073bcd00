//! notifyd's own queue (migration `20261207000001_own_queue.sql`, `claim::rotation`): the
//! rotation of the slot tables (current → draining → drained → clean, with TRUNCATE), a
//! drained slot that a transaction still holds, a held snapshot that cannot make dead rows
//! pile up in the slots, priority, delayed jobs and retries.
//!
//! The worker is driven one step at a time (`Processor::run_once`, `rotation::tick`); a slot
//! period is made to pass by backdating `notify.queue_slots.changed_at`, never by sleeping.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::TestDb;
use notifyd::claim::rotation::{self, Tick};
use notifyd::claim::{Processor, Step, backend, maintenance};
use notifyd::pipeline::{Answer, Outcome, Pipeline};
use notifyd::store::RateLimit;
use sqlx::{Connection, PgConnection, PgPool};

const WORKER: &str = "queue-test";

/// A registered processor with a rate limit no test here reaches.
async fn processor(db: &TestDb) -> Processor {
    maintenance::register(&db.pool, WORKER).await.unwrap();
    let rate = RateLimit {
        limit: 1_000_000,
        window: Duration::from_secs(3600),
    };
    Processor::new(db.pool.clone(), Pipeline::new(rate), WORKER)
}

/// Set the slot period, and start the current one now (the template database was migrated
/// a while ago, so its slot 0 would count as long expired).
async fn set_slot_secs(pool: &PgPool, secs: i32) {
    sqlx::query("UPDATE notify.queue_settings SET slot_secs = $1")
        .bind(secs)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE notify.queue_slots SET changed_at = now()")
        .execute(pool)
        .await
        .unwrap();
}

/// Make the current slot's period be over (instead of sleeping `slot_secs`).
async fn backdate(pool: &PgPool) {
    sqlx::query(
        "UPDATE notify.queue_slots SET changed_at = now() - interval '1 hour' WHERE state = 'current'",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// The state of each slot, 0 to 3.
async fn states(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT state FROM notify.queue_slots ORDER BY slot")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn tick(pool: &PgPool) -> Tick {
    let t = rotation::tick(pool).await.unwrap();
    assert!(t.ran, "no other replica rotates here");
    let current: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notify.queue_slots WHERE state = 'current'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(current, 1, "exactly one current slot after {t:?}");
    t
}

/// Where the job of `event` waits (`0`-`3`, `later`), if anywhere.
async fn place_of(pool: &PgPool, event: i64) -> Option<String> {
    sqlx::query_scalar("SELECT place FROM notify.queue WHERE event_id = $1")
        .bind(event)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Heap and index bytes of slot table `slot`.
async fn slot_bytes(pool: &PgPool, slot: i16) -> (i64, i64) {
    sqlx::query_as(
        "SELECT pg_relation_size(format('notify.queue_%s', $1::int)::regclass),
                pg_indexes_size(format('notify.queue_%s', $1::int)::regclass)",
    )
    .bind(slot)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Process until nothing is claimable; returns the answers.
async fn drain(p: &Processor, batch: usize) -> Vec<Answer> {
    let mut all = Vec::new();
    for _ in 0..10_000 {
        match p.run_once(batch).await.unwrap() {
            Step::Processed(answers) => all.extend(answers),
            Step::EmptyQueue => return all,
        }
    }
    panic!("the queue never ran empty");
}

/// Every event has exactly one outcome, and no event has two notifications.
async fn assert_exactly_once(db: &TestDb, total: i64) {
    assert_eq!(
        db.count("SELECT count(*) FROM notify.events").await,
        total,
        "events"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.event_outcomes WHERE outcome IS NULL")
            .await,
        0,
        "every event has an outcome"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM (SELECT event_id FROM notify.notifications
             GROUP BY event_id HAVING count(*) > 1) AS d"
        )
        .await,
        0,
        "no event stored twice"
    );
    assert_eq!(db.live_jobs().await, 0, "no job left");
    assert_eq!(
        db.count("SELECT count(*) FROM notify.queue_dead").await,
        0,
        "no job failed"
    );
}

async fn enqueue_many(pool: &PgPool, event_type: &str, n: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT 'user-' || (g % 50), $1, 'Event ' || g FROM generate_series(1, $2) AS g
         RETURNING id",
    )
    .bind(event_type)
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// (1) One full turn of a slot, step by step, then many rotations while events keep
/// arriving from another task: no job is lost or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_truncates_drained_slots_and_loses_no_job_while_events_arrive() {
    let db = TestDb::new().await;
    set_slot_secs(&db.pool, 1).await;
    let p = processor(&db).await;
    assert_eq!(
        states(&db.pool).await,
        ["current", "clean", "clean", "clean"]
    );

    // Within its period the current slot stays current.
    let first = enqueue_many(&db.pool, "system_alert", 10).await;
    assert_eq!(tick(&db.pool).await.rotated_to, None);
    assert_eq!(place_of(&db.pool, first[0]).await.as_deref(), Some("0"));

    // Its period over: a clean slot takes over, the old one drains (and is still claimed).
    backdate(&db.pool).await;
    assert_eq!(tick(&db.pool).await.rotated_to, Some(1));
    assert_eq!(
        states(&db.pool).await,
        ["draining", "current", "clean", "clean"]
    );
    let second = enqueue_many(&db.pool, "system_alert", 10).await;
    assert_eq!(place_of(&db.pool, second[0]).await.as_deref(), Some("1"));
    let (heap, _) = slot_bytes(&db.pool, 0).await;
    assert!(heap > 0);
    // A draining slot with jobs is not drained.
    let t = tick(&db.pool).await;
    assert_eq!((t.truncated, t.busy), (0, 0), "{t:?}");
    assert_eq!(states(&db.pool).await[0], "draining");

    let answers = drain(&p, 100).await;
    assert_eq!(answers.len(), 20);
    // Seen empty: drained, and truncated in the same tick (nothing holds it).
    let t = tick(&db.pool).await;
    assert_eq!((t.truncated, t.busy), (1, 0), "{t:?}");
    assert_eq!(
        states(&db.pool).await,
        ["clean", "current", "clean", "clean"]
    );
    assert_eq!(
        slot_bytes(&db.pool, 0).await.0,
        0,
        "TRUNCATE gave the heap back (a DELETE would not have)"
    );

    // Many rotations while events keep arriving from another task: each round lets it
    // commit up to 10 more enqueue transactions, concurrently with the round's claims and
    // ticks (some stay open across a rotation step), so that the producer never outruns
    // the claims and each round ends.
    let enqueued = Arc::new(AtomicI64::new(20));
    let (go, mut rounds) = tokio::sync::mpsc::unbounded_channel::<()>();
    let producer = {
        let (pool, enqueued) = (db.pool.clone(), enqueued.clone());
        tokio::spawn(async move {
            let mut n = 0i64;
            while rounds.recv().await.is_some() {
                let mut tx = pool.begin().await.unwrap();
                let k = 1 + n % 5;
                sqlx::query(
                    "INSERT INTO notify.events (user_id, event_type, body)
                     SELECT 'stream-' || (g % 7), 'new_message', 'Stream ' || g
                     FROM generate_series(1, $1) AS g",
                )
                .bind(k)
                .execute(&mut *tx)
                .await
                .unwrap();
                tokio::task::yield_now().await;
                tx.commit().await.unwrap();
                enqueued.fetch_add(k, Ordering::Relaxed);
                n += 1;
            }
        })
    };
    let mut became_current = std::collections::BTreeSet::new();
    let (mut truncated, mut busy, mut rotations) = (0, 0, 0u32);
    for round in 0..40usize {
        for _ in 0..10 {
            go.send(()).unwrap();
        }
        drain(&p, 20 + round % 30).await;
        backdate(&db.pool).await;
        let t = tick(&db.pool).await;
        became_current.extend(t.rotated_to);
        rotations += u32::from(t.rotated_to.is_some());
        let t2 = tick(&db.pool).await;
        truncated += t.truncated + t2.truncated;
        busy += t.busy + t2.busy;
    }
    drop(go);
    producer.await.unwrap();
    // Drain what is left: a job committed into a slot after it was seen empty is found by
    // the next tick (the slot goes back to draining).
    for _ in 0..100 {
        drain(&p, 200).await;
        tick(&db.pool).await;
        if db.live_jobs().await == 0 {
            break;
        }
    }
    let total = enqueued.load(Ordering::Relaxed);
    println!(
        "FIGURES rotation under load: {total} events, slots made current {became_current:?}, \
         {rotations} rotations, {truncated} truncations, {busy} busy"
    );
    assert_eq!(rotations, 40, "every round's period ended in a rotation");
    assert!(
        became_current.len() >= 3,
        "the slots took turns: {became_current:?}"
    );
    assert!(truncated >= 20, "{truncated} truncations in 40 rotations");
    assert_exactly_once(&db, total).await;
}

/// (2) A transaction that read the old current slot and wrote into it is still open when
/// the slot is seen empty: the slot is drained but cannot be locked (busy), so it is not
/// truncated; once the writer commits, the next tick finds the job, the slot drains again,
/// and the job is processed.
#[tokio::test]
async fn a_drained_slot_held_by_an_open_writer_is_not_truncated_and_its_job_is_found() {
    let db = TestDb::new().await;
    set_slot_secs(&db.pool, 1).await;
    let p = processor(&db).await;

    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = writer.begin().await.unwrap();
    let held: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body)
         VALUES ('42', 'new_message', 'late writer') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();

    backdate(&db.pool).await;
    assert_eq!(tick(&db.pool).await.rotated_to, Some(1));
    // The uncommitted job is invisible: slot 0 looks empty, is drained, and is busy.
    let t = tick(&db.pool).await;
    assert_eq!((t.truncated, t.busy), (0, 1), "{t:?}");
    assert_eq!(states(&db.pool).await[0], "drained");
    // Stays so while the writer is open, tick after tick.
    let t = tick(&db.pool).await;
    assert_eq!((t.truncated, t.busy), (0, 1), "{t:?}");

    tx.commit().await.unwrap();
    // Claims do not look into a drained slot ...
    assert!(matches!(p.run_once(10).await.unwrap(), Step::EmptyQueue));
    assert_eq!(place_of(&db.pool, held).await.as_deref(), Some("0"));
    // ... the next tick locks it, finds the job under the lock and puts it back to draining.
    let t = tick(&db.pool).await;
    assert_eq!((t.truncated, t.busy), (0, 0), "{t:?}");
    assert_eq!(states(&db.pool).await[0], "draining");
    let Step::Processed(answers) = p.run_once(10).await.unwrap() else {
        panic!("the late job is claimable from the draining slot");
    };
    assert!(
        matches!(answers[..], [Ok(Outcome::Stored { .. })]),
        "{answers:?}"
    );
    let t = tick(&db.pool).await;
    assert_eq!(t.truncated, 1, "{t:?}");
    assert_eq!(states(&db.pool).await[0], "clean");
    assert_exactly_once(&db, 1).await;
}

/// (3) A REPEATABLE READ snapshot held open across thousands of processed jobs: the rows
/// it keeps alive cannot be vacuumed, but the drained slots are truncated anyway, so the
/// slot tables and their claim index hold nothing of the finished jobs.
#[tokio::test]
async fn a_held_snapshot_does_not_make_dead_rows_pile_up_in_the_slots() {
    let db = TestDb::new().await;
    set_slot_secs(&db.pool, 1).await;
    let p = processor(&db).await;

    let mut snapshot = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut snapshot)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM notify.events")
        .fetch_one(&mut snapshot)
        .await
        .unwrap();
    assert_eq!(seen, 0);

    const ROUNDS: i64 = 8;
    const PER_ROUND: i64 = 500;
    let mut truncated = 0;
    let mut peak_heap = 0;
    for _ in 0..ROUNDS {
        enqueue_many(&db.pool, "system_alert", PER_ROUND).await;
        for slot in backend::SLOTS {
            peak_heap = peak_heap.max(slot_bytes(&db.pool, slot).await.0);
        }
        assert_eq!(drain(&p, 500).await.len(), PER_ROUND as usize);
        backdate(&db.pool).await;
        truncated += tick(&db.pool).await.truncated;
        truncated += tick(&db.pool).await.truncated;
    }
    // The snapshot is still open, and still sees none of it.
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM notify.events")
        .fetch_one(&mut snapshot)
        .await
        .unwrap();
    assert_eq!(seen, 0, "the snapshot was held throughout");
    let xmin_held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                        WHERE datname = current_database() AND backend_xmin IS NOT NULL
                          AND state = 'idle in transaction')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(xmin_held, "the snapshot holds the xmin horizon");
    assert_eq!(truncated, ROUNDS as u32, "one truncation per round");

    let mut sizes = Vec::new();
    for slot in backend::SLOTS {
        sizes.push(slot_bytes(&db.pool, slot).await);
    }
    println!(
        "FIGURES held snapshot: {} jobs processed in {ROUNDS} rotations; a slot's heap peaked at \
         {peak_heap} bytes; (heap, index) bytes per slot now {sizes:?}",
        ROUNDS * PER_ROUND
    );
    assert!(peak_heap > 8192, "a round's jobs take several pages");
    for (slot, (heap, index)) in sizes.iter().enumerate() {
        assert_eq!(*heap, 0, "slot {slot} still holds dead rows");
        assert!(
            *index <= 2 * 8192,
            "slot {slot}'s claim index holds dead entries: {index} bytes"
        );
    }
    assert_exactly_once(&db, ROUNDS * PER_ROUND).await;
    sqlx::query("ROLLBACK")
        .execute(&mut snapshot)
        .await
        .unwrap();
}

/// (4) A job carries its event type's priority; a claim takes higher priority first, even
/// behind hundreds of older jobs.
#[tokio::test]
async fn higher_priority_jobs_are_claimed_first() {
    let db = TestDb::new().await;
    sqlx::query(
        "UPDATE notify.event_types SET priority = CASE name WHEN 'new_message' THEN 100 ELSE 0 END
         WHERE name IN ('new_message', 'system_alert')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let alerts = enqueue_many(&db.pool, "system_alert", 500).await;
    let messages = enqueue_many(&db.pool, "new_message", 5).await;
    let priorities: Vec<(i16, i64)> =
        sqlx::query_as("SELECT priority, count(*) FROM notify.queue GROUP BY 1 ORDER BY 1 DESC")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(priorities, [(100, 5), (0, 500)]);

    let batch = backend::claim_due(&db.pool, 10, i16::MIN)
        .await
        .unwrap()
        .unwrap();
    let events = batch.events();
    assert_eq!(events[..5], messages[..], "the new_message jobs come first");
    assert_eq!(events[5..], alerts[..5], "then the oldest alerts");
    batch.take().unwrap().rollback().await.unwrap();
    // A claim with a minimum priority (the express lane) takes only those.
    let express = backend::claim_due(&db.pool, 100, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(express.events(), messages);
    express.take().unwrap().rollback().await.unwrap();

    // Through the worker's step: the first batch stores the messages.
    let p = processor(&db).await;
    let Step::Processed(answers) = p.run_once(10).await.unwrap() else {
        panic!("jobs are due");
    };
    assert_eq!(answers.len(), 10);
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notify.notifications WHERE event_id = ANY($1)")
            .bind(&messages)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, 5);

    // Priority orders jobs within a slot; across slots the current one comes first. A
    // message left in a draining slot behind a broadcast in the current one is still
    // found at once by a claim with a minimum priority (the express lane).
    set_slot_secs(&db.pool, 1).await;
    let late_message = enqueue_many(&db.pool, "new_message", 1).await[0];
    backdate(&db.pool).await;
    let to = tick(&db.pool).await.rotated_to.expect("a rotation");
    let broadcast = enqueue_many(&db.pool, "system_alert", 200).await;
    assert_eq!(place_of(&db.pool, broadcast[0]).await, Some(to.to_string()));
    let express = backend::claim_due(&db.pool, 10, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(express.events(), [late_message]);
    express.take().unwrap().rollback().await.unwrap();
}

/// (5) An event due beyond the slot period waits in `queue_later`, out of every claim and
/// out of the slots (so it never keeps one from being truncated); once due, a tick moves it
/// into the current slot and it is processed. One due within the period goes to the
/// current slot at once, and is still not claimed before its time.
#[tokio::test]
async fn a_delayed_job_waits_in_queue_later_until_a_tick_moves_it_due() {
    let db = TestDb::new().await;
    set_slot_secs(&db.pool, 10).await;
    let p = processor(&db).await;
    let later: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body, run_at)
         VALUES ('42', 'system_alert', 'in an hour', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let soon: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body, run_at)
         VALUES ('42', 'system_alert', 'in 5 s', now() + interval '5 seconds') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(place_of(&db.pool, later).await.as_deref(), Some("later"));
    assert_eq!(place_of(&db.pool, soon).await.as_deref(), Some("0"));
    assert!(matches!(p.run_once(10).await.unwrap(), Step::EmptyQueue));
    assert_eq!(
        tick(&db.pool).await.moved,
        0,
        "not due within a slot period"
    );
    assert_eq!(place_of(&db.pool, later).await.as_deref(), Some("later"));

    // Rotations pass it by: the slots drain and are truncated while it waits.
    sqlx::query("UPDATE notify.queue_0 SET run_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(drain(&p, 10).await.len(), 1);
    backdate(&db.pool).await;
    tick(&db.pool).await;
    assert_eq!(tick(&db.pool).await.truncated, 1);
    assert_eq!(place_of(&db.pool, later).await.as_deref(), Some("later"));

    // Its time has come.
    sqlx::query("UPDATE notify.queue_later SET run_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(
        matches!(p.run_once(10).await.unwrap(), Step::EmptyQueue),
        "queue_later is never claimed"
    );
    let t = tick(&db.pool).await;
    assert_eq!(t.moved, 1);
    assert_eq!(place_of(&db.pool, later).await.as_deref(), Some("1"));
    let Step::Processed(answers) = p.run_once(10).await.unwrap() else {
        panic!("the delayed job is due");
    };
    assert!(
        matches!(answers[..], [Ok(Outcome::Stored { .. })]),
        "{answers:?}"
    );
    assert_exactly_once(&db, 2).await;
}

/// (6) A batch that fails for a reason that is not transient (here a trigger that raises
/// on its notification) rolls back, and the worker counts an attempt: the job waits in
/// `queue_later` for its backoff, with the error; after `max_attempts` it is in
/// `queue_dead` for operators, with the reason and the worker.
#[tokio::test]
async fn a_failed_batch_backs_off_in_queue_later_then_ends_in_queue_dead() {
    let db = TestDb::new().await;
    sqlx::query(
        "UPDATE notify.queue_settings SET max_attempts = 3, retry_base_secs = 60, retry_max_secs = 600",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    set_slot_secs(&db.pool, 10).await;
    sqlx::raw_sql(
        "CREATE FUNCTION notify.test_explode() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.body = 'explode' THEN RAISE EXCEPTION 'boom: the test refuses this row'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_explode BEFORE INSERT ON notify.notifications
             FOR EACH ROW EXECUTE FUNCTION notify.test_explode();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let p = processor(&db).await;
    let id = db.enqueue("42", "new_message", "explode").await;

    // (attempt, backoff range: base 60 s × 2^(attempt-1) × 0.5..1.5; all beyond the slot
    // period of 10 s, within which a tick would move the job into the current slot)
    for (attempt, low, high) in [(1i16, 30.0, 90.0), (2, 60.0, 180.0)] {
        let before: f64 =
            sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let err = p.run_once(10).await.expect_err("the batch fails");
        assert!(err.to_string().contains("boom"), "{err}");
        let (attempts, run_at, after, last_error): (i16, f64, f64, Option<String>) =
            sqlx::query_as(
                "SELECT attempts, extract(epoch FROM run_at)::float8,
                        extract(epoch FROM clock_timestamp())::float8, last_error
                 FROM notify.queue_later WHERE event_id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(attempts, attempt);
        // Due between `low` after the attempt began and `high` after it was counted.
        assert!(
            run_at >= before + low && run_at <= after + high,
            "attempt {attempt}: retry at {:.2} s after the attempt began",
            run_at - before
        );
        assert!(last_error.unwrap_or_default().contains("boom"));
        // Waiting out the backoff: not claimable, not moved by a tick.
        assert!(matches!(p.run_once(10).await.unwrap(), Step::EmptyQueue));
        assert_eq!(tick(&db.pool).await.moved, 0);
        // Its time has come.
        sqlx::query("UPDATE notify.queue_later SET run_at = now() - interval '1 second'")
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(tick(&db.pool).await.moved, 1);
    }
    p.run_once(10)
        .await
        .expect_err("the third attempt fails too");
    assert_eq!(db.live_jobs().await, 0, "out of attempts: not retried");
    let (attempts, reason, worker): (i16, String, Option<String>) = sqlx::query_as(
        "SELECT attempts, reason, worker FROM notify.queue_dead WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 3);
    assert!(reason.contains("boom"), "{reason}");
    assert_eq!(worker.as_deref(), Some(WORKER));
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        0,
        "every attempt rolled back"
    );
    assert!(matches!(p.run_once(10).await.unwrap(), Step::EmptyQueue));
}

/// A backend transaction in REPEATABLE READ (or SERIALIZABLE) sees `notify.queue_slots` as
/// of its snapshot, so its enqueue can write into a slot that stopped being current long
/// ago, even one drained and truncated since (it held no lock on it until that INSERT).
/// The job must still be claimed: the next tick finds the clean slot holding it and puts
/// it back to draining, instead of leaving it until that slot's turn comes again (slot 3
/// is the last one the rotation picks, so under normal operation it might never come).
#[tokio::test]
async fn a_repeatable_read_backend_writing_into_a_stale_slot_does_not_strand_its_job() {
    let db = TestDb::new().await;
    set_slot_secs(&db.pool, 1).await;
    let p = processor(&db).await;
    sqlx::query(
        "UPDATE notify.queue_slots SET state = CASE slot WHEN 3 THEN 'current' ELSE 'clean' END",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let mut backend = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut backend)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM notify.notifications")
        .execute(&mut backend)
        .await
        .unwrap();

    // Slot 3 drains, is seen empty and is truncated (the backend holds no lock on it).
    backdate(&db.pool).await;
    assert_eq!(tick(&db.pool).await.rotated_to, Some(0));
    assert_eq!(tick(&db.pool).await.truncated, 1);
    assert_eq!(
        states(&db.pool).await,
        ["current", "clean", "clean", "clean"]
    );

    let id: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body)
         VALUES ('42', 'new_message', 'from an old snapshot') RETURNING id",
    )
    .fetch_one(&mut backend)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut backend).await.unwrap();
    assert_eq!(
        place_of(&db.pool, id).await.as_deref(),
        Some("3"),
        "the trigger read the slots as of the snapshot"
    );

    tick(&db.pool).await;
    assert_eq!(
        states(&db.pool).await[3],
        "draining",
        "a clean slot holding a job is claimed from again"
    );
    let Step::Processed(answers) = p.run_once(10).await.unwrap() else {
        panic!("the job written into the stale slot is claimable");
    };
    assert!(
        matches!(answers[..], [Ok(Outcome::Stored { .. })]),
        "{answers:?}"
    );
    assert_eq!(tick(&db.pool).await.truncated, 1);
    assert_eq!(states(&db.pool).await[3], "clean");
    assert_exactly_once(&db, 1).await;
}

/// A claim from a hint (where the lane's previous claim ended) skips the jobs before it,
/// which are mostly its own batches in flight, but a job left before it (a batch that
/// rolled back) is still claimed once the jobs after the hint run short.
#[tokio::test]
async fn a_claim_after_a_hint_still_takes_the_jobs_left_before_it() {
    let db = TestDb::new().await;
    let events = enqueue_many(&db.pool, "system_alert", 30).await;
    let (a, hint_a) = backend::claim_after(&db.pool, 10, i16::MIN, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.events(), events[..10]);
    let (b, hint_b) = backend::claim_after(&db.pool, 10, i16::MIN, hint_a)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.events(), events[10..20], "starts after the first claim");
    assert_eq!(hint_b.map(|h| h.event_id), Some(events[19]));
    a.take().unwrap().rollback().await.unwrap();
    let (c, _) = backend::claim_after(&db.pool, 20, i16::MIN, hint_b)
        .await
        .unwrap()
        .unwrap();
    let mut got = c.events();
    got.sort_unstable();
    let mut want: Vec<i64> = events[..10].iter().chain(&events[20..]).copied().collect();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "after the hint, then the rolled-back jobs before it"
    );
    b.take().unwrap().rollback().await.unwrap();
    c.take().unwrap().rollback().await.unwrap();
}
