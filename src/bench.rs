//! `notifyd bench`: measure the pipeline end to end on a scratch database.
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
//!    steady `--rate` for `--latency-secs`; latency is the notification's commit stamp
//!    minus the event's insert stamp, both from the database clock.
//!
//! Figures are printed as a table and as one JSON line (for scripts).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sqlx::{Connection, PgConnection, PgPool};

use crate::db;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Events to drain in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,

    /// Distinct users the events are spread over (keep events/users under the rate limit).
    #[arg(long, default_value_t = 20_000)]
    pub users: u64,

    /// Worker processes draining the queue.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,

    /// Passed to each worker as --concurrency.
    #[arg(long, default_value_t = 3000)]
    pub concurrency: u32,

    /// Passed to each worker as --fetch-batch.
    #[arg(long, default_value_t = 1000)]
    pub fetch_batch: u32,

    /// Passed to each worker as --store-batch.
    #[arg(long, default_value_t = 1000)]
    pub store_batch: u32,

    /// Passed to each worker as --store-flushers.
    #[arg(long, default_value_t = 2)]
    pub store_flushers: u32,

    /// Steady arrival rate (events per second) for the latency phase; 0 skips the phase.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,

    /// Length of the latency phase in seconds.
    #[arg(long, default_value_t = 20)]
    pub latency_secs: u64,

    /// pgbench clients for the ceiling phase; 0 skips the phase.
    #[arg(long, default_value_t = 2)]
    pub ceiling_clients: u32,

    /// Keep the scratch database afterwards (its name is printed).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Default, serde::Serialize)]
struct Report {
    events: u64,
    users: u64,
    replicas: u32,
    concurrency: u32,
    fetch_batch: u32,
    store_batch: u32,
    store_flushers: u32,
    ceiling_jobs_per_sec: Option<f64>,
    drain_jobs_per_sec: f64,
    drain_wall_secs: f64,
    ratio_to_ceiling: Option<f64>,
    worker_peak_rss_mib: Vec<f64>,
    latency_rate: u64,
    latency_events: u64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_max_ms: Option<f64>,
}

pub async fn run(database_url: &str, args: BenchArgs) -> anyhow::Result<()> {
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
    let mut report = Report {
        events: args.events,
        users: args.users,
        replicas: args.replicas,
        concurrency: args.concurrency,
        fetch_batch: args.fetch_batch,
        store_batch: args.store_batch,
        store_flushers: args.store_flushers,
        latency_rate: args.rate,
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

    if args.rate > 0 && args.latency_secs > 0 {
        eprintln!(
            "phase 3: latency at {} events/s for {} s",
            args.rate, args.latency_secs
        );
        let measured = latency(&pool, url, args).await;
        stop_workers(&mut workers);
        let (n, p50, p99, max) = measured?;
        report.latency_events = n;
        report.latency_p50_ms = p50;
        report.latency_p99_ms = p99;
        report.latency_max_ms = max;
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

fn spawn_workers(url: &str, args: &BenchArgs) -> anyhow::Result<Vec<Child>> {
    let exe = std::env::current_exe().context("cannot find the notifyd executable")?;
    (0..args.replicas)
        .map(|i| {
            Command::new(&exe)
                .arg("worker")
                .env("DATABASE_URL", url)
                .env("NOTIFYD_CONCURRENCY", args.concurrency.to_string())
                .env("NOTIFYD_FETCH_BATCH", args.fetch_batch.to_string())
                .env("NOTIFYD_STORE_BATCH", args.store_batch.to_string())
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

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
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

async fn processed(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM notify.events WHERE outcome IS NOT NULL")
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
    sqlx::query("ANALYZE").execute(pool).await?;

    let started = Instant::now();
    let mut workers = spawn_workers(url, args)?;
    let target = args.events as i64;
    let deadline = started + Duration::from_secs(1800);
    loop {
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
        "SELECT EXTRACT(EPOCH FROM max(processed_at) - min(processed_at))::float8 FROM notify.events",
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

async fn latency(
    pool: &PgPool,
    url: &str,
    args: &BenchArgs,
) -> anyhow::Result<(u64, Option<f64>, Option<f64>, Option<f64>)> {
    let first_id: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM notify.events")
        .fetch_one(pool)
        .await?;
    let producers = db::connect(url, 16, "notifyd-bench-producer").await?;
    let total = args.rate * args.latency_secs;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let p = producers.clone();
        let users = args.users;
        tasks.spawn(async move {
            sqlx::query(
                "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', $2)",
            )
            .bind(format!("lat{}", i % users))
            .bind(format!("Latency probe {i}"))
            .execute(&p)
            .await
        });
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notify.events WHERE id > $1 AND outcome IS NULL",
        )
        .bind(first_id)
        .fetch_one(pool)
        .await?;
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producers.close().await;
    let (n, p50, p99, max): (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                max(ms)
         FROM (SELECT EXTRACT(EPOCH FROM n.created_at - e.created_at)::float8 * 1000 AS ms
               FROM notify.events e JOIN notify.notifications n ON n.event_id = e.id
               WHERE e.id > $1) AS l",
    )
    .bind(first_id)
    .fetch_one(pool)
    .await?;
    eprintln!(
        "  latency: {n} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50.unwrap_or(f64::NAN),
        p99.unwrap_or(f64::NAN),
        max.unwrap_or(f64::NAN)
    );
    Ok((n as u64, p50, p99, max))
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
        "notifyd bench ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  workers: {} replica(s), concurrency {}, fetch batch {}, store batch {}, store flushers {}",
        r.replicas, r.concurrency, r.fetch_batch, r.store_batch, r.store_flushers
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
        "  latency at {} events/s ({} events): p50 {} ms, p99 {} ms, max {} ms",
        r.latency_rate,
        r.latency_events,
        f(r.latency_p50_ms),
        f(r.latency_p99_ms),
        f(r.latency_max_ms)
    );
    println!(
        "  worker peak RSS (MiB):        {:?}",
        r.worker_peak_rss_mib
    );
    println!("JSON {}", serde_json::to_string(r).unwrap_or_default());
}
