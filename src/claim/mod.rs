//! Claim: the apalis worker that takes batches of jobs from notifyd's queue and runs each
//! through the pipeline in the claim's own transaction.
//!
//! **One claim path.** apalis runs the worker (lifecycle, concurrency, graceful shutdown,
//! tracing) over a small backend of our own ([`backend`]): one apalis task is one claimed
//! batch of up to `fetch_batch` jobs, locked with `FOR UPDATE SKIP LOCKED` and deleted in a
//! transaction that also does the batch's whole effect (a rollback gives them back). The
//! second mode that used to sit beside it, apalis-postgres's own per-job backend (a claim
//! `UPDATE`, one task, codec, result layer and JSON ack per job, regrouped into store
//! transactions by a batcher), was retired: it drained 2 x slower when the decision was
//! taken, and 4.5 x slower in the last same-run comparison (BENCHMARKS.md, "One claim
//! path"), and it doubled the code, the states to rescue and the test matrix.
//!
//! **The queue is notifyd's own** (`notify.queue_*`, migration
//! `20261207000001_own_queue.sql`), not apalis-postgres's `apalis.jobs`: measured, a held
//! transaction made every claim on `apalis.jobs` walk the dead rows of all the jobs
//! finished since it began, and the backend's INSERT paid for a second row with eight
//! indexes. The queue's slot tables rotate and are truncated once drained ([`rotation`]),
//! and a job is a narrow row with one index (BENCHMARKS.md, "A real database's bad day").
//! apalis still runs the worker; `apalis.workers` still lists the instances.
//!
//! The rooms:
//! * [`backend`]: the apalis backend, the claim and every statement on the queue's jobs;
//! * [`rotation`]: the slots' rotation and truncation, one replica at a time;
//! * [`intake`]: committed events taken into the queue, when the enqueue trigger is off;
//! * [`bulk`]: the main lane yields to interactive jobs while they arrive;
//! * [`task`]: one batch, processed and committed or rolled back ([`Processor`]), and the
//!   step that tests drive ([`Processor::run_once`]);
//! * [`maintenance`]: the instance's row in `apalis.workers` (register, heartbeat, stop).
//!
//! How it is wired, and why:
//! * **Queue name** `notifyd.events` ([`crate::contract::QUEUE`]): the worker type in
//!   `apalis.workers`.
//! * **Wake-up**: an interval poll (`--poll-interval-ms`, 10 ms by default) while nothing
//!   is claimable. Enqueuing sends no NOTIFY: apalis's per-row `notify_workers` trigger is
//!   disabled (migration `20261201000003_enqueue_without_notify.sql`), because a NOTIFY
//!   makes every enqueuing transaction take a cluster-wide lock at commit and hold it
//!   through the commit's flush. The worker warns at start-up
//!   ([`crate::db::enqueue_notify_triggers`]) if a trigger on the enqueue path sends one.
//! * **No job can stop the worker**: apalis never decodes one (the task is the batch), and
//!   a job is an event id in a typed column; a job whose event is gone is refused
//!   (`notify.queue_dead`, with the reason).
//! * **Supervision**: [`run`] restarts apalis's worker under a fresh name, with
//!   exponential backoff and jitter, should it ever end on its own, so nothing short of
//!   the shutdown signal ends the claim loop.
//! * **No rescue**: a claim is a row lock, so a dead worker's jobs are claimable the moment
//!   its sessions end. Jobs that a worker of an older release left in `apalis.jobs` are
//!   moved into the queue by `notifyd migrate` ([`crate::db::adopt_legacy_jobs`]).

pub mod backend;
pub mod bulk;
pub mod intake;
pub mod maintenance;
pub mod rotation;
pub mod task;

use std::time::{Duration, Instant};

use apalis::prelude::*;
use futures::TryFutureExt;
use metrics::counter;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::telemetry::series;
pub use task::{Processor, Step};

/// How often a worker runs a rotation tick ([`rotation::tick`]); with several replicas,
/// one of them rotates at a time.
pub const ROTATION_TICK: Duration = Duration::from_millis(500);

/// How the claim loop is tuned.
#[derive(Debug, Clone)]
pub struct ClaimSettings {
    /// Batches in flight at once (each holds a connection from its claim to its commit).
    pub concurrency: usize,
    /// Most jobs in one batch, and so in one transaction.
    pub fetch_batch: usize,
    /// How long the claim stream waits after an empty claim.
    pub poll_interval: Duration,
    /// Worker heartbeat in `apalis.workers` (shown by `notifyd status`).
    pub heartbeat: Duration,
    /// Heartbeats a worker may miss before `notifyd status` shows it gone.
    pub missed_heartbeats: usize,
    /// Prefix of the worker name in `apalis.workers`.
    pub name: String,
    /// The express lane: batches in flight that claim only jobs of at least `min_priority`
    /// (0 turns it off).
    pub express: Express,
}

/// The express lane of a worker: its own batch slots, claiming only jobs whose type has at
/// least `min_priority`, so that an interactive event never waits for a slot held by a bulk
/// batch (a broadcast of a million `system_alert`s). The main lane claims every priority,
/// highest first, so the express lane only adds capacity; it never takes any away.
#[derive(Debug, Clone, Copy)]
pub struct Express {
    pub batches: usize,
    pub min_priority: i16,
    /// While interactive jobs arrive, the main lane's batches that may hold jobs below
    /// `min_priority` ([`bulk`]; 0: the main lane never yields).
    pub bulk_batches: usize,
}

impl ClaimSettings {
    /// How long a worker may be silent before it counts as gone.
    pub fn silent_after(&self) -> Duration {
        self.heartbeat * self.missed_heartbeats as u32
    }
}

/// How the claim loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// On the signal, after every batch in flight finished.
    Drained,
    /// At the drain deadline, with batches still in flight: their transactions rolled
    /// back, so their jobs are back in the queue for other replicas.
    RolledBack,
}

/// One apalis worker over the batch backend: `batches` in flight, claiming jobs of at least
/// `min_priority`; it ends when `shutdown` turns true and its batches are done. Boxed as a
/// `'static + Send` future, which also spares the compiler a proof it cannot finish
/// (higher-ranked lifetimes of apalis's worker future).
#[allow(clippy::too_many_arguments)]
fn lane(
    pool: &PgPool,
    settings: &ClaimSettings,
    processor: &Processor,
    instance: &str,
    name: &str,
    batches: usize,
    min_priority: i16,
    yield_to: Option<std::sync::Arc<bulk::Yield>>,
    shutdown: &watch::Receiver<bool>,
) -> futures::future::BoxFuture<'static, Result<(), WorkerError>> {
    let backend = backend::backend(backend::Source {
        pool: pool.clone(),
        fetch_batch: settings.fetch_batch,
        min_priority,
        yield_to,
        poll_interval: settings.poll_interval,
    });
    let worker = WorkerBuilder::new(name.to_owned())
        .backend(backend)
        .concurrency(batches)
        .data(processor.renamed(instance))
        .build(task::handle_batch);
    let mut stop = shutdown.clone();
    Box::pin(worker.run_until(async move {
        let _ = stop.wait_for(|s| *s).await;
        Ok::<(), std::io::Error>(())
    }))
}

/// Run the worker until `shutdown` turns true. Once it does, apalis stops claiming and
/// lets the batches in flight finish; if that takes longer than `drain`, the worker is
/// dropped, which rolls their transactions back.
pub async fn run(
    pool: PgPool,
    settings: ClaimSettings,
    processor: Processor,
    mut shutdown: watch::Receiver<bool>,
    drain: Option<Duration>,
) -> Stopped {
    let mut restarts: u32 = 0;
    let mut backoff = Duration::from_millis(250);
    loop {
        if *shutdown.borrow() {
            return Stopped::Drained;
        }
        let name = format!("{}-{}", settings.name, restarts);
        let span = tracing::info_span!("worker", worker = %name);
        if let Err(e) = maintenance::register(&pool, &name).await {
            span.in_scope(|| tracing::warn!(error = %e, "cannot register the worker; retrying"));
            let wait = backoff.mul_f64(0.5 + fastrand::f64());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return Stopped::Drained,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        let express = settings.express;
        let yield_to = (express.batches > 0)
            .then(|| bulk::Yield::new(express.min_priority, express.bulk_batches))
            .flatten();
        let mut lanes = vec![lane(
            &pool,
            &settings,
            &processor,
            &name,
            &name,
            settings.concurrency,
            i16::MIN,
            yield_to.clone(),
            &shutdown,
        )];
        if express.batches > 0 {
            lanes.push(lane(
                &pool,
                &settings,
                &processor,
                &name,
                &format!("{name}-express"),
                express.batches,
                express.min_priority,
                yield_to,
                &shutdown,
            ));
        }
        let running = futures::future::try_join_all(lanes)
            .map_ok(|_| ())
            .instrument(span.clone());

        let beat = tokio::spawn(
            maintenance::heartbeat(pool.clone(), name.clone(), settings.heartbeat)
                .instrument(span.clone()),
        );
        let rotate =
            tokio::spawn(rotation::run(pool.clone(), ROTATION_TICK).instrument(span.clone()));
        let take_in = tokio::spawn(
            intake::run(pool.clone(), settings.poll_interval).instrument(span.clone()),
        );
        let started = Instant::now();
        span.in_scope(|| tracing::info!("worker started"));
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
        rotate.abort();
        take_in.abort();
        maintenance::mark_stopped(&pool, &name, settings.silent_after()).await;
        match result {
            None => {
                span.in_scope(|| {
                    tracing::warn!(
                        drain_secs = drain.unwrap_or_default().as_secs_f64(),
                        "batches still in flight at the shutdown deadline: rolled back, \
                         their jobs are back in the queue"
                    )
                });
                return Stopped::RolledBack;
            }
            Some(Ok(())) if *shutdown.borrow() => {
                span.in_scope(|| tracing::info!("worker stopped"));
                return Stopped::Drained;
            }
            Some(Ok(())) => span.in_scope(|| tracing::warn!("worker ended on its own; restarting")),
            Some(Err(e)) => {
                span.in_scope(|| tracing::error!(error = %e, "worker failed; restarting"))
            }
        }
        counter!(series::WORKER_RESTARTS).increment(1);
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(250);
        }
        let wait = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return Stopped::Drained,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
        restarts += 1;
    }
}
