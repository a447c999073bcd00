//! `notifyd worker`: the claim loop, the group-commit batcher and the cleanup loop in one
//! process. Stateless: run as many replicas as you like against one database.
//!
//! Shutdown: on SIGTERM the claim loop stops fetching, apalis lets in-flight jobs finish
//! (they are answered by the batcher) and puts fetched-but-unstarted jobs back to
//! `Pending`. If that takes longer than `--shutdown-timeout-secs`, the process exits
//! anyway; the jobs it still held are rescued by another replica after the rescue time,
//! and the idempotent store step makes any rerun harmless.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::batch::Batcher;
use crate::config::WorkerArgs;
use crate::pipeline::Pipeline;
use crate::{claim, cleanup, db};

/// Run a worker until the shutdown signal.
pub async fn run(
    database_url: &str,
    args: WorkerArgs,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let pool = db::connect(database_url, args.db_pool, "notifyd-worker").await?;
    db::check_schema(&pool).await?;
    let claim_settings = args.claim();
    tracing::info!(
        worker = %claim_settings.name,
        concurrency = args.concurrency,
        fetch_batch = args.fetch_batch,
        store_batch = args.store_batch,
        rate_limit = args.rate_limit,
        rescue_after_secs = claim_settings.rescue_after().as_secs(),
        "starting worker"
    );
    let batcher = Batcher::start(Pipeline::new(pool.clone(), args.rate_limit()), args.batch());

    if args.cleanup_interval_secs > 0 {
        tokio::spawn(cleanup_loop(
            pool.clone(),
            args.retention.retention(),
            Duration::from_secs(args.cleanup_interval_secs),
            shutdown.clone(),
        ));
    }

    let claim = tokio::spawn(claim::run(
        pool.clone(),
        claim_settings,
        batcher,
        shutdown.clone(),
    ));
    crate::shutdown::wait(shutdown).await;
    let limit = Duration::from_secs(args.shutdown_timeout_secs);
    match tokio::time::timeout(limit, claim).await {
        Ok(_) => tracing::info!("worker drained and stopped"),
        Err(_) => tracing::warn!(
            timeout_secs = limit.as_secs(),
            "in-flight jobs did not finish in time; exiting, they will be rescued"
        ),
    }
    pool.close().await;
    Ok(())
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
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
