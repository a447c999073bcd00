//! The enqueue contract (jobs/README.md): what `notify.events` refuses at INSERT time and
//! with which constraint, idempotency, transactions, and the one-job-per-event bridge to
//! notifyd's queue (`notify.queue_*`).

mod common;

use std::time::Duration;

use common::{TestDb, process};
use notifyd::pipeline::Outcome;
use sqlx::{Connection, PgConnection, PgPool};

/// Insert one event with every backend-settable column; `Ok(None)` when the row was
/// skipped (a repeated idempotency key).
async fn insert_event(
    pool: &PgPool,
    user: Option<&str>,
    event_type: Option<&str>,
    body: Option<&str>,
    link: Option<&str>,
    key: Option<&str>,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(user)
    .bind(event_type)
    .bind(body)
    .bind(link)
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// Assert that `result` is a database error with this SQLSTATE and constraint, and that the
/// message a developer sees names the constraint.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, sqlx::Error>,
    code: &str,
    constraint: Option<&str>,
    what: &str,
) {
    let err = match result {
        Ok(v) => {
            panic!("{what}: expected SQLSTATE {code} ({constraint:?}), but it was accepted: {v:?}")
        }
        Err(e) => e,
    };
    let db = err
        .as_database_error()
        .unwrap_or_else(|| panic!("{what}: expected a database error, got {err:?}"));
    assert_eq!(
        db.code().as_deref(),
        Some(code),
        "{what}: wrong SQLSTATE: {}",
        db.message()
    );
    if let Some(constraint) = constraint {
        assert_eq!(
            db.constraint(),
            Some(constraint),
            "{what}: {}",
            db.message()
        );
        assert!(
            db.message().contains(constraint),
            "{what}: the message should name {constraint}: {}",
            db.message()
        );
    }
}

async fn events_count(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM notify.events").await
}

async fn jobs_count(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM notify.queue").await
}

async fn outcome_of(pool: &PgPool, id: i64) -> (Option<String>, Option<String>) {
    sqlx::query_as("SELECT outcome, outcome_reason FROM notify.event_outcomes WHERE event_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn unknown_event_type_is_refused_by_the_foreign_key() {
    let db = TestDb::new().await;
    for ty in ["no_such_type", "New_Message", "new_message ", ""] {
        assert_refused(
            insert_event(&db.pool, Some("42"), Some(ty), Some("hi"), None, None).await,
            "23503",
            Some("events_event_type_known"),
            &format!("event_type {ty:?}"),
        );
    }
    assert_eq!(events_count(&db).await, 0);
    assert_eq!(jobs_count(&db).await, 0);
}

#[tokio::test]
async fn body_is_1_to_1000_characters_and_not_blank() {
    let db = TestDb::new().await;
    let too_long_ascii = "x".repeat(1001);
    let too_long_multibyte = "é".repeat(1001);
    for body in [
        "",
        " ",
        "   \t\r\n  ",
        too_long_ascii.as_str(),
        too_long_multibyte.as_str(),
    ] {
        assert_refused(
            insert_event(
                &db.pool,
                Some("42"),
                Some("new_message"),
                Some(body),
                None,
                None,
            )
            .await,
            "23514",
            Some("events_body_length"),
            &format!("body of {} chars", body.chars().count()),
        );
    }
    assert_refused(
        insert_event(&db.pool, Some("42"), Some("new_message"), None, None, None).await,
        "23502",
        None,
        "NULL body",
    );
    // The limit is in characters: 1000 two-byte or four-byte characters are fine.
    let ok_ascii = "x".repeat(1000);
    let ok_two_byte = "é".repeat(1000);
    let ok_four_byte = "😀".repeat(1000);
    let mut ids = Vec::new();
    for body in [
        ok_ascii.as_str(),
        ok_two_byte.as_str(),
        ok_four_byte.as_str(),
        "x",
    ] {
        let id = insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some(body),
            None,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("body of {} chars refused: {e}", body.chars().count()))
        .unwrap();
        ids.push(id);
    }
    let outcomes = process(&db.pipeline(), &ids).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Stored { .. })),
        "{outcomes:?}"
    );
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT body FROM notify.notifications ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        vec![ok_ascii, ok_two_byte, ok_four_byte, "x".to_owned()]
    );
}

#[tokio::test]
async fn user_id_is_1_to_128_characters_without_whitespace_or_controls() {
    let db = TestDb::new().await;
    let too_long = "u".repeat(129);
    for user in [
        "",
        too_long.as_str(),
        "4 2",
        " 42",
        "42 ",
        "4\t2",
        "4\n2",
        "4\r2",
        "4\u{7}2",
        "4\u{7f}2",
    ] {
        assert_refused(
            insert_event(
                &db.pool,
                Some(user),
                Some("new_message"),
                Some("hi"),
                None,
                None,
            )
            .await,
            "23514",
            Some("events_user_id_valid"),
            &format!("user_id {user:?}"),
        );
    }
    assert_refused(
        insert_event(&db.pool, None, Some("new_message"), Some("hi"), None, None).await,
        "23502",
        None,
        "NULL user_id",
    );
    let longest = "u".repeat(128);
    for user in [
        "42",
        "7d9f2c1e-5b7a-4c3e-9a61-0f2b8e4d1c55",
        "auth0|5f7c8ec7c33c6c004bbafe82",
        "ü",
        longest.as_str(),
    ] {
        let id = insert_event(
            &db.pool,
            Some(user),
            Some("new_message"),
            Some("hi"),
            None,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("user_id {user:?} refused: {e}"))
        .unwrap();
        let out = process(&db.pipeline(), &[id]).await;
        assert!(
            matches!(out[0], Outcome::Stored { .. }),
            "{user:?}: {out:?}"
        );
    }
}

/// Links an attacker would try; every one must be refused by `events_link_safe`.
const UNSAFE_LINKS: &[&str] = &[
    "javascript:alert(1)",
    "JavaScript:alert(document.cookie)",
    "JAVASCRIPT:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "\u{1}javascript:alert(1)",
    "vbscript:msgbox(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "//evil.com",
    "//evil.com/inbox",
    "/\\evil.com",
    "\\\\evil.com",
    "ftp://x",
    "file:///etc/passwd",
    "https://user@host",
    "https://user:pw@example.com/",
    "https://example.com@evil.com/",
    "http://evil.com\\@example.com/",
    "https:evil.com",
    "https:/evil.com",
    "https://",
    "http://-evil.com/",
    "https://[::1]/",
    "/inbox with spaces",
    "https://example.com/a b",
    "/inbox\n/7",
    "/inbox\u{0}",
    "inbox/7",
    "",
];

#[tokio::test]
async fn unsafe_links_are_refused_at_insert() {
    let db = TestDb::new().await;
    for link in UNSAFE_LINKS {
        let r = insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("hi"),
            Some(link),
            None,
        )
        .await;
        if link.contains('\0') {
            // Postgres text cannot hold NUL at all: refused before any constraint.
            assert_refused(r, "22021", None, &format!("link {link:?}"));
        } else {
            assert_refused(
                r,
                "23514",
                Some("events_link_safe"),
                &format!("link {link:?}"),
            );
        }
    }
    let too_long = format!("/{}", "a".repeat(2048));
    assert_refused(
        insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("hi"),
            Some(&too_long),
            None,
        )
        .await,
        "23514",
        Some("events_link_safe"),
        "link of 2049 chars",
    );
    assert_eq!(events_count(&db).await, 0);
    assert_eq!(jobs_count(&db).await, 0);
}

#[tokio::test]
async fn safe_links_are_accepted_and_stored_normalised() {
    let db = TestDb::new().await;
    let longest = format!("/{}", "a".repeat(2047));
    let cases: Vec<(&str, &str)> = vec![
        ("/inbox/1?x=2#y", "/inbox/1?x=2#y"),
        ("https://example.com/a", "https://example.com/a"),
        ("/", "/"),
        ("/caf\u{e9}", "/caf%C3%A9"),
        ("HTTPS://Example.COM", "https://example.com/"),
        ("http://localhost:8080/x?y", "http://localhost:8080/x?y"),
        (
            "https://status.example.com/incidents/12",
            "https://status.example.com/incidents/12",
        ),
        (longest.as_str(), longest.as_str()),
    ];
    let mut ids = Vec::new();
    for (link, _) in &cases {
        ids.push(
            insert_event(
                &db.pool,
                Some("42"),
                Some("new_message"),
                Some("hi"),
                Some(link),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("link {link:?} refused: {e}"))
            .unwrap(),
        );
    }
    let out = process(&db.pipeline(), &ids).await;
    for ((link, expected), (id, outcome)) in cases.iter().zip(ids.iter().zip(&out)) {
        assert!(
            matches!(outcome, Outcome::Stored { .. }),
            "{link:?}: {outcome:?}"
        );
        let stored: Option<String> =
            sqlx::query_scalar("SELECT link FROM notify.notifications WHERE event_id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(stored.as_deref(), Some(*expected), "{link:?}");
    }
}

#[tokio::test]
async fn idempotency_key_is_1_to_255_characters() {
    let db = TestDb::new().await;
    let too_long = "k".repeat(256);
    for key in ["", too_long.as_str()] {
        assert_refused(
            insert_event(
                &db.pool,
                Some("42"),
                Some("new_message"),
                Some("hi"),
                None,
                Some(key),
            )
            .await,
            "23514",
            Some("events_idempotency_key_length"),
            &format!("key of {} chars", key.chars().count()),
        );
    }
    let longest = "k".repeat(255);
    assert!(
        insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("hi"),
            None,
            Some(&longest)
        )
        .await
        .unwrap()
        .is_some()
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_a_silent_no_op() {
    let db = TestDb::new().await;
    let key = Some("message:1002:new_message");
    let first = insert_event(
        &db.pool,
        Some("42"),
        Some("new_message"),
        Some("first"),
        None,
        key,
    )
    .await
    .unwrap()
    .expect("the first insert creates the event");

    // A plain INSERT with the same key: no error, no row, nothing queued.
    let r = sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
         VALUES ('42', 'new_message', 'second', $1)",
    )
    .bind(key)
    .execute(&db.pool)
    .await
    .expect("a repeated key is not an error");
    assert_eq!(r.rows_affected(), 0);
    assert_eq!(
        insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("third"),
            None,
            key
        )
        .await
        .unwrap(),
        None,
        "RETURNING gives no row for a skipped repeat"
    );
    // ON CONFLICT DO NOTHING works too.
    let r = sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
         VALUES ('42', 'new_message', 'fourth', $1)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(key)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(r.rows_affected(), 0);
    // Repeats inside one multi-row INSERT: the first row wins.
    let r = sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
         VALUES ('42', 'new_message', 'a', 'multi'), ('42', 'new_message', 'b', 'multi'),
                ('42', 'new_message', 'c', $1)",
    )
    .bind(key)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(r.rows_affected(), 1);

    assert_eq!(events_count(&db).await, 2);
    assert_eq!(
        jobs_count(&db).await,
        2,
        "one job per event, none for the repeats"
    );
    let body: String = sqlx::query_scalar("SELECT body FROM notify.events WHERE id = $1")
        .bind(first)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(body, "first", "the first event is kept unchanged");

    // After processing, a repeat is still a no-op and there is still one notification.
    let all: Vec<i64> = sqlx::query_scalar("SELECT id FROM notify.events ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let out = process(&db.pipeline(), &all).await;
    assert!(out.iter().all(|o| matches!(o, Outcome::Stored { .. })));
    assert_eq!(
        insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("again"),
            None,
            key
        )
        .await
        .unwrap(),
        None
    );
    let out = process(&db.pipeline(), &all).await;
    assert_eq!(out, vec![Outcome::Duplicate, Outcome::Duplicate]);
    assert_eq!(events_count(&db).await, 2);
    assert_eq!(
        jobs_count(&db).await,
        0,
        "the jobs were deleted with their outcomes, and the repeat queued none"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        2
    );
    let bodies: Vec<String> =
        sqlx::query_scalar("SELECT body FROM notify.notifications ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(bodies, vec!["first", "a"]);
}

/// Two transactions racing with the same new key: a plain INSERT loses with a unique
/// violation, ON CONFLICT DO NOTHING loses with a no-op. Either way one event, one job.
#[tokio::test]
async fn racing_transactions_with_the_same_new_key() {
    let db = TestDb::new().await;
    for (on_conflict, key) in [(false, "race-plain"), (true, "race-on-conflict")] {
        let mut first = PgConnection::connect(&db.url).await.unwrap();
        let mut tx = first.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
             VALUES ('42', 'new_message', 'first', $1)",
        )
        .bind(key)
        .execute(&mut *tx)
        .await
        .unwrap();

        let url = db.url.clone();
        let second = tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let sql = if on_conflict {
                "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
                 VALUES ('42', 'new_message', 'second', $1)
                 ON CONFLICT (idempotency_key) DO NOTHING"
            } else {
                "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
                 VALUES ('42', 'new_message', 'second', $1)"
            };
            sqlx::query(sql)
                .bind(key)
                .execute(&mut conn)
                .await
                .map(|r| r.rows_affected())
        });
        // The second INSERT must be waiting on the first transaction's key before it commits;
        // otherwise the trigger would see the committed row and this would not be a race.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = db
                .count(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await;
            if waiting > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the second INSERT never waited"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.commit().await.unwrap();
        let result = second.await.unwrap();
        if on_conflict {
            assert_eq!(result.unwrap(), 0, "ON CONFLICT DO NOTHING loses quietly");
        } else {
            assert_refused(
                result,
                "23505",
                Some("events_idempotency_key_unique"),
                "racing plain INSERT",
            );
        }
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notify.events WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(n, 1);
    }
    assert_eq!(jobs_count(&db).await, 2);
}

#[tokio::test]
async fn a_rolled_back_enqueue_leaves_no_event_and_no_job() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
         VALUES ('42', 'new_message', 'never', 'rolled-back') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    // Inside the transaction the job exists (same transaction as the event) ...
    let jobs_inside: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notify.queue WHERE event_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(jobs_inside, 1);
    // ... and nobody else can see either.
    assert_eq!(jobs_count(&db).await, 0);
    tx.rollback().await.unwrap();
    assert_eq!(events_count(&db).await, 0);
    assert_eq!(jobs_count(&db).await, 0);
    // The key was never used, so it can be used now.
    assert!(
        insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("now"),
            None,
            Some("rolled-back")
        )
        .await
        .unwrap()
        .is_some()
    );
}

/// Every event gets exactly one job in the queue (a slot or `queue_later`) that names it.
async fn assert_one_job_per_event(db: &TestDb) {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT e.id, count(j.event_id)
         FROM notify.events AS e
         LEFT JOIN notify.queue AS j ON j.event_id = e.id
         GROUP BY e.id ORDER BY e.id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (id, jobs) in &rows {
        assert_eq!(*jobs, 1, "event {id} has {jobs} jobs");
    }
    assert_eq!(jobs_count(db).await, rows.len() as i64, "no stray jobs");
}

#[tokio::test]
async fn each_event_gets_exactly_one_job() {
    let db = TestDb::new().await;
    let single = db.enqueue("42", "new_message", "one").await;
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, link, run_at)
         VALUES ('42', 'status_change', 'two', '/a', now() + interval '5 minutes'),
                ('43', 'system_alert', 'three', NULL, now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_one_job_per_event(&db).await;
    // The job is exactly what the worker expects: due when the event is, in the current
    // slot (or, not due within a slot period, in queue_later), with no attempt yet and the
    // priority of its event type.
    let (place, attempts, priority, same_run_at): (String, i16, i16, bool) = sqlx::query_as(
        "SELECT j.place, j.attempts, j.priority, j.run_at = e.run_at
         FROM notify.queue AS j JOIN notify.events AS e ON j.event_id = e.id
         WHERE e.id = $1",
    )
    .bind(single)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(place, "0", "slot 0 is current in a fresh database");
    assert_eq!(attempts, 0);
    assert_eq!(priority, 100, "new_message's priority");
    assert!(same_run_at);
    let mismatched = db
        .count(
            "SELECT count(*) FROM notify.queue AS j
             JOIN notify.events AS e ON j.event_id = e.id
             JOIN notify.event_types AS t ON t.name = e.event_type
             WHERE j.run_at <> e.run_at OR j.attempts <> 0 OR j.priority <> t.priority
                OR (j.place = 'later') <> (e.run_at > now() + interval '1 minute')",
        )
        .await;
    assert_eq!(mismatched, 0);
}

#[tokio::test]
async fn an_insert_select_of_1000_events_creates_1000_jobs() {
    let db = TestDb::new().await;
    let r = sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT 'user-' || (g % 37), 'system_alert', 'Maintenance tonight (' || g || ')'
         FROM generate_series(1, 1000) AS g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(r.rows_affected(), 1000);
    assert_eq!(events_count(&db).await, 1000);
    assert_eq!(jobs_count(&db).await, 1000);
    assert_one_job_per_event(&db).await;
    assert_eq!(
        db.count("SELECT count(DISTINCT event_id) FROM notify.queue_0")
            .await,
        1000,
        "all in the current slot, one per event"
    );
}

#[tokio::test]
async fn a_future_run_at_is_not_claimed_before_its_time() {
    let db = TestDb::new().await;
    let later: i64 = sqlx::query_scalar(
        "INSERT INTO notify.events (user_id, event_type, body, run_at)
         VALUES ('42', 'system_alert', 'later', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let due = db.enqueue("42", "system_alert", "now").await;
    let in_future = db
        .count(
            "SELECT count(*) FROM notify.queue_later AS j JOIN notify.events AS e
               ON j.event_id = e.id
             WHERE j.run_at = e.run_at AND j.run_at > now() + interval '59 minutes'",
        )
        .await;
    assert_eq!(
        in_future, 1,
        "the delayed job waits in queue_later with the event's run_at"
    );

    // Claim the way the worker does (`claim_due`: row locks, SKIP LOCKED, due jobs only):
    // only the due job comes. Each claim is dropped unprocessed here, which rolls it back,
    // so the jobs are deleted by hand to see what the next claim takes.
    let claim = || async {
        let batch = notifyd::claim::backend::claim_due(&db.pool, 100, i16::MIN)
            .await
            .unwrap();
        let events: Vec<i64> = batch.map(|b| b.events()).unwrap_or_default();
        sqlx::query("DELETE FROM notify.queue_0 WHERE event_id = ANY($1)")
            .bind(&events)
            .execute(&db.pool)
            .await
            .unwrap();
        events
    };
    assert_eq!(claim().await, vec![due]);
    assert!(claim().await.is_empty(), "nothing else is due");
    // Once its time has come, a rotation tick moves the delayed one into the current slot,
    // and it is claimed too.
    sqlx::query("UPDATE notify.queue_later SET run_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(claim().await.is_empty(), "queue_later is never claimed");
    let tick = notifyd::claim::rotation::tick(&db.pool).await.unwrap();
    assert_eq!(tick.moved, 1);
    assert_eq!(claim().await, vec![later]);
}

#[tokio::test]
async fn id_cannot_be_supplied() {
    let db = TestDb::new().await;
    assert_refused(
        sqlx::query(
            "INSERT INTO notify.events (id, user_id, event_type, body)
             VALUES (1000, '42', 'new_message', 'hi')",
        )
        .execute(&db.pool)
        .await,
        "428C9",
        None,
        "explicit id",
    );
    assert_eq!(events_count(&db).await, 0);
}

/// A queue row is typed (an event id, a priority, a time, a count), so no payload can be
/// malformed; the one bad job there can be is a row whose event does not exist (written
/// by hand, or its event deleted by retention). It is refused for good: it leaves the slot
/// for `notify.queue_dead` with the reason, and the batch around it is processed.
#[tokio::test]
async fn a_queue_row_for_a_missing_event_is_refused_into_queue_dead() {
    let db = TestDb::new().await;
    let good = db.enqueue("42", "new_message", "fine").await;
    sqlx::query("INSERT INTO notify.queue_0 (event_id, run_at) VALUES (987654321, now())")
        .execute(&db.pool)
        .await
        .unwrap();
    let processor = notifyd::claim::Processor::new(
        db.pool.clone(),
        notifyd::pipeline::Pipeline::new(Default::default()),
        "contract-test",
    );
    notifyd::claim::maintenance::register(&db.pool, "contract-test")
        .await
        .unwrap();
    let notifyd::claim::Step::Processed(answers) = processor.run_once(100).await.unwrap() else {
        panic!("two jobs were due");
    };
    assert_eq!(answers.len(), 2);
    assert_eq!(
        answers.iter().filter(|a| a.is_err()).count(),
        1,
        "{answers:?}"
    );
    let (attempts, reason, worker): (i16, String, Option<String>) = sqlx::query_as(
        "SELECT attempts, reason, worker FROM notify.queue_dead WHERE event_id = 987654321",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    assert!(
        reason.contains("event 987654321 does not exist"),
        "{reason}"
    );
    assert_eq!(worker.as_deref(), Some("contract-test"));
    assert_eq!(db.live_jobs().await, 0, "both jobs left the queue");
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        1
    );
    let (outcome, _) = outcome_of(&db.pool, good).await;
    assert_eq!(outcome.as_deref(), Some("stored"));
}

#[tokio::test]
async fn a_nul_byte_is_refused() {
    let db = TestDb::new().await;
    assert_refused(
        insert_event(
            &db.pool,
            Some("42"),
            Some("new_message"),
            Some("a\0b"),
            None,
            None,
        )
        .await,
        "22021",
        None,
        "NUL in body",
    );
    assert_eq!(events_count(&db).await, 0);
}

/// Adding a type is one INSERT; events of the new type are processed like any other.
#[tokio::test]
async fn a_new_event_type_is_one_insert() {
    let db = TestDb::new().await;
    for bad in ["Weekly", "weekly digest", "1weekly", "", &"w".repeat(64)] {
        assert_refused(
            sqlx::query("INSERT INTO notify.event_types (name) VALUES ($1)")
                .bind(bad)
                .execute(&db.pool)
                .await,
            "23514",
            Some("event_types_name_format"),
            &format!("type name {bad:?}"),
        );
    }
    sqlx::query(
        "INSERT INTO notify.event_types (name, description) VALUES ('weekly_digest', 'Weekly summary')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let id = db
        .enqueue("42", "weekly_digest", "Your summary is ready")
        .await;
    let out = process(&db.pipeline(), &[id]).await;
    assert!(matches!(out[0], Outcome::Stored { .. }), "{out:?}");
    // A type in use cannot be deleted out from under its events.
    assert_refused(
        sqlx::query("DELETE FROM notify.event_types WHERE name = 'weekly_digest'")
            .execute(&db.pool)
            .await,
        "23503",
        Some("events_event_type_known"),
        "deleting a type in use",
    );
}

/// Values the constraints let through but the worker refuses: recorded as `invalid` with a
/// reason, never stored, never an error for the job.
#[tokio::test]
async fn values_that_slip_past_the_constraints_end_invalid_with_a_reason() {
    let db = TestDb::new().await;
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        ("42", "\u{1}\u{2}\u{7}", None, "no text left"),
        ("42", "\u{202e}\u{202d}", None, "no text left"),
        ("42", "<script>alert(1)</script>", None, "no text left"),
        ("42", "hi", Some("http://999.1.1.1/"), "link must be"),
    ];
    // Unicode blank space and out-of-range ports are refused by the constraints already.
    for (body, link, constraint) in [
        ("\u{a0}\u{a0}", None, "events_body_length"),
        ("\u{3000}", None, "events_body_length"),
        ("hi", Some("http://example.com:99999/"), "events_link_safe"),
    ] {
        assert_refused(
            insert_event(
                &db.pool,
                Some("42"),
                Some("new_message"),
                Some(body),
                link,
                None,
            )
            .await,
            "23514",
            Some(constraint),
            &format!("{body:?} {link:?}"),
        );
    }
    let mut ids = Vec::new();
    for (user, body, link, _) in cases {
        ids.push(
            insert_event(
                &db.pool,
                Some(user),
                Some("new_message"),
                Some(body),
                *link,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{body:?} {link:?} was refused at INSERT: {e}"))
            .unwrap(),
        );
    }
    let out = process(&db.pipeline(), &ids).await;
    for ((_, body, link, reason), (id, outcome)) in cases.iter().zip(ids.iter().zip(&out)) {
        match outcome {
            Outcome::Invalid { reason: r } => {
                assert!(r.contains(reason), "{body:?} {link:?}: {r}")
            }
            other => panic!("{body:?} {link:?}: expected invalid, got {other:?}"),
        }
        let (o, r) = outcome_of(&db.pool, *id).await;
        assert_eq!(o.as_deref(), Some("invalid"));
        assert!(r.unwrap_or_default().contains(reason));
    }
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        0
    );

    // A user id with a Unicode space: depending on the server's locale, `[[:space:]]` in
    // the constraint may or may not match it. Either way it never becomes a notification.
    for user in ["a\u{a0}b", "a\u{2003}b", "a\u{3000}b"] {
        match insert_event(
            &db.pool,
            Some(user),
            Some("new_message"),
            Some("hi"),
            None,
            None,
        )
        .await
        {
            Err(e) => assert_refused::<()>(
                Err(e),
                "23514",
                Some("events_user_id_valid"),
                &format!("user {user:?}"),
            ),
            Ok(id) => {
                let out = process(&db.pipeline(), &[id.unwrap()]).await;
                assert!(
                    matches!(&out[0], Outcome::Invalid { reason } if reason.contains("user_id")),
                    "user {user:?}: {out:?}"
                );
            }
        }
    }
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        0
    );
}

/// The first payload heard on apalis's old insert channel (or the test's own) after an
/// event is enqueued, with a marker sent (and committed) right after the enqueue: notifications
/// arrive in commit order, so the marker comes first exactly when the enqueue sent nothing.
async fn first_heard_after_enqueue(db: &TestDb, marker: &str) -> String {
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener
        .listen_all(["apalis::job::insert", "notifyd_test_enqueue"])
        .await
        .unwrap();
    db.enqueue("42", "new_message", "hello").await;
    sqlx::query("SELECT pg_notify('apalis::job::insert', $1)")
        .bind(marker)
        .execute(&db.pool)
        .await
        .unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the marker arrives")
        .unwrap();
    heard.payload().to_owned()
}

/// Enqueuing sends no NOTIFY (migration 20261201000003): one would make every enqueuing
/// transaction commit one at a time. The queue's own trigger sends none; a trigger that
/// someone adds on a queue table and that sends one is found by the worker's start-up check
/// (`db::enqueue_notify_triggers`), and heard.
#[tokio::test]
async fn enqueue_sends_no_notify() {
    let db = TestDb::new().await;
    assert_eq!(
        notifyd::db::enqueue_notify_triggers(&db.pool)
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(first_heard_after_enqueue(&db, "marker-1").await, "marker-1");

    // apalis's old per-row trigger enabled again changes nothing: apalis.jobs is no
    // longer written.
    sqlx::query("ALTER TABLE apalis.jobs ENABLE TRIGGER notify_workers")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        first_heard_after_enqueue(&db, "marker-apalis").await,
        "marker-apalis"
    );
    // A trigger on the current slot that sends one: both the check and the listener notice.
    sqlx::raw_sql(
        "CREATE FUNCTION notify.test_wake() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('notifyd_test_enqueue', 'notifyd.events'); RETURN NULL; END $$;
         CREATE TRIGGER notify_workers AFTER INSERT ON notify.queue_0
             FOR EACH STATEMENT EXECUTE FUNCTION notify.test_wake();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        notifyd::db::enqueue_notify_triggers(&db.pool)
            .await
            .unwrap(),
        vec!["notify.queue_0.notify_workers".to_owned()]
    );
    let heard = first_heard_after_enqueue(&db, "marker-2").await;
    assert!(heard.contains("notifyd.events"), "{heard}");
}

/// The three text checks, as released in `20261122000001_notify_schema.sql`, written out
/// inline: the reference that the function-based checks of
/// `20261207000200_event_checks_as_functions.sql` must agree with, value for value.
const RELEASED_CHECKS: [(&str, &str); 3] = [
    (
        "notify.event_user_id_is_valid",
        r"char_length(v) BETWEEN 1 AND 128
          AND v !~ '[[:cntrl:]\s\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]'",
    ),
    (
        "notify.event_body_is_valid",
        r"char_length(v) BETWEEN 1 AND 1000
          AND v ~ '[^\s\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]'",
    ),
    (
        "notify.event_link_is_safe",
        r#"char_length(v) <= 2048
          AND v !~ '[[:cntrl:]\s\u00a0\u2000-\u200b\u2028\u2029\u3000\\''"`<>]'
          AND (v ~ '^/([^/]|$)'
               OR v ~* ('^https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?'
                        '(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?'
                        '([/?#]|$)'))"#,
    ),
];

/// Values near every edge of the three checks: each space and control character they
/// list, lengths at and past the limits, and links an attacker would try.
fn check_corpus() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "a",
        "42",
        "user-7@example.com",
        "Ünïcödé",
        "日本語",
        "a b",
        " ",
        "/",
        "//x",
        "/a",
        "/inbox/7?x=1#y",
        "/\\x",
        "http://a",
        "https://a.b:65535/",
        "https://a.b:65536/",
        "http://a.b:0/",
        "HTTPS://EXAMPLE.COM/",
        "http://-a.com/",
        "http://a-.com/",
        "http://user@host/",
        "javascript:alert(1)",
        "http://a/'",
        "http://a/\"",
        "http://a/`",
        "http://a/<",
        "http://a/>",
        "http://a/\\",
        "ftp://a/",
        "http:/a",
        "http://a?q",
        "http://a#f",
        "http://a:/",
        "&amp;",
        "<b>hi</b>",
        "http://a.b:99999/",
        "http://a.b:65539/",
        "🎉",
        "a🎉b",
        "/🎉",
        "su0a",
        "\\s",
        "\\u00a0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for c in [
        '\u{1}', '\t', '\n', '\r', '\u{b}', '\u{c}', '\u{1f}', '\u{7f}', '\u{85}', '\u{9f}',
        '\u{a0}', '\u{1680}', '\u{180e}', '\u{2000}', '\u{2007}', '\u{200a}', '\u{200b}',
        '\u{200c}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}', '\u{feff}',
        '\u{1fff}',
    ] {
        v.push(c.to_string());
        v.push(format!("a{c}b"));
        v.push(format!("/a{c}b"));
        v.push(format!("http://a.com/{c}"));
    }
    for n in [127, 128, 129, 999, 1000, 1001, 2047, 2048, 2049] {
        v.push("x".repeat(n));
        v.push(format!("/{}", "é".repeat(n - 1)));
    }
    v
}

/// What `function` answers for each value of `corpus`, in order, on `conn`'s session.
async fn check_answers(
    conn: impl sqlx::PgExecutor<'_>,
    function: &str,
    corpus: &[String],
) -> Vec<Option<bool>> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {function}(v) FROM unnest($1::text[]) WITH ORDINALITY AS t(v, i) ORDER BY i"
    )))
    .bind(corpus)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// The function-based checks refuse exactly what the released inline checks refused, in
/// the server's locale, for every value of the corpus; and a caller's session settings
/// cannot change them (standard_conforming_strings off, a search_path that puts a
/// caller's own `!~` before pg_catalog's).
#[tokio::test]
async fn function_checks_refuse_exactly_what_the_released_checks_refused() {
    let db = TestDb::new().await;
    let corpus = check_corpus();
    for (function, expression) in RELEASED_CHECKS {
        let disagree: Vec<(String, Option<bool>, Option<bool>)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT v, {function}(v), ({expression})
                 FROM unnest($1::text[]) AS t(v)
                 WHERE {function}(v) IS DISTINCT FROM ({expression})"
            )))
            .bind(&corpus)
            .fetch_all(&db.pool)
            .await
            .unwrap();
        assert!(disagree.is_empty(), "{function}: {disagree:?}");
    }
    // The corpus reaches both answers of every check.
    for (function, _) in RELEASED_CHECKS {
        let (yes, no): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE {function}(v)), count(*) FILTER (WHERE NOT {function}(v))
             FROM unnest($1::text[]) AS t(v)"
        )))
        .bind(&corpus)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(
            yes > 5 && no > 5,
            "{function}: {yes} accepted, {no} refused"
        );
    }

    // The row's check is the fold, and the fold calls these functions (else the rest
    // would test nothing; migration 20261208000001 folded the checks into one).
    let defs: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = 'notify.events'::regclass AND contype = 'c'
         ORDER BY conname",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(defs.len(), 1, "{defs:?}");
    assert!(
        defs[0].contains(
            "notify.event_row_is_valid(user_id, event_type, body, link, idempotency_key, outcome)"
        ),
        "{}",
        defs[0]
    );
    let fold: String = sqlx::query_scalar(
        "SELECT prosrc FROM pg_proc WHERE oid = 'notify.event_row_is_valid'::regproc",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    for call in [
        "notify.event_body_is_valid(b)",
        "notify.event_link_is_safe(l)",
        "notify.event_user_id_is_valid(u)",
    ] {
        assert!(fold.contains(call), "the fold does not call {call}");
    }

    // A hostile session: first on its search_path, its own operators and char_length that
    // let everything through, and the pre-9.1 string syntax. The checks still answer as
    // released, for the whole corpus, and still refuse, with their names.
    let reference: Vec<Vec<Option<bool>>> = {
        let mut all = Vec::new();
        for (function, _) in RELEASED_CHECKS {
            all.push(check_answers(&db.pool, function, &corpus).await);
        }
        all
    };
    sqlx::raw_sql(
        "CREATE SCHEMA evil;
         CREATE FUNCTION evil.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE FUNCTION evil.always_int(integer, integer) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE FUNCTION evil.char_length(text) RETURNS integer LANGUAGE sql AS 'SELECT 1';
         CREATE OPERATOR evil.!~ (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always);
         CREATE OPERATOR evil.~ (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always);
         CREATE OPERATOR evil.~* (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always);
         CREATE OPERATOR evil.<= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.always_int);
         CREATE OPERATOR evil.>= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.always_int)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SET search_path = evil, pg_catalog, public")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("SET standard_conforming_strings = off")
        .execute(&mut conn)
        .await
        .unwrap();
    // The session's own operators and function are what unqualified names find there.
    let fooled: (bool, bool, i32) =
        sqlx::query_as("SELECT 'a'::text !~ 'a'::text, 2000 <= 1, char_length('abc'::text)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        fooled,
        (true, true, 1),
        "the hostile session's names are not in effect"
    );
    for ((function, _), want) in RELEASED_CHECKS.iter().zip(&reference) {
        let got = check_answers(&mut conn, function, &corpus).await;
        let differ: Vec<&String> = corpus
            .iter()
            .zip(got.iter().zip(want))
            .filter(|(_, (g, w))| g != w)
            .map(|(v, _)| v)
            .collect();
        assert!(
            differ.is_empty(),
            "{function} in a hostile session: {differ:?}"
        );
    }
    for (user, body, link, constraint) in [
        ("a b", "hi", None, "events_user_id_valid"),
        ("a\u{2028}b", "hi", None, "events_user_id_valid"),
        ("42", "\u{3000}", None, "events_body_length"),
        ("42", "hi", Some("/a\\b"), "events_link_safe"),
        ("42", "hi", Some("/a b"), "events_link_safe"),
        ("42", "hi", Some("javascript:alert(1)"), "events_link_safe"),
    ] {
        let r = sqlx::query(
            "INSERT INTO notify.events (user_id, event_type, body, link)
             VALUES ($1, 'new_message', $2, $3)",
        )
        .bind(user)
        .bind(body)
        .bind(link)
        .execute(&mut conn)
        .await;
        assert_refused(
            r,
            "23514",
            Some(constraint),
            &format!("{user:?} {body:?} {link:?}"),
        );
    }
    // And what is valid stays valid in that session.
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body, link)
         VALUES ('42', 'new_message', 'hi', '/inbox/7')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
}
