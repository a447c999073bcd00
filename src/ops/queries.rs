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

/// Rows changed per statement by `retry --all` and `discard --all`.
const BULK_BATCH: i64 = 5000;

/// The queue's jobs by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, sqlx::FromRow)]
pub struct QueueStats {
    /// Due and waiting to be claimed (a batch in flight is invisible as a state: its claim
    /// is a row lock, so its jobs count as pending until it commits).
    pub pending: i64,
    /// Not due yet (a later `run_at`).
    pub scheduled: i64,
    /// Failed with attempts left, waiting out the backoff.
    pub retrying: i64,
    /// Ended without an outcome (refused, or out of attempts): `notify.queue_dead`.
    pub failed: i64,
    /// Seconds since the oldest due, unclaimed job became due (0 when there is none).
    pub lag_secs: f64,
}

impl QueueStats {
    /// Jobs not finished yet.
    pub fn depth(&self) -> i64 {
        self.pending + self.scheduled + self.retrying
    }

    /// The `/metrics` gauges of these counts.
    pub fn gauges(&self, workers_alive: usize) -> QueueGauges {
        QueueGauges {
            depth: self.depth(),
            jobs: vec![
                ("pending", self.pending),
                ("scheduled", self.scheduled),
                ("retry_wait", self.retrying),
                ("failed", self.failed),
            ],
            lag_secs: self.lag_secs,
            workers_alive,
        }
    }
}

pub async fn queue_stats(pool: &PgPool) -> Result<QueueStats, sqlx::Error> {
    let query = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE place <> 'later' AND run_at <= now()) AS pending,
                count(*) FILTER (WHERE run_at > now() AND (place <> 'later' OR attempts = 0))
                    AS scheduled,
                count(*) FILTER (WHERE place = 'later' AND attempts > 0) AS retrying,
                (SELECT count(*) FROM notify.queue_dead) AS failed,
                COALESCE(extract(epoch FROM now() - min(run_at) FILTER (
                    WHERE run_at <= now())), 0)::float8 AS lag_secs
         FROM notify.queue",
    );
    db::fetch_optional(pool, query)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// How the queue is fed (`notify.intake`): by the enqueue trigger, or by the workers'
/// intake; and, in intake mode, the committed events not yet taken in.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct IntakeRow {
    /// `trigger` or `intake`.
    pub mode: String,
    /// Committed events not yet in the queue (0 in trigger mode).
    pub waiting: i64,
    /// Seconds since the oldest of them was created (0 when none waits).
    pub oldest_secs: f64,
}

pub async fn intake(pool: &PgPool) -> Result<IntakeRow, sqlx::Error> {
    db::fetch_optional(
        pool,
        sqlx::query_as(
            "SELECT mode, waiting,
                    COALESCE(extract(epoch FROM now() - oldest), 0)::float8 AS oldest_secs
             FROM notify.intake_backlog()",
        ),
    )
    .await?
    .ok_or(sqlx::Error::RowNotFound)
}

/// One slot of the queue's rotation (`notify.queue_slots`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SlotRow {
    pub slot: i16,
    /// `current`, `draining`, `drained` or `clean`.
    pub state: String,
    /// Seconds in this state.
    pub for_secs: f64,
}

pub async fn slots(pool: &PgPool) -> Result<Vec<SlotRow>, sqlx::Error> {
    db::fetch_all(
        pool,
        sqlx::query_as(
            "SELECT slot, state, extract(epoch FROM now() - changed_at)::float8 AS for_secs
             FROM notify.queue_slots ORDER BY slot",
        ),
    )
    .await
}

/// The session whose snapshot is the oldest in this database: while it is open, vacuum
/// keeps every row version deleted since it began, in every table (the queue's slots are
/// truncated instead, see `claim::rotation`, but events, notifications and the rate
/// windows are not).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct HorizonHolder {
    /// Its backend pid (0 for a prepared transaction, or a replication slot nobody uses).
    pub pid: i32,
    /// Seconds since its transaction began (since it was prepared, for a prepared
    /// transaction). `None` when the server does not show it to this role (another role's
    /// session, without `pg_read_all_stats`) or for a replication slot.
    pub age_secs: Option<f64>,
    /// Transactions since its snapshot's xmin (`age(xmin)`), shown to every role.
    pub xmin_age: i32,
    /// `session`, `standby feedback`, `prepared transaction` or `replication slot`.
    pub kind: String,
    pub user_name: Option<String>,
    pub application_name: Option<String>,
    pub state: Option<String>,
    /// Its current or last statement, shortened.
    pub query: Option<String>,
}

/// The oldest holder of the xmin horizon: a session of this database with a snapshot or
/// an open transaction id (a READ COMMITTED transaction that wrote and then waits has no
/// snapshot but still holds back vacuum), a walsender whose standby reports its horizon
/// (`hot_standby_feedback`), a prepared transaction, or a replication slot. Another role's
/// session shows its pid and transaction ages to every role, its start time and statement
/// only with `pg_read_all_stats` (which operators may grant the worker role; `notifyd
/// grants` does not, since granting it needs a superuser). `None` when nothing holds it.
pub async fn horizon_holder(pool: &PgPool) -> Result<Option<HorizonHolder>, sqlx::Error> {
    db::fetch_optional(
        pool,
        sqlx::query_as(
            "SELECT pid, age_secs, xmin_age, kind, user_name, application_name, state, query FROM (
                 SELECT a.pid, extract(epoch FROM now() - a.xact_start)::float8 AS age_secs,
                        CASE WHEN a.backend_type = 'walsender' THEN 'standby feedback'
                             ELSE 'session' END AS kind,
                        a.usename::text AS user_name, a.application_name::text,
                        a.state::text, left(a.query, 200) AS query,
                        greatest(age(a.backend_xmin), age(a.backend_xid)) AS xmin_age
                 FROM pg_stat_activity AS a
                 WHERE (a.datname = current_database() OR a.backend_type = 'walsender')
                   AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
                   AND a.pid <> pg_backend_pid()
                 UNION ALL
                 SELECT 0, extract(epoch FROM now() - p.prepared)::float8, 'prepared transaction',
                        p.owner::text, p.gid, NULL, NULL, age(p.transaction)
                 FROM pg_prepared_xacts AS p WHERE p.database = current_database()
                 UNION ALL
                 SELECT COALESCE(r.active_pid, 0), NULL, 'replication slot', NULL, r.slot_name::text,
                        NULL, NULL, age(r.xmin)
                 FROM pg_replication_slots AS r WHERE r.xmin IS NOT NULL
             ) AS h
             ORDER BY xmin_age DESC, age_secs DESC NULLS LAST
             LIMIT 1",
        ),
    )
    .await
}

/// A worker's heartbeat row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkerRow {
    pub name: String,
    pub last_seen: DateTime<Utc>,
    /// Seconds since the last heartbeat.
    pub silent_secs: f64,
    #[sqlx(skip)]
    pub alive: bool,
}

/// Workers seen in the last hour.
pub async fn workers(pool: &PgPool, silent_after: Duration) -> Result<Vec<WorkerRow>, sqlx::Error> {
    let query = sqlx::query_as(
        "SELECT w.id AS name, w.last_seen,
                extract(epoch FROM now() - w.last_seen)::float8 AS silent_secs
         FROM apalis.workers AS w
         WHERE w.worker_type = $1 AND w.last_seen > now() - interval '1 hour'
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

/// One job, as operators see it. A job is named by its event's id.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobView {
    pub event_id: i64,
    /// `pending` (due), `scheduled` (not due yet), `retry_wait` (failed, attempts left,
    /// waiting out the backoff) or `failed` (ended without an outcome).
    pub status: String,
    /// Where it waits: slot `0`-`3`, `later`, or `dead`.
    pub place: String,
    pub attempts: i32,
    pub max_attempts: i32,
    /// When it is due (for a failed job: when it failed).
    pub run_at: DateTime<Utc>,
    /// The worker that refused it or counted its last attempt (failed jobs).
    pub worker: Option<String>,
    /// Why it failed (failed jobs, and retries: the last error).
    pub reason: Option<String>,
}

const JOB_QUERY: &str = "
SELECT q.event_id,
       CASE WHEN q.place = 'later' AND q.attempts > 0 THEN 'retry_wait'
            WHEN q.run_at > now() THEN 'scheduled'
            ELSE 'pending' END AS status,
       q.place, q.attempts::integer AS attempts, s.max_attempts, q.run_at,
       NULL::text AS worker, q.last_error AS reason
FROM notify.queue AS q, notify.queue_settings AS s
WHERE q.event_id = ANY($1)
UNION ALL
SELECT d.event_id, 'failed', 'dead', d.attempts::integer, s.max_attempts, d.failed_at,
       d.worker, d.reason
FROM notify.queue_dead AS d, notify.queue_settings AS s
WHERE d.event_id = ANY($1)";

/// Failed jobs, newest first, and how many there are in all.
pub async fn failed_jobs(pool: &PgPool, limit: i64) -> Result<(Vec<JobView>, i64), sqlx::Error> {
    let rows: Vec<JobView> = sqlx::query_as(
        "SELECT d.event_id, 'failed' AS status, 'dead' AS place, d.attempts::integer AS attempts,
                s.max_attempts, d.failed_at AS run_at, d.worker, d.reason
         FROM notify.queue_dead AS d, notify.queue_settings AS s
         ORDER BY d.failed_at DESC, d.event_id DESC
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM notify.queue_dead")
        .fetch_one(pool)
        .await?;
    Ok((rows, total))
}

/// The job of event `id`, wherever it is; `None` once it has finished (its record is then
/// the event's outcome).
pub async fn job(pool: &PgPool, id: i64) -> Result<Option<JobView>, sqlx::Error> {
    sqlx::query_as(JOB_QUERY)
        .bind([id])
        .fetch_optional(pool)
        .await
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

/// Put failed jobs back in the queue (attempts 0, due now). `None` means all of them.
/// Returns the event ids of the jobs changed.
pub async fn retry_failed(pool: &PgPool, ids: Option<&[i64]>) -> Result<Vec<i64>, sqlx::Error> {
    bulk(
        pool,
        ids,
        "INSERT INTO notify.queue_later (event_id, priority, run_at)
         SELECT g.event_id, COALESCE(t.priority, 0), now()
         FROM gone AS g
         LEFT JOIN notify.events AS e ON e.id = g.event_id
         LEFT JOIN notify.event_types AS t ON t.name = e.event_type
         ON CONFLICT (event_id) DO NOTHING",
    )
    .await
}

/// Delete failed jobs for good. `None` means all of them. Returns the event ids.
pub async fn discard_failed(pool: &PgPool, ids: Option<&[i64]>) -> Result<Vec<i64>, sqlx::Error> {
    bulk(pool, ids, "SELECT 1").await
}

/// Take the selected failed jobs out of `notify.queue_dead` (the CTE `gone`) and run `then`
/// on them, in bounded batches for `--all`.
async fn bulk(
    pool: &PgPool,
    ids: Option<&[i64]>,
    then: &'static str,
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = format!(
        "WITH gone AS (
             DELETE FROM notify.queue_dead
             WHERE event_id = ANY(ARRAY(
                 SELECT event_id FROM notify.queue_dead
                 WHERE $1::bigint[] IS NULL OR event_id = ANY($1)
                 ORDER BY event_id
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED))
             RETURNING event_id
         ),
         followed AS ({then})
         SELECT event_id FROM gone"
    );
    let mut changed = Vec::new();
    loop {
        let batch: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
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
    /// How the queue is fed, and what waits to be taken in.
    pub intake: IntakeRow,
    /// The rotation of the queue's slots.
    pub slots: Vec<SlotRow>,
    /// The oldest open transaction (or prepared transaction, or replication slot) holding
    /// back vacuum in this database; `None` when there is none.
    pub horizon: Option<HorizonHolder>,
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
        slots: slots(pool).await?,
        intake: intake(pool).await?,
        horizon: horizon_holder(pool).await?,
        events_last_hour: recent_outcomes(pool).await?,
        digests: digest_stats(pool).await?,
        silent_after_secs: silent_after.as_secs(),
        workers_alive: workers.iter().filter(|w| w.alive).count(),
        workers,
        retry: retry_settings(pool).await.ok(),
        jobs,
    })
}
