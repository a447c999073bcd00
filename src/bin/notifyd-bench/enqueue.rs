//! The enqueue cost phase (`--enqueue-secs`): what the backend's INSERT pays for the queue.
//!
//! The method, pinned: `pgbench -n -M prepared`, 4 clients and 4 threads, one single-row
//! INSERT per transaction, the server's own settings (so `synchronous_commit` as the
//! backend gets it: on by default), for `--enqueue-secs` per measurement. The same row goes
//! into `notify.events` (constraints, trigger, queue row) and into a plain table with the
//! same columns and a primary key only, alternating, `--enqueue-rounds` rounds (the order
//! flips each round), both tables emptied before every measurement. No worker runs. Printed:
//! every measurement, the medians and their ratio.

use std::process::{Command, Stdio};

use anyhow::Context;
use sqlx::PgPool;

const PLAIN_TABLE: &str = "CREATE TABLE IF NOT EXISTS public.bench_plain_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         text NOT NULL,
    event_type      text NOT NULL,
    body            text NOT NULL,
    link            text,
    idempotency_key text,
    run_at          timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    outcome         text,
    outcome_reason  text,
    processed_at    timestamptz
)";

const CLIENTS: u32 = 4;

/// What the phase measured: transactions per second.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct EnqueueCost {
    pub events_tps: Vec<f64>,
    pub plain_tps: Vec<f64>,
    pub events_median: f64,
    pub plain_median: f64,
    /// `events_median / plain_median`.
    pub ratio: f64,
    pub synchronous_commit: String,
}

pub async fn run(pool: &PgPool, url: &str, secs: u64, rounds: u32) -> anyhow::Result<EnqueueCost> {
    sqlx::query(PLAIN_TABLE).execute(pool).await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(pool)
        .await?;
    let dir = std::env::temp_dir();
    let script = |table: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join(format!(
            "notifyd-enqueue-{}-{}.sql",
            table.replace('.', "_"),
            std::process::id()
        ));
        std::fs::write(
            &path,
            format!(
                "\\set u random(1, 1000)\n\
                 INSERT INTO {table} (user_id, event_type, body, link) \
                 VALUES (:u::text, 'new_message', 'You have a new message from Alice', '/messages/1');\n"
            ),
        )?;
        Ok(path)
    };
    let events_script = script("notify.events")?;
    let plain_script = script("public.bench_plain_events")?;
    let mut cost = EnqueueCost {
        synchronous_commit,
        ..Default::default()
    };
    for round in 0..rounds {
        let order: [(&str, &std::path::Path); 2] = if round % 2 == 0 {
            [("events", &events_script), ("plain", &plain_script)]
        } else {
            [("plain", &plain_script), ("events", &events_script)]
        };
        for (name, path) in order {
            sqlx::raw_sql(
                "TRUNCATE notify.events, notify.queue_0, notify.queue_1, notify.queue_2,
                          notify.queue_3, notify.queue_later, public.bench_plain_events",
            )
            .execute(pool)
            .await?;
            let tps = pgbench(url, path, secs)?;
            eprintln!("  enqueue round {} {name:<6} {tps:>8.0} tps", round + 1);
            match name {
                "events" => cost.events_tps.push(tps),
                _ => cost.plain_tps.push(tps),
            }
        }
    }
    let _ = std::fs::remove_file(&events_script);
    let _ = std::fs::remove_file(&plain_script);
    sqlx::raw_sql(
        "TRUNCATE notify.events, notify.queue_0, notify.queue_1, notify.queue_2, notify.queue_3,
                  notify.queue_later;
         DROP TABLE public.bench_plain_events",
    )
    .execute(pool)
    .await?;
    cost.events_median = median(&cost.events_tps);
    cost.plain_median = median(&cost.plain_tps);
    cost.ratio = cost.events_median / cost.plain_median;
    eprintln!(
        "  enqueue: notify.events {:.0} tps, plain table {:.0} tps (medians of {rounds}): {:.2} x \
         (synchronous_commit {})",
        cost.events_median, cost.plain_median, cost.ratio, cost.synchronous_commit
    );
    Ok(cost)
}

fn pgbench(url: &str, script: &std::path::Path, secs: u64) -> anyhow::Result<f64> {
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-f"])
        .arg(script)
        .args(["-c", &CLIENTS.to_string(), "-j", &CLIENTS.to_string()])
        .args(["-T", &secs.to_string()])
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .context(
            "cannot run pgbench (install the postgresql-client or postgresql-contrib package)",
        )?;
    anyhow::ensure!(out.status.success(), "pgbench failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .context("pgbench printed no tps")
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
