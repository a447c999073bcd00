//! Claim: the apalis worker that takes jobs from `apalis.jobs` and hands them to the
//! pipeline, and the rescue of jobs held by dead workers.
//!
//! Two claim modes ([`ClaimMode`]) run on apalis's worker over the same table and states:
//! * **batch** (default, `claim::batches`): one apalis task is one claimed batch, claimed by
//!   row locks in a transaction that also does its whole effect ([`Batcher::process_in`])
//!   and deletes its finished jobs, then commits. Claim errors are retried in place and a
//!   failed batch rolls back, so a database outage never stops it; the rescue below is not
//!   needed for it (locks end with the session);
//! * **per-job**: apalis-postgres's own backend, one task per job, regrouped into store
//!   transactions by the group-commit [`Batcher`]. The points below about codecs, apalis's
//!   acks and restarts are about this mode.
//!
//! How it is wired, and why:
//! * **Queue name** `notifyd.events`, set explicitly (the trigger on `notify.events` writes it).
//! * **Wake-up**: an interval poll (`--poll-interval-ms`, 10 ms by default) in both modes.
//!   Enqueuing sends no NOTIFY: apalis's per-row `notify_workers` trigger is disabled
//!   (migration `20261201000003_enqueue_without_notify.sql`), because a NOTIFY makes every
//!   enqueuing transaction take a cluster-wide lock at commit and hold it through the
//!   commit's flush, so the backend's transactions would commit one at a time. The worker
//!   warns at start-up ([`crate::db::enqueue_notify_triggers`]) if an apalis upgrade has
//!   brought it back.
//! * **Codec**: payloads reach the handler as raw bytes ([`RawCodec`] cannot fail), because
//!   apalis's worker exits on a decode error. The pipeline validates the bytes itself.
//! * **Outcomes**: a bad job returns `AbortError` (status `Killed`, not retried, reason in
//!   `last_result`); a database failure returns an ordinary error (status `Failed`, retried
//!   by apalis up to `max_attempts`, after a backoff that the `notifyd_failed_job_backoff`
//!   trigger sets).
//! * **Supervision**: apalis's backend stops its worker on any database error (fetch,
//!   heartbeat or ack). [`run`] restarts it under a fresh name with exponential backoff and
//!   jitter, so a Postgres restart costs a pause, never the process. The jobs the failed
//!   instance held are released at once (it is gone, so nobody else can finish them); if
//!   that fails too, they are rescued like a dead worker's.
//! * **Rescue** ([`rescue_orphans`], run by every worker replica every heartbeat; per-job mode,
//!   and any row left `Queued`/`Running` by hand or by an older release): a job
//!   claimed by a worker whose heartbeat is older than `heartbeat × missed_heartbeats` goes
//!   back to `Pending`. Only a silent worker's jobs are touched, so starting or stopping
//!   replicas never re-runs a live replica's jobs. Each instance beats from its own task
//!   ([`heartbeat`]), not only from apalis's fetch loop, which goes quiet while a busy
//!   worker waits on its in-flight jobs. apalis's own orphan check is kept as a backstop one
//!   heartbeat later (for replicas without this rescuer).
//! * **Fencing**: a worker that was only slow, not dead, may still finish a rescued job.
//!   Its effect is idempotent (the outcome is recorded under the user's lock, once per
//!   event; the second run answers `duplicate`), and its ack is a no-op because apalis
//!   guards acks with `lock_by`.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_core::backend::ext::with_codec::WithCodec;
use apalis_postgres::{Config, PostgresStorage};
use sqlx::PgPool;
use sqlx::postgres::types::PgInterval;
use tokio::sync::watch;
use tracing::Instrument;

mod batches;

use crate::batch::Batcher;
use crate::pipeline::{JobError, Outcome};
use crate::validate::{RawJob, parse_job};
use crate::{metrics, pipeline};

/// The apalis queue (`apalis.jobs.job_type`) that `notify.enqueue_events` writes.
pub const QUEUE: &str = "notifyd.events";

/// apalis's own orphan check runs this many heartbeats after ours, as a backstop.
const APALIS_BACKSTOP_HEARTBEATS: usize = 1;

/// How long the best-effort release of a stopped instance's jobs may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// Hands apalis's bytes to the handler untouched. Decoding cannot fail, so no payload can
/// stop the worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec<RawJob> for RawCodec {
    type Error = Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, val: &RawJob) -> Result<Vec<u8>, Infallible> {
        Ok(val.0.clone())
    }

    fn decode(&self, val: &Vec<u8>) -> Result<RawJob, Infallible> {
        Ok(RawJob(val.clone()))
    }
}

/// How jobs reach the pipeline. Both run on apalis's worker over the same `apalis.jobs`
/// states; they differ in what one apalis task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClaimMode {
    /// One apalis task per claimed batch (see `claim::batches`): claim, one store transaction
    /// and one set-based ack per batch. The default: it is several times faster.
    #[default]
    Batch,
    /// apalis-postgres's own backend: one apalis task per job, gathered again into store
    /// transactions by the [`Batcher`]. Kept for comparison (BENCHMARKS.md) and as a
    /// fallback.
    PerJob,
}

/// How the apalis side of the worker is tuned.
#[derive(Debug, Clone)]
pub struct ClaimSettings {
    /// What one apalis task is.
    pub mode: ClaimMode,
    /// Per-job mode: jobs in flight at once (they wait in the batcher for their
    /// transaction). Batch mode: batches in flight at once.
    pub concurrency: usize,
    /// Jobs claimed by one `apalis.get_jobs` call.
    pub fetch_batch: usize,
    /// Poll interval when no notification arrives (delayed jobs, missed notifications).
    pub poll_interval: Duration,
    /// Worker heartbeat; a worker silent for `heartbeat × missed_heartbeats` is dead and
    /// its jobs are rescued by the other workers.
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    /// Prefix of the worker name in `apalis.workers`.
    pub name: String,
}

impl ClaimSettings {
    /// How long a dead worker's jobs wait before another worker rescues them.
    pub fn rescue_after(&self) -> Duration {
        self.heartbeat * self.missed_heartbeats as u32
    }
}

/// Looked up once (a lookup per job shows at tens of thousands of jobs per second). The
/// recorder is installed before any worker starts.
static CLAIM_WAIT: std::sync::LazyLock<::metrics::Histogram> =
    std::sync::LazyLock::new(|| ::metrics::histogram!(metrics::CLAIM_WAIT));

/// What the handler knows about a job besides its payload.
struct JobInfo {
    id: String,
    /// Milliseconds since the epoch when the job became due: its enqueue time (from the
    /// ULID) or its `run_at` (whole seconds), whichever is later.
    due_ms: Option<u64>,
}

impl<Args: Sync> FromRequest<Task<Args>> for JobInfo {
    type Error = Infallible;

    async fn from_request(task: &Task<Args>) -> Result<Self, Infallible> {
        let ctx = task.ctx();
        let created = ctx
            .task_id()
            .and_then(|id| id.as_ulid())
            .map(|u| u.timestamp_ms());
        let run_at = ctx.run_at().map(|s| s.saturating_mul(1000));
        Ok(JobInfo {
            id: ctx.task_id().map(ToString::to_string).unwrap_or_default(),
            due_ms: created.max(run_at),
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn handle_job(
    job: RawJob,
    batcher: Data<Batcher>,
    info: JobInfo,
) -> Result<Outcome, BoxDynError> {
    if let Some(due) = info.due_ms {
        let wait = now_ms().saturating_sub(due) as f64 / 1e3;
        CLAIM_WAIT.record(wait);
    }
    let event_id = parse_job(&job).ok();
    let span = tracing::debug_span!("job", id = %info.id, event_id);
    match batcher.submit(job).instrument(span).await {
        Ok(outcome) => Ok(outcome),
        Err(JobError::Bad(reason)) => {
            tracing::warn!(job = %info.id, event_id, %reason, "job refused");
            Err(AbortError::new(reason).into())
        }
        Err(e @ JobError::Transient(_)) => {
            tracing::warn!(job = %info.id, event_id, error = %e, "job failed; apalis will retry it");
            Err(e.into())
        }
    }
}

/// What the batch handler needs besides its batch.
#[derive(Clone)]
struct BatchContext {
    batcher: Batcher,
    pool: PgPool,
    worker: String,
}

/// Process one claimed batch in its claim transaction, settle its jobs and commit. Never
/// returns an error (apalis would only log it): whatever fails, the transaction rolls back
/// and the jobs are claimable again; a non-transient failure also counts an attempt.
async fn handle_batch(
    batch: batches::ClaimedBatch,
    ctx: Data<BatchContext>,
) -> Result<(), BoxDynError> {
    let now = now_ms() as i64;
    for job in &batch.jobs {
        CLAIM_WAIT.record(now.saturating_sub(job.due_ms).max(0) as f64 / 1e3);
    }
    let Some(mut tx) = batch.take() else {
        return Ok(());
    };
    let span = tracing::debug_span!(
        "batch_task",
        jobs = batch.jobs.len(),
        first_job = batch.jobs.first().map(|j| j.id.as_str()),
    );
    async {
        let started = Instant::now();
        let job_ids: Vec<&str> = batch.jobs.iter().map(|j| j.id.as_str()).collect();
        let done = async {
            let answers = ctx
                .batcher
                .process_in(&mut tx, &batches::payloads(&batch), &job_ids)
                .await?;
            let processed = Instant::now();
            batches::settle(&mut tx, &ctx.worker, &batch.jobs, &answers).await?;
            Ok::<_, sqlx::Error>((answers, processed))
        }
        .await;
        let result = match done {
            Ok((answers, processed)) => {
                let settled = Instant::now();
                tx.commit().await.map(|()| {
                    tracing::debug!(
                        jobs = batch.jobs.len(),
                        process_ms = (processed - started).as_secs_f64() * 1e3,
                        settle_ms = (settled - processed).as_secs_f64() * 1e3,
                        commit_ms = settled.elapsed().as_secs_f64() * 1e3,
                        "batch committed"
                    );
                    answers
                })
            }
            Err(e) => {
                // Roll back now, not when the connection next goes back to the pool: the
                // attempt counted below must find the rows unlocked.
                let _ = tx.rollback().await;
                Err(e)
            }
        };
        match result {
            Ok(answers) => {
                for (job, answer) in batch.jobs.iter().zip(&answers) {
                    if let Err(reason) = answer {
                        tracing::warn!(job = %job.id, %reason, "job refused");
                    }
                }
                ctx.batcher.committed(&answers);
            }
            // The transaction was rolled back: the jobs are back in the queue. A transient
            // failure (lost connection, deadlock, server shutting down) is not the jobs'
            // fault and costs no attempt; any other counts one (with the retry backoff).
            // Either way this slot pauses, so a failure that repeats neither hammers the
            // database nor spins.
            Err(e) => {
                let pause = Duration::from_millis(200).mul_f64(0.5 + fastrand::f64() * 4.0);
                if pipeline::is_transient(&e) {
                    tracing::warn!(error = %e, jobs = batch.jobs.len(), retry_in_ms = pause.as_millis() as u64,
                        "batch failed; its jobs are back in the queue");
                } else {
                    let reason = format!("batch failed: {e}");
                    match batches::fail(&ctx.pool, &ctx.worker, &batch.jobs, &reason).await {
                        Ok(n) if n as usize == batch.jobs.len() => tracing::error!(error = %e, jobs = n,
                            "batch failed; its jobs will be retried after a backoff"),
                        Ok(n) => tracing::error!(error = %e, marked = n, jobs = batch.jobs.len(),
                            "batch failed; some of its jobs were claimed again before the attempt was counted"),
                        Err(e2) => tracing::error!(error = %e, mark_error = %e2, "batch failed; its jobs are back in the queue"),
                    }
                }
                count_retries(batch.jobs.len());
                tokio::time::sleep(pause).await;
            }
        }
    }
    .instrument(span)
    .await;
    Ok(())
}

/// The per-job mode's poll clock: one item every `period`, always armed.
///
/// apalis's own interval strategy re-creates its timer when it fires without polling the
/// new one, so when that tick coincides with an empty fetch nothing is left to wake the
/// worker until its next heartbeat (seen as an idle replica that took no jobs for
/// seconds once the LISTEN wake-up was gone). This stream polls its interval once more
/// after every tick, which arms the next one with the caller's waker.
struct Ticks(tokio::time::Interval);

impl Ticks {
    fn new(period: Duration) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(interval)
    }
}

impl futures::Stream for Ticks {
    type Item = ();

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<()>> {
        match self.0.poll_tick(cx) {
            std::task::Poll::Ready(_) => {
                // The next tick is a period away: this returns Pending and registers `cx`.
                let _ = self.0.poll_tick(cx);
                std::task::Poll::Ready(Some(()))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// Count `n` jobs whose batch failed and that go back to the queue.
fn count_retries(n: usize) {
    let mut tally = metrics::OutcomeTally::default();
    for _ in 0..n {
        tally.transient_failure();
    }
    tally.record();
}

/// Run the worker until `shutdown` turns true, waiting for in-flight jobs as long as they
/// take. Restarts apalis's worker after failures. See [`run_with_drain`].
pub async fn run(
    pool: PgPool,
    settings: ClaimSettings,
    batcher: Batcher,
    shutdown: watch::Receiver<bool>,
) {
    run_with_drain(pool, settings, batcher, shutdown, None).await;
}

/// [`run`], with a bound on shutdown: once `shutdown` turns true, apalis stops claiming,
/// lets in-flight jobs finish and puts fetched-but-unstarted ones back to `Pending`. If that
/// takes longer than `drain`, the worker is dropped and the jobs it still held are released
/// (back to `Pending`) for other replicas. Returns the number of jobs released that way.
pub async fn run_with_drain(
    pool: PgPool,
    settings: ClaimSettings,
    batcher: Batcher,
    mut shutdown: watch::Receiver<bool>,
    drain: Option<Duration>,
) -> u64 {
    let mut restarts: u32 = 0;
    let mut backoff = Duration::from_millis(250);
    loop {
        if *shutdown.borrow() {
            return 0;
        }
        let name = format!("{}-{}", settings.name, restarts);
        let span = tracing::info_span!("worker", worker = %name);
        let running: futures::future::BoxFuture<'static, Result<(), WorkerError>> =
            match settings.mode {
                ClaimMode::PerJob => {
                    let config = Config::default()
                        .queue(QUEUE)
                        .batch_size(settings.fetch_batch)
                        .heartbeat_interval(settings.heartbeat)
                        .missed_heartbeats(settings.missed_heartbeats + APALIS_BACKSTOP_HEARTBEATS)
                        // The claim already marks jobs Queued with lock_by; a second
                        // per-job UPDATE to Running buys nothing here (rescue covers
                        // Queued jobs too).
                        .lock_tasks(false)
                        .persist_results(true);
                    let storage = PostgresStorage::<RawJob>::new(&pool).with_config(config);
                    let strategy = Strategy::new().stream(Ticks::new(settings.poll_interval));
                    let backend = WithCodec::new(PollWith::new(storage, strategy), RawCodec);
                    let worker = WorkerBuilder::new(name.clone())
                        .backend(backend)
                        .concurrency(settings.concurrency)
                        .data(batcher.clone())
                        .build(handle_job);
                    let mut stop = shutdown.clone();
                    Box::pin(worker.run_until(async move {
                        let _ = stop.wait_for(|s| *s).await;
                        Ok::<(), std::io::Error>(())
                    }))
                }
                ClaimMode::Batch => {
                    if let Err(e) = batches::register(&pool, &name).await {
                        span.in_scope(
                            || tracing::warn!(error = %e, "cannot register the worker; retrying"),
                        );
                        let wait = backoff.mul_f64(0.5 + fastrand::f64());
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.wait_for(|s| *s) => return 0,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                    let backend = batches::backend(batches::Source {
                        pool: pool.clone(),
                        fetch_batch: settings.fetch_batch,
                        poll_interval: settings.poll_interval,
                    });
                    let worker = WorkerBuilder::new(name.clone())
                        .backend(backend)
                        .concurrency(settings.concurrency)
                        .data(BatchContext {
                            batcher: batcher.clone(),
                            pool: pool.clone(),
                            worker: name.clone(),
                        })
                        .build(handle_batch);
                    let mut stop = shutdown.clone();
                    Box::pin(worker.run_until(async move {
                        let _ = stop.wait_for(|s| *s).await;
                        Ok::<(), std::io::Error>(())
                    }))
                }
            };

        let beat = tokio::spawn(
            heartbeat(pool.clone(), name.clone(), settings.heartbeat).instrument(span.clone()),
        );
        let started = Instant::now();
        span.in_scope(|| tracing::info!(mode = ?settings.mode, "worker started"));
        let running = running.instrument(span.clone());
        let mut deadline = shutdown.clone();
        let drain_deadline = async move {
            let _ = deadline.wait_for(|s| *s).await;
            match drain {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = running => Some(r),
            _ = drain_deadline => None,
        };
        beat.abort();
        match result {
            None => {
                span.in_scope(|| {
                    tracing::warn!(
                        drain_secs = drain.unwrap_or_default().as_secs_f64(),
                        "in-flight jobs did not finish before the shutdown deadline; they are released \
                         (batch mode: their transactions roll back; per-job mode: see below)"
                    )
                });
                return release_after_stop(&pool, &name, settings.rescue_after())
                    .instrument(span)
                    .await;
            }
            Some(Ok(())) if *shutdown.borrow() => {
                span.in_scope(|| tracing::info!("worker stopped"));
                return release_after_stop(&pool, &name, settings.rescue_after())
                    .instrument(span)
                    .await;
            }
            Some(Ok(())) => span.in_scope(|| tracing::warn!("worker ended on its own; restarting")),
            Some(Err(e)) => {
                span.in_scope(|| tracing::error!(error = %e, "worker failed; restarting"))
            }
        }
        ::metrics::counter!(metrics::WORKER_RESTARTS).increment(1);
        release_after_stop(&pool, &name, settings.rescue_after())
            .instrument(span)
            .await;
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(250);
        }
        let wait = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return 0,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
        restarts += 1;
    }
}

/// Keep `worker`'s heartbeat fresh while its instance runs, independently of apalis.
///
/// apalis heartbeats from inside its fetch loop, and only between fetched batches: a
/// worker whose in-flight jobs wait on a slow store transaction can go silent for longer
/// than the rescue time while it is alive and working, and lose its jobs to a rescue. This
/// task beats on its own timer, so "silent" means what rescue assumes: the process is dead,
/// frozen, or cut off from the database. (apalis keeps beating too; both write `now()`.)
async fn heartbeat(pool: PgPool, worker: String, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = crate::db::execute(
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

/// Give back the jobs of a stopped worker instance and mark it stopped (its heartbeat is
/// backdated by the rescue time, so `notifyd status` shows it gone at once and anything it
/// still holds is rescued at the next check). Best effort and time-bounded: if the database
/// is down, the jobs stay claimed and are rescued later.
async fn release_after_stop(pool: &PgPool, worker: &str, rescue_after: Duration) -> u64 {
    let work = async {
        let released = release_jobs(pool, worker).await?;
        crate::db::execute(
            pool,
            sqlx::query(
                "UPDATE apalis.workers SET last_seen = least(last_seen, now() - $2::interval)
                 WHERE id = $1",
            )
            .bind(worker)
            .bind(interval(rescue_after)),
        )
        .await?;
        Ok::<u64, sqlx::Error>(released)
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, work).await {
        Ok(Ok(0)) => 0,
        Ok(Ok(n)) => {
            tracing::info!(jobs = n, "released the jobs of the stopped worker instance");
            n
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the stopped instance's jobs; they will be rescued");
            0
        }
        Err(_) => {
            tracing::warn!("releasing the stopped instance's jobs timed out; they will be rescued");
            0
        }
    }
}

fn interval(d: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// Put the claimed jobs of `worker` (an instance of this process that is no longer
/// running) back to `Pending`. Counts as an attempt, like apalis's own re-enqueue.
pub async fn release_jobs(pool: &PgPool, worker: &str) -> Result<u64, sqlx::Error> {
    let n = crate::db::execute(
        pool,
        sqlx::query(
            "UPDATE apalis.jobs
             SET status = 'Pending', lock_by = NULL, lock_at = NULL, done_at = NULL,
                 attempts = attempts + 1,
                 last_result = jsonb_build_object('Err', 'Released by worker ' || $2 || ' as it stopped')
             WHERE job_type = $1 AND lock_by = $2 AND status IN ('Queued', 'Running')",
        )
        .bind(QUEUE)
        .bind(worker),
    )
    .await?
    .rows_affected();
    if n > 0 {
        ::metrics::counter!(metrics::RELEASED).increment(n);
    }
    Ok(n)
}

/// Jobs taken back from one dead worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Rescued {
    pub worker: String,
    pub jobs: i64,
    /// Seconds since the worker's last heartbeat.
    pub silent_secs: f64,
}

/// Put the jobs of workers silent for at least `after` back to `Pending` (attempts + 1, the
/// reason in `last_result`). Safe to run from every replica at once (`SKIP LOCKED`), and it
/// never touches a worker that heartbeats: see the module docs for why a slow worker is
/// harmless.
pub async fn rescue_orphans(pool: &PgPool, after: Duration) -> Result<Vec<Rescued>, sqlx::Error> {
    let after = interval(after);
    let query = sqlx::query_as(
        // Driven from the (few) silent workers through the lock_by index, and updated by
        // primary key: joining the job table to them is planned as a sequential scan of
        // the whole queue (150 ms per check with a 60k backlog, every heartbeat, on every
        // replica). The WHERE clause sees the old lock_by, so `d` names the dead worker.
        "WITH dead AS MATERIALIZED (
             SELECT id, extract(epoch FROM now() - last_seen)::float8 AS silent
             FROM apalis.workers
             WHERE last_seen <= now() - $2::interval
         ),
         rescued AS (
             UPDATE apalis.jobs AS j
             SET status = 'Pending', lock_by = NULL, lock_at = NULL, done_at = NULL,
                 attempts = j.attempts + 1,
                 last_result = jsonb_build_object('Err',
                     'Rescued: worker ' || d.id || ' missed its heartbeats')
             FROM dead AS d
             WHERE j.id = ANY(ARRAY(
                       SELECT stale.id FROM apalis.jobs AS stale
                       WHERE stale.lock_by = ANY(ARRAY(SELECT id FROM dead))
                         AND stale.job_type = $1
                         AND stale.status IN ('Queued', 'Running')
                       FOR UPDATE SKIP LOCKED))
               AND d.id = j.lock_by
             RETURNING d.id AS worker, d.silent
         )
         SELECT worker, count(*), max(silent) FROM rescued GROUP BY worker ORDER BY worker",
    )
    .bind(QUEUE)
    .bind(after);
    let rows: Vec<(String, i64, f64)> = crate::db::fetch_all(pool, query).await?;
    let rescued: Vec<Rescued> = rows
        .into_iter()
        .map(|(worker, jobs, silent_secs)| Rescued {
            worker,
            jobs,
            silent_secs,
        })
        .collect();
    let total: i64 = rescued.iter().map(|r| r.jobs).sum();
    if total > 0 {
        ::metrics::counter!(metrics::RESCUED).increment(total as u64);
    }
    Ok(rescued)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll};

    use futures::Stream;

    use super::*;

    struct Woken(AtomicBool);

    impl futures::task::ArcWake for Woken {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.store(true, Ordering::SeqCst);
        }
    }

    /// apalis's poll wrapper polls its strategy once per worker poll and ignores the
    /// answer, so after a tick nobody polls the clock again: the next tick must still wake
    /// the worker on its own.
    #[tokio::test(start_paused = true)]
    async fn the_poll_clock_stays_armed_after_a_tick_nobody_polls_again() {
        let woken = Arc::new(Woken(AtomicBool::new(false)));
        let waker = futures::task::waker(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut ticks = Ticks::new(Duration::from_millis(10));
        // A tokio interval's first tick is immediate.
        assert!(matches!(
            std::pin::Pin::new(&mut ticks).poll_next(&mut cx),
            Poll::Ready(Some(()))
        ));
        assert!(!woken.0.load(Ordering::SeqCst));
        tokio::time::advance(Duration::from_millis(11)).await;
        assert!(
            woken.0.load(Ordering::SeqCst),
            "the next tick woke the task that got the last one"
        );
    }
}
