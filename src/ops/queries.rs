//! The operator commands' queries: every statement `notifyd status` and `notifyd jobs`
//! run, and the rows they return. The worker's metrics loop reads the same queue counts.
//! Only the queue of `notifyd.events` is ever read or changed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::contract::QUEUE;
use crate::db;
use crate::telemetry::series::QueueGauges;
use crate::validate::parse_job;

/// `status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts)`: final failures.
const IS_FAILED: &str = "(status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))";

/// Rows changed per statement by `retry --all` and `discard --all`.
const BULK_BATCH: i64 = 5000;

/// Queue rows of `notifyd.events` by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, sqlx::FromRow)]
pub struct QueueStats {
    pub pending: i64,
    /// Pending, but not due yet (delayed events, and retries waiting out their backoff are
    /// counted in `retrying`).
    pub scheduled: i64,
    pub queued: i64,
    pub running: i64,
    pub retrying: i64,
    pub failed: i64,
    pub done: i64,
    /// Seconds since the oldest due, unclaimed job became due (0 when there is none).
    pub lag_secs: f64,
}

impl QueueStats {
    /// Jobs not finished yet.
    pub fn depth(&self) -> i64 {
        self.pending + self.queued + self.running + self.retrying
    }

    /// The `/metrics` gauges of these counts.
    pub fn gauges(&self, workers_alive: usize) -> QueueGauges {
        QueueGauges {
            depth: self.depth(),
            jobs: vec![
                ("pending", self.pending),
                ("queued", self.queued),
                ("running", self.running),
                ("retry_wait", self.retrying),
                ("failed", self.failed),
                ("done", self.done),
            ],
            lag_secs: self.lag_secs,
            workers_alive,
        }
    }
}

pub async fn queue_stats(pool: &PgPool) -> Result<QueueStats, sqlx::Error> {
    let query = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE status = 'Pending') AS pending,
                count(*) FILTER (WHERE status = 'Pending' AND run_at > now()) AS scheduled,
                count(*) FILTER (WHERE status = 'Queued') AS queued,
                count(*) FILTER (WHERE status = 'Running') AS running,
                count(*) FILTER (WHERE status = 'Failed' AND attempts < max_attempts) AS retrying,
                count(*) FILTER (WHERE {IS_FAILED}) AS failed,
                count(*) FILTER (WHERE status = 'Done') AS done,
                COALESCE(extract(epoch FROM now() - min(run_at) FILTER (
                    WHERE (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
                      AND run_at <= now())), 0)::float8 AS lag_secs
         FROM apalis.jobs WHERE job_type = $1"
    )))
    .bind(QUEUE);
    db::fetch_optional(pool, query)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// A worker's heartbeat row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkerRow {
    pub name: String,
    pub last_seen: DateTime<Utc>,
    /// Seconds since the last heartbeat.
    pub silent_secs: f64,
    /// Jobs it has claimed and not finished.
    pub holds: i64,
    #[sqlx(skip)]
    pub alive: bool,
}

/// Workers seen in the last hour, and any older one that still holds jobs.
pub async fn workers(pool: &PgPool, silent_after: Duration) -> Result<Vec<WorkerRow>, sqlx::Error> {
    let query = sqlx::query_as(
        "SELECT w.id AS name, w.last_seen,
                extract(epoch FROM now() - w.last_seen)::float8 AS silent_secs,
                (SELECT count(*) FROM apalis.jobs AS j
                 WHERE j.lock_by = w.id AND j.status IN ('Queued', 'Running')) AS holds
         FROM apalis.workers AS w
         WHERE w.worker_type = $1
           AND (w.last_seen > now() - interval '1 hour'
                OR EXISTS (SELECT 1 FROM apalis.jobs AS j
                           WHERE j.lock_by = w.id AND j.status IN ('Queued', 'Running')))
         ORDER BY w.last_seen DESC, w.id
         LIMIT 200",
    )
    .bind(QUEUE);
    let mut rows: Vec<WorkerRow> = db::fetch_all(pool, query).await?;
    for w in &mut rows {
        w.alive = w.silent_secs < silent_after.as_secs_f64();
    }
    Ok(rows)
}

/// Events created in the last hour, by outcome (`unprocessed` when they have none yet).
pub async fn recent_outcomes(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE(outcome, 'unprocessed'), count(*)
         FROM notify.event_outcomes WHERE created_at > now() - interval '1 hour'
         GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// What the rate limit held back and what got through on a budget of its own, for
/// operators: `notifyd status` and its `--json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DigestStats {
    /// Events `rate_limited` (by the total or by their type's cap) in the last hour, by type.
    pub suppressed_last_hour: BTreeMap<String, i64>,
    /// Users with a digest waiting for room, and the events it sums up so far.
    pub pending_users: i64,
    pub pending_events: i64,
    /// Digest notifications stored in the last hour.
    pub digests_last_hour: i64,
    /// Notifications of critical types stored in the last hour, by type.
    pub critical_last_hour: BTreeMap<String, i64>,
}

/// [`DigestStats`]: the suppressed events through the `events_suppressed` index, the
/// notifications of the last hour through the `created_at` BRIN index.
pub async fn digest_stats(pool: &PgPool) -> Result<DigestStats, sqlx::Error> {
    let suppressed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, count(*) FROM notify.events
         WHERE outcome = 'rate_limited' AND processed_at > now() - interval '1 hour'
         GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let (pending_users, pending_events): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT user_id), COALESCE(sum(suppressed), 0)::bigint
         FROM notify.digest_pending",
    )
    .fetch_one(pool)
    .await?;
    let delivered: Vec<(String, i64)> = sqlx::query_as(
        "SELECT n.event_type, count(*) FROM notify.notifications AS n
         WHERE n.created_at > now() - interval '1 hour'
           AND (n.event_type = 'digest'
                OR n.event_type = ANY(ARRAY(SELECT name FROM notify.event_types WHERE critical)))
         GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let mut stats = DigestStats {
        suppressed_last_hour: suppressed.into_iter().collect(),
        pending_users,
        pending_events,
        ..DigestStats::default()
    };
    for (event_type, n) in delivered {
        if event_type == crate::digest::DIGEST_TYPE {
            stats.digests_last_hour = n;
        } else {
            stats.critical_last_hour.insert(event_type, n);
        }
    }
    Ok(stats)
}

/// The retry policy (`notify.queue_settings`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct RetrySettings {
    pub max_attempts: i32,
    pub retry_base_secs: f64,
    pub retry_max_secs: f64,
    pub updated_at: DateTime<Utc>,
}

pub async fn retry_settings(pool: &PgPool) -> anyhow::Result<RetrySettings> {
    sqlx::query_as(
        "SELECT max_attempts, retry_base_secs, retry_max_secs, updated_at FROM notify.queue_settings",
    )
    .fetch_optional(pool)
    .await
    .context("cannot read notify.queue_settings (run `notifyd migrate`)")?
    .context("notify.queue_settings is empty (run `notifyd migrate`)")
}

/// Change the retry policy; `None` keeps a setting as it is.
pub async fn set_retry_settings(
    pool: &PgPool,
    max_attempts: Option<i32>,
    retry_base_secs: Option<f64>,
    retry_max_secs: Option<f64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notify.queue_settings
         SET max_attempts = COALESCE($1, max_attempts),
             retry_base_secs = COALESCE($2, retry_base_secs),
             retry_max_secs = COALESCE($3, retry_max_secs),
             updated_at = now()",
    )
    .bind(max_attempts)
    .bind(retry_base_secs)
    .bind(retry_max_secs)
    .execute(pool)
    .await?;
    Ok(())
}

/// One job, as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lock_by: Option<String>,
    pub lock_at: Option<DateTime<Utc>>,
    pub done_at: Option<DateTime<Utc>>,
    /// The event id named by the payload, if the payload is valid.
    pub event_id: Option<i64>,
    /// The payload as text (lossy UTF-8, at most 200 characters).
    pub payload: String,
    /// Why the job failed: the error text of `last_result`, or `last_result` as JSON.
    pub reason: Option<String>,
    pub last_result: Option<serde_json::Value>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    status: String,
    attempts: i32,
    max_attempts: i32,
    run_at: DateTime<Utc>,
    lock_by: Option<String>,
    lock_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    job: Vec<u8>,
    last_result: Option<serde_json::Value>,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
        let event_id = parse_job(&r.job).ok();
        let payload: String = String::from_utf8_lossy(&r.job).chars().take(200).collect();
        let reason = r.last_result.as_ref().map(|v| match v.get("Err") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => v.to_string(),
        });
        JobView {
            id: r.id,
            status: r.status,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            lock_by: r.lock_by,
            lock_at: r.lock_at,
            done_at: r.done_at,
            event_id,
            payload,
            reason,
            last_result: r.last_result,
        }
    }
}

const JOB_COLUMNS: &str =
    "id, status, attempts, max_attempts, run_at, lock_by, lock_at, done_at, job, last_result";

/// Failed jobs, newest first, and how many there are in all.
pub async fn failed_jobs(pool: &PgPool, limit: i64) -> Result<(Vec<JobView>, i64), sqlx::Error> {
    let rows: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM apalis.jobs
         WHERE job_type = $1 AND {IS_FAILED}
         ORDER BY done_at DESC NULLS LAST, id DESC
         LIMIT $2"
    )))
    .bind(QUEUE)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND {IS_FAILED}"
    )))
    .bind(QUEUE)
    .fetch_one(pool)
    .await?;
    Ok((rows.into_iter().map(JobView::from).collect(), total))
}

pub async fn job(pool: &PgPool, id: &str) -> Result<Option<JobView>, sqlx::Error> {
    let row: Option<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM apalis.jobs WHERE job_type = $1 AND id = $2"
    )))
    .bind(QUEUE)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(JobView::from))
}

/// The event a job points at (no body: operators need its state, not its text).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventView {
    pub id: i64,
    pub user_id: String,
    pub event_type: String,
    pub created_at: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
    pub outcome: Option<String>,
    pub outcome_reason: Option<String>,
    pub processed_at: Option<DateTime<Utc>>,
    pub notification_id: Option<i64>,
}

pub async fn event(pool: &PgPool, id: i64) -> Result<Option<EventView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id AS id, user_id, event_type, created_at, run_at, outcome,
                outcome_reason, processed_at, notification_id
         FROM notify.event_outcomes WHERE event_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Put failed jobs back to `Pending` (attempts 0, due now). `None` means all of them.
/// Returns the ids changed.
pub async fn retry_failed(
    pool: &PgPool,
    ids: Option<&[String]>,
) -> Result<Vec<String>, sqlx::Error> {
    bulk(
        pool,
        ids,
        "UPDATE apalis.jobs AS j
         SET status = 'Pending', attempts = 0, run_at = now(),
             lock_by = NULL, lock_at = NULL, done_at = NULL
         FROM chosen WHERE j.id = chosen.id
         RETURNING j.id",
    )
    .await
}

/// Delete failed jobs. `None` means all of them. Returns the ids deleted.
pub async fn discard_failed(
    pool: &PgPool,
    ids: Option<&[String]>,
) -> Result<Vec<String>, sqlx::Error> {
    bulk(
        pool,
        ids,
        "DELETE FROM apalis.jobs AS j USING chosen WHERE j.id = chosen.id RETURNING j.id",
    )
    .await
}

/// Run `action` (a statement over the CTE `chosen`) on the selected failed jobs, in bounded
/// batches for `--all`.
async fn bulk(
    pool: &PgPool,
    ids: Option<&[String]>,
    action: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let sql = format!(
        "WITH chosen AS (
             SELECT id FROM apalis.jobs
             WHERE job_type = $1 AND {IS_FAILED} AND ($2::text[] IS NULL OR id = ANY($2))
             ORDER BY id
             LIMIT $3
             FOR UPDATE SKIP LOCKED)
         {action}"
    );
    let mut changed = Vec::new();
    loop {
        let batch: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .bind(QUEUE)
            .bind(ids)
            .bind(BULK_BATCH)
            .fetch_all(pool)
            .await?;
        let n = batch.len() as i64;
        changed.extend(batch);
        if ids.is_some() || n < BULK_BATCH {
            return Ok(changed);
        }
    }
}

/// Everything `notifyd status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub queue: String,
    pub depth: i64,
    pub jobs: QueueStats,
    pub events_last_hour: BTreeMap<String, i64>,
    pub digests: DigestStats,
    pub silent_after_secs: u64,
    pub workers_alive: usize,
    pub workers: Vec<WorkerRow>,
    pub retry: Option<RetrySettings>,
}

pub async fn status(pool: &PgPool, silent_after: Duration) -> anyhow::Result<Status> {
    let jobs = queue_stats(pool).await?;
    let workers = workers(pool, silent_after).await?;
    Ok(Status {
        queue: QUEUE.to_owned(),
        depth: jobs.depth(),
        events_last_hour: recent_outcomes(pool).await?,
        digests: digest_stats(pool).await?,
        silent_after_secs: silent_after.as_secs(),
        workers_alive: workers.iter().filter(|w| w.alive).count(),
        workers,
        retry: retry_settings(pool).await.ok(),
        jobs,
    })
}
