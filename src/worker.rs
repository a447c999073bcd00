//! `notifyd worker`: the claim loop, the group-commit batcher, the rescuer, the cleanup loop
//! and (optionally) a `/metrics` listener in one process. Stateless: run as many replicas as
//! you like against one database.
//!
//! Bounds an operator can rely on (defaults in brackets):
//! * **Batch mode** (the default): a batch is claimed by row locks in its own transaction,
//!   so a dead worker's jobs are free once the server ends its sessions; a frozen worker's
//!   when `--idle-tx-timeout-secs` (5 s) ends them (at worst once per batch in flight, 4).
//!   The points below are about the per-job mode's states.
//! * **Rescue**: every replica runs [`claim::rescue_orphans`] once per heartbeat; the jobs of a
//!   worker silent for `heartbeat × missed_heartbeats` [5 s × 4 = 20 s] go back to the queue,
//!   so a crashed worker's jobs are claimed again within `heartbeat × (missed + 1)` [25 s] as
//!   long as one replica is running (or, failing that, when the next one starts).
//! * **Shutdown**: on SIGTERM the claim loop stops fetching, apalis lets in-flight jobs finish
//!   (they are answered by the batcher) and puts fetched-but-unstarted jobs back to
//!   `Pending`. Jobs still unfinished after `--shutdown-timeout-secs` [10 s] are released
//!   (back to `Pending`, for other replicas), then the process exits: at most about
//!   shutdown timeout + 2 s [12 s]. If the database is down the release fails and the jobs are
//!   rescued instead; the idempotent store step makes any rerun harmless.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::batch::Batcher;
use crate::config::WorkerArgs;
use crate::pipeline::Pipeline;
use crate::{claim, cleanup, db, metrics, ops};

/// Time allowed, after the claim loop returned, for closing the connection pool.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Dead tuples a watched table may hold before the worker vacuums it itself (see
/// [`cleanup::vacuum_if_needed`]).
const VACUUM_MIN_DEAD: i64 = 50_000;

/// The longest a worker statement waits for a lock (`lock_timeout` for every session). In
/// batch mode a batch waiting on a user's lock also holds its claimed jobs, so a lock held by
/// a stuck session (one frozen mid-statement, which the idle-transaction timeout cannot
/// see) must not hold them forever: the batch fails as transient, rolls back and is claimed
/// again. A healthy wait is one other batch's store step, well under a second.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Run a worker until the shutdown signal.
pub async fn run(
    database_url: &str,
    args: WorkerArgs,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Set on every session, or per transaction through a transaction pooler (db.rs).
    let mut settings = vec![("lock_timeout", LOCK_TIMEOUT.as_millis().to_string())];
    if args.idle_tx_timeout_secs > 0 {
        settings.push((
            "idle_in_transaction_session_timeout",
            (args.idle_tx_timeout_secs * 1000).to_string(),
        ));
    }
    db::set_session_settings(settings);
    let url = database_url;
    let claim_settings = args.claim();
    // The replica's name in pg_stat_activity, so that an operator (or a test) can tell
    // which replica holds which session and, in batch mode, which row locks.
    let app = format!("notifyd-worker:{}", claim_settings.name);
    // In batch mode every batch in flight holds a connection from its claim to its commit;
    // the claim, heartbeat, rescue, cleanup and metrics loops need a few more.
    let pool_size = args.db_pool.max(args.store_flushers + 4);
    let pool = db::connect(url, pool_size, &app).await?;
    db::check_schema(&pool).await?;
    match db::enqueue_notify_triggers(&pool).await {
        Ok(found) if !found.is_empty() => tracing::warn!(
            triggers = ?found,
            "enqueuing sends a NOTIFY, which makes enqueuing transactions commit one at a \
             time; disable these triggers (see migrations/README.md)"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot check the enqueue triggers"),
    }
    let rescue_after = claim_settings.rescue_after();
    // Bind first, so that a bad address fails before any job is claimed.
    let metrics_listener = match args.metrics.listen() {
        Some(listen) => Some(metrics::serve(listen, shutdown.clone()).await?),
        None => None,
    };
    tracing::info!(
        worker = %claim_settings.name,
        concurrency = args.concurrency,
        fetch_batch = args.fetch_batch,
        store_batch = args.store_batch,
        rate_limit = args.rate_limit,
        rescue_after_secs = rescue_after.as_secs_f64(),
        shutdown_timeout_secs = args.shutdown_timeout_secs,
        metrics = metrics_listener.as_ref().map(|(a, _)| a.to_string()),
        "starting worker"
    );
    let batcher = Batcher::start(Pipeline::new(pool.clone(), args.rate_limit()), args.batch());

    if args.cleanup_interval_secs > 0 {
        tokio::spawn(
            cleanup_loop(
                pool.clone(),
                args.retention.retention(),
                Duration::from_secs(args.cleanup_interval_secs),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("cleanup")),
        );
    }
    tokio::spawn(
        rescue_loop(
            pool.clone(),
            claim_settings.heartbeat,
            rescue_after,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("rescue")),
    );
    if metrics_listener.is_some() {
        tokio::spawn(queue_metrics_loop(
            pool.clone(),
            Duration::from_secs(args.queue_metrics_secs),
            rescue_after,
            shutdown.clone(),
        ));
    }

    let drain = Duration::from_secs(args.shutdown_timeout_secs);
    let mut claim = tokio::spawn(claim::run_with_drain(
        pool.clone(),
        claim_settings,
        batcher,
        shutdown.clone(),
        Some(drain),
    ));
    tokio::select! {
        _ = crate::shutdown::wait(shutdown) => {}
        _ = &mut claim => anyhow::bail!("the claim loop ended without a shutdown signal"),
    }
    let stopping = Instant::now();
    // The claim loop bounds itself (drain, then a time-limited release); this is a net.
    match tokio::time::timeout(drain + Duration::from_secs(2), claim).await {
        Ok(Ok(0)) => tracing::info!(
            secs = stopping.elapsed().as_secs_f64(),
            "in-flight jobs finished; worker drained"
        ),
        Ok(Ok(released)) => tracing::warn!(
            released,
            "in-flight jobs did not finish in time; released them to other replicas"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "the claim loop panicked"),
        Err(_) => tracing::warn!("the claim loop did not stop in time; its jobs will be rescued"),
    }
    if tokio::time::timeout(CLOSE_TIMEOUT, pool.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections still busy at exit; closing them anyway");
    }
    tracing::info!(secs = stopping.elapsed().as_secs_f64(), "worker stopped");
    Ok(())
}

/// Rescue the jobs of dead workers, once per heartbeat.
async fn rescue_loop(
    pool: PgPool,
    every: Duration,
    rescue_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        match claim::rescue_orphans(&pool, rescue_after).await {
            Ok(rescued) => {
                failing = false;
                for r in rescued {
                    tracing::warn!(
                        dead_worker = %r.worker,
                        jobs = r.jobs,
                        silent_secs = r.silent_secs,
                        "rescued the jobs of a worker that stopped heartbeating"
                    );
                }
            }
            // Said once per outage: the claim loop and the cleanup loop report it too.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "rescue check failed; will try again");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Refresh the queue gauges on /metrics.
async fn queue_metrics_loop(
    pool: PgPool,
    every: Duration,
    rescue_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stats = ops::queue_stats(&pool).await;
        let workers = ops::workers(&pool, rescue_after).await;
        match (stats, workers) {
            (Ok(stats), Ok(workers)) => {
                metrics::set_queue(&stats, workers.iter().filter(|w| w.alive).count())
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "queue metrics query failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Purge finished queue rows at every tick, and run full retention every 60 ticks.
async fn cleanup_loop(
    pool: PgPool,
    retention: cleanup::Retention,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick: u64 = 0;
    loop {
        let result = if tick.is_multiple_of(60) {
            cleanup::run_once(&pool, retention).await.map(|r| {
                if r != cleanup::Report::default() {
                    tracing::info!(?r, "retention pass");
                }
            })
        } else {
            cleanup::purge_done_jobs(&pool, retention.batch)
                .await
                .map(|_| ())
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cleanup failed; will try again");
        }
        // Every 6th pass (30 s by default): the dead-tuple safety net.
        if tick.is_multiple_of(6)
            && let Err(e) = cleanup::vacuum_if_needed(&pool, VACUUM_MIN_DEAD).await
        {
            tracing::warn!(error = %e, "vacuum check failed; will try again");
        }
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
