//! The worker instances' rows in `apalis.workers`: registration, heartbeat, and the mark
//! of a stopped instance. Every statement on that table is here.
//!
//! Liveness is only shown, never acted on: a claim is a row lock, so a dead worker's jobs
//! are free as soon as its sessions end, with no rescue. The rows exist because
//! `apalis.jobs.lock_by` references them (a `Killed` or `Failed` job names the worker that
//! refused it) and because `notifyd status` lists the workers with their last heartbeat.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::types::PgInterval;

use crate::contract::QUEUE;
use crate::db;

/// Register (or refresh) a worker instance, as apalis-postgres does.
pub async fn register(pool: &PgPool, worker: &str) -> Result<(), sqlx::Error> {
    db::execute(
        pool,
        sqlx::query(
            "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at)
             VALUES ($1, $2, 'notifyd-batch', '', now(), now())
             ON CONFLICT (id) DO UPDATE SET last_seen = now(), worker_type = EXCLUDED.worker_type",
        )
        .bind(worker)
        .bind(QUEUE),
    )
    .await?;
    Ok(())
}

/// Keep `worker`'s heartbeat fresh while its instance runs. A beat that fails (the
/// database is away) is skipped; the next one tries again.
pub async fn heartbeat(pool: PgPool, worker: String, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = db::execute(
            &pool,
            sqlx::query(
                "UPDATE apalis.workers SET last_seen = now() WHERE id = $1 AND worker_type = $2",
            )
            .bind(&worker)
            .bind(QUEUE),
        );
        if let Ok(Err(e)) = tokio::time::timeout(every, beat).await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
}

/// How long marking a stopped instance may take.
const STOP_MARK_TIMEOUT: Duration = Duration::from_secs(1);

/// Mark a stopped instance: its heartbeat is backdated by `silent_after`, so that
/// `notifyd status` shows it gone at once. Best effort and time-bounded (the database may
/// be the reason it stopped).
pub async fn mark_stopped(pool: &PgPool, worker: &str, silent_after: Duration) {
    let mark = db::execute(
        pool,
        sqlx::query(
            "UPDATE apalis.workers SET last_seen = least(last_seen, now() - $2::interval)
             WHERE id = $1",
        )
        .bind(worker)
        .bind(PgInterval {
            months: 0,
            days: 0,
            microseconds: i64::try_from(silent_after.as_micros()).unwrap_or(i64::MAX),
        }),
    );
    match tokio::time::timeout(STOP_MARK_TIMEOUT, mark).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not mark the stopped instance"),
        Err(_) => tracing::debug!("marking the stopped instance timed out"),
    }
}
