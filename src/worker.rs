//! `notifyd worker`: the claim loop, the cleanup loop, the digest sweep
//! ([`crate::digest`]) and (optionally) a `/metrics` listener in one process. Stateless: run as many replicas as you like against one
//! database.
//!
//! Bounds an operator can rely on (defaults in brackets):
//! * **A dead worker** holds nothing: a batch is claimed by row locks in its own
//!   transaction, so its jobs are free once the server ends its sessions; a frozen worker's
//!   when `--idle-tx-timeout-secs` [5 s] ends them, or `lock_timeout` [10 s] a statement
//!   stuck behind another session's lock.
//! * **Shutdown**: on SIGTERM the claim loop stops claiming and the batches in flight
//!   finish and commit. Batches still unfinished after `--shutdown-timeout-secs` [10 s] are
//!   rolled back (their jobs are claimable again at once, by other replicas), then the
//!   process exits: at most about shutdown timeout + 2 s [12 s].

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::claim::{self, Processor, Stopped};
use crate::config::WorkerArgs;
use crate::pipeline::Pipeline;
use crate::telemetry::series;
use crate::{cleanup, db, digest, ops};

/// Time allowed, after the claim loop returned, for closing the connection pool.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Dead tuples a watched table may hold before the worker vacuums it itself (see
/// [`cleanup::vacuum_if_needed`]).
const VACUUM_MIN_DEAD: i64 = 50_000;

/// Settings of the per-job mode, retired: set, they are ignored, and the worker says so.
const RETIRED_SETTINGS: [&str; 4] = [
    "NOTIFYD_CLAIM_MODE",
    "NOTIFYD_CONCURRENCY",
    "NOTIFYD_STORE_BATCH",
    "NOTIFYD_BATCH_LINGER_MS",
];

/// The longest a worker statement waits for a lock (`lock_timeout` for every session). A
/// batch waiting on a user's lock also holds its claimed jobs, so a lock held by
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
    for name in RETIRED_SETTINGS {
        if std::env::var_os(name).is_some() {
            tracing::warn!(
                setting = name,
                "{name} is set, but it belonged to the retired per-job claim mode and is \
                 ignored; remove it"
            );
        }
    }
    // Set on every session, or per transaction through a transaction pooler (db.rs).
    // No JIT: the worker's statements are short and run thousands of times; a cost estimate
    // over `jit_above_cost` (a table whose statistics are stale, a plan with a disabled
    // node) would compile each run for tens of milliseconds.
    let mut settings = vec![
        ("lock_timeout", LOCK_TIMEOUT.as_millis().to_string()),
        ("jit", "off".to_owned()),
    ];
    if args.idle_tx_timeout_secs > 0 {
        settings.push((
            "idle_in_transaction_session_timeout",
            (args.idle_tx_timeout_secs * 1000).to_string(),
        ));
    }
    db::set_session_settings(settings);
    let claim_settings = args.claim();
    // The replica's name in pg_stat_activity, so that an operator (or a test) can tell
    // which replica holds which session and which row locks.
    let app = format!("notifyd-worker:{}", claim_settings.name);
    // Every batch in flight holds a connection from its claim to its commit; the claim,
    // heartbeat, cleanup and metrics loops need a few more.
    let pool_size = args
        .db_pool
        .max(args.store_flushers + args.express_batches + 4);
    let pool = db::connect(database_url, pool_size, &app).await?;
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
    match db::intake_index_ready(&pool).await {
        Ok(false) => tracing::warn!(
            "the intake's index notify.events_txid is missing or invalid (a failed CREATE \
             INDEX CONCURRENTLY): drop it and run `notifyd migrate` again \
             (migrations/20261208000002_events_txid_index.sql)"
        ),
        Ok(true) => {}
        Err(e) => tracing::debug!(error = %e, "cannot check the intake's index"),
    }
    let silent_after = claim_settings.silent_after();
    // Bind first, so that a bad address fails before any job is claimed.
    let metrics_listener = match args.metrics.listen() {
        Some(listen) => Some(series::serve(listen, shutdown.clone()).await?),
        None => None,
    };
    tracing::info!(
        worker = %claim_settings.name,
        batches_in_flight = claim_settings.concurrency,
        fetch_batch = args.fetch_batch,
        rate_limit = args.rate_limit,
        shutdown_timeout_secs = args.shutdown_timeout_secs,
        metrics = metrics_listener.as_ref().map(|(a, _)| a.to_string()),
        "starting worker"
    );
    let processor = Processor::new(
        pool.clone(),
        Pipeline::new(args.rate_limit()),
        &claim_settings.name,
    );

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
        digest::sweep_loop(
            pool.clone(),
            args.rate_limit(),
            Duration::from_secs(args.digest_interval_secs),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("digest")),
    );
    if metrics_listener.is_some() {
        tokio::spawn(queue_metrics_loop(
            pool.clone(),
            Duration::from_secs(args.queue_metrics_secs),
            silent_after,
            shutdown.clone(),
        ));
    }

    let drain = Duration::from_secs(args.shutdown_timeout_secs);
    let mut claim = tokio::spawn(claim::run(
        pool.clone(),
        claim_settings,
        processor,
        shutdown.clone(),
        Some(drain),
    ));
    tokio::select! {
        _ = crate::shutdown::wait(shutdown) => {}
        _ = &mut claim => anyhow::bail!("the claim loop ended without a shutdown signal"),
    }
    let stopping = Instant::now();
    // The claim loop bounds itself (the drain deadline); this is a net.
    match tokio::time::timeout(drain + Duration::from_secs(2), claim).await {
        Ok(Ok(Stopped::Drained)) => tracing::info!(
            secs = stopping.elapsed().as_secs_f64(),
            "batches in flight finished; worker drained"
        ),
        Ok(Ok(Stopped::RolledBack)) => tracing::warn!(
            secs = stopping.elapsed().as_secs_f64(),
            "batches in flight did not finish in time; rolled back, their jobs are claimable again"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "the claim loop panicked"),
        Err(_) => tracing::warn!(
            "the claim loop did not stop in time; its batches roll back as the process exits"
        ),
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

/// Refresh the queue gauges on /metrics.
async fn queue_metrics_loop(
    pool: PgPool,
    every: Duration,
    silent_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stats = ops::queries::queue_stats(&pool).await;
        let workers = ops::queries::workers(&pool, silent_after).await;
        match (stats, workers) {
            (Ok(stats), Ok(workers)) => {
                series::set_queue(&stats.gauges(workers.iter().filter(|w| w.alive).count()))
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "queue metrics query failed")
            }
        }
        match ops::queries::horizon_holder(&pool).await {
            Ok(h) => series::set_horizon(
                h.map(|h| (h.age_secs.unwrap_or(0.0), i64::from(h.xmin_age), h.pid)),
            ),
            Err(e) => tracing::debug!(error = %e, "horizon query failed"),
        }
        match ops::queries::intake(&pool).await {
            Ok(i) => series::set_intake(i.waiting, i.oldest_secs),
            Err(e) => tracing::debug!(error = %e, "intake query failed"),
        }
        match ops::queries::slots(&pool).await {
            Ok(slots) => series::set_slots(&slots.into_iter().map(|s| s.state).collect::<Vec<_>>()),
            Err(e) => tracing::debug!(error = %e, "slot query failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Run a retention pass every 60 ticks (5 minutes by default), and the dead-tuple safety
/// net every 6 (30 s).
async fn cleanup_loop(
    pool: PgPool,
    retention: cleanup::Retention,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick: u64 = 0;
    let mut vacuum = cleanup::VacuumNet::new(cleanup::VACUUM_BACKOFF);
    loop {
        if tick.is_multiple_of(60) {
            match cleanup::run_once(&pool, retention).await {
                Ok(r) if r != cleanup::Report::default() => tracing::info!(?r, "retention pass"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cleanup failed; will try again"),
            }
        }
        if tick.is_multiple_of(6)
            && let Err(e) = vacuum.run(&pool, VACUUM_MIN_DEAD).await
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
