//! End to end through the real apalis worker, in process: `claim::run` over the claim
//! backend, fed by SQL inserts, drained by polling the queue (no fixed sleeps); and the
//! worker's step (`Processor::run_once`) driven one batch at a time to `EmptyQueue`.

mod common;

use std::time::{Duration, Instant};

use common::TestDb;
use notifyd::claim::{self, ClaimSettings, Processor, Step, Stopped};
use notifyd::pipeline::{Outcome, Pipeline};
use notifyd::store::RateLimit;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One worker replica: its own pool, processor and claim loop.
struct Worker {
    name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Stopped>,
    /// A clone of the worker's processor: how many jobs it answered and committed.
    processor: Processor,
}

impl Worker {
    async fn start(db: &TestDb, name: &str, rate: RateLimit) -> Self {
        Self::start_with(db, name, rate, (50, 2), Duration::from_secs(1)).await
    }

    /// `(fetch_batch, in_flight)`: jobs per claimed batch, batches at once; `heartbeat`:
    /// the worker's heartbeat interval.
    async fn start_with(
        db: &TestDb,
        name: &str,
        rate: RateLimit,
        (fetch_batch, in_flight): (usize, usize),
        heartbeat: Duration,
    ) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(in_flight as u32 + 4)
            .connect(&db.url)
            .await
            .expect("worker pool");
        let processor = Processor::new(pool.clone(), Pipeline::new(rate), name);
        let settings = ClaimSettings {
            concurrency: in_flight,
            fetch_batch,
            poll_interval: Duration::from_millis(10),
            heartbeat,
            missed_heartbeats: 5,
            name: name.to_owned(),
            express: claim::Express {
                batches: 1,
                min_priority: 1,
                bulk_batches: 1,
            },
        };
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(claim::run(pool, settings, processor.clone(), rx, None));
        Worker {
            name: name.to_owned(),
            stop,
            task,
            processor,
        }
    }

    /// Ask the worker to stop and wait (bounded) for its claim loop to return.
    async fn shutdown(self) {
        assert!(
            !self.task.is_finished(),
            "worker {} ended before it was told to stop",
            self.name
        );
        self.stop.send(true).unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap_or_else(|_| panic!("worker {} did not stop within 30 s", self.name))
            .unwrap();
        assert_eq!(stopped, Stopped::Drained, "worker {}", self.name);
    }
}

/// Wait until apalis has registered the worker (it is then listening and polling).
async fn wait_registered(db: &TestDb, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM apalis.workers WHERE id LIKE $1 || '-%'")
                .bind(name)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "worker {name} never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A queue row for `event_id`, written straight into the current slot, as a hand edit
/// would (or left behind when retention deleted its event). A queue row is typed, so the
/// only poison it can carry is an event that does not exist. Due a minute ago with the
/// given priority.
async fn insert_raw_job(pool: &PgPool, event_id: i64, priority: i16) -> i64 {
    sqlx::query(
        "INSERT INTO notify.queue_0 (event_id, priority, run_at)
         VALUES ($1, $2, now() - interval '1 minute')",
    )
    .bind(event_id)
    .bind(priority)
    .execute(pool)
    .await
    .unwrap();
    event_id
}

/// The reason `notify.queue_dead` gives for `event_id`'s job.
async fn dead_reason(pool: &PgPool, event_id: i64) -> String {
    sqlx::query_scalar("SELECT reason FROM notify.queue_dead WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// One INSERT ... SELECT of `users * per_user` events. Each user's events are consecutive,
/// so consecutive claims (by both replicas) and concurrent store transactions hit the same
/// user: the hardest case for the rate limit.
async fn enqueue_many(db: &TestDb, users: i64, per_user: i64) {
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT 'user-' || (g / $2), 'new_message', 'Message ' || g
         FROM generate_series(0, $1 * $2 - 1) AS g",
    )
    .bind(users)
    .bind(per_user)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_rows_are_refused_with_a_reason_and_do_not_block_the_queue() {
    let db = TestDb::new().await;
    // First in line (highest priority, due a minute ago), ahead of the good events.
    let poison = [
        insert_raw_job(&db.pool, 987654321, 1000).await,
        insert_raw_job(&db.pool, 987654322, 1000).await,
        insert_raw_job(&db.pool, 987654323, 0).await,
    ];
    let mut good = Vec::new();
    for i in 0..50 {
        good.push(
            db.enqueue(&format!("u{}", i % 5), "new_message", &format!("Good {i}"))
                .await,
        );
    }

    let worker = Worker::start(&db, "poison", RateLimit::default()).await;
    db.wait_until_drained(Duration::from_secs(30)).await;

    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        50,
        "every good event behind the poison rows was stored"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.event_outcomes WHERE outcome = 'stored'")
            .await,
        50
    );
    for id in poison {
        let reason = dead_reason(&db.pool, id).await;
        assert!(
            reason.contains(&format!("event {id} does not exist")),
            "poison job {id}: {reason}"
        );
    }
    // No other job failed, and the good jobs finished (a finished job is deleted with its
    // outcome).
    assert_eq!(db.count("SELECT count(*) FROM notify.queue_dead").await, 3);
    assert_eq!(db.live_jobs().await, 0);

    // The worker kept running through them: apalis's worker was never restarted (a restart
    // registers a new name, "<prefix>-1"), and it still takes new work.
    let more = db.enqueue("u1", "system_alert", "After the poison").await;
    db.wait_until_drained(Duration::from_secs(30)).await;
    let outcome: Option<String> =
        sqlx::query_scalar("SELECT outcome FROM notify.event_outcomes WHERE event_id = $1")
            .bind(more)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(outcome.as_deref(), Some("stored"));
    let names: Vec<String> = sqlx::query_scalar("SELECT id FROM apalis.workers ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(names, vec!["poison-0".to_owned()]);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_drain_2000_events_with_an_exact_rate_limit() {
    const USERS: i64 = 50;
    const PER_USER: i64 = 40;
    const LIMIT: u32 = 30;
    let db = TestDb::new().await;
    let rate = RateLimit {
        limit: LIMIT,
        window: Duration::from_secs(3600),
    };
    // Both idle and polling before the events arrive, so they race for them. Small batches,
    // several at once per replica, so that many transactions hold events of the same user
    // at the moment that user reaches the limit.
    let second = Duration::from_secs(1);
    let a = Worker::start_with(&db, "replica-a", rate, (10, 4), second).await;
    let b = Worker::start_with(&db, "replica-b", rate, (10, 4), second).await;
    wait_registered(&db, "replica-a").await;
    wait_registered(&db, "replica-b").await;

    enqueue_many(&db, USERS, PER_USER).await;
    db.wait_until_drained(Duration::from_secs(120)).await;

    let per_user: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.user_id, count(n.event_id)
         FROM notify.events AS e LEFT JOIN notify.notifications AS n ON n.event_id = e.id
         GROUP BY e.user_id ORDER BY e.user_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(per_user.len(), USERS as usize);
    for (user, stored) in &per_user {
        assert_eq!(*stored, i64::from(LIMIT), "user {user}");
    }
    assert_eq!(
        db.count(
            "SELECT count(*) FROM (SELECT event_id FROM notify.notifications
             GROUP BY event_id HAVING count(*) > 1) AS d"
        )
        .await,
        0,
        "no event stored twice"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.event_outcomes WHERE outcome IS NULL")
            .await,
        0,
        "every event has an outcome"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.event_outcomes WHERE outcome = 'rate_limited'")
            .await,
        USERS * (PER_USER - i64::from(LIMIT))
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM notify.events AS e
             JOIN notify.notifications AS n ON n.event_id = e.id
             WHERE e.outcome <> 'stored'"
        )
        .await,
        0,
        "outcomes agree with the notifications"
    );
    // Every job finished (deleted with its outcome) and none failed.
    assert_eq!(db.live_jobs().await, 0, "every job finished");
    assert_eq!(
        db.count("SELECT count(*) FROM notify.queue_dead").await,
        0,
        "none failed"
    );
    // Both replicas took part (each claims at most 10 per batch, and both were woken), and
    // between them they answered every job once.
    let (by_a, by_b) = (
        a.processor.outcomes_committed(),
        b.processor.outcomes_committed(),
    );
    assert!(
        by_a > 0 && by_b > 0,
        "both workers should have processed jobs: {by_a} and {by_b}"
    );
    assert_eq!(by_a + by_b, (USERS * PER_USER) as u64);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// Workers find new jobs by polling (enqueuing sends no NOTIFY), so an idle worker must keep
/// polling after its polls found the queue empty (apalis's own interval poll once lost its
/// timer then, and a lone event waited for the next heartbeat). With a 60 s heartbeat,
/// three lone events, each after an idle second, must each be stored within 10 s.
async fn an_idle_worker_picks_up_a_lone_event_long_before_its_heartbeat() {
    let db = TestDb::new().await;
    let minute = Duration::from_secs(60);
    let worker = Worker::start_with(&db, "idle", RateLimit::default(), (50, 2), minute).await;
    wait_registered(&db, "idle").await;
    for i in 0..3 {
        // Idle on purpose: the worker's polls meet an empty queue.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let id = db.enqueue("42", "new_message", &format!("lone {i}")).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stored: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM notify.notifications WHERE event_id = $1)",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if stored {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "lone event {i} was not stored within 10 s by an idle worker"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_event_is_stored_only_after_its_time() {
    let db = TestDb::new().await;
    let worker = Worker::start(&db, "delay", RateLimit::default()).await;
    wait_registered(&db, "delay").await;

    let (id, run_at): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "INSERT INTO notify.events (user_id, event_type, body, run_at)
         VALUES ('42', 'system_alert', 'Later', now() + interval '2 seconds')
         RETURNING id, run_at",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // An event due now, enqueued after the delayed one, is stored first.
    let now_id = db.enqueue("42", "system_alert", "Now").await;

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw_pending_while_early = false;
    let created_at = loop {
        let row: Option<(chrono::DateTime<chrono::Utc>,)> =
            sqlx::query_as("SELECT created_at FROM notify.notifications WHERE event_id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        if let Some((created_at,)) = row {
            break created_at;
        }
        let (early, now_stored): (bool, bool) = sqlx::query_as(
            "SELECT now() < $1, EXISTS (SELECT 1 FROM notify.notifications WHERE event_id = $2)",
        )
        .bind(run_at)
        .bind(now_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if early && now_stored {
            saw_pending_while_early = true;
        }
        assert!(
            Instant::now() < deadline,
            "the delayed event was not stored within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        created_at >= run_at,
        "stored at {created_at}, before its run_at {run_at}"
    );
    assert!(
        created_at < run_at + chrono::Duration::seconds(5),
        "stored at {created_at}, long after its run_at {run_at}"
    );
    assert!(
        saw_pending_while_early,
        "the worker was running (the due event was stored) while the delayed one waited"
    );
    db.wait_until_drained(Duration::from_secs(10)).await;
    worker.shutdown().await;
}

/// The worker's step, driven by hand: each `run_once` claims one batch of due jobs,
/// processes it and commits; once nothing is claimable it answers `EmptyQueue`, and a
/// delayed event stays out of every batch until it is due.
#[tokio::test]
async fn run_once_claims_batches_until_the_queue_is_empty() {
    let db = TestDb::new().await;
    for i in 0..25 {
        db.enqueue(&format!("u{}", i % 3), "new_message", &format!("m{i}"))
            .await;
    }
    let bad = insert_raw_job(&db.pool, 987654321, 0).await;
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, run_at)
         VALUES ('42', 'system_alert', 'later', now() + interval '1 hour')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    claim::maintenance::register(&db.pool, "stepper")
        .await
        .unwrap();
    let p = Processor::new(
        db.pool.clone(),
        Pipeline::new(RateLimit::default()),
        "stepper",
    );

    let mut sizes = Vec::new();
    let mut refused = 0;
    loop {
        match p.run_once(10).await.unwrap() {
            Step::Processed(answers) => {
                sizes.push(answers.len());
                refused += answers.iter().filter(|a| a.is_err()).count();
                assert!(
                    answers
                        .iter()
                        .flatten()
                        .all(|o| matches!(o, Outcome::Stored { .. })),
                    "{answers:?}"
                );
            }
            Step::EmptyQueue => break,
        }
        assert!(sizes.len() < 10, "the queue never ran empty: {sizes:?}");
    }
    // 25 events and the bad row, in claims of at most 10; the delayed event is not due.
    assert_eq!(sizes, [10, 10, 6]);
    assert_eq!(refused, 1);
    assert_eq!(p.outcomes_committed(), 25);
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        25
    );
    assert!(dead_reason(&db.pool, bad).await.contains("does not exist"));
    assert!(matches!(p.run_once(10).await.unwrap(), Step::EmptyQueue));
    // Left: the refused job (in queue_dead) and the delayed event's job (in queue_later).
    assert_eq!(db.count("SELECT count(*) FROM notify.queue_dead").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM notify.queue WHERE place = 'later'")
            .await,
        1
    );
    assert_eq!(db.live_jobs().await, 1);
}

/// Upgrading from a release that queued in `apalis.jobs`: the jobs an older worker left
/// there (due, left claimed `Queued`/`Running` by a killed per-job worker, retrying,
/// ended) would never be claimed from notifyd's own queue. `notifyd migrate` adopts them:
/// those with work left go to `notify.queue_later` (and from there, due, into the current
/// slot), the ended ones to `notify.queue_dead`, finished ones are dropped, and each is
/// then processed exactly once. Running migrate again adopts nothing.
#[tokio::test]
async fn migrate_adopts_the_jobs_left_in_apalis_jobs() {
    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for body in [
        "pending",
        "queued",
        "running",
        "retrying",
        "killed",
        "exhausted",
        "done",
    ] {
        ids.push(db.enqueue("7", "new_message", body).await);
    }
    // As an older release would have queued them: no row in our queue, one in apalis.jobs.
    sqlx::query("DELETE FROM notify.queue_0")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at)
         VALUES ('old-per-job-0', 'notifyd.events', 'PostgresStorage', '', now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for (event, status, attempts, result) in [
        (ids[0], "Pending", 0, None),
        (ids[1], "Queued", 0, None),
        (ids[2], "Running", 1, None),
        (
            ids[3],
            "Failed",
            2,
            Some(r#"{"Err": "batch failed: flaky"}"#),
        ),
        (
            ids[4],
            "Killed",
            1,
            Some(r#"{"Err": "payload is not JSON"}"#),
        ),
        (
            ids[5],
            "Failed",
            5,
            Some(r#"{"Err": "batch failed: for good"}"#),
        ),
        (ids[6], "Done", 1, Some(r#"{"Ok": null}"#)),
    ] {
        sqlx::query(
            "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                                      priority, idempotency_key, lock_by, lock_at, last_result,
                                      done_at)
             VALUES (convert_to(json_build_object('event_id', $1::bigint)::text, 'UTF8'),
                     apalis.generate_ulid(), 'notifyd.events', $2, $3, 5,
                     now() - interval '1 minute', 0, 'event:' || $1,
                     CASE WHEN $2 IN ('Queued', 'Running') THEN 'old-per-job-0' END,
                     CASE WHEN $2 IN ('Queued', 'Running') THEN now() END, $4::jsonb,
                     CASE WHEN $2 IN ('Killed', 'Failed', 'Done') THEN now() END)",
        )
        .bind(event)
        .bind(status)
        .bind(attempts)
        .bind(result)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // Another queue's job in apalis.jobs is not ours to move.
    sqlx::query(
        "INSERT INTO apalis.jobs (job, id, job_type) VALUES ('x', apalis.generate_ulid(), 'other.queue')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    claim::maintenance::register(&db.pool, "new").await.unwrap();
    let p = Processor::new(db.pool.clone(), Pipeline::new(RateLimit::default()), "new");
    // Before the adoption nothing is claimable: the jobs would be stranded.
    assert!(matches!(p.run_once(100).await.unwrap(), Step::EmptyQueue));

    notifyd::db::migrate(&db.pool).await.unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM apalis.jobs WHERE job_type = 'notifyd.events'")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM apalis.jobs").await, 1);
    let later: Vec<(i64, i16)> =
        sqlx::query_as("SELECT event_id, attempts FROM notify.queue_later ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        later,
        vec![(ids[0], 0), (ids[1], 0), (ids[2], 1), (ids[3], 2)]
    );
    let dead: Vec<(i64, String)> =
        sqlx::query_as("SELECT event_id, reason FROM notify.queue_dead ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        dead,
        vec![
            (ids[4], "payload is not JSON".to_owned()),
            (ids[5], "batch failed: for good".to_owned())
        ]
    );
    // A tick moves the due ones into the current slot; one step processes them, once.
    let tick = claim::rotation::tick(&db.pool).await.unwrap();
    assert_eq!(tick.moved, 4);
    let Step::Processed(rest) = p.run_once(100).await.unwrap() else {
        panic!("the adopted jobs are claimable");
    };
    assert_eq!(rest.len(), 4);
    assert!(
        rest.iter().all(|a| matches!(a, Ok(Outcome::Stored { .. }))),
        "{rest:?}"
    );
    assert!(matches!(p.run_once(100).await.unwrap(), Step::EmptyQueue));
    let stored: Vec<i64> =
        sqlx::query_scalar("SELECT event_id FROM notify.notifications ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, ids[..4].to_vec());
    assert_eq!(db.live_jobs().await, 0);
    // Idempotent: nothing left to adopt.
    assert_eq!(notifyd::db::adopt_legacy_jobs(&db.pool).await.unwrap(), 0);
    notifyd::db::migrate(&db.pool).await.unwrap();
    assert_eq!(db.live_jobs().await, 0);
    assert_eq!(db.count("SELECT count(*) FROM notify.queue_dead").await, 2);
}
