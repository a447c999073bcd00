//! `notifyd-bench`: measure the pipeline end to end on a scratch database. A binary of its
//! own, beside `notifyd`: the harness (pgbench, scratch databases, process control) is no
//! part of the production binary. It drives real `notifyd worker` processes: by default the
//! `notifyd` built next to it, or any other with `--worker-bin` (an A/B of two builds runs
//! the same harness against both).
//!
//! One run, three phases, all against the server in `DATABASE_URL` (a scratch database is
//! created on it and dropped afterwards):
//! 1. **ceiling**: the same work done as set-based SQL by `pgbench`, 1,000 jobs per
//!    transaction (claim, preference join, rate-limit upsert, notification insert, job
//!    delete) on an equivalent schema. This is what Postgres alone can do on this machine.
//! 2. **drain**: N events enqueued by one SQL `INSERT … SELECT` (the trigger queues them),
//!    then `--replicas` real `notifyd worker` processes drain them. Throughput is N over
//!    the span from the first to the last stored notification; the worker's peak RSS is
//!    read from `/proc`.
//! 3. **latency**: with the workers idle, events are inserted one per transaction at a
//!    steady `--rate` for `--latency-secs`, each for a user of its own. "Readable" latency
//!    runs from just before the producer sends its INSERT to the moment the bench hears
//!    the worker's post-commit announcement for that user (so the row is committed). It
//!    is also split at the moment the INSERT's commit is acknowledged: the producer's own
//!    INSERT, and commit to readable. The producers' 16 connections are opened before the
//!    clock starts. The "stamp" figure is the notification's stamp minus the event's
//!    insert stamp, both from the database clock. `--latency-csv` writes every probe.
//!
//! The drain's end is detected by looking at the claim index (is a claimable job left?)
//! before counting events with an outcome: the count alone reads every event row, and
//! polled every 100 ms it took about a quarter of the drain's throughput from Postgres.
//!
//! Figures are printed as a table and as one JSON line (for scripts).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser};
use sqlx::{Connection, PgConnection, PgPool};

use notifyd::db;

mod enqueue;
mod steady;

use steady::{Latencies, Percentiles, QueueSample, Steady, show_percentiles};

#[derive(Debug, Parser)]
#[command(
    name = "notifyd-bench",
    version,
    about = "Measure drain throughput and enqueue-to-readable latency against DATABASE_URL"
)]
struct Cli {
    /// Postgres connection URL of the server to measure on (a scratch database is created
    /// there and dropped afterwards; the role needs CREATEDB).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    #[command(flatten)]
    bench: BenchArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    notifyd::telemetry::init(notifyd::config::LogFormat::Human);
    match run(&cli.database_url, cli.bench).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("notifyd-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Args)]
struct BenchArgs {
    /// Events to drain in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: u64,

    /// Distinct users the events are spread over (keep events/users under the rate limit).
    #[arg(long, default_value_t = 20_000)]
    users: u64,

    /// Worker processes draining the queue.
    #[arg(long, default_value_t = 1)]
    replicas: u32,

    /// The `notifyd` executable whose workers are measured (default: the one next to this
    /// executable).
    #[arg(long)]
    worker_bin: Option<std::path::PathBuf>,

    /// Passed to each worker as --fetch-batch.
    #[arg(long, default_value_t = 1000)]
    fetch_batch: u32,

    /// Passed to each worker as --store-flushers.
    #[arg(long, default_value_t = 4)]
    store_flushers: u32,

    /// Steady arrival rate (events per second) for the latency phase; 0 skips the phase.
    #[arg(long, default_value_t = 1000)]
    rate: u64,

    /// Length of the latency phase in seconds.
    #[arg(long, default_value_t = 20)]
    latency_secs: u64,

    /// Length of the soak phase in seconds (steady `--rate`, sampling worker RSS and the
    /// queue table's size and dead tuples); 0 skips it.
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,

    /// Seconds between soak samples.
    #[arg(long, default_value_t = 30)]
    soak_sample_secs: u64,

    /// pgbench clients for the ceiling phase; 0 skips the phase.
    #[arg(long, default_value_t = 2)]
    ceiling_clients: u32,

    /// Hold one REPEATABLE READ transaction open for this many seconds, during a second
    /// steady phase at `--rate` (the first one is its baseline, in the same run), then run a
    /// third steady phase after releasing it; 0 skips.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,

    /// Seconds per pgbench measurement of the enqueue cost phase (single-row INSERT into
    /// notify.events against a plain table, 4 clients); 0 skips the phase.
    #[arg(long, default_value_t = 0)]
    enqueue_secs: u64,

    /// How the queue is fed in the scratch database: `trigger` (the enqueue trigger) or
    /// `intake` (workers take committed events in; `notifyd jobs enqueue-by`).
    #[arg(long, default_value = "trigger", value_parser = ["trigger", "intake"])]
    enqueue_by: String,

    /// Rounds of the enqueue cost phase (alternating order).
    #[arg(long, default_value_t = 3)]
    enqueue_rounds: u32,

    /// Drain the burst on tables no ANALYZE has seen (and autovacuum off on them), as a
    /// first backfill or a server whose autovacuum lags would; by default the bench
    /// analyzes after enqueuing.
    #[arg(long)]
    stale_stats: bool,

    /// A broadcast: this many `system_alert` events (one per user, one INSERT … SELECT)
    /// enqueued while `new_message` probes run at `--broadcast-rate`, beside the same probes
    /// without it; 0 skips.
    #[arg(long, default_value_t = 0)]
    broadcast: u64,

    /// Probe rate (events per second) of the broadcast phase and its baseline.
    #[arg(long, default_value_t = 100)]
    broadcast_rate: u64,

    /// Length of the broadcast phase in seconds (the broadcast is enqueued 1 s in).
    #[arg(long, default_value_t = 120)]
    broadcast_secs: u64,

    /// Keep the scratch database afterwards (its name is printed).
    #[arg(long)]
    keep: bool,

    /// Write one CSV line per latency probe to this file: `event,sent_ms,insert_ms,readable_ms`
    /// (sent_ms from the start of the phase; readable_ms -1 where never heard), to see when in a run
    /// the slow ones happened and on which side of the INSERT's commit.
    #[arg(long)]
    latency_csv: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Report {
    /// How the queue was fed: `trigger` or `intake`.
    enqueue_by: String,
    events: u64,
    users: u64,
    replicas: u32,
    worker_bin: String,
    fetch_batch: u32,
    store_flushers: u32,
    ceiling_jobs_per_sec: Option<f64>,
    drain_jobs_per_sec: f64,
    drain_wall_secs: f64,
    ratio_to_ceiling: Option<f64>,
    worker_peak_rss_mib: Vec<f64>,
    latency_rate: u64,
    latency_events: u64,
    /// Enqueue (client, before the INSERT) to readable (commit announcement heard).
    latency_readable_ms: Option<Percentiles>,
    /// The producer's INSERT alone (sent to committed), client side.
    latency_insert_ms: Option<Percentiles>,
    /// INSERT committed to readable, client side.
    latency_after_insert_ms: Option<Percentiles>,
    /// Notification stamp minus event stamp, database clock.
    latency_stamp_ms: Option<Percentiles>,
    soak: Vec<SoakSample>,
    stale_stats: bool,
    enqueue: Option<enqueue::EnqueueCost>,
    hold: Option<HoldReport>,
    broadcast: Option<BroadcastReport>,
}

/// The held-transaction phases.
#[derive(Debug, Default, serde::Serialize)]
struct HoldReport {
    secs: u64,
    held: Latencies,
    after: Latencies,
    /// Held p99 over the baseline p99 of the same run.
    p99_ratio: Option<f64>,
    samples: Vec<QueueSample>,
}

/// The broadcast phase and its baseline.
#[derive(Debug, Default, serde::Serialize)]
struct BroadcastReport {
    events: u64,
    rate: u64,
    baseline: Latencies,
    during: Latencies,
    /// Seconds the broadcast's INSERT took.
    insert_secs: f64,
    /// Seconds from the broadcast's commit until none of its jobs is left (`None`: not
    /// drained in the phase).
    drained_secs: Option<f64>,
    /// Latency (database stamps) of the probes sent while the broadcast drained.
    while_draining: Option<Percentiles>,
    samples: Vec<QueueSample>,
}

/// One sample of the soak phase.
#[derive(Debug, Clone, serde::Serialize)]
struct SoakSample {
    secs: u64,
    /// Current RSS of each worker (VmRSS), MiB.
    worker_rss_mib: Vec<f64>,
    /// The queue's slot tables (`notify.queue_0..3`): live and dead tuples, and their size
    /// with indexes.
    jobs_live: i64,
    jobs_dead: i64,
    jobs_mib: f64,
    /// Events enqueued so far in the soak, and how many still have no outcome.
    enqueued: u64,
    backlog: i64,
}

async fn run(database_url: &str, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.users > 0,
        "--events and --users must be positive"
    );
    let scratch = format!("notifyd_bench_{}", std::process::id());
    let scratch_url = with_database(database_url, &scratch)?;
    let mut admin = PgConnection::connect(database_url)
        .await
        .context("cannot connect to DATABASE_URL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {scratch}")))
        .execute(&mut admin)
        .await
        .context("cannot create the scratch database (the role needs CREATEDB)")?;
    eprintln!("scratch database: {scratch}");

    let result = run_phases(&scratch_url, &args).await;

    if !args.keep {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
    }
    let report = result?;
    print_report(&report);
    Ok(())
}

async fn run_phases(url: &str, args: &BenchArgs) -> anyhow::Result<Report> {
    let pool = db::connect(url, 8, "notifyd-bench").await?;
    db::migrate(&pool).await?;
    notifyd::claim::intake::switch(&pool, &args.enqueue_by).await?;
    eprintln!("the queue is fed by {}", args.enqueue_by);
    let mut report = Report {
        events: args.events,
        users: args.users,
        replicas: args.replicas,
        worker_bin: worker_bin(args)?.display().to_string(),
        fetch_batch: args.fetch_batch,
        store_flushers: args.store_flushers,
        latency_rate: args.rate,
        stale_stats: args.stale_stats,
        enqueue_by: args.enqueue_by.clone(),
        ..Default::default()
    };

    // Some users switch one type off, so the preference join has rows to find.
    sqlx::query(
        "INSERT INTO notify.preferences (user_id, event_type, enabled)
         SELECT 'u' || g, 'system_alert', false FROM generate_series(1, $1::bigint / 10) AS g",
    )
    .bind(args.users as i64)
    .execute(&pool)
    .await?;

    if args.enqueue_secs > 0 {
        eprintln!(
            "phase 0: enqueue cost, pgbench {} x {} s",
            args.enqueue_rounds, args.enqueue_secs
        );
        report.enqueue =
            Some(enqueue::run(&pool, url, args.enqueue_secs, args.enqueue_rounds.max(1)).await?);
    }

    if args.ceiling_clients > 0 {
        eprintln!(
            "phase 1: set-based SQL ceiling with pgbench ({} events)",
            args.events
        );
        report.ceiling_jobs_per_sec = Some(ceiling(&pool, url, args).await?);
    }

    eprintln!(
        "phase 2: drain {} events with {} worker(s)",
        args.events, args.replicas
    );
    let (rate, wall, rss, mut workers) = drain(&pool, url, args).await?;
    report.drain_jobs_per_sec = rate;
    report.drain_wall_secs = wall;
    report.worker_peak_rss_mib = rss;
    report.ratio_to_ceiling = report.ceiling_jobs_per_sec.map(|c| rate / c);

    if args.broadcast > 0 {
        let b = broadcast_phases(&pool, url, args).await;
        if b.is_err() {
            stop_workers(&mut workers);
        }
        report.broadcast = Some(b?);
    }

    if args.rate > 0 && args.latency_secs > 0 {
        eprintln!(
            "phase 3: latency at {} events/s for {} s",
            args.rate, args.latency_secs
        );
        let measured = steady::run(
            &pool,
            url,
            &Steady {
                rate: args.rate,
                secs: args.latency_secs,
                event_type: "new_message",
                label: "lat",
                csv: args.latency_csv.as_deref(),
            },
        )
        .await;
        if measured.is_err() {
            stop_workers(&mut workers);
        }
        let measured = measured?;
        if args.hold_secs > 0 {
            let held = hold_phases(&pool, url, args, measured.readable).await;
            if held.is_err() {
                stop_workers(&mut workers);
            }
            report.hold = Some(held?);
        }

        report.latency_events = measured.events;
        report.latency_readable_ms = measured.readable;
        report.latency_stamp_ms = measured.stamp;
        report.latency_insert_ms = measured.insert;
        report.latency_after_insert_ms = measured.after_insert;
        if args.soak_secs > 0 {
            eprintln!(
                "phase 4: soak at {} events/s for {} s",
                args.rate, args.soak_secs
            );
            let soaked = soak(&pool, url, args, &workers).await;
            stop_workers(&mut workers);
            report.soak = soaked?;
        } else {
            stop_workers(&mut workers);
        }
    } else {
        stop_workers(&mut workers);
    }
    pool.close().await;
    Ok(report)
}

const CEILING_SCHEMA: &str = r#"
CREATE SCHEMA ceiling;
CREATE TABLE ceiling.jobs (id bigint PRIMARY KEY, user_id text NOT NULL, event_type text NOT NULL, body text NOT NULL);
CREATE TABLE ceiling.rate (user_id text PRIMARY KEY, n bigint NOT NULL);
CREATE TABLE ceiling.notifications (LIKE notify.notifications INCLUDING ALL);
"#;

/// pgbench script: one transaction claims, filters, counts, stores and deletes 1,000 jobs.
const CEILING_SCRIPT: &str = r#"
WITH claimed AS (
    DELETE FROM ceiling.jobs
    WHERE id IN (SELECT id FROM ceiling.jobs ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED)
    RETURNING *
), allowed AS (
    SELECT c.* FROM claimed c
    LEFT JOIN notify.preferences p ON p.user_id = c.user_id AND p.event_type = c.event_type
    WHERE p.enabled IS NOT FALSE
), counted AS (
    INSERT INTO ceiling.rate (user_id, n)
    SELECT user_id, count(*) FROM allowed GROUP BY user_id
    ON CONFLICT (user_id) DO UPDATE SET n = ceiling.rate.n + EXCLUDED.n
    RETURNING user_id, n
)
INSERT INTO ceiling.notifications (user_id, event_id, event_type, body, created_at)
SELECT a.user_id, a.id, a.event_type, a.body, now()
FROM allowed a JOIN counted r USING (user_id)
WHERE r.n <= 1000000;
"#;

async fn ceiling(pool: &PgPool, url: &str, args: &BenchArgs) -> anyhow::Result<f64> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(CEILING_SCHEMA.to_owned()))
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO ceiling.jobs
         SELECT g, 'u' || (g % $2 + 1),
                (ARRAY['new_message','status_change','system_alert'])[g % 3 + 1],
                'You have a new message from user ' || g
         FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(args.events as i64)
    .bind(args.users as i64)
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE ceiling.jobs")
        .execute(pool)
        .await?;
    let script = std::env::temp_dir().join(format!("notifyd-ceiling-{}.sql", std::process::id()));
    std::fs::write(&script, CEILING_SCRIPT)?;
    let clients = args.ceiling_clients;
    let per_client = args.events.div_ceil(1000).div_ceil(u64::from(clients));
    let started = Instant::now();
    let status = Command::new("pgbench")
        .args(["-n", "-f"])
        .arg(&script)
        .args(["-c", &clients.to_string(), "-j", &clients.to_string()])
        .args(["-t", &per_client.to_string()])
        .arg(url)
        .stdout(Stdio::null())
        .status()
        .context(
            "cannot run pgbench (install the postgresql-client or postgresql-contrib package)",
        )?;
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&script);
    anyhow::ensure!(status.success(), "pgbench failed");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM ceiling.notifications")
        .fetch_one(pool)
        .await?;
    sqlx::query("DROP SCHEMA ceiling CASCADE")
        .execute(pool)
        .await?;
    let rate = stored as f64 / secs;
    eprintln!("  ceiling: {stored} jobs in {secs:.2} s = {rate:.0} jobs/s");
    Ok(rate)
}

/// The worker executable: `--worker-bin`, else `notifyd` next to this executable.
fn worker_bin(args: &BenchArgs) -> anyhow::Result<std::path::PathBuf> {
    let exe = match &args.worker_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("notifyd"),
    };
    anyhow::ensure!(
        exe.is_file(),
        "no worker executable at {} (build it with `cargo build --release`, or pass --worker-bin)",
        exe.display()
    );
    Ok(exe)
}

fn spawn_workers(url: &str, args: &BenchArgs) -> anyhow::Result<Vec<Child>> {
    let exe = worker_bin(args)?;
    (0..args.replicas)
        .map(|i| {
            Command::new(&exe)
                .arg("worker")
                .env("DATABASE_URL", url)
                .env("NOTIFYD_FETCH_BATCH", args.fetch_batch.to_string())
                .env("NOTIFYD_STORE_FLUSHERS", args.store_flushers.to_string())
                .env("NOTIFYD_WORKER_NAME", format!("bench-{i}"))
                .env("NOTIFYD_RATE_LIMIT", "100000")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start a worker process")
        })
        .collect()
}

/// A memory figure of `pid` from `/proc/<pid>/status` (`VmHWM`: peak RSS, `VmRSS`: current
/// RSS), in MiB; NaN when it cannot be read.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn current_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// Steady load for `--soak-secs`: one INSERT per event at `--rate`, from a few producer
/// tasks, sampling every `--soak-sample-secs`. The worker's own cleanup loop is what keeps
/// the queue table small; this only watches it.
async fn soak(
    pool: &PgPool,
    url: &str,
    args: &BenchArgs,
    workers: &[Child],
) -> anyhow::Result<Vec<SoakSample>> {
    let producers = db::connect(url, 8, "notifyd-bench-soak").await?;
    let first_id: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM notify.events")
        .fetch_one(pool)
        .await?;
    let enqueued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Batches of 10 per tick keep the producer from being the bottleneck at high rates.
    let per_tick = 10u64;
    let tick = Duration::from_secs_f64(per_tick as f64 / args.rate.max(1) as f64);
    let producer = {
        let (producers, enqueued, stop) = (producers.clone(), enqueued.clone(), stop.clone());
        let users = args.users;
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut n: u64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep_until(start + tick.mul_f64((n / per_tick) as f64)).await;
                let r = sqlx::query(
                    "INSERT INTO notify.events (user_id, event_type, body)
                     SELECT 'soak' || ((($1::bigint + g) % $3) + 1), 'status_change', 'Soak event ' || ($1::bigint + g)
                     FROM generate_series(1, $2::bigint) AS g",
                )
                .bind(n as i64)
                .bind(per_tick as i64)
                .bind(users as i64)
                .execute(&producers)
                .await;
                if let Err(e) = r {
                    eprintln!("  soak producer: {e}");
                }
                n += per_tick;
                enqueued.store(n, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    loop {
        let elapsed = started.elapsed().as_secs();
        let (live, dead, bytes): (i64, i64, i64) = sqlx::query_as(
            "SELECT sum(n_live_tup)::bigint, sum(n_dead_tup)::bigint,
                    sum(pg_total_relation_size(relid))::bigint
             FROM pg_stat_user_tables
             WHERE schemaname = 'notify' AND relname ~ '^queue_[0-9]$'",
        )
        .fetch_one(pool)
        .await?;
        let backlog: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notify.event_outcomes WHERE event_id > $1 AND outcome IS NULL",
        )
        .bind(first_id)
        .fetch_one(pool)
        .await?;
        let sample = SoakSample {
            secs: elapsed,
            worker_rss_mib: workers.iter().map(|w| current_rss_mib(w.id())).collect(),
            jobs_live: live,
            jobs_dead: dead,
            jobs_mib: bytes as f64 / (1024.0 * 1024.0),
            enqueued: enqueued.load(std::sync::atomic::Ordering::Relaxed),
            backlog,
        };
        eprintln!(
            "  soak t={:>4}s rss {:?} MiB, queue slots live {} dead {} ({:.1} MiB), enqueued {}, backlog {}",
            sample.secs,
            sample
                .worker_rss_mib
                .iter()
                .map(|m| (m * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            sample.jobs_live,
            sample.jobs_dead,
            sample.jobs_mib,
            sample.enqueued,
            sample.backlog
        );
        samples.push(sample);
        if elapsed >= args.soak_secs {
            break;
        }
        let next = Duration::from_secs(args.soak_sample_secs.max(1) * samples.len() as u64);
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = producer.await;
    producers.close().await;
    Ok(samples)
}

fn stop_workers(workers: &mut [Child]) {
    for w in workers.iter() {
        // SIGTERM, the graceful path.
        let _ = Command::new("kill").arg(w.id().to_string()).status();
    }
    for w in workers.iter_mut() {
        let _ = w.wait();
    }
}

/// Whether the queue still holds a job a worker could claim now or after a backoff
/// (in-flight jobs count). One probe of each slot's claim index, which skips the entries
/// of finished jobs once they are marked dead: a sequential scan would walk the finished
/// rows in front of the first live one, more of them with every poll.
async fn claimable_jobs_left(pool: &PgPool) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(QUEUE_NOT_EMPTY).fetch_one(pool).await?)
}

/// `true` while any job waits: see [`claimable_jobs_left`].
pub const QUEUE_NOT_EMPTY: &str = "
SELECT (SELECT event_id FROM notify.queue_0 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_1 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_2 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_3 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_later ORDER BY event_id LIMIT 1) IS NOT NULL
    OR notify.intake_has_waiting()";

/// `true` while a job of a type with priority 0 or lower waits (a broadcast's).
pub const LOW_PRIORITY_LEFT: &str = "
SELECT (SELECT event_id FROM notify.queue_0 WHERE priority <= 0 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_1 WHERE priority <= 0 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_2 WHERE priority <= 0 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR (SELECT event_id FROM notify.queue_3 WHERE priority <= 0 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NOT NULL
    OR notify.intake_has_waiting(0)";

/// The reason of one failed job of the queue, if there is one.
async fn failed_job(pool: &PgPool) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT reason FROM notify.queue_dead LIMIT 1")
            .fetch_optional(pool)
            .await?,
    )
}

async fn processed(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM notify.event_outcomes WHERE outcome IS NOT NULL")
            .fetch_one(pool)
            .await?,
    )
}

/// Drain the queue; the workers are returned still running (idle) for the latency phase.
async fn drain(
    pool: &PgPool,
    url: &str,
    args: &BenchArgs,
) -> anyhow::Result<(f64, f64, Vec<f64>, Vec<Child>)> {
    if args.stale_stats {
        // No ANALYZE may see the burst before the drain, not even autovacuum's.
        for table in STALE_TABLES {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} SET (autovacuum_enabled = false)"
            )))
            .execute(pool)
            .await?;
        }
    }
    sqlx::query(
        "INSERT INTO notify.events (user_id, event_type, body)
         SELECT 'u' || (g % $2 + 1),
                (ARRAY['new_message','status_change','system_alert'])[g % 3 + 1],
                'You have a new message from <b>user ' || g || '</b>'
         FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(args.events as i64)
    .bind(args.users as i64)
    .execute(pool)
    .await?;
    if !args.stale_stats {
        sqlx::query("ANALYZE").execute(pool).await?;
    }

    let started = Instant::now();
    let mut workers = spawn_workers(url, args)?;
    let target = args.events as i64;
    let deadline = started + Duration::from_secs(1800);
    let mut next_failure_check = started + Duration::from_secs(5);
    loop {
        // A failed job means a failed batch: retried, but the figures would not be those of
        // a working drain, and a batch that always fails would keep this loop waiting. No
        // index has failed jobs alone, so this scans the queue: every 5 s, not every poll.
        if Instant::now() >= next_failure_check {
            if let Some(error) = failed_job(pool).await? {
                stop_workers(&mut workers);
                anyhow::bail!("a job failed during the drain, so it is not measured: {error}");
            }
            next_failure_check = Instant::now() + Duration::from_secs(5);
        }
        // The exact count reads every event row (tens of ms of Postgres CPU at 200k rows,
        // taken from the drain it measures), so ask first whether any claimable job is
        // left, which walks a few pages of the queue's partial claim index.
        if claimable_jobs_left(pool).await? {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let done = processed(pool).await?;
        if done >= target {
            break;
        }
        if Instant::now() > deadline {
            stop_workers(&mut workers);
            anyhow::bail!("drain did not finish in 30 minutes ({done}/{target})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let rss: Vec<f64> = workers.iter().map(|w| peak_rss_mib(w.id())).collect();
    let span: f64 = sqlx::query_scalar(
        // The view: a stored event's time is its notification's (its row keeps none).
        "SELECT EXTRACT(EPOCH FROM max(processed_at) - min(processed_at))::float8
         FROM notify.event_outcomes",
    )
    .fetch_one(pool)
    .await?;
    let rate = if span > 0.0 {
        target as f64 / span
    } else {
        f64::NAN
    };
    eprintln!(
        "  drain: {target} events, {span:.2} s from first to last outcome = {rate:.0} jobs/s (wall {wall:.2} s incl. start-up)"
    );
    Ok((rate, wall, rss, workers))
}

/// The tables a burst writes, kept from autovacuum's ANALYZE by `--stale-stats`.
const STALE_TABLES: [&str; 8] = [
    "notify.events",
    "notify.notifications",
    "notify.rate_windows",
    "notify.preferences",
    "notify.queue_0",
    "notify.queue_1",
    "notify.queue_2",
    "notify.queue_3",
];

/// Phase 3b/3c: a held snapshot for `--hold-secs` at the steady rate, then the same rate
/// after it is released. `baseline` is phase 3's readable latency.
async fn hold_phases(
    pool: &PgPool,
    url: &str,
    args: &BenchArgs,
    baseline: Option<Percentiles>,
) -> anyhow::Result<HoldReport> {
    eprintln!(
        "phase 3b: latency at {} events/s with a REPEATABLE READ transaction held for {} s",
        args.rate, args.hold_secs
    );
    let hold = steady::Hold::open(url).await?;
    eprintln!("  holding: pid {}", hold.pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = steady::sample_queue(pool.clone(), Duration::from_secs(10), true, stop.clone());
    let held = steady::run(
        pool,
        url,
        &Steady {
            rate: args.rate,
            secs: args.hold_secs,
            event_type: "new_message",
            label: "held",
            csv: None,
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();
    hold.release().await?;
    let held = held?;
    for (minute, p) in held.per_minute.iter().enumerate() {
        eprintln!(
            "    minute {:>3}: {}",
            minute + 1,
            show_percentiles(Some(*p))
        );
    }
    if let Some(last) = samples.last() {
        let max_backlog = samples.iter().filter_map(|s| s.backlog).max().unwrap_or(0);
        let max_dead = samples.iter().map(|s| s.slot_dead).max().unwrap_or(0);
        eprintln!(
            "  held: backlog at most {max_backlog}, slot dead tuples at most {max_dead}; slots at the end {}",
            last.slots
        );
    }
    eprintln!(
        "phase 3c: latency at {} events/s after the release",
        args.rate
    );
    let after = steady::run(
        pool,
        url,
        &Steady {
            rate: args.rate,
            secs: args.latency_secs,
            event_type: "new_message",
            label: "after",
            csv: None,
        },
    )
    .await?;
    let p99_ratio = match (held.readable, baseline) {
        (Some(h), Some(b)) if b.p99 > 0.0 => Some(h.p99 / b.p99),
        _ => None,
    };
    Ok(HoldReport {
        secs: args.hold_secs,
        held,
        after,
        p99_ratio,
        samples,
    })
}

/// Phases 2b/2c: `new_message` probes at `--broadcast-rate` without, then with, a broadcast
/// of `--broadcast` `system_alert` events enqueued one second in.
async fn broadcast_phases(
    pool: &PgPool,
    url: &str,
    args: &BenchArgs,
) -> anyhow::Result<BroadcastReport> {
    eprintln!(
        "phase 2b: new_message probes at {}/s for {} s, no broadcast",
        args.broadcast_rate, args.latency_secs
    );
    let baseline = steady::run(
        pool,
        url,
        &Steady {
            rate: args.broadcast_rate,
            secs: args.latency_secs,
            event_type: "new_message",
            label: "quiet",
            csv: None,
        },
    )
    .await?;
    eprintln!(
        "phase 2c: the same probes for {} s, with a broadcast of {} system_alert events",
        args.broadcast_secs, args.broadcast
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = steady::sample_queue(pool.clone(), Duration::from_secs(1), false, stop.clone());
    let phase_start = Instant::now();
    let broadcaster = {
        let pool = pool.clone();
        let n = args.broadcast;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let started = Instant::now();
            sqlx::query(
                "INSERT INTO notify.events (user_id, event_type, body)
                 SELECT 'bcast' || g, 'system_alert', 'Scheduled maintenance tonight at 22:00'
                 FROM generate_series(1, $1::bigint) AS g",
            )
            .bind(n as i64)
            .execute(&pool)
            .await
            .map(|_| (started - phase_start, started.elapsed()))
        })
    };
    let during = steady::run(
        pool,
        url,
        &Steady {
            rate: args.broadcast_rate,
            secs: args.broadcast_secs,
            event_type: "new_message",
            label: "busy",
            csv: None,
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();
    let (began, insert) = broadcaster.await??;
    let during = during?;
    let committed = (began + insert).as_secs_f64();
    let drained = samples
        .iter()
        .find(|s| s.secs > committed && !s.low_priority_left)
        .map(|s| s.secs - committed);
    // The probes sent while the broadcast drained: per-minute windows are too coarse, so
    // read them back from the database clock (event stamp to notification stamp).
    let while_draining = match drained {
        Some(d) => {
            let ms: Vec<f64> = sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM n.created_at - e.created_at)::float8 * 1000
                 FROM notify.events e JOIN notify.notifications n ON n.event_id = e.id
                 WHERE e.user_id LIKE 'busy%'
                   AND e.created_at BETWEEN
                       (SELECT min(created_at) FROM notify.events WHERE user_id LIKE 'bcast%')
                       + make_interval(secs => $1)
                       AND (SELECT min(created_at) FROM notify.events WHERE user_id LIKE 'bcast%')
                       + make_interval(secs => $1 + $2)",
            )
            .bind(insert.as_secs_f64())
            .bind(d)
            .fetch_all(pool)
            .await?;
            steady::percentiles(ms)
        }
        None => None,
    };
    eprintln!(
        "  broadcast: INSERT of {} took {:.1} s; queue empty {} after its commit; probes          meanwhile (db stamps): {}",
        args.broadcast,
        insert.as_secs_f64(),
        drained.map_or("not within the phase".to_owned(), |d| format!("{d:.1} s")),
        show_percentiles(while_draining)
    );
    Ok(BroadcastReport {
        events: args.broadcast,
        rate: args.broadcast_rate,
        baseline,
        during,
        insert_secs: insert.as_secs_f64(),
        drained_secs: drained,
        while_draining,
        samples,
    })
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).context("DATABASE_URL is not a valid URL")?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

fn print_report(r: &Report) {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    println!();
    println!(
        "notifyd-bench ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  workers: {} replica(s) of {}, fetch batch {}, store flushers {}",
        r.replicas, r.worker_bin, r.fetch_batch, r.store_flushers
    );
    println!("  events: {} over {} users", r.events, r.users);
    println!(
        "  ceiling (pgbench, set-based): {} jobs/s",
        f(r.ceiling_jobs_per_sec)
    );
    println!(
        "  drain (end to end):           {:.1} jobs/s",
        r.drain_jobs_per_sec
    );
    println!(
        "  ratio drain / ceiling:        {}",
        r.ratio_to_ceiling.map_or("-".into(), |v| format!("{v:.3}"))
    );
    println!(
        "  latency at {} events/s ({} events)",
        r.latency_rate, r.latency_events
    );
    println!(
        "    enqueue to readable (client): {}",
        show_percentiles(r.latency_readable_ms)
    );
    println!(
        "      the producer's INSERT:      {}",
        show_percentiles(r.latency_insert_ms)
    );
    println!(
        "      INSERT commit to readable:  {}",
        show_percentiles(r.latency_after_insert_ms)
    );
    println!(
        "    db stamps (event to row):     {}",
        show_percentiles(r.latency_stamp_ms)
    );
    println!(
        "  worker peak RSS (MiB):        {:?}",
        r.worker_peak_rss_mib
    );
    if let Some(e) = &r.enqueue {
        println!(
            "  enqueue (pgbench, 4 clients, synchronous_commit {}): notify.events {:.0} tps, plain table {:.0} tps: {:.2} x",
            e.synchronous_commit, e.events_median, e.plain_median, e.ratio
        );
    }
    if r.stale_stats {
        println!("  (drained on tables no ANALYZE had seen)");
    }
    if let Some(h) = &r.hold {
        println!(
            "  held transaction, {} s: enqueue to readable {}; p99 {} x the baseline",
            h.secs,
            show_percentiles(h.held.readable),
            h.p99_ratio.map_or("-".into(), |v| format!("{v:.2}"))
        );
        println!(
            "    backlog at most {}, slot dead tuples at most {}",
            h.samples
                .iter()
                .filter_map(|s| s.backlog)
                .max()
                .unwrap_or(0),
            h.samples.iter().map(|s| s.slot_dead).max().unwrap_or(0)
        );
        println!(
            "    after the release: {}",
            show_percentiles(h.after.readable)
        );
    }
    if let Some(b) = &r.broadcast {
        println!(
            "  broadcast of {} system_alert, new_message probes at {}/s:",
            b.events, b.rate
        );
        println!(
            "    without it:   {}",
            show_percentiles(b.baseline.readable)
        );
        println!("    with it:      {}", show_percentiles(b.during.readable));
        println!(
            "    broadcast INSERT {:.1} s, drained {} after its commit; probes while it drained (db stamps): {}",
            b.insert_secs,
            b.drained_secs
                .map_or("-".to_owned(), |d| format!("{d:.1} s")),
            show_percentiles(b.while_draining)
        );
    }
    if let (Some(first), Some(last)) = (r.soak.first(), r.soak.last()) {
        let max_dead = r.soak.iter().map(|s| s.jobs_dead).max().unwrap_or(0);
        let max_mib = r.soak.iter().map(|s| s.jobs_mib).fold(0.0, f64::max);
        let max_backlog = r.soak.iter().map(|s| s.backlog).max().unwrap_or(0);
        println!(
            "  soak {} s: worker RSS {:?} -> {:?} MiB; queue slots at most {} dead tuples, {:.1} MiB; backlog at most {}",
            last.secs, first.worker_rss_mib, last.worker_rss_mib, max_dead, max_mib, max_backlog
        );
    }
    println!("JSON {}", serde_json::to_string(r).unwrap_or_default());
}
