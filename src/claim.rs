//! Claim: the apalis worker that takes jobs from `apalis.jobs` and hands them to the
//! group-commit [`Batcher`].
//!
//! How it is wired, and why:
//! * **Queue name** `notifyd.events`, set explicitly (the trigger on `notify.events` writes it).
//! * **Wake-up**: LISTEN on apalis's insert channel *and* an interval poll. An idle apalis
//!   worker notices neither SQL-inserted jobs nor delayed (`run_at`) jobs without both.
//! * **Codec**: payloads reach the handler as raw bytes ([`RawCodec`] cannot fail), because
//!   apalis's worker exits on a decode error. The pipeline validates the bytes itself.
//! * **Outcomes**: a bad job returns `AbortError` (status `Killed`, not retried, reason in
//!   `last_result`); a database failure returns an ordinary error (status `Failed`, retried
//!   by apalis up to `max_attempts`).
//! * **Supervision**: apalis's backend stops its worker on any database error (fetch,
//!   heartbeat or ack). [`run`] restarts it under a fresh name with exponential backoff and
//!   jitter, so a Postgres restart costs a pause, never the process. Jobs the dead instance
//!   held are rescued by the orphan check after `heartbeat × missed_heartbeats`; the store
//!   step is idempotent, so a rescued job that had in fact finished is a `duplicate`.

use std::convert::Infallible;
use std::time::Duration;

use apalis::prelude::*;
use apalis_core::backend::ext::with_codec::WithCodec;
use apalis_postgres::{Config, PostgresStorage, Pubsub};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::batch::Batcher;
use crate::pipeline::{JobError, Outcome};
use crate::validate::RawJob;

/// The apalis queue (`apalis.jobs.job_type`) that `notify.enqueue_events` writes.
pub const QUEUE: &str = "notifyd.events";

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

/// How the apalis side of the worker is tuned.
#[derive(Debug, Clone)]
pub struct ClaimSettings {
    /// Jobs in flight at once (they wait in the batcher for their transaction).
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

async fn handle_job(job: RawJob, batcher: Data<Batcher>) -> Result<Outcome, BoxDynError> {
    match batcher.submit(job).await {
        Ok(outcome) => Ok(outcome),
        Err(JobError::Bad(reason)) => {
            tracing::warn!(%reason, "job refused");
            Err(AbortError::new(reason).into())
        }
        Err(e @ JobError::Transient(_)) => Err(e.into()),
    }
}

/// Run the worker until `shutdown` turns true. Restarts apalis's worker after failures.
pub async fn run(
    pool: PgPool,
    settings: ClaimSettings,
    batcher: Batcher,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut restarts: u32 = 0;
    let mut backoff = Duration::from_millis(250);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let name = format!("{}-{}", settings.name, restarts);
        let config = Config::default()
            .queue(QUEUE)
            .batch_size(settings.fetch_batch)
            .heartbeat_interval(settings.heartbeat)
            .missed_heartbeats(settings.missed_heartbeats)
            // The claim already marks jobs Queued with lock_by; a second per-job UPDATE to
            // Running buys nothing here (rescue covers Queued jobs too).
            .lock_tasks(false)
            .persist_results(true);
        let storage = PostgresStorage::<RawJob>::new(&pool).with_config(config);
        let strategy = Strategy::new()
            .stream(Pubsub::new(pool.clone(), QUEUE.to_owned()))
            .interval(settings.poll_interval);
        let backend = WithCodec::new(PollWith::new(storage, strategy), RawCodec);
        let worker = WorkerBuilder::new(name.clone())
            .backend(backend)
            .concurrency(settings.concurrency)
            .data(batcher.clone())
            .build(handle_job);

        let mut stop = shutdown.clone();
        let started = std::time::Instant::now();
        tracing::info!(worker = %name, "worker started");
        let result = worker
            .run_until(async move {
                let _ = stop.wait_for(|s| *s).await;
                Ok::<(), std::io::Error>(())
            })
            .await;
        match result {
            Ok(()) if *shutdown.borrow() => {
                tracing::info!(worker = %name, "worker stopped");
                return;
            }
            Ok(()) => tracing::warn!(worker = %name, "worker ended on its own; restarting"),
            Err(e) => tracing::error!(worker = %name, error = %e, "worker failed; restarting"),
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(250);
        }
        let wait = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
        restarts += 1;
    }
}
