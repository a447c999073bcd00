//! Steady-rate phases: events inserted one per transaction at a fixed rate, each for a user
//! of its own, timed from just before the INSERT is sent to the moment the bench hears the
//! worker's post-commit announcement for that user. The plain latency phase, the held
//! transaction phase (`--hold-secs`) and the broadcast phase (`--broadcast`) are all this,
//! with something else going on beside it.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::{Connection, PgConnection, PgPool};

use notifyd::contract::ANNOUNCE_CHANNEL;
use notifyd::db;

/// Latency figures of one steady run, in milliseconds.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Latencies {
    pub events: u64,
    /// Client side: from just before the producer sends its INSERT to the moment the
    /// bench hears the worker's commit announcement for that user (the notification is
    /// committed, hence readable, by then).
    pub readable: Option<Percentiles>,
    /// Database clock: notification stamp minus event stamp (excludes the commit).
    pub stamp: Option<Percentiles>,
    /// Client side: the producer's INSERT, from sending it to its commit acknowledged.
    pub insert: Option<Percentiles>,
    /// Client side: from the INSERT's commit acknowledged to readable.
    pub after_insert: Option<Percentiles>,
    /// Readable latency per minute of the run (by when the probe was sent).
    pub per_minute: Vec<Percentiles>,
    /// Probes never heard as readable within two minutes of the end.
    pub unheard: u64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn show_percentiles(p: Option<Percentiles>) -> String {
    p.map_or("-".to_owned(), |p| {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p.p50, p.p99, p.max
        )
    })
}

pub fn percentiles(mut ms: Vec<f64>) -> Option<Percentiles> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    Some(Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        max: ms[ms.len() - 1],
    })
}

/// One steady run.
pub struct Steady<'a> {
    pub rate: u64,
    pub secs: u64,
    pub event_type: &'static str,
    /// Probe users are `<label><n>`: unique per run, so each announcement names one probe.
    pub label: &'a str,
    pub csv: Option<&'a std::path::Path>,
}

/// Run one steady phase against the workers already running.
pub async fn run(pool: &PgPool, url: &str, s: &Steady<'_>) -> anyhow::Result<Latencies> {
    let first_id: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM notify.events")
        .fetch_one(pool)
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(ANNOUNCE_CHANNEL).await?;
    let (stop_listening, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let prefix = s.label.to_owned();
    let heard = tokio::spawn(async move {
        let mut first_heard: std::collections::HashMap<u64, Instant> = Default::default();
        loop {
            let n = tokio::select! {
                n = listener.try_recv() => n,
                _ = &mut stop_rx => break,
            };
            let Ok(Some(n)) = n else { break };
            let at = Instant::now();
            if let Ok(pairs) = serde_json::from_str::<Vec<(String, i64)>>(n.payload()) {
                for (user, _) in pairs {
                    if let Some(i) = user.strip_prefix(&prefix).and_then(|i| i.parse().ok()) {
                        first_heard.entry(i).or_insert(at);
                    }
                }
            }
        }
        first_heard
    });

    const PRODUCER_CONNECTIONS: u32 = 16;
    let producers = db::connect(url, PRODUCER_CONNECTIONS, "notifyd-bench-producer").await?;
    // Open every producer connection before the clock starts, as a running backend's pool
    // would be: otherwise the first second measures connection set-up (up to 160 ms).
    drop(
        futures::future::try_join_all((0..PRODUCER_CONNECTIONS).map(|_| producers.acquire()))
            .await?,
    );
    let total = s.rate * s.secs;
    let interval = Duration::from_secs_f64(1.0 / s.rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Per probe: when its INSERT was sent, and when its commit was acknowledged.
    let mut sent: Vec<Option<(Instant, Instant)>> = vec![None; total as usize];
    let mut record =
        |r: Result<Result<(u64, Instant, Instant), sqlx::Error>, tokio::task::JoinError>| {
            let (i, at, committed) = r??;
            sent[i as usize] = Some((at, committed));
            Ok::<(), anyhow::Error>(())
        };
    let insert = format!(
        "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, '{}', $2)",
        s.event_type
    );
    for i in 0..total {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let p = producers.clone();
        let user = format!("{}{i}", s.label);
        let sql = insert.clone();
        tasks.spawn(async move {
            let at = Instant::now();
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(user)
                .bind(format!("Latency probe {i}"))
                .execute(&p)
                .await
                .map(|_| (i, at, Instant::now()))
        });
        while let Some(r) = tasks.try_join_next() {
            record(r)?;
        }
    }
    while let Some(r) = tasks.join_next().await {
        record(r)?;
    }
    // Wait for the probes (not for anything else enqueued meanwhile) to have an outcome.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notify.event_outcomes
             WHERE event_id > $1 AND outcome IS NULL AND user_id LIKE $2 || '%'",
        )
        .bind(first_id)
        .bind(s.label)
        .fetch_one(pool)
        .await?;
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producers.close().await;
    // The last announcements are already on their way once every probe has an outcome.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_listening.send(());
    let first_heard = heard.await.unwrap_or_default();

    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
    let mut readable = Vec::new();
    let mut insert = Vec::new();
    let mut after_insert = Vec::new();
    let mut minutes: Vec<Vec<f64>> = Vec::new();
    let mut unheard = 0;
    let mut csv = String::from("event,sent_ms,insert_ms,readable_ms\n");
    for (i, probe) in sent.iter().enumerate() {
        let Some((at, committed)) = *probe else {
            continue;
        };
        insert.push(ms(at, committed));
        let heard = first_heard.get(&(i as u64)).copied();
        let sent_ms = ms(start.into_std(), at);
        match heard {
            Some(heard) => {
                readable.push(ms(at, heard));
                after_insert.push(ms(committed, heard));
                let minute = (sent_ms / 60_000.0) as usize;
                if minutes.len() <= minute {
                    minutes.resize_with(minute + 1, Vec::new);
                }
                minutes[minute].push(ms(at, heard));
            }
            None => unheard += 1,
        }
        if s.csv.is_some() {
            csv.push_str(&format!(
                "{i},{sent_ms:.2},{:.2},{}\n",
                ms(at, committed),
                heard.map_or("-1".to_owned(), |h| format!("{:.2}", ms(at, h)))
            ));
        }
    }
    if let Some(path) = s.csv {
        std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let stamps: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM n.created_at - e.created_at)::float8 * 1000
         FROM notify.events e JOIN notify.notifications n ON n.event_id = e.id
         WHERE e.id > $1 AND e.user_id LIKE $2 || '%'",
    )
    .bind(first_id)
    .bind(s.label)
    .fetch_all(pool)
    .await?;
    let out = Latencies {
        events: total,
        readable: percentiles(readable),
        stamp: percentiles(stamps),
        insert: percentiles(insert),
        after_insert: percentiles(after_insert),
        per_minute: minutes.into_iter().filter_map(percentiles).collect(),
        unheard,
    };
    eprintln!(
        "  {}: {total} events at {}/s, {unheard} unheard; enqueue to readable: {}; of which the \
         INSERT: {}; its commit to readable: {}; db stamps: {}",
        s.label,
        s.rate,
        show_percentiles(out.readable),
        show_percentiles(out.insert),
        show_percentiles(out.after_insert),
        show_percentiles(out.stamp)
    );
    Ok(out)
}

/// A snapshot held open on its own connection: `BEGIN ISOLATION LEVEL REPEATABLE READ`
/// and one read, then nothing until [`Hold::release`], as a report or a forgotten `psql`
/// session would. While it is open, no row version deleted after it began can be removed.
pub struct Hold {
    conn: PgConnection,
    pub pid: i32,
}

impl Hold {
    pub async fn open(url: &str) -> anyhow::Result<Hold> {
        let mut conn = PgConnection::connect(url).await?;
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut conn)
            .await?;
        let pid: i32 = sqlx::query_scalar(
            "SELECT pg_backend_pid() FROM (SELECT count(*) FROM notify.events) AS snapshot",
        )
        .fetch_one(&mut conn)
        .await?;
        Ok(Hold { conn, pid })
    }

    pub async fn release(mut self) -> anyhow::Result<()> {
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await?;
        self.conn.close().await?;
        Ok(())
    }
}

/// One sample of the queue during a held or broadcast phase.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueSample {
    pub secs: f64,
    /// Jobs waiting (due or not); counted only where asked (a count reads every row).
    pub backlog: Option<i64>,
    /// Whether a job of a type with priority 0 or lower waits (a broadcast's `system_alert`).
    pub low_priority_left: bool,
    /// Dead tuples in the queue's slot tables, as the statistics collector counts them.
    pub slot_dead: i64,
    /// The slots' states, `current/draining/drained/clean` counts.
    pub slots: String,
}

/// Sample the queue every `every` until `stop` is set; `count` also counts the backlog.
pub fn sample_queue(
    pool: PgPool,
    every: Duration,
    count: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<QueueSample>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut out = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let secs = started.elapsed().as_secs_f64();
            let row: Result<(Option<i64>, bool, i64, String), sqlx::Error> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT CASE WHEN $1 THEN (SELECT count(*) FROM notify.queue) END,
                            ({}),
                            (SELECT COALESCE(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables
                             WHERE schemaname = 'notify' AND relname ~ '^queue_[0-9]$'),
                            (SELECT string_agg(state, ',' ORDER BY slot) FROM notify.queue_slots)",
                    super::LOW_PRIORITY_LEFT
                )))
                .bind(count)
                .fetch_one(&pool)
                .await;
            if let Ok((backlog, low_priority_left, slot_dead, slots)) = row {
                out.push(QueueSample {
                    secs,
                    backlog,
                    low_priority_left,
                    slot_dead,
                    slots,
                });
            }
            tokio::time::sleep(every).await;
        }
        out
    })
}
