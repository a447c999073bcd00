//! Operator commands: `notifyd status` and `notifyd jobs stats|failed|show|retry|discard|settings`.
//!
//! Every command reads or changes the queue of `notifyd.events` only, prints aligned text
//! for a human (or JSON with `--json`), and exits non-zero when it could not do all it was
//! asked. The queries here are also what the worker's metrics loop reports.
//!
//! Vocabulary (what operators see, mapped onto apalis's states):
//! * **pending**: waiting to be claimed (`Pending`; `scheduled` ones are not due yet);
//! * **claimed**: fetched by a worker (`Queued`), **running**: `Running`;
//! * **retry wait**: failed with attempts left (`Failed`, attempts < max), due again after a
//!   backoff;
//! * **failed**: final, kept with the reason until retention deletes it: refused (`Killed`:
//!   a bad payload or a missing event, never retried) or exhausted (`Failed` at the attempt
//!   limit). `jobs retry` puts them back; `jobs discard` deletes them;
//! * **depth** = pending + claimed + running + retry wait; **lag** = age of the oldest job
//!   that is due and not claimed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use sqlx::PgPool;

use crate::claim::QUEUE;
use crate::validate::{RawJob, parse_job};

/// `status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts)`: final failures.
const IS_FAILED: &str = "(status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))";

/// Rows changed per statement by `retry --all` and `discard --all`.
const BULK_BATCH: i64 = 5000;

/// Worker liveness: the worker's heartbeat settings, and how the status command tells
/// live workers from dead ones. One definition for both, so that they agree when they
/// share an environment.
#[derive(Debug, Clone, Args)]
pub struct LivenessArgs {
    /// Seconds between worker heartbeats.
    #[arg(long, env = "NOTIFYD_HEARTBEAT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub heartbeat_secs: u64,

    /// Heartbeats a worker may miss before its jobs are rescued by others (rescue time =
    /// heartbeat × this).
    #[arg(long, env = "NOTIFYD_MISSED_HEARTBEATS", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(2..=100))]
    pub missed_heartbeats: u64,
}

impl LivenessArgs {
    pub fn rescue_after(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs * self.missed_heartbeats)
    }
}

/// `notifyd status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub liveness: LivenessArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `notifyd jobs ...`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// Queue counts by state, depth, lag, and event outcomes over the last hour.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List failed jobs (refused, or out of attempts), newest first, with their reason.
    Failed {
        /// Most jobs listed.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one job (any state) and its event.
    Show {
        /// The job id (a ULID, as listed by `jobs failed`).
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put failed jobs back in the queue, with their attempts reset.
    Retry(Selection),
    /// Delete failed jobs for good (their events keep no outcome).
    Discard(Selection),
    /// Show the retry policy, or change it (applies to events enqueued and failures recorded
    /// from now on; no restart needed).
    Settings(SettingsArgs),
}

/// Which failed jobs a bulk command acts on.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
pub struct Selection {
    /// Job ids, as listed by `jobs failed`.
    pub ids: Vec<String>,
    /// Every failed job.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SettingsArgs {
    /// Attempts per job before it is failed for good (1-100).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub max_attempts: Option<i32>,
    /// Delay before the first retry, in seconds; it doubles with each attempt.
    #[arg(long)]
    pub retry_base_secs: Option<f64>,
    /// Longest delay between retries, in seconds.
    #[arg(long)]
    pub retry_max_secs: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

// ------------------------------------------------------------------------- queries

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
    crate::db::fetch_optional(pool, query)
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
pub async fn workers(pool: &PgPool, rescue_after: Duration) -> Result<Vec<WorkerRow>, sqlx::Error> {
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
    let mut rows: Vec<WorkerRow> = crate::db::fetch_all(pool, query).await?;
    for w in &mut rows {
        w.alive = w.silent_secs < rescue_after.as_secs_f64();
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
        let raw = RawJob(r.job);
        let event_id = parse_job(&raw).ok();
        let payload: String = String::from_utf8_lossy(&raw.0).chars().take(200).collect();
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

// ------------------------------------------------------------------------- commands

/// Everything `notifyd status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub queue: String,
    pub depth: i64,
    pub jobs: QueueStats,
    pub events_last_hour: BTreeMap<String, i64>,
    pub rescue_after_secs: u64,
    pub workers_alive: usize,
    pub workers: Vec<WorkerRow>,
    pub retry: Option<RetrySettings>,
}

pub async fn status(pool: &PgPool, rescue_after: Duration) -> anyhow::Result<Status> {
    let jobs = queue_stats(pool).await?;
    let workers = workers(pool, rescue_after).await?;
    Ok(Status {
        queue: QUEUE.to_owned(),
        depth: jobs.depth(),
        events_last_hour: recent_outcomes(pool).await?,
        rescue_after_secs: rescue_after.as_secs(),
        workers_alive: workers.iter().filter(|w| w.alive).count(),
        workers,
        retry: retry_settings(pool).await.ok(),
        jobs,
    })
}

/// `notifyd status`.
pub async fn run_status(pool: &PgPool, args: &StatusArgs) -> anyhow::Result<()> {
    let status = status(pool, args.liveness.rescue_after()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

/// `notifyd jobs ...`.
pub async fn run_jobs(pool: &PgPool, args: &JobsArgs) -> anyhow::Result<()> {
    match &args.command {
        JobsCommand::Stats { json } => {
            let stats = queue_stats(pool).await?;
            let outcomes = recent_outcomes(pool).await?;
            if *json {
                let value = serde_json::json!({
                    "queue": QUEUE, "depth": stats.depth(), "jobs": stats,
                    "events_last_hour": outcomes,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let mut out = render_queue(&stats);
                out.push('\n');
                out.push_str(&render_outcomes(&outcomes));
                print!("{out}");
            }
        }
        JobsCommand::Failed { limit, json } => {
            let (jobs, total) = failed_jobs(pool, *limit).await?;
            if *json {
                let value = serde_json::json!({ "total": total, "jobs": jobs });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_failed(&jobs, total));
            }
        }
        JobsCommand::Show { id, json } => {
            let job = job(pool, id).await?.with_context(|| {
                format!(
                    "no job {id} in queue {QUEUE} (a finished job is deleted with its \
                         outcome recorded: see notify.event_outcomes for its event)"
                )
            })?;
            let event = match job.event_id {
                Some(e) => event(pool, e).await?,
                None => None,
            };
            if *json {
                let value = serde_json::json!({ "job": job, "event": event });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_job(&job, event.as_ref()));
            }
        }
        JobsCommand::Retry(sel) | JobsCommand::Discard(sel) => {
            let retry = matches!(args.command, JobsCommand::Retry(_));
            let ids = (!sel.all).then_some(sel.ids.as_slice());
            let changed = if retry {
                retry_failed(pool, ids).await?
            } else {
                discard_failed(pool, ids).await?
            };
            let verb = if retry { "retried" } else { "discarded" };
            println!(
                "{verb} {} failed job{}",
                changed.len(),
                plural(changed.len())
            );
            for id in &changed {
                println!("  {id}");
            }
            if let Some(ids) = ids {
                let missing: Vec<&String> = ids.iter().filter(|id| !changed.contains(id)).collect();
                if !missing.is_empty() {
                    for id in &missing {
                        eprintln!(
                            "  {id}: not a failed job of {QUEUE} (see `notifyd jobs failed`)"
                        );
                    }
                    anyhow::bail!(
                        "{} of the {} jobs named were not failed jobs",
                        missing.len(),
                        ids.len()
                    );
                }
            }
        }
        JobsCommand::Settings(s) => {
            if s.max_attempts.is_some() || s.retry_base_secs.is_some() || s.retry_max_secs.is_some()
            {
                sqlx::query(
                    "UPDATE notify.queue_settings
                     SET max_attempts = COALESCE($1, max_attempts),
                         retry_base_secs = COALESCE($2, retry_base_secs),
                         retry_max_secs = COALESCE($3, retry_max_secs),
                         updated_at = now()",
                )
                .bind(s.max_attempts)
                .bind(s.retry_base_secs)
                .bind(s.retry_max_secs)
                .execute(pool)
                .await
                .context("cannot change the retry policy (base must be in (0, 3600] s, max in [base, 86400] s)")?;
            }
            let settings = retry_settings(pool).await?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                print!("{}", render_settings(&settings));
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------- rendering

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Seconds as a short human duration: 850 ms, 4.2 s, 3 min 20 s, 2 h 05 min.
pub fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1e3)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{} min {:02} s", (secs / 60.0) as u64, secs as u64 % 60)
    } else {
        format!(
            "{} h {:02} min",
            (secs / 3600.0) as u64,
            (secs as u64 % 3600) / 60
        )
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn opt_ts(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map_or_else(|| "-".to_owned(), ts)
}

/// Columns padded to their widest cell; `right[i]` right-aligns column `i`.
fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if right.get(i).copied().unwrap_or(false) {
                s.push_str(&pad);
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if i + 1 < cells.len() {
                    s.push_str(&pad);
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn render_queue(s: &QueueStats) -> String {
    let mut out = format!("Queue {QUEUE}\n");
    let rows = vec![
        vec![
            "depth".into(),
            s.depth().to_string(),
            "jobs not finished (the rows below, without failed and done)".into(),
        ],
        vec![
            "  pending".into(),
            s.pending.to_string(),
            format!(
                "waiting to be claimed ({} scheduled for later)",
                s.scheduled
            ),
        ],
        vec![
            "  claimed".into(),
            s.queued.to_string(),
            "fetched by a worker".into(),
        ],
        vec!["  running".into(), s.running.to_string(), String::new()],
        vec![
            "  retry wait".into(),
            s.retrying.to_string(),
            "failed, attempts left, waiting out the backoff".into(),
        ],
        vec![
            "lag".into(),
            human_secs(s.lag_secs),
            "age of the oldest due job nobody has claimed".into(),
        ],
        vec![
            "failed".into(),
            s.failed.to_string(),
            "final: see `notifyd jobs failed`".into(),
        ],
        vec![
            "done".into(),
            s.done.to_string(),
            "finished, not purged yet".into(),
        ],
    ];
    out.push_str(&table(
        &["STATE", "JOBS", "MEANING"],
        &[false, true, false],
        &rows,
    ));
    out
}

fn render_outcomes(outcomes: &BTreeMap<String, i64>) -> String {
    let mut out = String::from("Events enqueued in the last hour, by outcome\n");
    if outcomes.is_empty() {
        out.push_str("  (none)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    out.push_str(&table(&["OUTCOME", "EVENTS"], &[false, true], &rows));
    out
}

fn render_workers(workers: &[WorkerRow], rescue_after: u64) -> String {
    let mut out = format!(
        "Workers (dead after {rescue_after} s without a heartbeat; their jobs are then rescued)\n"
    );
    if workers.is_empty() {
        out.push_str("  (none seen in the last hour)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let state = match (w.alive, w.holds) {
                (true, _) => "alive",
                (false, 0) => "gone",
                (false, _) => "dead, jobs awaiting rescue",
            };
            vec![
                w.name.clone(),
                format!("{} ago", human_secs(w.silent_secs)),
                w.holds.to_string(),
                state.to_owned(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["WORKER", "LAST HEARTBEAT", "JOBS HELD", "STATE"],
        &[false, true, true, false],
        &rows,
    ));
    out
}

fn render_settings(s: &RetrySettings) -> String {
    format!(
        "Retry policy (notify.queue_settings, changed {})\n  max attempts  {}\n  backoff       {} s, doubling per attempt, at most {} s, jitter ±50%\n",
        ts(&s.updated_at),
        s.max_attempts,
        s.retry_base_secs,
        s.retry_max_secs
    )
}

pub fn render_status(s: &Status) -> String {
    let mut out = render_queue(&s.jobs);
    out.push('\n');
    out.push_str(&render_outcomes(&s.events_last_hour));
    out.push('\n');
    out.push_str(&render_workers(&s.workers, s.rescue_after_secs));
    if let Some(r) = &s.retry {
        out.push('\n');
        out.push_str(&render_settings(r));
    }
    out
}

fn shorten(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

fn render_failed(jobs: &[JobView], total: i64) -> String {
    if total == 0 {
        return format!("No failed jobs in {QUEUE}.\n");
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.event_id.map_or_else(|| "-".to_owned(), |e| e.to_string()),
                if j.status == "Killed" {
                    "refused".into()
                } else {
                    "exhausted".into()
                },
                format!("{}/{}", j.attempts, j.max_attempts),
                opt_ts(&j.done_at),
                shorten(j.reason.as_deref().unwrap_or("-"), 100),
            ]
        })
        .collect();
    let mut out = format!(
        "{total} failed job{} in {QUEUE}{}\n",
        plural(total as usize),
        if (jobs.len() as i64) < total {
            format!(" (newest {} shown; --limit for more)", jobs.len())
        } else {
            String::new()
        }
    );
    out.push_str(&table(
        &[
            "JOB",
            "EVENT",
            "KIND",
            "ATTEMPTS",
            "FAILED AT (UTC)",
            "REASON",
        ],
        &[false, true, false, true, false, false],
        &rows,
    ));
    out.push_str("Inspect: notifyd jobs show <JOB> · retry: notifyd jobs retry <JOB>|--all · delete: notifyd jobs discard <JOB>|--all\n");
    out
}

fn render_job(j: &JobView, e: Option<&EventView>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Job {}", j.id);
    let _ = writeln!(out, "  status        {}", j.status);
    let _ = writeln!(out, "  attempts      {}/{}", j.attempts, j.max_attempts);
    let _ = writeln!(out, "  run at        {}", ts(&j.run_at));
    let _ = writeln!(
        out,
        "  claimed by    {}",
        j.lock_by.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "  claimed at    {}", opt_ts(&j.lock_at));
    let _ = writeln!(out, "  finished at   {}", opt_ts(&j.done_at));
    let _ = writeln!(out, "  payload       {}", shorten(&j.payload, 200));
    let _ = writeln!(
        out,
        "  last result   {}",
        j.reason.as_deref().unwrap_or("-")
    );
    match (j.event_id, e) {
        (None, _) => {
            let _ = writeln!(out, "Event: none (the payload names no event)");
        }
        (Some(id), None) => {
            let _ = writeln!(
                out,
                "Event {id}: not found (never enqueued, or deleted by retention)"
            );
        }
        (Some(_), Some(e)) => {
            let _ = writeln!(out, "Event {}", e.id);
            let _ = writeln!(out, "  user          {}", e.user_id);
            let _ = writeln!(out, "  type          {}", e.event_type);
            let _ = writeln!(out, "  created at    {}", ts(&e.created_at));
            let _ = writeln!(
                out,
                "  outcome       {}",
                e.outcome.as_deref().unwrap_or("(none yet)")
            );
            if let Some(r) = &e.outcome_reason {
                let _ = writeln!(out, "  reason        {r}");
            }
            let _ = writeln!(out, "  processed at  {}", opt_ts(&e.processed_at));
            let _ = writeln!(
                out,
                "  notification  {}",
                e.notification_id
                    .map_or_else(|| "-".to_owned(), |n| n.to_string())
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(0.25), "250 ms");
        assert_eq!(human_secs(4.21), "4.2 s");
        assert_eq!(human_secs(200.0), "3 min 20 s");
        assert_eq!(human_secs(7500.0), "2 h 05 min");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "NUM"],
            &[false, true],
            &[
                vec!["long name".into(), "7".into()],
                vec!["x".into(), "1234".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], format!("  A{}NUM", " ".repeat(11)));
        assert_eq!(lines[1], format!("  long name{}7", " ".repeat(5)));
        assert_eq!(lines[2], format!("  x{}1234", " ".repeat(10)));
    }
}
