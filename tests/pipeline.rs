//! The pipeline against a real Postgres: outcomes, preferences, idempotency.

mod common;

use common::{TestDb, process};
use notifyd::pipeline::Outcome;

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
