//! Database connections and migrations.
//!
//! `notifyd migrate` runs apalis-postgres's migrations first (schema `apalis`, history in
//! `apalis._sqlx_migrations`), then ours (schema `notify`, history in
//! `notify._sqlx_migrations`), because ours moved what older releases left in
//! `apalis.jobs` into notifyd's own queue. Both are idempotent and take sqlx's migration lock, so running them on
//! every deploy (the Procfile's `release` step) is safe. Workers and the read service
//! never migrate; they check at startup that the schema is there and say so if not.
//!
//! # Connection poolers ([`Pooler`], `NOTIFYD_DB_POOLER`)
//!
//! A pooler in **session** mode hands each client connection one server connection for
//! its lifetime, so everything works as on a direct connection, except that it refuses (or,
//! told to ignore them, drops) the startup parameter `options`. notifyd therefore never
//! sends session settings as startup options: they are `SET` once per connection
//! ([`connect`]'s `after_connect`), which is the same on a direct connection.
//!
//! In **transaction** mode the pooler may give the next transaction, or the next
//! statement outside a transaction, to another server connection (after every
//! ReadyForQuery that says "idle"). With sqlx 0.9 that breaks two things, read from its
//! executor (`sqlx-postgres/src/connection/executor.rs`) and its PgBouncer issue (#67):
//! * **named statements.** sqlx prepares every statement under a name (`sqlx_s_N`,
//!   numbered per client connection) and caches it. `statement_cache_capacity(0)` does
//!   not help: the statement is still named, only never closed, so it stays on the server
//!   connection and the next client numbering from 1 there gets `prepared statement
//!   "sqlx_s_2" already exists` (the reported failure), or a reused name is missing.
//!   `.persistent(false)` makes sqlx use the unnamed statement, which lives only until
//!   the next Parse;
//! * **split round trips.** Even unnamed, sqlx sends Parse/Describe/Sync, waits, then
//!   Bind/Execute/Sync. Outside a transaction the first Sync ends the pooler's
//!   "transaction", and Bind can land on a server connection where the statement does
//!   not exist (or is another client's). Inside a transaction both halves stay on one
//!   server connection.
//!
//! So in transaction mode every statement is unnamed ([`persistent`] is false) and runs
//! inside a transaction: statements of the worker's claim transaction already do, and
//! every other one goes through [`execute`], [`fetch_all`], [`fetch_optional`] or
//! [`fetch_one`], which wrap it in one. Session settings become `SET LOCAL` in the same
//! simple-query message as the `BEGIN` ([`begin`]): no extra round trip, and nothing
//! leaks to other clients of the server connection. Connection-level `SET`s, session
//! advisory locks and LISTEN are not used through a transaction pooler (the vacuum safety
//! net drops its advisory lock there; serve's LISTEN takes `NOTIFYD_LISTEN_DATABASE_URL`).
//! The cost is two round trips more per statement outside a transaction and a fresh plan
//! per statement, so it is a setting rather than the default: measured in BENCHMARKS.md
//! ("Through PgBouncer").
//!
//! The mode and the session settings are process-wide ([`set_pooler`],
//! [`set_session_settings`], once at startup): one notifyd process talks to one database
//! one way.

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{FromRow, PgPool, Postgres};

/// How notifyd reaches Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooler {
    /// A direct connection (or any proxy that keeps one server session per connection).
    #[default]
    None,
    /// A pooler in session mode (PgBouncer `pool_mode = session`): the same as `none`.
    Session,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`): unnamed
    /// statements, each inside a transaction, settings as `SET LOCAL`.
    Transaction,
}

/// Session settings notifyd relies on, as (name, value) pairs of server settings.
pub type Settings = Vec<(&'static str, String)>;

static POOLER: OnceLock<Pooler> = OnceLock::new();
/// The settings, and the `BEGIN; SET LOCAL ...` that carries them through a transaction
/// pooler.
static SETTINGS: OnceLock<(Settings, String)> = OnceLock::new();

/// Set this process's pooler mode (`NOTIFYD_DB_POOLER`), before any connection is made.
/// The first call counts; a process that never calls it uses [`Pooler::None`].
pub fn set_pooler(pooler: Pooler) {
    let _ = POOLER.set(pooler);
}

/// Set the session settings this process relies on (the worker's `lock_timeout` and
/// `idle_in_transaction_session_timeout`), before any connection is made. The first call
/// counts. Names are fixed identifiers and values plain numbers with a unit, so they are
/// written into SQL as they are.
pub fn set_session_settings(settings: Settings) {
    for (name, value) in &settings {
        assert!(
            name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "session settings are fixed names and plain values"
        );
    }
    let _ = SETTINGS.set((settings.clone(), begin_statement(&settings)));
}

fn begin_statement(settings: &Settings) -> String {
    let mut begin = String::from("BEGIN");
    for (name, value) in settings
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain([CONNECTION_CHECK])
    {
        begin.push_str(&format!("; SET LOCAL {name} = '{value}'"));
    }
    begin
}

/// A session whose client is gone (killed, or a worker that stopped while a statement
/// waited on a lock) is ended within a second even while it waits, so its transaction's
/// row locks (a batch's claimed jobs) go with it. Postgres 14 and later.
const CONNECTION_CHECK: (&str, &str) = ("client_connection_check_interval", "1000");

fn settings() -> &'static (Settings, String) {
    SETTINGS.get_or_init(|| (Vec::new(), begin_statement(&Vec::new())))
}

/// This process's pooler mode.
pub fn pooler() -> Pooler {
    POOLER.get().copied().unwrap_or_default()
}

/// Whether statements outlive their transaction (named, cached). False through a
/// transaction pooler; every query of notifyd passes this to `.persistent(..)`.
pub fn persistent() -> bool {
    pooler() != Pooler::Transaction
}

/// Begin a transaction, with the session settings as `SET LOCAL` through a transaction
/// pooler (they are already set on the connection otherwise).
pub async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    if pooler() == Pooler::Transaction {
        // In a task of its own, so that a caller that gives up (a timeout around a
        // heartbeat) cannot cut the BEGIN off halfway. Through a pooler the BEGIN is where
        // a client waits for a free server connection, so that is where callers give up;
        // and sqlx 0.9 forgets a BEGIN cancelled after it was sent (its guard rolls back
        // only at depth > 0), which returns the connection to the pool inside an open
        // transaction that then holds a server connection of the pooler. Finished here,
        // a transaction nobody takes is dropped and rolled back as usual.
        let pool = pool.clone();
        let begin = settings().1.clone();
        tokio::spawn(async move { pool.begin_with(sqlx::AssertSqlSafe(begin)).await })
            .await
            .map_err(|e| sqlx::Error::Protocol(format!("begin task failed: {e}")))?
    } else {
        pool.begin().await
    }
}

/// Run one statement outside any caller's transaction (in one of its own through a
/// transaction pooler).
pub async fn execute<'q>(
    pool: &PgPool,
    query: Query<'q, Postgres, PgArguments>,
) -> Result<PgQueryResult, sqlx::Error> {
    if persistent() {
        return query.execute(pool).await;
    }
    let mut tx = begin(pool).await?;
    let done = query.persistent(false).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(done)
}

/// [`execute`] for a query's rows.
pub async fn fetch_all<'q, O>(
    pool: &PgPool,
    query: QueryAs<'q, Postgres, O, PgArguments>,
) -> Result<Vec<O>, sqlx::Error>
where
    O: Send + Unpin + for<'r> FromRow<'r, PgRow>,
{
    if persistent() {
        return query.fetch_all(pool).await;
    }
    let mut tx = begin(pool).await?;
    let rows = query.persistent(false).fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(rows)
}

/// [`execute`] for at most one row.
pub async fn fetch_optional<'q, O>(
    pool: &PgPool,
    query: QueryAs<'q, Postgres, O, PgArguments>,
) -> Result<Option<O>, sqlx::Error>
where
    O: Send + Unpin + for<'r> FromRow<'r, PgRow>,
{
    if persistent() {
        return query.fetch_optional(pool).await;
    }
    let mut tx = begin(pool).await?;
    let row = query.persistent(false).fetch_optional(&mut *tx).await?;
    tx.commit().await?;
    Ok(row)
}

/// [`execute`] for one value.
pub async fn fetch_one<'q, O>(
    pool: &PgPool,
    query: QueryScalar<'q, Postgres, O, PgArguments>,
) -> Result<O, sqlx::Error>
where
    O: Send + Unpin,
    (O,): for<'r> FromRow<'r, PgRow>,
{
    if persistent() {
        return query.fetch_one(pool).await;
    }
    let mut tx = begin(pool).await?;
    let value = query.persistent(false).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(value)
}

/// Our migrations, from `migrations/`, with their own history table.
pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name("notify._sqlx_migrations");
    m.create_schema("notify");
    m
}

/// Open a pool. `max` connections at most; each connection names the application so that
/// `pg_stat_activity` shows who is who, and (except through a transaction pooler, see the
/// module doc) gets this process's session settings.
pub async fn connect(url: &str, max: u32, app: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid postgres:// URL")?
        .application_name(app);
    pool_options(max)
        .connect_with(options)
        .await
        .context("cannot connect to the database at DATABASE_URL")
}

fn pool_options(max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                if pooler() == Pooler::Transaction {
                    // A SET here would stay on the server connection for other clients
                    // and be lost for this one: `begin` applies them instead.
                    return Ok(());
                }
                for (name, value) in &settings().0 {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET {name} = '{value}'")))
                        .execute(&mut *conn)
                        .await?;
                }
                // Older servers than 14 refuse this one, which is fine.
                let (name, value) = CONNECTION_CHECK;
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET {name} = {value}")))
                    .execute(&mut *conn)
                    .await
                {
                    tracing::debug!(error = %e, "client_connection_check_interval not available");
                }
                Ok(())
            })
        })
}

/// Run apalis's migrations, then ours, then [`adopt_legacy_jobs`]. Needs a real session
/// (sqlx's migration lock is a session advisory lock): refused through a transaction pooler.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    anyhow::ensure!(
        pooler() != Pooler::Transaction,
        "`notifyd migrate` needs a session of its own (its lock is a session advisory lock): \
         point DATABASE_URL past the transaction pooler (or at a session pool) and unset \
         NOTIFYD_DB_POOLER for this command"
    );
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .context("apalis-postgres migrations failed")?;
    migrator()
        .run(pool)
        .await
        .context("notifyd migrations failed")?;
    let adopted = adopt_legacy_jobs(pool)
        .await
        .context("cannot move the jobs of apalis.jobs into notifyd's queue")?;
    if adopted > 0 {
        tracing::warn!(
            jobs = adopted,
            "moved jobs that a worker of an older release left in apalis.jobs into \
             notifyd's queue"
        );
    }
    Ok(())
}

/// Move this queue's jobs that are still in `apalis.jobs` (written by releases before the
/// own queue, migration `20261207000001_own_queue.sql`) into `notify.queue_later` (they come
/// due at once) or, when they had ended, `notify.queue_dead`; returns how many. Run by
/// every `notifyd migrate` (idempotent, a no-op once no older worker is left): during a
/// rolling upgrade a worker of the older release may still fail a job back into
/// `apalis.jobs`. A job such a worker still runs may then run twice; the store step records
/// one outcome per event, so the second run answers `duplicate`.
pub async fn adopt_legacy_jobs(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT notify.adopt_apalis_jobs()")
        .fetch_one(pool)
        .await
}

/// Fail with a clear message when `notifyd migrate` has not been run. Reads the catalog
/// only, so it needs no privilege on either schema (the read service's role has none on
/// `apalis`).
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let ready: bool = fetch_one(
        pool,
        sqlx::query_scalar(
            "SELECT count(*) = 3 FROM pg_class AS c
             JOIN pg_namespace AS n ON n.oid = c.relnamespace
             WHERE n.nspname = 'notify' AND c.relname IN ('notifications', 'queue_slots', 'intake')",
        ),
    )
    .await
    .context("cannot query the database")?;
    anyhow::ensure!(
        ready,
        "the database has no notifyd schema yet: run `notifyd migrate` first"
    );
    Ok(())
}

/// Whether the intake's index (`notify.events_txid`, migration 20261208000002) exists and
/// is valid. A failed `CREATE INDEX CONCURRENTLY` leaves it invalid, and the intake would
/// then scan `notify.events` on every call.
pub async fn intake_index_ready(pool: &PgPool) -> Result<bool, sqlx::Error> {
    fetch_one(
        pool,
        sqlx::query_scalar(
            "SELECT COALESCE((SELECT i.indisvalid FROM pg_index AS i
                              WHERE i.indexrelid = to_regclass('notify.events_txid')), false)",
        ),
    )
    .await
}

/// Enabled triggers on the enqueue path (`notify.events`, the queue's tables) whose function
/// calls `pg_notify`, as `table.trigger`. There should be none: a NOTIFY makes every
/// enqueuing transaction take a cluster-wide lock at commit and hold it through the
/// commit's flush (migration `20261201000003_enqueue_without_notify.sql`). An
/// apalis-postgres upgrade whose migrations recreate its `notify_workers` trigger would
/// bring one back.
pub async fn enqueue_notify_triggers(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = fetch_all(
        pool,
        sqlx::query_as(
            "SELECT t.tgrelid::regclass::text || '.' || t.tgname
             FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid
             WHERE t.tgrelid IN ('notify.events'::regclass, 'notify.queue_0'::regclass,
                                 'notify.queue_1'::regclass, 'notify.queue_2'::regclass,
                                 'notify.queue_3'::regclass, 'notify.queue_later'::regclass)
               AND NOT t.tgisinternal AND t.tgenabled <> 'D'
               AND (p.prosrc ILIKE '%pg_notify%' OR p.prosrc ~* '\\mnotify\\s')
             ORDER BY 1",
        ),
    )
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
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
