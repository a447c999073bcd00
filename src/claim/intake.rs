//! The intake: workers take committed events into the queue, when the queue is fed that
//! way (`notify.intake.mode = 'intake'`, migration `20261208000001_intake.sql`).
//!
//! Why: the enqueue trigger wrote each job in the backend's own transaction, and the
//! backend's single-row INSERT paid for it (0.6-0.7 x a plain table's, BENCHMARKS.md "The
//! backend's INSERT"). With the intake the INSERT writes the event row alone; the row,
//! with the id of the transaction that wrote it (`notify.events.txid`), is the job until a
//! worker copies it into the current slot. So "the job exists if and only if the event
//! committed" is the event row's own guarantee. The design and the measurements are in
//! docs/INTAKE.md.
//!
//! Invariants (`notify.take_in_step`):
//! * **Exactly once.** A step takes the events of the transactions visible in a snapshot
//!   taken after the intake lock and not in the previous step's; the queue rows and the
//!   new position commit in one transaction, one replica at a time (an advisory lock; the
//!   others skip). A rolled-back step changes nothing.
//! * **No walk past a held transaction.** Events are found by index, by ranges of
//!   transaction ids around the ones still in progress, so a transaction held open (read
//!   or write) costs nothing per step, and the position is a row appended per step, never
//!   an updated one (whose versions a held snapshot would keep for every reader to walk).
//! * **Small transactions first.** A transaction with `chunk` rows or more in one call
//!   (a broadcast) is taken in `chunk` rows per call after the small ones, so interactive
//!   events committed after it wait one call, not the whole broadcast.
//!
//! Who calls it: every worker, in [`run`], every poll interval and at once again while it
//! reports more, waking the idle claim loops of its process ([`taken_in`]) when it took
//! events in; and [`super::Processor::run_once`] before each claim (the step tests drive).
//! In trigger mode a call returns at once.

use std::sync::LazyLock;
use std::time::Duration;

use metrics::counter;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::db;
use crate::telemetry::series;

/// Most rows of small transactions one call takes in.
pub const MAX_ROWS: i32 = 2000;

/// Rows per call of a big transaction, and the size at which a transaction counts as big.
pub const CHUNK: i32 = 500;

/// Woken when this process's intake has taken events in, so that an idle claim loop
/// claims them at once instead of at its next poll.
static TAKEN_IN: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Wait until this process's intake takes events in (an idle claim loop's wake-up; it
/// polls as well, for what another replica took in).
pub async fn taken_in() {
    TAKEN_IN.notified().await
}

/// What one call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Events copied into the queue.
    pub rows: u64,
    /// More is waiting to be taken in right away (a step under way, or a big transaction).
    pub more: bool,
}

/// One call of `notify.take_in()`.
pub async fn take_in(pool: &PgPool) -> Result<Taken, sqlx::Error> {
    let (rows, more): (i32, bool) = db::fetch_optional(
        pool,
        sqlx::query_as("SELECT taken, more FROM notify.take_in($1, $2)")
            .bind(MAX_ROWS)
            .bind(CHUNK),
    )
    .await?
    .ok_or(sqlx::Error::RowNotFound)?;
    let taken = Taken {
        rows: rows.max(0) as u64,
        more,
    };
    if taken.rows > 0 {
        counter!(series::INTAKE_EVENTS).increment(taken.rows);
        TAKEN_IN.notify_waiters();
    }
    Ok(taken)
}

/// Take in until nothing more is waiting right away; the rows taken in.
pub async fn take_in_all(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut rows = 0;
    loop {
        let t = take_in(pool).await?;
        rows += t.rows;
        if !t.more {
            return Ok(rows);
        }
    }
}

/// Take in every `every` while the worker runs, and at once again while more waits. A call
/// that fails (the database is away) is logged and the next one tries again.
pub async fn run(pool: PgPool, every: Duration) {
    let mut failures: u32 = 0;
    loop {
        match take_in(&pool).await {
            Ok(t) => {
                failures = 0;
                if t.more {
                    continue;
                }
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "the intake failed; retrying");
                }
                let backoff = (every * failures.min(100)).min(Duration::from_secs(5));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// How the queue is fed: `trigger` or `intake`.
pub async fn mode(pool: &PgPool) -> Result<String, sqlx::Error> {
    let (mode,): (String,) =
        db::fetch_optional(pool, sqlx::query_as("SELECT mode FROM notify.intake"))
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
    Ok(mode)
}

/// Switch how the queue is fed (`notifyd queue enqueue-by`); see `notify.enqueue_by()`.
/// Runs as the owner of `notify.events`.
pub async fn switch(pool: &PgPool, to: &str) -> Result<String, sqlx::Error> {
    let (mode,): (String,) = db::fetch_optional(
        pool,
        sqlx::query_as("SELECT notify.enqueue_by($1)").bind(to),
    )
    .await?
    .ok_or(sqlx::Error::RowNotFound)?;
    Ok(mode)
}
