//! Database connections and migrations.
//!
//! `notifyd migrate` runs apalis-postgres's migrations first (schema `apalis`, history in
//! `apalis._sqlx_migrations`), then ours (schema `notify`, history in
//! `notify._sqlx_migrations`), because ours add a trigger and a constraint on
//! `apalis.jobs`. Both are idempotent and take sqlx's migration lock, so running them on
//! every deploy (the Procfile's `release` step) is safe. Workers and the read service
//! never migrate; they check at startup that the schema is there and say so if not.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Our migrations, from `migrations/`, with their own history table.
pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name("notify._sqlx_migrations");
    m.create_schema("notify");
    m
}

/// Open a pool. `max` connections at most; each connection names the application so that
/// `pg_stat_activity` shows who is who.
pub async fn connect(url: &str, max: u32, app: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid postgres:// URL")?
        .application_name(app);
    PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                // A session whose client is gone (killed, or a worker that stopped while a
                // statement waited on a lock) is ended within a second even while it waits,
                // so its transaction's row locks (a batch's claimed jobs) go with it.
                // Postgres 14 and later; older servers refuse the setting, which is fine.
                if let Err(e) = sqlx::query("SET client_connection_check_interval = 1000")
                    .execute(&mut *conn)
                    .await
                {
                    tracing::debug!(error = %e, "client_connection_check_interval not available");
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .context("cannot connect to the database at DATABASE_URL")
}

/// Run apalis's migrations, then ours, then [`reset_retired_claims`].
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .context("apalis-postgres migrations failed")?;
    migrator()
        .run(pool)
        .await
        .context("notifyd migrations failed")?;
    let reset = reset_retired_claims(pool)
        .await
        .context("cannot reset jobs left claimed by per-job workers")?;
    if reset > 0 {
        tracing::warn!(
            jobs = reset,
            "put jobs left Queued or Running by per-job workers of an older release back \
             to Pending"
        );
    }
    Ok(())
}

/// Put the jobs in the retired per-job mode's states (`Queued`, `Running`) back to
/// `Pending`; returns how many. This release claims by row locks and never writes those
/// states, so nothing else would ever claim such a row again. Run by every `notifyd
/// migrate` (idempotent, and a no-op once no per-job worker is left): the upgrade's release
/// step takes back what the old workers left, and running `notifyd migrate` again after the
/// last of them stopped takes back what they claimed meanwhile. A job that a per-job worker
/// still runs may then run twice; the store step records one outcome per event, so the
/// second run answers `duplicate`, and the old worker's ack (guarded by `lock_by`) matches
/// no row.
pub async fn reset_retired_claims(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL
         WHERE job_type = $1 AND status IN ('Queued', 'Running')",
    )
    .bind(crate::contract::QUEUE)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Fail with a clear message when `notifyd migrate` has not been run.
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let ready: bool = sqlx::query_scalar(
        "SELECT to_regclass('notify.notifications') IS NOT NULL
            AND to_regclass('apalis.jobs') IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .context("cannot query the database")?;
    anyhow::ensure!(
        ready,
        "the database has no notifyd schema yet: run `notifyd migrate` first"
    );
    Ok(())
}

/// Enabled triggers on the enqueue path (`notify.events`, `apalis.jobs`) whose function
/// calls `pg_notify`, as `table.trigger`. There should be none: a NOTIFY makes every
/// enqueuing transaction take a cluster-wide lock at commit and hold it through the
/// commit's flush (migration `20261201000003_enqueue_without_notify.sql`). An
/// apalis-postgres upgrade whose migrations recreate its `notify_workers` trigger would
/// bring one back.
pub async fn enqueue_notify_triggers(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT t.tgrelid::regclass::text || '.' || t.tgname
         FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid
         WHERE t.tgrelid IN ('notify.events'::regclass, 'apalis.jobs'::regclass)
           AND NOT t.tgisinternal AND t.tgenabled <> 'D'
           AND (p.prosrc ILIKE '%pg_notify%' OR p.prosrc ~* '\\mnotify\\s')
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
}

/// Errors that are not the data's fault: lost or refused connections, and conflicts that
/// a retry resolves. A batch that fails with one costs its jobs no attempt.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                || code.starts_with("53") // insufficient resources
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
                || code == "55P03" // lock not available (lock_timeout)
                || code == "25P03" // idle_in_transaction_session_timeout ended the session
        }),
        _ => false,
    }
}
