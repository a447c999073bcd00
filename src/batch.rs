//! Group commit: gather the jobs that apalis hands to many concurrent handler calls into
//! batches, and run each batch through the [`Pipeline`] in one transaction.
//!
//! apalis calls the job handler once per job, with up to `concurrency` calls in flight.
//! Each call submits its job here and waits for the answer. A few flusher tasks take
//! whatever has queued up (up to `max_batch`, waiting at most `linger` for more once the
//! first job arrived), process it, and answer every caller. While one batch is in its
//! transaction the next one fills, so batches grow with load and latency stays low when
//! the queue is quiet.
//!
//! Every answer is counted in `notifyd_events_total{outcome}` (see [`crate::metrics`]).
//!
//! Invariant: every submitted job is answered exactly once; if the batcher is gone (the
//! worker is shutting down) the caller gets a transient error and apalis keeps the job.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::metrics::OutcomeTally;
use crate::pipeline::{JobError, Outcome, Pipeline};
use crate::validate::RawJob;

type Reply = oneshot::Sender<Result<Outcome, JobError>>;

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most jobs in one transaction.
    pub max_batch: usize,
    /// How long to wait for more jobs after the first one of a batch arrived.
    pub linger: Duration,
    /// Batches processed at the same time.
    pub flushers: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            linger: Duration::from_millis(2),
            flushers: 2,
        }
    }
}

/// The handle that job handlers submit to. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Batcher {
    sender: mpsc::Sender<(RawJob, Reply)>,
    pipeline: Pipeline,
    /// Jobs answered with an outcome and committed, by this batcher and its clones.
    committed: Arc<std::sync::atomic::AtomicU64>,
}

impl Batcher {
    /// Start the flusher tasks. They stop when every `Batcher` clone is dropped.
    pub fn start(pipeline: Pipeline, settings: BatchSettings) -> Self {
        let (sender, receiver) = mpsc::channel(settings.max_batch * settings.flushers.max(1) * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        let committed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..settings.flushers.max(1) {
            tokio::spawn(flush_loop(
                pipeline.clone(),
                committed.clone(),
                settings,
                receiver.clone(),
            ));
        }
        Self {
            sender,
            pipeline,
            committed,
        }
    }

    /// Process a batch that is already whole (the batch claim mode) inside the caller's
    /// open transaction (see [`Pipeline::process_in`]). Nothing is counted until the caller
    /// has committed and calls [`Batcher::committed`] with the answers.
    pub async fn process_in(
        &self,
        tx: &mut sqlx::PgConnection,
        jobs: &[RawJob],
        job_ids: &[&str],
    ) -> Result<Vec<Result<Outcome, JobError>>, sqlx::Error> {
        self.pipeline.process_in(tx, jobs, job_ids).await
    }

    /// Count the answers of a batch whose transaction committed.
    pub fn committed(&self, answers: &[Result<Outcome, JobError>]) {
        count(&self.committed, answers);
    }

    /// Jobs answered with an outcome (and committed) so far by this batcher and its clones.
    pub fn outcomes_committed(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Submit one job and wait for its answer.
    pub async fn submit(&self, job: RawJob) -> Result<Outcome, JobError> {
        let (reply, answer) = oneshot::channel();
        if self.sender.send((job, reply)).await.is_err() {
            return Err(JobError::Transient("worker is shutting down".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(JobError::Transient("worker is shutting down".into())))
    }
}

async fn flush_loop(
    pipeline: Pipeline,
    committed: Arc<std::sync::atomic::AtomicU64>,
    settings: BatchSettings,
    receiver: Arc<Mutex<mpsc::Receiver<(RawJob, Reply)>>>,
) {
    loop {
        let batch = {
            let mut rx = receiver.lock().await;
            match gather(&mut rx, settings).await {
                Some(batch) => batch,
                None => return,
            }
        };
        let (jobs, replies): (Vec<RawJob>, Vec<Reply>) = batch.into_iter().unzip();
        let answers = pipeline.process(&jobs).await;
        count(&committed, &answers);
        for (reply, answer) in replies.into_iter().zip(answers) {
            // The caller may have gone away (worker shutdown); its job stays in the queue.
            let _ = reply.send(answer);
        }
    }
}

/// Record committed answers: on `/metrics` by outcome, and in the batcher's count of jobs
/// answered with an outcome.
fn count(committed: &std::sync::atomic::AtomicU64, answers: &[Result<Outcome, JobError>]) {
    tally(answers).record();
    committed.fetch_add(
        answers.iter().filter(|a| a.is_ok()).count() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn tally(answers: &[Result<Outcome, JobError>]) -> OutcomeTally {
    let mut tally = OutcomeTally::default();
    for answer in answers {
        match answer {
            Ok(outcome) => tally.outcome(outcome.label()),
            Err(JobError::Bad(_)) => tally.permanent_failure(),
            Err(JobError::Transient(_)) => tally.transient_failure(),
        }
    }
    tally
}

/// Wait for the first job, then take more until the batch is full, the channel is empty
/// and the linger time has passed. `None` once the channel is closed and drained.
async fn gather(
    rx: &mut mpsc::Receiver<(RawJob, Reply)>,
    settings: BatchSettings,
) -> Option<Vec<(RawJob, Reply)>> {
    let first = rx.recv().await?;
    let deadline = tokio::time::Instant::now() + settings.linger;
    let mut batch = Vec::with_capacity(settings.max_batch);
    batch.push(first);
    while batch.len() < settings.max_batch {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    Some(batch)
}
