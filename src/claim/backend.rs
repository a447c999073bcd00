//! The claim backend: an apalis [`CustomBackend`] whose tasks are whole batches of queue
//! jobs, so that apalis's per-task machinery is paid once per batch instead of once per job,
//! and whose claim is a transaction, so that a batch's whole effect commits at once. Every
//! SQL statement on `apalis.jobs` that the worker runs is here.
//!
//! One batch is one transaction:
//! * **claim** ([`claim_due`]): `SELECT … FOR UPDATE SKIP LOCKED` with the eligibility and
//!   order of `apalis.get_jobs` takes up to `fetch_batch` jobs, which become one task
//!   carrying the open transaction. A claim happens only when the worker has a free slot
//!   (apalis polls the backend only after its service is ready), so `concurrency` batches
//!   are in flight at most, and a worker never holds jobs it cannot start;
//! * **wake-up**: polling. After an empty claim the stream looks again after
//!   `poll_interval` (10 ms by default); a claim that returns jobs is followed by the next
//!   claim as soon as a slot is free. Enqueuing sends no NOTIFY (migration
//!   `20261201000003_enqueue_without_notify.sql`: a NOTIFY makes every enqueuing
//!   transaction commit one at a time), so there is nothing to listen for. New and delayed
//!   (`run_at`) jobs are found the same way;
//! * **process**: the pipeline loads, sanitizes and stores the batch in that transaction
//!   (per-user locks, exact rate limit, one notification per event), and its store
//!   statement deletes the jobs that got an outcome (the outcome is the notification or the
//!   `notify.events` row);
//! * **settle** ([`settle`]): jobs refused by the pipeline become `Killed` with the
//!   reason; then the transaction commits.
//!
//! Invariant: a claimed job's effect (notification, outcome, queue row) commits exactly
//! once, all together, or not at all. If the worker stops, crashes, loses its connection or
//! fails a statement, the transaction rolls back and the jobs are claimable again at once
//! (no heartbeat rescue is involved; a frozen worker's session is ended by
//! `idle_in_transaction_session_timeout`). A batch that fails with an error that is the
//! data's fault counts a failed attempt ([`fail`]); after `max_attempts` it stays `Failed`
//! for operators. In-flight jobs show as `Pending` in `notifyd status` (their lock is not
//! visible as a state). Nothing here can make the worker exit: claim errors are retried,
//! and payloads are never decoded by apalis.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use apalis_core::backend::custom::{BackendBuilder, CustomBackend};
use apalis_core::task::Task;
use futures::{Sink, StreamExt};
use sqlx::PgPool;

use crate::contract::QUEUE;
use crate::db;
use crate::pipeline::{Answer, JobRef};

/// One claimed queue job.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: String,
    pub job: Vec<u8>,
    /// Milliseconds since the epoch when the job became due (its `run_at`).
    pub due_ms: i64,
}

/// The task type of the batch backend: the jobs of one claim, and the open transaction
/// that holds their row locks. The handler takes the transaction ([`ClaimedBatch::take`]),
/// does the batch's whole effect in it and commits; if the batch is dropped instead (the
/// worker stops, the process dies), the transaction rolls back and the jobs are back in
/// the queue at once.
#[derive(Clone, Default)]
pub struct ClaimedBatch {
    pub jobs: Vec<ClaimedJob>,
    tx: Arc<std::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>>,
}

impl ClaimedBatch {
    /// A batch of `jobs` whose rows `tx` has locked. The worker's claim is [`claim_due`];
    /// a test may lock rows of its own choosing and hand them to the same processing.
    pub fn new(tx: sqlx::Transaction<'static, sqlx::Postgres>, jobs: Vec<ClaimedJob>) -> Self {
        ClaimedBatch {
            jobs,
            tx: Arc::new(std::sync::Mutex::new(Some(tx))),
        }
    }

    /// The jobs as the pipeline takes them.
    pub fn refs(&self) -> Vec<JobRef<'_>> {
        self.jobs
            .iter()
            .map(|j| JobRef {
                id: &j.id,
                payload: &j.job,
            })
            .collect()
    }

    /// The claim's transaction; `None` if it was taken already.
    pub fn take(&self) -> Option<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.tx.lock().ok().and_then(|mut tx| tx.take())
    }
}

impl std::fmt::Debug for ClaimedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedBatch")
            .field("jobs", &self.jobs)
            .finish_non_exhaustive()
    }
}

/// Where a worker instance claims from.
#[derive(Clone)]
pub struct Source {
    pub pool: PgPool,
    pub fetch_batch: usize,
    /// How long the claim stream waits after an empty claim.
    pub poll_interval: Duration,
}

type ClaimStream =
    futures::stream::BoxStream<'static, Result<Option<Task<ClaimedBatch>>, Infallible>>;
type NoSink = std::pin::Pin<Box<dyn Sink<Task<ClaimedBatch>, Error = Infallible> + Send>>;

/// The apalis backend for one worker instance.
pub type BatchBackend = CustomBackend<ClaimedBatch, Source, ClaimStream, NoSink, ()>;

/// Build the backend. The worker instance must be registered (`maintenance::register`)
/// first, since `apalis.jobs.lock_by` references `apalis.workers`.
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

/// Claim until something comes back. Waits the poll interval after an empty claim, and
/// backs off (jittered, up to 5 s) while the database fails.
async fn next_batch(source: &Source) -> ClaimedBatch {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let (pool, n) = (source.pool.clone(), source.fetch_batch);
        // In a task of its own, so that a worker stopping mid-claim (dropping this stream)
        // lets the statement finish instead of cutting it off; the claim it returns is then
        // dropped, which rolls it back.
        let claimed = tokio::spawn(async move { claim_due(&pool, n).await })
            .await
            .unwrap_or_else(|e| Err(sqlx::Error::Protocol(format!("claim task failed: {e}"))));
        match claimed {
            Ok(Some(batch)) => {
                tracing::debug!(
                    jobs = batch.jobs.len(),
                    claim_ms = started.elapsed().as_secs_f64() * 1e3,
                    "batch claimed"
                );
                return batch;
            }
            Ok(None) => {
                backoff = Duration::from_millis(100);
                tokio::time::sleep(source.poll_interval).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "claim failed; retrying");
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The claim: lock up to `n` due jobs with the rows, order and eligibility of
/// `apalis.get_jobs` (`Pending`, or `Failed` with attempts left; due; highest priority,
/// then oldest `run_at`, first), inside a transaction that stays open until the batch
/// is settled. The rows are not updated: the row lock is the claim. Other replicas skip
/// them (`SKIP LOCKED`), and the lock ends with the transaction, so a worker that dies
/// or is cut off gives its jobs back the moment its session ends, with no rescue
/// needed; a frozen one, when `idle_in_transaction_session_timeout` ends its session.
///
/// This writes no row version for the claim and none for the ack (the settle deletes
/// the rows), where a claim `UPDATE` and an ack `UPDATE` each wrote a version into every
/// index of `apalis.jobs`: measured with pgbench on this schema, the batch's SQL ran at
/// 32k jobs/s this way against 18.5k with the two updates (see BENCHMARKS.md).
const CLAIM: &str = "
SELECT id, job, (EXTRACT(EPOCH FROM run_at) * 1000)::bigint
FROM apalis.jobs
WHERE (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
  AND run_at < now()
  AND job_type = $1
ORDER BY priority DESC, run_at ASC
LIMIT $2
FOR UPDATE SKIP LOCKED";

/// Claim up to `n` due jobs ([`CLAIM`]); `None` when nothing is claimable.
pub async fn claim_due(pool: &PgPool, n: usize) -> Result<Option<ClaimedBatch>, sqlx::Error> {
    let mut tx = db::begin(pool).await?;
    let rows: Vec<(String, Vec<u8>, i64)> = sqlx::query(CLAIM)
        .persistent(db::persistent())
        .bind(QUEUE)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .try_map(|row: sqlx::postgres::PgRow| {
            use sqlx::Row;
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        })
        .fetch_all(&mut *tx)
        .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    let jobs = rows
        .into_iter()
        .map(|(id, job, due_ms)| ClaimedJob { id, job, due_ms })
        .collect();
    Ok(Some(ClaimedBatch::new(tx, jobs)))
}

/// Settle the jobs of a processed batch that got no outcome, inside its claim
/// transaction (the caller commits): they become `Killed` with the reason, `attempts + 1`
/// and `lock_by` = this worker, as apalis would write them. The jobs that got an outcome
/// were deleted by the store statement already (their outcome is in `notify.event_outcomes`).
/// Returns the rows marked.
pub async fn settle(
    tx: &mut sqlx::PgConnection,
    worker: &str,
    jobs: &[ClaimedJob],
    answers: &[Answer],
) -> Result<u64, sqlx::Error> {
    let mut bad = Vec::new();
    let mut reasons = Vec::new();
    for (job, answer) in jobs.iter().zip(answers) {
        if let Err(e) = answer {
            bad.push(job.id.as_str());
            reasons.push(serde_json::json!({ "Err": e.to_string() }));
        }
    }
    if bad.is_empty() {
        return Ok(0);
    }
    let killed = sqlx::query(
        "UPDATE apalis.jobs AS j
         SET status = 'Killed', attempts = j.attempts + 1, last_result = a.result,
             done_at = now(), lock_by = $1, lock_at = now()
         FROM unnest($2::text[], $3::jsonb[]) AS a(id, result)
         WHERE j.id = a.id AND j.id = ANY($2)",
    )
    .persistent(db::persistent())
    .bind(worker)
    .bind(&bad)
    .bind(&reasons)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(killed)
}

/// Count a failed attempt for the jobs of a batch whose transaction was rolled back
/// (status `Failed`, `attempts + 1`, the reason in `last_result`; the
/// `notifyd_failed_job_backoff` trigger delays the retry). Jobs that another replica has
/// claimed meanwhile are skipped, not waited for. Returns the jobs marked.
pub async fn fail(
    pool: &PgPool,
    worker: &str,
    jobs: &[ClaimedJob],
    reason: &str,
) -> Result<u64, sqlx::Error> {
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let n = db::execute(
        pool,
        sqlx::query(
            "UPDATE apalis.jobs
             SET status = 'Failed', attempts = attempts + 1, done_at = now(),
                 lock_by = $2, lock_at = now(), last_result = jsonb_build_object('Err', $3::text)
             WHERE id = ANY(ARRAY(
                 SELECT id FROM apalis.jobs
                 WHERE id = ANY($1) AND status IN ('Pending', 'Failed')
                 FOR UPDATE SKIP LOCKED))",
        )
        .bind(&ids)
        .bind(worker)
        .bind(reason),
    )
    .await?
    .rows_affected();
    Ok(n)
}
