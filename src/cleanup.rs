//! Retention and table hygiene: `notifyd cleanup`, and the worker's periodic loop.
//!
//! Every delete is bounded (`batch` rows per statement, repeated until a statement
//! deletes fewer), uses `SKIP LOCKED` so replicas running it at once do not wait on each
//! other, and never holds a long lock on a hot table. Each finds its rows by key
//! (`id = ANY(ARRAY(subquery))`, or `ctid` where the key has two columns): written as a
//! join of the table with a CTE, Postgres hashes a sequential scan of the whole table,
//! which makes every bounded delete cost O(table).
//!
//! What goes, and when:
//! * failed jobs (`notify.queue_dead`: refused, or out of attempts): after the retention
//!   window, so operators can inspect them until then (finished jobs are deleted with their
//!   outcome, and drained queue slots truncated, by the worker itself);
//! * processed events (an outcome on the row, or a notification), then notifications,
//!   older than the retention window (7 days by default); an event that never got an
//!   outcome is kept twice as long, for inspection;
//! * `notify.rate_windows` rows with no stamp, or whose newest stamp is older than the
//!   longest rate window the worker accepts (7 days), in the total and in the per-type
//!   entries (a row of critical deliveries only has none in the total): they can no longer
//!   change a decision;
//! * `apalis.workers` rows of workers silent for a day;
//! * dead tuples: [`vacuum_if_needed`] vacuums the queue and event tables when autovacuum
//!   has let dead tuples pile up (or is off), so they stay bounded either way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::types::PgInterval;

use crate::contract::QUEUE;
use crate::db;

/// What a pass deletes.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Notifications, events and failed jobs older than this are deleted.
    pub keep: Duration,
    /// Rows deleted per statement.
    pub batch: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: Duration::from_secs(7 * 24 * 3600),
            batch: 5000,
        }
    }
}

/// Rows deleted by one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub failed_jobs: u64,
    pub notifications: u64,
    pub events: u64,
    pub rate_windows: u64,
    pub workers: u64,
}

fn interval(d: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// One full pass.
pub async fn run_once(pool: &PgPool, retention: Retention) -> Result<Report, sqlx::Error> {
    let keep = interval(retention.keep);
    let batch = retention.batch;
    let failed_jobs = repeat(batch, || {
        db::execute(
            pool,
            sqlx::query(
                "DELETE FROM notify.queue_dead
             WHERE event_id = ANY(ARRAY(
                 SELECT event_id FROM notify.queue_dead
                 WHERE failed_at < now() - $1::interval
                 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            )
            .bind(keep)
            .bind(batch),
        )
    })
    .await?;
    // Events before notifications: deleting a notification whose event row still exists
    // writes `stored` on the event row (trigger `notifications_keep_outcome`), which
    // would be wasted on rows about to go. An event is processed when it has an outcome
    // or a notification (a stored event's record).
    let events = repeat(batch, || {
        db::execute(
            pool,
            sqlx::query(
                "DELETE FROM notify.events
             WHERE id = ANY(ARRAY(
                 SELECT e.id FROM notify.events AS e
                 WHERE (e.created_at < now() - $1::interval
                        AND (e.outcome IS NOT NULL
                             OR (SELECT n.event_id FROM notify.notifications AS n
                                 WHERE n.event_id = e.id) IS NOT NULL))
                    OR e.created_at < now() - 2 * $1::interval
                 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            )
            .bind(keep)
            .bind(batch),
        )
    })
    .await?;
    let notifications = repeat(batch, || {
        db::execute(
            pool,
            sqlx::query(
                "DELETE FROM notify.notifications
             WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM notify.notifications
                 WHERE created_at < now() - $1::interval
                 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            )
            .bind(keep)
            .bind(batch),
        )
    })
    .await?;
    // The store takes its per-user lock on these rows (inserting an empty one for a new
    // user) and upserts them; a row deleted here held only stamps that no window can reach,
    // or none, so the next batch for that user simply starts a new one. Rows locked by a
    // batch in flight are skipped.
    let rate_windows = repeat(batch, || {
        db::execute(
            pool,
            sqlx::query(
                "DELETE FROM notify.rate_windows
             WHERE user_id = ANY(ARRAY(
                 SELECT user_id FROM notify.rate_windows
                 WHERE (stamps[1] IS NULL OR stamps[1] < now() - interval '7 days')
                   AND (type_stamps[1] IS NULL OR type_stamps[1] < now() - interval '7 days')
                 LIMIT $1 FOR UPDATE SKIP LOCKED))",
            )
            .bind(batch),
        )
    })
    .await?;
    let workers = db::execute(
        pool,
        sqlx::query(
            "DELETE FROM apalis.workers AS w
             WHERE w.worker_type = $1 AND w.last_seen < now() - interval '1 day'",
        )
        .bind(QUEUE),
    )
    .await?
    .rows_affected();
    Ok(Report {
        failed_jobs,
        notifications,
        events,
        rate_windows,
        workers,
    })
}

/// Run a bounded delete until it deletes less than a full batch.
async fn repeat<F, Fut>(batch: i64, mut statement: F) -> Result<u64, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<sqlx::postgres::PgQueryResult, sqlx::Error>>,
{
    let mut total = 0;
    loop {
        let n = statement().await?.rows_affected();
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// The tables whose dead tuples the worker watches: the queue's table of jobs not due yet
/// (its slot tables are truncated instead, see `claim::rotation`), and the tables that every
/// event updates or inserts into.
pub const VACUUMED_TABLES: [(&str, &str); 4] = [
    ("notify", "queue_later"),
    ("notify", "events"),
    ("notify", "notifications"),
    ("notify", "rate_windows"),
];

/// Advisory lock key (class "notf", key 2) held while one replica vacuums, so that replicas
/// do not vacuum the same table at once.
const VACUUM_LOCK: (i32, i32) = (0x6e6f_7466, 2);

/// Said once per process: the vacuum safety net cannot run for a role that does not own
/// the tables.
static NOT_OWNER_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Vacuum the watched tables whose dead tuples exceed `max(min_dead, live / 4)`, once
/// (a [`VacuumNet`] with no memory of earlier passes; the worker keeps one).
pub async fn vacuum_if_needed(pool: &PgPool, min_dead: i64) -> Result<Vec<String>, sqlx::Error> {
    VacuumNet::new(VACUUM_BACKOFF).run(pool, min_dead).await
}

/// How long the safety net first leaves a table alone after a VACUUM that could not
/// remove its dead tuples; doubled after each such VACUUM, up to [`VACUUM_BACKOFF_MAX`].
pub const VACUUM_BACKOFF: Duration = Duration::from_secs(60);
pub const VACUUM_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The dead-tuple safety net, with its memory between passes.
///
/// Autovacuum normally keeps the watched tables bounded, but it can be off (it is on some
/// servers, and then the queue table grows by ~3 dead tuples per job: 1.9 million after a
/// 10-minute soak at 1,000 events/s, see BENCHMARKS.md) or lag behind a burst. This is the
/// safety net: a cheap statistics check, and a plain `VACUUM (SKIP_LOCKED)` (no exclusive
/// lock; readers and writers carry on) when it is needed.
///
/// A VACUUM cannot remove tuples that an open transaction may still see. While one holds
/// the horizon back, every pass would find the table over its threshold again and scan it
/// for nothing: measured, 41 VACUUMs of `notify.rate_windows` in a 30-minute hold, each
/// longer than the last (1.1 s to 3.9 s). So a VACUUM that leaves at least half of the dead
/// tuples it was called for puts its table on hold, for [`VACUUM_BACKOFF`] doubling to
/// [`VACUUM_BACKOFF_MAX`]; one that removes them takes it off. After the transaction ends,
/// the next try comes within that maximum.
///
/// It needs the table's owner (Postgres 15 has no VACUUM privilege), normally the role that
/// migrated. A worker running as a least-privilege role (`notifyd grants`) is not the
/// owner: it skips the tables it does not own and says so once (autovacuum, which a managed
/// server always runs, is then the only one). Replicas take an advisory lock so that they
/// do not vacuum at once; through a transaction pooler a session lock cannot be held across
/// statements, so there they rely on `SKIP_LOCKED` alone (a second VACUUM of the same table
/// skips it).
#[derive(Debug)]
pub struct VacuumNet {
    backoff: Duration,
    /// Tables on hold: until when, and the hold that set it.
    held: HashMap<&'static str, (Instant, Duration)>,
}

impl VacuumNet {
    /// A net whose first hold after a VACUUM that removed too little lasts `backoff`.
    pub fn new(backoff: Duration) -> Self {
        VacuumNet {
            backoff,
            held: HashMap::new(),
        }
    }

    /// One pass; returns the tables vacuumed.
    pub async fn run(&mut self, pool: &PgPool, min_dead: i64) -> Result<Vec<String>, sqlx::Error> {
        let pooled = db::pooler() == db::Pooler::Transaction;
        let mut vacuumed = Vec::new();
        let mut not_owned = Vec::new();
        for (schema, table) in VACUUMED_TABLES {
            if self
                .held
                .get(table)
                .is_some_and(|(until, _)| Instant::now() < *until)
            {
                continue;
            }
            let Some((dead, live, owner)) = table_stats(pool, schema, table).await? else {
                continue;
            };
            if dead < min_dead.max(live / 4) {
                continue;
            }
            let name = format!("{schema}.{table}");
            if !owner {
                not_owned.push(name);
                continue;
            }
            let started = Instant::now();
            let statement = format!("VACUUM (SKIP_LOCKED) {name}");
            let result = if pooled {
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(pool)
                    .await
                    .map(|_| true)
            } else {
                vacuum_locked(pool, statement).await
            };
            if !result? {
                continue;
            }
            let secs = started.elapsed().as_secs_f64();
            // VACUUM reports the tuples it could not remove as the table's dead tuples.
            let left = table_stats(pool, schema, table)
                .await?
                .map_or(0, |(d, _, _)| d);
            if left.saturating_mul(2) >= dead {
                let hold = self
                    .held
                    .get(table)
                    .map_or(self.backoff, |(_, h)| (*h * 2).min(VACUUM_BACKOFF_MAX));
                self.held.insert(table, (Instant::now() + hold, hold));
                tracing::info!(
                    table = %name,
                    dead_tuples = dead,
                    left,
                    secs,
                    next_try_secs = hold.as_secs(),
                    "vacuumed, but an open transaction keeps the dead tuples (notifyd status \
                     shows it); not again before the next try"
                );
            } else {
                self.held.remove(table);
                tracing::info!(
                    table = %name,
                    dead_tuples = dead,
                    live_tuples = live,
                    left,
                    secs,
                    "vacuumed (dead tuples were piling up; is autovacuum off?)"
                );
            }
            vacuumed.push(name);
        }
        if !not_owned.is_empty() && !NOT_OWNER_SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                tables = ?not_owned,
                "dead tuples are piling up, and the vacuum safety net needs the tables' owner, \
                 which this role is not: leaving them to autovacuum (check that it is on, or \
                 VACUUM these tables as their owner)"
            );
        }
        Ok(vacuumed)
    }
}

/// Dead and live tuples of a watched table, and whether this role may vacuum it (owns it).
async fn table_stats(
    pool: &PgPool,
    schema: &str,
    table: &str,
) -> Result<Option<(i64, i64, bool)>, sqlx::Error> {
    db::fetch_optional(
        pool,
        sqlx::query_as(
            "SELECT s.n_dead_tup, s.n_live_tup, pg_has_role(c.relowner, 'USAGE')
             FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
             WHERE s.schemaname = $1 AND s.relname = $2",
        )
        .bind(schema)
        .bind(table),
    )
    .await
}

/// The safety net's VACUUM pauses this long per `vacuum_cost_limit` of work, as autovacuum
/// does by default.
const VACUUM_COST_DELAY_MS: u32 = 2;

/// Run `statement` (a VACUUM) under the replicas' advisory lock, on one session; false if
/// another replica holds the lock.
async fn vacuum_locked(pool: &PgPool, statement: String) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(VACUUM_LOCK.0)
        .bind(VACUUM_LOCK.1)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(false);
    }
    // Throttled as autovacuum is (a manual VACUUM is not, by default): after a long-held
    // transaction ended, an unthrottled VACUUM of a million dead rows took the disk from
    // the enqueues and the store, and the first minute's p99 from 44 to 604 ms (measured).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET vacuum_cost_delay = '{VACUUM_COST_DELAY_MS}ms'"
    )))
    .execute(&mut *conn)
    .await?;
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(&mut *conn)
        .await;
    sqlx::raw_sql("RESET vacuum_cost_delay")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(VACUUM_LOCK.0)
        .bind(VACUUM_LOCK.1)
        .execute(&mut *conn)
        .await?;
    result.map(|_| true)
}
