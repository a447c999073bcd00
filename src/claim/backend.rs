//! The claim backend: an apalis [`CustomBackend`] whose tasks are whole batches of queue
//! jobs, so that apalis's per-task machinery is paid once per batch instead of once per job,
//! and whose claim is a transaction, so that a batch's whole effect commits at once. Every
//! SQL statement on the queue's job tables that the worker runs is here (the rotation of
//! its slots is in [`super::rotation`]).
//!
//! The queue is notifyd's own (migration `20261207000001_own_queue.sql`): rotating slot
//! tables `notify.queue_0..3` that are truncated once drained, so that no held transaction
//! can make a claim walk the dead rows of finished jobs (BENCHMARKS.md, "A real database's
//! bad day"), beside `notify.queue_later` (jobs not due yet) and `notify.queue_dead` (jobs
//! that ended without an outcome).
//!
//! One batch is one transaction:
//! * **claim** ([`claim_due`]): `notify.claim_jobs(n)` locks up to `fetch_batch` due jobs
//!   `FOR UPDATE SKIP LOCKED` and deletes them, from the current slot first, then the
//!   draining ones, highest priority first in each; they become one task carrying the open
//!   transaction (until it commits, the delete is the claim's alone: a rollback undoes it).
//!   A lane's next claim starts after its previous one ([`Hint`]): the jobs before it are
//!   mostly the lane's own batches in flight and finished ones, which a claim from the top
//!   walked every time (17 % of the database's time in a drain); it still takes them when
//!   the rest runs short, and claims from the top at least once a second. A claim
//!   happens only when the worker has a free slot (apalis polls the backend only after its
//!   service is ready), so `concurrency` batches are in flight at most;
//! * **wake-up**: polling. After an empty claim the stream looks again after
//!   `poll_interval` (10 ms by default); a claim that returns jobs is followed by the next
//!   claim as soon as a slot is free. Enqueuing sends no NOTIFY (a NOTIFY makes every
//!   enqueuing transaction commit one at a time), so there is nothing to listen for;
//! * **process**: the pipeline loads, sanitizes and stores the batch in that transaction
//!   (per-user locks, exact rate limit, one notification per event);
//! * **settle** ([`settle`]): the jobs refused by the pipeline go to `notify.queue_dead`
//!   with the reason; then the transaction commits. (Deleting at the claim rather than
//!   here spares each batch a second visit of its 1,000 rows.)
//!
//! Invariant: a claimed job's effect (notification, outcome, queue row) commits exactly
//! once, all together, or not at all. If the worker stops, crashes, loses its connection or
//! fails a statement, the transaction rolls back and the jobs are claimable again at once
//! (a frozen worker's session is ended by `idle_in_transaction_session_timeout`). A batch
//! that fails with an error that is the data's fault counts a failed attempt ([`fail`]):
//! the job waits in `notify.queue_later` for its backoff, and after `max_attempts` it goes to
//! `notify.queue_dead` for operators. Claimed rows are addressed by `ctid` within their slot
//! (the slots carry one index, the claim's): a rolled-back delete leaves the row where it
//! was, and [`fail`] checks the event id as well, since a truncated slot reuses ctids.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use apalis_core::backend::custom::{BackendBuilder, CustomBackend};
use apalis_core::task::Task;
use futures::{Sink, StreamExt};
use sqlx::PgPool;

use super::bulk::{BulkTicket, Yield};
use crate::db;
use crate::pipeline::Answer;

/// One claimed queue job.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    /// The slot table (`notify.queue_<slot>`) the job was claimed from.
    pub slot: i16,
    /// The row's `ctid` in that table, as text.
    pub tid: String,
    pub event_id: i64,
    /// Microseconds since the epoch when the job became due (its `run_at`, exactly).
    pub due_us: i64,
    /// Failed attempts before this one.
    pub attempts: i16,
    /// The priority of the job's type when it was enqueued.
    pub priority: i16,
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
    /// Counts the batch as one of the main lane's bulk batches while it lives.
    bulk: Option<Arc<BulkTicket>>,
}

impl ClaimedBatch {
    /// A batch of `jobs` whose rows `tx` has locked. The worker's claim is [`claim_due`];
    /// a test may lock rows of its own choosing and hand them to the same processing.
    pub fn new(tx: sqlx::Transaction<'static, sqlx::Postgres>, jobs: Vec<ClaimedJob>) -> Self {
        ClaimedBatch {
            jobs,
            tx: Arc::new(std::sync::Mutex::new(Some(tx))),
            bulk: None,
        }
    }

    /// The jobs as the pipeline takes them: their event ids, in claim order.
    pub fn events(&self) -> Vec<i64> {
        self.jobs.iter().map(|j| j.event_id).collect()
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
    /// Only jobs of at least this priority (`i16::MIN`: all; the express lane's is higher).
    pub min_priority: i16,
    /// Shared by the worker's lanes when the main lane yields to interactive jobs
    /// ([`super::bulk`]): the express lane reports its claims, the main lane narrows its own.
    pub yield_to: Option<Arc<Yield>>,
    /// How long the claim stream waits after an empty claim.
    pub poll_interval: Duration,
}

type ClaimStream =
    futures::stream::BoxStream<'static, Result<Option<Task<ClaimedBatch>>, Infallible>>;
type NoSink = std::pin::Pin<Box<dyn Sink<Task<ClaimedBatch>, Error = Infallible> + Send>>;

/// The apalis backend for one worker instance.
pub type BatchBackend = CustomBackend<ClaimedBatch, Source, ClaimStream, NoSink, ()>;

/// Build the backend. The worker instance is registered (`maintenance::register`) first,
/// so that `notifyd status` lists it.
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
    futures::stream::unfold(
        (source, Resume::default()),
        |(source, mut resume)| async move {
            let batch = next_batch(&source, &mut resume).await;
            Some((Ok(Some(Task::new(batch))), (source, resume)))
        },
    )
    .boxed()
}

/// How often a lane claims from the top of the queue at least (without a [`Hint`]), so
/// that a job left before its hint (a batch that rolled back) waits no longer than this.
const FULL_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// Where a lane's next claim starts: after its previous one, while that one came back
/// full and the last claim from the top is recent.
#[derive(Debug)]
struct Resume {
    hint: Option<Hint>,
    from_top_at: std::time::Instant,
}

impl Default for Resume {
    fn default() -> Self {
        Resume {
            hint: None,
            from_top_at: std::time::Instant::now(),
        }
    }
}

impl Resume {
    fn hint(&mut self) -> Option<Hint> {
        if self.from_top_at.elapsed() >= FULL_CLAIM_EVERY {
            self.hint = None;
        }
        if self.hint.is_none() {
            self.from_top_at = std::time::Instant::now();
        }
        self.hint
    }

    /// After a claim of `got` jobs out of `n`: a short claim has seen the whole queue (it
    /// took the jobs before the hint too), so the next one starts from the top.
    fn claimed(&mut self, got: usize, n: usize, next: Option<Hint>) {
        self.hint = if got < n { None } else { next };
    }
}

/// Claim until something comes back. Waits the poll interval after an empty claim (or
/// until this process's intake takes events in), and
/// backs off (jittered, up to 5 s) while the database fails.
async fn next_batch(source: &Source, resume: &mut Resume) -> ClaimedBatch {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let min = match &source.yield_to {
            Some(y) if source.min_priority < y.express_min => y.main_floor(),
            Some(y) if !y.express_may_claim() => {
                tokio::time::sleep(source.poll_interval).await;
                continue;
            }
            _ => source.min_priority,
        };
        let (pool, n) = (source.pool.clone(), source.fetch_batch);
        // In a task of its own, so that a worker stopping mid-claim (dropping this stream)
        // lets the statement finish instead of cutting it off; the claim it returns is then
        // dropped, which rolls it back.
        let hint = resume.hint();
        let claimed = tokio::spawn(async move { claim_after(&pool, n, min, hint).await })
            .await
            .unwrap_or_else(|e| Err(sqlx::Error::Protocol(format!("claim task failed: {e}"))));
        match claimed {
            Ok(Some((mut batch, next))) => {
                resume.claimed(batch.jobs.len(), n, next);
                if let Some(y) = &source.yield_to {
                    if batch.jobs.iter().any(|j| j.priority >= y.express_min) {
                        y.saw_interactive();
                    }
                    if batch.jobs.iter().any(|j| j.priority < y.express_min) {
                        batch.bulk = Some(Arc::new(y.bulk_ticket()));
                    }
                }
                tracing::debug!(
                    jobs = batch.jobs.len(),
                    claim_ms = started.elapsed().as_secs_f64() * 1e3,
                    "batch claimed"
                );
                return batch;
            }
            Ok(None) => {
                resume.claimed(0, n, None);
                backoff = Duration::from_millis(100);
                tokio::select! {
                    _ = tokio::time::sleep(source.poll_interval) => {}
                    _ = super::intake::taken_in() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "claim failed; retrying");
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Claim up to `n` due jobs of at least `min_priority` (`notify.claim_jobs`, see the module
/// doc) in a transaction that stays open until the batch is settled; `None` when nothing
/// is claimable. The rows are deleted in that transaction, under their row locks: other
/// replicas skip them (`SKIP LOCKED`), and a worker that dies or is cut off gives its jobs
/// back the moment its session ends (the delete rolls back), with no rescue needed.
pub async fn claim_due(
    pool: &PgPool,
    n: usize,
    min_priority: i16,
) -> Result<Option<ClaimedBatch>, sqlx::Error> {
    Ok(claim_after(pool, n, min_priority, None)
        .await?
        .map(|(batch, _)| batch))
}

/// Where a lane's previous claim ended: its last job, in claim order, in the slot it
/// claimed from first. The next claim starts after it ([`claim_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    pub slot: i16,
    pub priority: i16,
    pub due_us: i64,
    pub event_id: i64,
}

/// [`claim_due`] from a [`Hint`]: in the hint's slot, the higher priorities first, then the
/// jobs after the hint, and the ones before it only when that leaves the claim short. The
/// jobs before the hint are mostly the lane's own batches in flight and finished ones that
/// every claim from the top walked again (migration `20261207000001`, `notify.claim_jobs`).
/// Returns the batch and the hint for the next claim.
pub async fn claim_after(
    pool: &PgPool,
    n: usize,
    min_priority: i16,
    hint: Option<Hint>,
) -> Result<Option<(ClaimedBatch, Option<Hint>)>, sqlx::Error> {
    let mut tx = db::begin(pool).await?;
    let mut jobs = sqlx::query(
        "SELECT slot, tid, event_id, (EXTRACT(EPOCH FROM run_at) * 1000000)::bigint, attempts,
                priority
         FROM notify.claim_jobs($1, $2, $3, $4,
                                timestamptz 'epoch' + $5::bigint * interval '1 microsecond', $6)",
    )
    .persistent(db::persistent())
    .bind(i32::try_from(n).unwrap_or(i32::MAX))
    .bind(i32::from(min_priority))
    .bind(hint.map(|h| h.slot))
    .bind(hint.map(|h| h.priority))
    .bind(hint.map(|h| h.due_us))
    .bind(hint.map(|h| h.event_id))
    .try_map(job_row)
    .fetch_all(&mut *tx)
    .await?;
    if jobs.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    // The claim order within a slot: highest priority, then oldest, then event id.
    let order = |j: &ClaimedJob| (std::cmp::Reverse(j.priority), j.due_us, j.event_id);
    let first_slot = jobs[0].slot;
    let next = jobs
        .iter()
        .filter(|j| j.slot == first_slot)
        .max_by_key(|j| order(j))
        .map(|j| Hint {
            slot: j.slot,
            priority: j.priority,
            due_us: j.due_us,
            event_id: j.event_id,
        });
    // A DELETE returns its rows in table order; hand them on in the claim's order.
    jobs.sort_by_key(order);
    Ok(Some((ClaimedBatch::new(tx, jobs), next)))
}

/// Claim the waiting jobs of the given events, wherever they are due (any slot), `SKIP
/// LOCKED`, in the caller's transaction, as [`claim_due`] does (locked and deleted): the
/// claim of named events, for tests and for operators' tools. Jobs in `notify.queue_later` are not taken.
pub async fn claim_events(
    tx: &mut sqlx::PgConnection,
    events: &[i64],
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    let mut jobs = Vec::new();
    for slot in SLOTS {
        let found = sqlx::query(on_slot(
            "DELETE FROM notify.queue_{slot}
             WHERE ctid = ANY(ARRAY(SELECT ctid FROM notify.queue_{slot}
                                    WHERE event_id = ANY($1) FOR UPDATE SKIP LOCKED))
             RETURNING {slot}::smallint, ctid::text, event_id,
                       (EXTRACT(EPOCH FROM run_at) * 1000000)::bigint, attempts, priority",
            slot,
        ))
        .persistent(db::persistent())
        .bind(events)
        .try_map(job_row)
        .fetch_all(&mut *tx)
        .await?;
        jobs.extend(found);
    }
    jobs.sort_by_key(|j| j.event_id);
    Ok(jobs)
}

/// The queue's slot tables, `notify.queue_<slot>`.
pub const SLOTS: [i16; 4] = [0, 1, 2, 3];

/// A statement on one slot table: `template` with every `{slot}` replaced by `slot`, one of
/// [`SLOTS`]. The only text spliced in is that small number, never input, so the statement
/// is as safe as a literal (and each slot's text is prepared and cached once).
pub(crate) fn on_slot(template: &'static str, slot: i16) -> sqlx::AssertSqlSafe<String> {
    debug_assert!(SLOTS.contains(&slot));
    sqlx::AssertSqlSafe(template.replace("{slot}", &slot.to_string()))
}

fn job_row(row: sqlx::postgres::PgRow) -> Result<ClaimedJob, sqlx::Error> {
    use sqlx::Row;
    Ok(ClaimedJob {
        slot: row.try_get(0)?,
        tid: row.try_get(1)?,
        event_id: row.try_get(2)?,
        due_us: row.try_get(3)?,
        attempts: row.try_get(4)?,
        priority: row.try_get(5)?,
    })
}

/// The jobs of `jobs` in `slot`: their ctids and event ids.
fn in_slot(jobs: &[&ClaimedJob], slot: i16) -> (Vec<String>, Vec<i64>) {
    jobs.iter()
        .filter(|j| j.slot == slot)
        .map(|j| (j.tid.clone(), j.event_id))
        .unzip()
}

/// Settle a processed batch inside its claim transaction (the caller commits). The claim
/// deleted the jobs already (their record is the notification or the outcome on the event
/// row); what is left is to move the refused ones to `notify.queue_dead` with the reason and
/// this worker's name, one statement, only when there are any. Returns the jobs refused.
pub async fn settle(
    tx: &mut sqlx::PgConnection,
    worker: &str,
    jobs: &[ClaimedJob],
    answers: &[Answer],
) -> Result<u64, sqlx::Error> {
    let mut events = Vec::new();
    let mut attempts = Vec::new();
    let mut reasons = Vec::new();
    for (job, answer) in jobs.iter().zip(answers) {
        if let Err(e) = answer {
            events.push(job.event_id);
            attempts.push(job.attempts.saturating_add(1));
            reasons.push(e.to_string());
        }
    }
    if events.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "INSERT INTO notify.queue_dead (event_id, attempts, reason, worker)
         SELECT r.event_id, r.attempts, r.reason, $4
         FROM unnest($1::bigint[], $2::smallint[], $3::text[]) AS r(event_id, attempts, reason)
         ON CONFLICT (event_id) DO UPDATE
         SET attempts = EXCLUDED.attempts, reason = EXCLUDED.reason,
             worker = EXCLUDED.worker, failed_at = now()",
    )
    .persistent(db::persistent())
    .bind(&events)
    .bind(&attempts)
    .bind(&reasons)
    .bind(worker)
    .execute(&mut *tx)
    .await?;
    Ok(events.len() as u64)
}

/// Count a failed attempt for the jobs of a batch whose transaction was rolled back: each
/// waits in `notify.queue_later` for its backoff (`notify.queue_settings`: the base delay,
/// doubled per earlier attempt, capped, jittered by 0.5-1.5 x), or, out of attempts, goes
/// to `notify.queue_dead` with the reason. Jobs that another replica has claimed meanwhile are skipped, not waited
/// for. Returns the jobs marked.
pub async fn fail(
    pool: &PgPool,
    worker: &str,
    jobs: &[ClaimedJob],
    reason: &str,
) -> Result<u64, sqlx::Error> {
    let all: Vec<&ClaimedJob> = jobs.iter().collect();
    let mut marked = 0;
    for slot in SLOTS {
        let (tids, events) = in_slot(&all, slot);
        if tids.is_empty() {
            continue;
        }
        let n: i64 = db::fetch_one(
            pool,
            sqlx::query_scalar(on_slot(
                "WITH gone AS (
                     DELETE FROM notify.queue_{slot}
                     WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM notify.queue_{slot}
                         WHERE ctid = ANY($1::text[]::tid[]) AND event_id = ANY($2)
                         FOR UPDATE SKIP LOCKED))
                     RETURNING event_id, priority, attempts + 1 AS attempts
                 ),
                 settings AS (
                     SELECT max_attempts, retry_base_secs, retry_max_secs FROM notify.queue_settings
                 ),
                 later AS (
                     INSERT INTO notify.queue_later (event_id, priority, run_at, attempts, last_error)
                     SELECT g.event_id, g.priority,
                            now() + make_interval(secs => least(s.retry_max_secs,
                                s.retry_base_secs * power(2, least(g.attempts - 1, 30)))
                                * (0.5 + random())),
                            g.attempts, $3
                     FROM gone AS g, settings AS s WHERE g.attempts < s.max_attempts
                     ON CONFLICT (event_id) DO NOTHING
                     RETURNING 1
                 ),
                 dead AS (
                     INSERT INTO notify.queue_dead (event_id, attempts, reason, worker)
                     SELECT g.event_id, g.attempts, $3, $4
                     FROM gone AS g, settings AS s WHERE g.attempts >= s.max_attempts
                     ON CONFLICT (event_id) DO NOTHING
                     RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM later) + (SELECT count(*) FROM dead)", slot))
            .bind(&tids)
            .bind(&events)
            .bind(reason)
            .bind(worker),
        )
        .await?;
        marked += n as u64;
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HINT: Hint = Hint {
        slot: 0,
        priority: 0,
        due_us: 1,
        event_id: 7,
    };

    #[test]
    fn a_lane_resumes_after_full_claims_and_starts_from_the_top_otherwise() {
        let mut r = Resume::default();
        assert_eq!(r.hint(), None, "the first claim is from the top");
        r.claimed(10, 10, Some(HINT));
        assert_eq!(
            r.hint(),
            Some(HINT),
            "a full claim: the next starts after it"
        );
        r.claimed(3, 10, Some(HINT));
        assert_eq!(r.hint(), None, "a short claim saw everything: from the top");
        r.claimed(10, 10, Some(HINT));
        r.from_top_at -= FULL_CLAIM_EVERY;
        assert_eq!(
            r.hint(),
            None,
            "at least one claim from the top per interval"
        );
        r.claimed(0, 10, None);
        assert_eq!(r.hint(), None);
    }
}
