//! The batch backend: an apalis [`CustomBackend`] whose tasks are whole batches of queue
//! jobs, so that apalis's per-task machinery is paid once per batch instead of once per job.
//!
//! Why: apalis-postgres 1.0 hands the worker one task per job. Its claim is batched, but
//! every job then goes through its own task future, codec, result layer and JSON ack, and
//! measured on this machine that caps a worker near 9k jobs/s with a no-op handler (see
//! BENCHMARKS.md), well below what the set-based store can do. Here apalis still runs the
//! worker (lifecycle, concurrency, graceful shutdown, tracing), over the same
//! `apalis.jobs` table with the same states, so `notifyd status`, `notifyd jobs`, the
//! rescue and apalis-postgres's own tooling see exactly what they saw before:
//!
//! * **claim**: one SKIP LOCKED statement with the semantics of `apalis.get_jobs` (`Pending`,
//!   or `Failed` with attempts left, due, highest priority first; see [`CLAIM`] for why not
//!   the function itself) takes up to `fetch_batch` jobs, which become one task. A claim happens only when the worker has a free slot (apalis polls
//!   the backend only after its service is ready), so a worker never holds jobs it cannot
//!   start; `concurrency` batches are in flight at most.
//! * **wake-up**: LISTEN on apalis's insert channel, plus the poll interval (delayed jobs,
//!   a lost listener). An empty claim waits for whichever comes first.
//! * **process**: the whole batch goes through [`Batcher::process_now`] (one store
//!   transaction, exactly-once effect, exact rate limit).
//! * **ack**: one set-based `UPDATE`, fenced by `lock_by` (a job rescued from this worker
//!   and claimed by another is left alone), writes what apalis itself would write:
//!   `Done` with `{"Ok": outcome}`, `Killed` with `{"Err": reason}` for a bad job (never
//!   retried), `Failed` with `{"Err": reason}` for a database failure (retried after the
//!   backoff that the `notifyd_failed_job_backoff` trigger sets); `attempts + 1`.
//!   An ack that fails is retried with backoff until it succeeds or the worker stops;
//!   after a stop, [`super::release_jobs`] or the rescue gives the jobs back.
//!
//! Invariant: every claimed job is acknowledged exactly once by this worker, or released,
//! or rescued after this worker goes silent. Nothing here can make the worker exit: claim
//! and ack errors are retried, and payloads are never decoded by apalis.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use apalis_core::backend::custom::{BackendBuilder, CustomBackend};
use apalis_core::task::Task;
use futures::{Sink, StreamExt};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

use super::QUEUE;
use crate::pipeline::{JobError, Outcome};
use crate::validate::RawJob;

/// apalis's channel for inserted jobs (its per-row trigger on `apalis.jobs`).
const INSERT_CHANNEL: &str = "apalis::job::insert";

/// One claimed queue job.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: String,
    pub job: Vec<u8>,
    /// Milliseconds since the epoch when the job became due (its `run_at`).
    pub due_ms: i64,
}

/// The task type of the batch backend: the jobs of one claim.
#[derive(Debug, Clone, Default)]
pub struct ClaimedBatch(pub Vec<ClaimedJob>);

/// Where a worker instance claims from.
#[derive(Clone)]
pub struct Source {
    pub pool: PgPool,
    pub worker: String,
    pub fetch_batch: usize,
    pub poll_interval: Duration,
    pub wake: Arc<Notify>,
    /// Held for as long as a claim statement runs. The claim runs in a task of its own, so
    /// that a worker stopping mid-claim (dropping this stream) cannot abandon a statement
    /// that still commits on the server: the stop path takes this lock before it releases
    /// the instance's jobs.
    pub claiming: Arc<tokio::sync::Mutex<()>>,
}

type ClaimStream =
    futures::stream::BoxStream<'static, Result<Option<Task<ClaimedBatch>>, Infallible>>;
type NoSink = std::pin::Pin<Box<dyn Sink<Task<ClaimedBatch>, Error = Infallible> + Send>>;

/// The apalis backend for one worker instance.
pub type BatchBackend = CustomBackend<ClaimedBatch, Source, ClaimStream, NoSink, ()>;

/// Build the backend. The worker instance must be registered ([`register`]) first, since
/// `apalis.jobs.lock_by` references `apalis.workers`.
pub fn backend(source: Source) -> BatchBackend {
    BackendBuilder::new()
        .database(source)
        .fetcher(|source: &mut Source, _: &(), _| claim_stream(source.clone()))
        // notifyd never pushes jobs from Rust: the `notify.events` trigger writes them.
        .sink(|_: &mut Source, _: &()| -> NoSink { Box::pin(futures::sink::drain()) })
        .build()
        .expect("database, fetcher and sink are all set")
}

fn claim_stream(source: Source) -> ClaimStream {
    futures::stream::unfold(source, |source| async move {
        let batch = next_batch(&source).await;
        Some((Ok(Some(Task::new(batch))), source))
    })
    .boxed()
}

/// Claim until something comes back. Waits for a wake-up or the poll interval when the
/// queue is empty, and backs off (jittered, up to 5 s) while the database fails.
async fn next_batch(source: &Source) -> ClaimedBatch {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let guard = source.claiming.clone().lock_owned().await;
        let (pool, worker, n) = (
            source.pool.clone(),
            source.worker.clone(),
            source.fetch_batch,
        );
        let claimed = tokio::spawn(async move {
            let claimed = claim(&pool, &worker, n).await;
            drop(guard);
            claimed
        })
        .await
        .unwrap_or_else(|e| Err(sqlx::Error::Protocol(format!("claim task failed: {e}"))));
        match claimed {
            Ok(jobs) if !jobs.is_empty() => {
                tracing::debug!(
                    jobs = jobs.len(),
                    claim_ms = started.elapsed().as_secs_f64() * 1e3,
                    "batch claimed"
                );
                return ClaimedBatch(jobs);
            }
            Ok(_) => {
                backoff = Duration::from_millis(100);
                let _ = tokio::time::timeout(source.poll_interval, source.wake.notified()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "claim failed; retrying");
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The claim. The same rows, order and state change as `apalis.get_jobs` (`Pending`, or
/// `Failed` with attempts left; due; highest priority, then oldest `run_at`, first; set to
/// `Queued` with `lock_by`), written so that the UPDATE finds its rows by primary key: the
/// function joins its CTE back to `apalis.jobs`, which Postgres plans as a hash join over a
/// sequential scan of the whole table, so each claim costs O(backlog) (measured: 15 of its
/// 27 ms for 1,000 jobs out of 30,000; see BENCHMARKS.md).
const CLAIM: &str = "
UPDATE apalis.jobs
SET status = 'Queued', lock_by = $1, lock_at = now()
WHERE id = ANY(ARRAY(
    SELECT id
    FROM apalis.jobs
    WHERE (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
      AND run_at < now()
      AND job_type = $2
    ORDER BY priority DESC, run_at ASC
    LIMIT $3
    FOR UPDATE SKIP LOCKED
))
RETURNING id, job, (EXTRACT(EPOCH FROM run_at) * 1000)::bigint";

async fn claim(pool: &PgPool, worker: &str, n: usize) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    let rows: Vec<(String, Vec<u8>, i64)> = sqlx::query(CLAIM)
        .bind(worker)
        .bind(QUEUE)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .try_map(|row: sqlx::postgres::PgRow| {
            use sqlx::Row;
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        })
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, job, due_ms)| ClaimedJob { id, job, due_ms })
        .collect())
}

/// Register (or refresh) a worker instance in `apalis.workers`, as apalis-postgres does.
pub async fn register(pool: &PgPool, worker: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at)
         VALUES ($1, $2, 'notifyd-batch', '', now(), now())
         ON CONFLICT (id) DO UPDATE SET last_seen = now(), worker_type = EXCLUDED.worker_type",
    )
    .bind(worker)
    .bind(QUEUE)
    .execute(pool)
    .await?;
    Ok(())
}

/// Wake the claim loop when apalis announces a job of our queue. Reconnects after a lost
/// connection (the poll interval covers the gap); ends with the instance.
pub async fn listen(pool: PgPool, wake: Arc<Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "wake-up listener cannot connect; polling meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(INSERT_CHANNEL).await {
            tracing::debug!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // A wake-up after (re)connecting: jobs may have arrived while we were away.
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if n.payload().contains(QUEUE) {
                        wake.notify_one();
                    }
                }
                Ok(None) => {
                    // The connection dropped; sqlx reconnects on the next call.
                    wake.notify_one();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up listener failed; reconnecting");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What one job's ack writes.
fn ack_row(answer: &Result<Outcome, JobError>) -> (&'static str, serde_json::Value) {
    match answer {
        Ok(outcome) => (
            "Done",
            serde_json::json!({ "Ok": serde_json::to_value(outcome).unwrap_or_default() }),
        ),
        Err(e @ JobError::Bad(_)) => ("Killed", serde_json::json!({ "Err": e.to_string() })),
        Err(e @ JobError::Transient(_)) => ("Failed", serde_json::json!({ "Err": e.to_string() })),
    }
}

/// Acknowledge a processed batch in one statement, fenced by `lock_by`. Returns the rows
/// written (fewer than the batch if some jobs were rescued from this worker meanwhile).
pub async fn ack(
    pool: &PgPool,
    worker: &str,
    jobs: &[ClaimedJob],
    answers: &[Result<Outcome, JobError>],
) -> Result<u64, sqlx::Error> {
    let mut ids = Vec::with_capacity(jobs.len());
    let mut statuses = Vec::with_capacity(jobs.len());
    let mut results = Vec::with_capacity(jobs.len());
    for (job, answer) in jobs.iter().zip(answers) {
        let (status, result) = ack_row(answer);
        ids.push(job.id.as_str());
        statuses.push(status);
        results.push(result);
    }
    let n = sqlx::query(
        "UPDATE apalis.jobs AS j
         SET status = a.status, attempts = j.attempts + 1, last_result = a.result,
             done_at = now()
         FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS a(id, status, result)
         WHERE j.id = a.id AND j.id = ANY($2) AND j.lock_by = $1
           AND j.status IN ('Queued', 'Running')",
    )
    .bind(worker)
    .bind(&ids)
    .bind(&statuses)
    .bind(&results)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n)
}

/// The raw payloads of a batch, for the pipeline.
pub fn payloads(batch: &ClaimedBatch) -> Vec<RawJob> {
    batch.0.iter().map(|j| RawJob(j.job.clone())).collect()
}
