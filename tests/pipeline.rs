//! The pipeline against a real Postgres: outcomes, preferences, idempotency.

mod common;

use common::{TestDb, process};
use notifyd::pipeline::Outcome;
use notifyd::sanitize::sanitize_body;
use notifyd::store::{Content, Decision, Prepared, RateLimit};

/// A valid `new_message` event of `user`, ready for the store step (its body made by the
/// sanitizer, the only maker of the store's text).
fn valid(user: &str, id: i64, body: &str) -> Prepared {
    Prepared {
        event_id: id,
        user_id: user.into(),
        event_type: "new_message".into(),
        content: Content::Valid {
            body: sanitize_body(body).unwrap(),
            link: None,
        },
    }
}

/// The store step alone, in a transaction of its own, as a batch's would be.
async fn apply_batch(
    pool: &sqlx::PgPool,
    batch: &[Prepared],
    rate: RateLimit,
    now: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Vec<Decision>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let decisions = notifyd::store::apply_in(&mut tx, batch, rate, now).await?;
    tx.commit().await?;
    Ok(decisions)
}

#[tokio::test]
async fn stores_one_notification_per_event_even_when_run_twice() {
    let db = TestDb::new().await;
    let p = db.pipeline();
    let id = db.enqueue("42", "new_message", "Hello <b>Alice</b>").await;
    let first = process(&p, &[id]).await;
    assert!(matches!(
        first[0],
        Outcome::Stored {
            notification_id: Some(_)
        }
    ));
    let again = process(&p, &[id, id]).await;
    assert_eq!(again, vec![Outcome::Duplicate, Outcome::Duplicate]);
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        1
    );
    let body: String = sqlx::query_scalar("SELECT body FROM notify.notifications")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(body, "Hello Alice");
}

/// The store step itself refuses to decide an event twice, even when the caller loaded the
/// event before another run recorded its outcome (two replicas running the same job: both
/// loaded it undecided, one waits for the other's per-user lock). Simulated here by
/// handing the store the same prepared event again.
#[tokio::test]
async fn the_store_step_never_decides_an_event_twice() {
    let db = TestDb::new().await;
    let stored = db.enqueue("42", "new_message", "first run").await;
    let limited = db.enqueue("42", "new_message", "limited").await;
    let prepared = |id: i64| valid("42", id, "stale copy");
    let one = RateLimit {
        limit: 1,
        ..RateLimit::default()
    };
    let first = apply_batch(&db.pool, &[prepared(stored), prepared(limited)], one, None)
        .await
        .unwrap();
    let outcomes: Vec<&str> = first.iter().map(|d| d.verdict.as_str()).collect();
    assert_eq!(outcomes, ["stored", "rate_limited"]);

    // A second run with stale input, and a more generous limit: nothing is decided again.
    let again = apply_batch(
        &db.pool,
        &[prepared(stored), prepared(limited)],
        RateLimit::default(),
        None,
    )
    .await
    .unwrap();
    assert!(again.is_empty(), "decided twice: {again:?}");
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT o.outcome, COALESCE(n.body, '') FROM notify.event_outcomes AS o
         LEFT JOIN notify.notifications AS n ON n.id = o.notification_id
         ORDER BY o.event_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("stored".to_owned(), "stale copy".to_owned()),
            ("rate_limited".to_owned(), String::new())
        ]
    );
}

/// The rate-limit state keeps what a longer window needs: deliveries counted under a 1-hour
/// window still count after the window is made 1 day long (a config change between
/// restarts), and the limit holds across store transactions, not only inside one.
#[tokio::test]
async fn a_longer_window_still_counts_earlier_deliveries() {
    use chrono::{Duration as Days, Utc};
    use std::time::Duration;

    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(db.enqueue("w", "new_message", &format!("event {i}")).await);
    }
    let prepared = |id: i64| valid("w", id, &format!("body {id}"));
    let t0 = Utc::now() - Days::hours(5);
    let hour = RateLimit {
        limit: 3,
        window: Duration::from_secs(3600),
    };
    // Two transactions at t0: 2 + 1 = the limit of 3.
    let a = apply_batch(
        &db.pool,
        &[prepared(ids[0]), prepared(ids[1])],
        hour,
        Some(t0),
    )
    .await
    .unwrap();
    let b = apply_batch(
        &db.pool,
        &[prepared(ids[2]), prepared(ids[3])],
        hour,
        Some(t0),
    )
    .await
    .unwrap();
    let outcomes = |d: &[Decision]| -> Vec<String> {
        d.iter().map(|d| d.verdict.as_str().to_owned()).collect()
    };
    assert_eq!(outcomes(&a), ["stored", "stored"]);
    assert_eq!(outcomes(&b), ["stored", "rate_limited"]);
    // Two hours later the 1-hour window is clear again, but with a 1-day window the three
    // deliveries at t0 are still inside it: nothing more gets through.
    let day = RateLimit {
        limit: 3,
        window: Duration::from_secs(24 * 3600),
    };
    let c = apply_batch(
        &db.pool,
        &[prepared(ids[4])],
        day,
        Some(t0 + Days::hours(2)),
    )
    .await
    .unwrap();
    assert_eq!(outcomes(&c), ["rate_limited"]);
    // With the 1-hour window it would have been stored.
    let d = apply_batch(
        &db.pool,
        &[prepared(ids[5])],
        hour,
        Some(t0 + Days::hours(2)),
    )
    .await
    .unwrap();
    assert_eq!(outcomes(&d), ["stored"]);
}

/// A stored event's record is its notification: the worker writes nothing on the event
/// row, and `notify.event_outcomes` reads the outcome, the time and the id from the
/// notification.
#[tokio::test]
async fn a_stored_event_is_recorded_by_its_notification() {
    let db = TestDb::new().await;
    let id = db.enqueue("42", "new_message", "Hello").await;
    let out = process(&db.pipeline(), &[id]).await;
    let Outcome::Stored {
        notification_id: Some(notification),
    } = out[0]
    else {
        panic!("not stored: {out:?}");
    };
    let row: (Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT outcome, processed_at FROM notify.events WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(row, (None, None), "the event row was written");
    let view: (Option<String>, bool, Option<i64>) = sqlx::query_as(
        "SELECT outcome, processed_at IS NOT NULL, notification_id
         FROM notify.event_outcomes WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(view, (Some("stored".into()), true, Some(notification)));
}

/// A second run of a stored event, in a batch with new events of the same user, takes no
/// place in the user's rate limit: with a limit of 2, one earlier delivery and the
/// duplicate first in event order, the next event is still stored.
#[tokio::test]
async fn a_second_run_of_a_stored_event_takes_no_place_in_the_limit() {
    let db = TestDb::new().await;
    let first = db.enqueue("d", "new_message", "first").await;
    let second = db.enqueue("d", "new_message", "second").await;
    let third = db.enqueue("d", "new_message", "third").await;
    let prepared = |id: i64| valid("d", id, &format!("body {id}"));
    let two = RateLimit {
        limit: 2,
        ..RateLimit::default()
    };
    let a = apply_batch(&db.pool, &[prepared(first)], two, None)
        .await
        .unwrap();
    assert_eq!(a[0].verdict.as_str(), "stored");
    let b = apply_batch(
        &db.pool,
        &[prepared(first), prepared(second), prepared(third)],
        two,
        None,
    )
    .await
    .unwrap();
    let decided: Vec<(i64, &str)> = b.iter().map(|d| (d.event_id, d.verdict.as_str())).collect();
    assert_eq!(decided, [(second, "stored"), (third, "rate_limited")]);
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        2
    );
}

/// Deleting notifications (the backend, or retention) writes `stored` on their event rows,
/// in one statement for several users, so the events keep their outcome and a later run of
/// their jobs stores nothing again. The rows then look like ones recorded by a worker of an
/// earlier release, which the store also skips.
#[tokio::test]
async fn deleted_notifications_leave_their_events_stored() {
    let db = TestDb::new().await;
    let p = db.pipeline();
    let a = db.enqueue("42", "new_message", "Hello").await;
    let b = db.enqueue("43", "status_change", "Shipped").await;
    let kept = db.enqueue("43", "new_message", "Still here").await;
    process(&p, &[a, b, kept]).await;
    let created: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT created_at FROM notify.notifications WHERE event_id = ANY($1) ORDER BY event_id",
    )
    .bind([a, b])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM notify.notifications WHERE event_id = ANY($1)")
        .bind([a, b])
        .execute(&db.pool)
        .await
        .unwrap();
    let rows: Vec<(i64, Option<String>, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT id, outcome, processed_at FROM notify.events ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (a, Some("stored".into()), Some(created[0])),
            (b, Some("stored".into()), Some(created[1])),
            (kept, None, None),
        ]
    );
    let view: Vec<(i64, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT event_id, outcome, notification_id FROM notify.event_outcomes ORDER BY event_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(view[0], (a, Some("stored".into()), None));
    assert_eq!(view[1], (b, Some("stored".into()), None));
    assert!(view[2].2.is_some(), "{view:?}");
    assert_eq!(
        process(&p, &[a, b]).await,
        vec![Outcome::Duplicate, Outcome::Duplicate]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        1,
        "stored again after its notification was deleted"
    );
}

/// A worker of the previous release, running again an event this release stored, writes
/// the outcome it decided on the row (it does not see the notification): the view still
/// says `stored`, because a notification is the record of a delivery.
#[tokio::test]
async fn a_notification_outweighs_the_outcome_on_its_event_row() {
    let db = TestDb::new().await;
    let id = db.enqueue("42", "new_message", "Hello").await;
    process(&db.pipeline(), &[id]).await;
    sqlx::query(
        "UPDATE notify.events SET outcome = 'rate_limited', processed_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let view: (Option<String>, Option<String>, bool) = sqlx::query_as(
        "SELECT outcome, outcome_reason, notification_id IS NOT NULL
         FROM notify.event_outcomes WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(view, (Some("stored".into()), None, true));
}
