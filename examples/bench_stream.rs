//! The load generator of `scripts/bench-stream.sh`; not part of the product (an example,
//! built only by the benchmark, so it may use the dev-dependencies' HTTP client).
//!
//! * `latency`: opens one SSE stream per user, then enqueues events with plain SQL
//!   `INSERT INTO notify.events` at a steady rate, round-robin over the users, each body
//!   carrying the time just before its INSERT. Every stream measures enqueue → receipt
//!   for each event it gets; prints the count, p50, p99 and max, and checks that every
//!   event arrived exactly once.
//! * `idle`: opens N streams for N users and holds them (draining heartbeats), printing
//!   the serve process's resident memory before, once all are open, and after holding.
//!
//! Tokens are signed with `NOTIFYD_JWT_SECRET`, as `notifyd token` does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use tokio::sync::Semaphore;

#[derive(Parser)]
struct Cli {
    /// Base URL of the serve process, e.g. http://127.0.0.1:18081.
    #[arg(long)]
    base: String,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Latency {
        #[arg(long, env = "BENCH_DB_URL")]
        database_url: String,
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Events per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        secs: u32,
    },
    Idle {
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Pid of the serve process (for its RSS).
        #[arg(long)]
        pid: u32,
        /// Seconds to hold the streams open before the last RSS reading.
        #[arg(long, default_value_t = 20)]
        hold_secs: u64,
    },
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

fn mint(secret: &str, sub: &str) -> anyhow::Result<String> {
    let exp = (now_micros() / 1_000_000) as u64 + 7200;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("no process {pid}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Open a stream for `user`: 200 and the first frame (the retry hint) received.
async fn open(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> anyhow::Result<reqwest::Response> {
    let mut r = http
        .get(format!("{base}/api/notifications/stream"))
        .bearer_auth(token)
        .send()
        .await?;
    ensure!(r.status() == 200, "stream answered {}", r.status());
    r.chunk().await?.context("the stream ended at once")?;
    Ok(r)
}

/// Open one stream per user, `concurrency` at a time.
async fn open_all(
    http: &reqwest::Client,
    base: &str,
    users: &[String],
    secret: &str,
    concurrency: usize,
) -> anyhow::Result<Vec<reqwest::Response>> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(users.len());
    for user in users {
        let (http, base, gate) = (http.clone(), base.to_owned(), gate.clone());
        let token = mint(secret, user)?;
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            open(&http, &base, &token).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

#[derive(Default)]
struct Seen {
    latencies_us: Vec<i64>,
    per_user: HashMap<String, usize>,
    duplicates: usize,
    ids: std::collections::HashSet<i64>,
}

/// Read a stream's events until it ends; record each `bench <micros>` body's latency.
async fn read_events(
    mut r: reqwest::Response,
    user: String,
    seen: Arc<Mutex<Seen>>,
    received: Arc<AtomicUsize>,
) {
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        let at = now_micros();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(n) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            let sent = n["body"]
                .as_str()
                .and_then(|b| b.strip_prefix("bench "))
                .and_then(|t| t.parse::<i64>().ok());
            let id = n["id"].as_i64().unwrap_or(-1);
            let mut s = seen.lock().unwrap();
            if !s.ids.insert(id) {
                s.duplicates += 1;
                continue;
            }
            if let Some(sent) = sent {
                s.latencies_us.push(at - sent);
            }
            *s.per_user.entry(user.clone()).or_default() += 1;
            received.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

async fn latency(
    cli: &Cli,
    database_url: &str,
    users: usize,
    rate: u32,
    secs: u32,
    secret: &str,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let names: Vec<String> = (0..users).map(|i| format!("bench-{i}")).collect();
    let started = Instant::now();
    let streams = open_all(&http, &cli.base, &names, secret, cli.open_concurrency).await?;
    eprintln!(
        "opened {} streams in {:.1} s",
        streams.len(),
        started.elapsed().as_secs_f64()
    );
    let seen = Arc::new(Mutex::new(Seen::default()));
    let received = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = streams
        .into_iter()
        .zip(&names)
        .map(|(r, u)| tokio::spawn(read_events(r, u.clone(), seen.clone(), received.clone())))
        .collect();

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(database_url)
        .await?;
    let total = rate as usize * secs as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inserts = Vec::with_capacity(total);
    let load_started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let (pool, user) = (pool.clone(), names[i % users].clone());
        inserts.push(tokio::spawn(async move {
            let body = format!("bench {}", now_micros());
            sqlx::query(
                "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', $2)",
            )
            .bind(user)
            .bind(body)
            .execute(&pool)
            .await
        }));
    }
    for i in inserts {
        i.await??;
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in readers {
        r.abort();
    }
    let mut s = seen.lock().unwrap();
    s.latencies_us.sort_unstable();
    let got = s.latencies_us.len();
    // Round-robin: with at least as many events as users, every user got some.
    let starved = names
        .iter()
        .take(total)
        .filter(|u| !s.per_user.contains_key(*u))
        .count();
    println!(
        "RESULT {total} {got} {} {:.1} {:.3} {:.3} {:.3} {}",
        s.duplicates,
        total as f64 / load_secs,
        percentile(&s.latencies_us, 50.0),
        percentile(&s.latencies_us, 99.0),
        percentile(&s.latencies_us, 100.0),
        starved,
    );
    if got != total || s.duplicates > 0 {
        bail!(
            "{got} of {total} events received, {} duplicates",
            s.duplicates
        );
    }
    Ok(())
}

async fn idle(
    cli: &Cli,
    streams: usize,
    pid: u32,
    hold_secs: u64,
    secret: &str,
) -> anyhow::Result<()> {
    let before = rss_kib(pid)?;
    let http = reqwest::Client::new();
    let names: Vec<String> = (0..streams).map(|i| format!("idle-{i}")).collect();
    let started = Instant::now();
    let open = open_all(&http, &cli.base, &names, secret, cli.open_concurrency).await?;
    let open_secs = started.elapsed().as_secs_f64();
    let opened = rss_kib(pid)?;
    // Drain heartbeats, as a real client would.
    let ended = Arc::new(AtomicUsize::new(0));
    let drains: Vec<_> = open
        .into_iter()
        .map(|mut r| {
            let ended = ended.clone();
            tokio::spawn(async move {
                while let Ok(Some(_)) = r.chunk().await {}
                ended.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let held = rss_kib(pid)?;
    let ended = ended.load(Ordering::Relaxed);
    println!("RESULT {streams} {open_secs:.1} {before} {opened} {held} {ended}");
    for d in drains {
        d.abort();
    }
    ensure!(ended == 0, "{ended} streams ended while held");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let secret = std::env::var("NOTIFYD_JWT_SECRET").context("set NOTIFYD_JWT_SECRET")?;
    match &cli.command {
        Mode::Latency {
            database_url,
            users,
            rate,
            secs,
        } => latency(&cli, database_url, *users, *rate, *secs, &secret).await,
        Mode::Idle {
            streams,
            pid,
            hold_secs,
        } => idle(&cli, *streams, *pid, *hold_secs, &secret).await,
    }
}
