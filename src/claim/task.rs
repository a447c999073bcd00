//! The task: what the worker does with one claimed batch. [`Processor::process`] runs the
//! pipeline in the claim's transaction, settles the jobs and commits, or rolls
//! everything back; apalis calls it through [`handle_batch`], and tests drive it one step
//! at a time through [`Processor::run_once`], which answers [`Step::EmptyQueue`] when
//! nothing is claimable.
//!
//! Invariants: answers are counted (on `/metrics` and in [`Processor::outcomes_committed`])
//! only after their transaction committed; a failed batch is never an error for apalis
//! (which would only log it): its jobs are back in the queue, and an error that is the
//! data's fault (not a lost connection or a conflict) also counts them an attempt, so a
//! batch that can never succeed ends `Failed` instead of looping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::{BoxDynError, Data};
use metrics::histogram;
use sqlx::PgPool;
use tracing::Instrument;

use super::backend::{self, ClaimedBatch};
use crate::db;
use crate::pipeline::{Answer, Pipeline, Tally};
use crate::telemetry::series;

/// What one step of the worker did.
#[derive(Debug)]
pub enum Step {
    /// A batch was claimed, processed and committed; its answers, in claim order.
    Processed(Vec<Answer>),
    /// Nothing was claimable.
    EmptyQueue,
}

/// Processes claimed batches for one worker instance. Cheap to clone.
#[derive(Clone)]
pub struct Processor {
    pool: PgPool,
    pipeline: Pipeline,
    worker: String,
    /// Jobs answered with an outcome and committed, by this processor and its clones.
    committed: Arc<AtomicU64>,
}

impl Processor {
    /// A processor for the registered worker instance `worker` (it is named as the
    /// refuser of bad jobs).
    pub fn new(pool: PgPool, pipeline: Pipeline, worker: &str) -> Self {
        Processor {
            pool,
            pipeline,
            worker: worker.to_owned(),
            committed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same processor under another instance name (after a restart).
    pub fn renamed(&self, worker: &str) -> Self {
        Processor {
            worker: worker.to_owned(),
            ..self.clone()
        }
    }

    /// Jobs answered with an outcome (and committed) so far, by this processor and its
    /// clones.
    pub fn outcomes_committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Take in what waits (intake mode, [`super::intake`]), then claim one batch of up to
    /// `fetch_batch` due jobs and process it: the worker's step, without apalis around it.
    pub async fn run_once(&self, fetch_batch: usize) -> Result<Step, sqlx::Error> {
        super::intake::take_in_all(&self.pool).await?;
        match backend::claim_due(&self.pool, fetch_batch, i16::MIN).await? {
            None => Ok(Step::EmptyQueue),
            Some(batch) => self.process(batch).await.map(Step::Processed),
        }
    }

    /// Process a claimed batch in its transaction, settle it and commit. On `Err` the
    /// transaction was rolled back: the jobs are claimable again (with an attempt counted
    /// when the error is not transient).
    pub async fn process(&self, batch: ClaimedBatch) -> Result<Vec<Answer>, sqlx::Error> {
        // One registry lookup per batch, not per job (it shows at tens of thousands of
        // jobs per second).
        let wait = histogram!(series::CLAIM_WAIT);
        let now = chrono::Utc::now().timestamp_micros();
        for job in &batch.jobs {
            wait.record(now.saturating_sub(job.due_us).max(0) as f64 / 1e6);
        }
        let Some(mut tx) = batch.take() else {
            return Ok(Vec::new());
        };
        let span = tracing::debug_span!(
            "batch_task",
            jobs = batch.jobs.len(),
            first_event = batch.jobs.first().map(|j| j.event_id),
        );
        async {
            let started = Instant::now();
            let done = async {
                let answers = self.pipeline.process_in(&mut tx, &batch.events()).await?;
                let processed = Instant::now();
                backend::settle(&mut tx, &self.worker, &batch.jobs, &answers).await?;
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
                    // Roll back now, not when the connection next goes back to the pool:
                    // the attempt counted below must find the rows unlocked.
                    let _ = tx.rollback().await;
                    Err(e)
                }
            };
            match result {
                Ok(answers) => {
                    for (job, answer) in batch.jobs.iter().zip(&answers) {
                        if let Err(reason) = answer {
                            tracing::warn!(event = job.event_id, %reason, "job refused");
                        }
                    }
                    let tally = Tally::of(&answers);
                    tally.record();
                    self.committed
                        .fetch_add(tally.outcomes(), Ordering::Relaxed);
                    Ok(answers)
                }
                Err(e) => {
                    self.failed(&batch, &e).await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// After a rollback: count an attempt unless the failure was transient, and log it.
    async fn failed(&self, batch: &ClaimedBatch, e: &sqlx::Error) {
        let jobs = batch.jobs.len();
        if db::is_transient(e) {
            tracing::warn!(error = %e, jobs, "batch failed; its jobs are back in the queue");
        } else {
            let reason = format!("batch failed: {e}");
            match backend::fail(&self.pool, &self.worker, &batch.jobs, &reason).await {
                Ok(n) if n as usize == jobs => tracing::error!(error = %e, jobs,
                    "batch failed; its jobs will be retried after a backoff"),
                Ok(n) => tracing::error!(error = %e, marked = n, jobs,
                    "batch failed; some of its jobs were claimed again before the attempt was counted"),
                Err(e2) => tracing::error!(error = %e, mark_error = %e2,
                    "batch failed; its jobs are back in the queue"),
            }
        }
        Tally {
            retried: jobs as u64,
            ..Tally::default()
        }
        .record();
    }
}

/// The apalis handler: process one claimed batch. A failed batch pauses this slot (200 ms,
/// jittered), so that a failure that repeats neither hammers the database nor spins.
pub async fn handle_batch(batch: ClaimedBatch, p: Data<Processor>) -> Result<(), BoxDynError> {
    if p.process(batch).await.is_err() {
        let pause = Duration::from_millis(200).mul_f64(0.5 + fastrand::f64() * 4.0);
        tokio::time::sleep(pause).await;
    }
    Ok(())
}
