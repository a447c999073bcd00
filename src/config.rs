//! Command line and environment: one `notifyd` binary with subcommands.
//!
//! Every setting is a flag with an environment fallback (`.env.example` lists them all).
//! clap rejects a bad value at startup with a message that names the flag and the
//! variable; settings that depend on each other are checked by the command that uses them.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::claim::ClaimSettings;
use crate::cleanup::Retention;
use crate::store::RateLimit;

#[derive(Debug, Parser)]
#[command(
    name = "notifyd",
    version,
    about = "Notification worker and read service on Postgres"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Postgres connection URL, e.g. postgres://user:pass@host:5432/db.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Log format: human-readable lines, or one JSON object per line. The level filter is
    /// RUST_LOG (default "info").
    #[arg(long, env = "NOTIFYD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    /// What DATABASE_URL points at: `none` (Postgres itself), `session` (a pooler in
    /// session mode, e.g. PgBouncer `pool_mode = session`) or `transaction` (a pooler in
    /// transaction mode: statements unnamed and inside transactions, settings as SET
    /// LOCAL; see docs/OPERATIONS.md, Connection poolers).
    #[arg(long, env = "NOTIFYD_DB_POOLER", value_enum, default_value_t = crate::db::Pooler::None, global = true)]
    pub db_pooler: crate::db::Pooler,
}

impl GlobalArgs {
    /// The database URL, or an error that says how to set it.
    pub fn database_url(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "DATABASE_URL is not set: set the environment variable or pass --database-url"
                )
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the database schema (apalis's and notifyd's). Idempotent.
    Migrate,
    /// Claim queued events and turn them into notifications.
    Worker(WorkerArgs),
    /// Serve the read-only notifications API.
    Serve(crate::serve::ServeArgs),
    /// Delete expired notifications, events and finished queue rows once, then exit.
    Cleanup(CleanupArgs),
    /// Print a signed JWT for a user (development and demos; needs NOTIFYD_JWT_SECRET).
    Token(crate::serve::TokenArgs),
    /// Print queue depth, lag, failures, recent outcomes and worker heartbeats.
    Status(crate::ops::StatusArgs),
    /// Inspect and steer queue jobs: stats, failed, show, retry, discard, settings.
    Jobs(crate::ops::JobsArgs),
    /// Create the backend, worker and reader roles (NOLOGIN) and grant each exactly what it
    /// needs. Idempotent; run it after `notifyd migrate`, as the schema's owner.
    Grants(crate::roles::GrantsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Most jobs claimed in one batch, and so processed in one transaction.
    #[arg(long, env = "NOTIFYD_FETCH_BATCH", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub fetch_batch: u32,

    /// Batches in flight at once (each claimed, processed and committed in its own
    /// transaction, on its own connection).
    #[arg(long, env = "NOTIFYD_STORE_FLUSHERS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub store_flushers: u32,

    /// Batches in flight of the express lane, which claims only jobs whose type has at
    /// least NOTIFYD_EXPRESS_PRIORITY, so that interactive events never wait behind a bulk
    /// backlog's batches (0 turns the lane off).
    #[arg(long, env = "NOTIFYD_EXPRESS_BATCHES", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub express_batches: u32,

    /// Lowest `notify.event_types.priority` the express lane claims (seeded: new_message
    /// 100, status_change 50, system_alert 0).
    #[arg(long, env = "NOTIFYD_EXPRESS_PRIORITY", default_value_t = 1,
          value_parser = clap::value_parser!(i16).range(-1000..=1000))]
    pub express_priority: i16,

    /// While interactive jobs are arriving (the express lane claimed one in the last
    /// 250 ms), at most this many of the main lane's batches hold jobs below
    /// NOTIFYD_EXPRESS_PRIORITY; its other batches take interactive jobs only. A bulk
    /// backlog then leaves the database CPU for interactive events (0: never yield).
    #[arg(long, env = "NOTIFYD_EXPRESS_BULK_BATCHES", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=64))]
    pub express_bulk_batches: u32,

    /// Milliseconds between looks at the queue while nothing is claimable (new and delayed
    /// events are found this way: enqueuing sends no NOTIFY).
    #[arg(long, env = "NOTIFYD_POLL_INTERVAL_MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(5..=60_000))]
    pub poll_interval_ms: u64,

    #[command(flatten)]
    pub liveness: crate::ops::LivenessArgs,

    /// Most notifications per user in any rolling window.
    #[arg(long, env = "NOTIFYD_RATE_LIMIT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit: u32,

    /// Length of the rate-limit window in seconds.
    #[arg(long, env = "NOTIFYD_RATE_WINDOW_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub rate_window_secs: u64,

    /// Seconds between the worker's digest sweeps: a user whose events the rate limit held
    /// back gets their digest at most this long after their window has room again.
    #[arg(long, env = "NOTIFYD_DIGEST_INTERVAL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub digest_interval_secs: u64,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Seconds between the worker's cleanup ticks: a retention pass every 60 ticks, the
    /// dead-tuple check every 6 (0 turns the loop off).
    #[arg(long, env = "NOTIFYD_CLEANUP_INTERVAL_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub cleanup_interval_secs: u64,

    /// Database connections in the worker's pool (at least NOTIFYD_STORE_FLUSHERS + 4:
    /// each batch in flight holds one from its claim to its commit).
    #[arg(long, env = "NOTIFYD_DB_POOL", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(2..=500))]
    pub db_pool: u32,

    /// Seconds to finish in-flight jobs after SIGTERM. Jobs still unfinished then are
    /// released to other replicas and the process exits (at most about 2 s later).
    #[arg(long, env = "NOTIFYD_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub shutdown_timeout_secs: u64,

    /// Worker name prefix in apalis.workers (default: host name and process id).
    #[arg(long, env = "NOTIFYD_WORKER_NAME")]
    pub worker_name: Option<String>,

    /// Seconds a worker's database session may sit idle inside a transaction before the
    /// server ends it (idle_in_transaction_session_timeout; 0 turns it off). A frozen or
    /// partitioned worker would otherwise keep its row locks (claimed jobs, users), and stall
    /// its jobs and other replicas' batches for the same users.
    #[arg(long, env = "NOTIFYD_IDLE_TX_TIMEOUT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub idle_tx_timeout_secs: u64,

    /// Seconds between refreshes of the queue gauges (depth, lag, workers) on /metrics.
    #[arg(long, env = "NOTIFYD_QUEUE_METRICS_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub queue_metrics_secs: u64,

    #[command(flatten)]
    pub metrics: crate::telemetry::series::MetricsArgs,
}

impl WorkerArgs {
    pub fn rate_limit(&self) -> RateLimit {
        RateLimit {
            limit: self.rate_limit,
            window: Duration::from_secs(self.rate_window_secs),
        }
    }

    pub fn claim(&self) -> ClaimSettings {
        let name = self.worker_name.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "host".into());
            format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
        });
        ClaimSettings {
            concurrency: self.store_flushers as usize,
            fetch_batch: self.fetch_batch as usize,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            heartbeat: Duration::from_secs(self.liveness.heartbeat_secs),
            missed_heartbeats: self.liveness.missed_heartbeats as usize,
            name,
            express: crate::claim::Express {
                batches: self.express_batches as usize,
                min_priority: self.express_priority,
                bulk_batches: self.express_bulk_batches as usize,
            },
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// Days to keep notifications, processed events and failed jobs.
    #[arg(long, env = "NOTIFYD_RETENTION_DAYS", default_value_t = 7,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub retention_days: u32,

    /// Rows deleted per statement by cleanup.
    #[arg(long, env = "NOTIFYD_CLEANUP_BATCH", default_value_t = 5000,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub cleanup_batch: i64,
}

impl RetentionArgs {
    pub fn retention(&self) -> Retention {
        Retention {
            keep: Duration::from_secs(u64::from(self.retention_days) * 24 * 3600),
            batch: self.cleanup_batch,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub retention: RetentionArgs,
}
