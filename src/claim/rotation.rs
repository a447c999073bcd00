//! The rotation of the queue's slots: what keeps the claim from walking dead rows.
//!
//! A finished job's row is deleted, and while any transaction older than the delete is
//! open (a backend request left in a transaction, a report, `psql`), neither vacuum nor the
//! index scan itself can remove it or mark its index entry dead, so every claim visits it
//! again. The slot tables bound that walk: new jobs go to the `current` slot; every
//! `slot_secs` ([`crate::claim`]: `notify.queue_settings.slot_secs`, 10 s by default) a
//! `clean` slot takes over and the old one drains; a slot seen empty is `drained`, claims
//! stop touching it, and it is TRUNCATEd, which frees its dead rows whatever the horizon.
//! A claim therefore walks at most the dead rows of about two slot periods.
//!
//! One [`tick`] does, under a transaction-level advisory lock so that one replica at a time
//! rotates (the others skip the tick):
//! 1. move the jobs of `notify.queue_later` due within a slot period into the current slot;
//! 2. mark `draining` slots that are empty `drained`, and `clean` slots that hold jobs
//!    `draining` (an enqueue from an old REPEATABLE READ snapshot can write into one);
//! 3. make a `clean` slot current if the current one is older than `slot_secs`;
//! 4. truncate `drained` slots: `LOCK ... NOWAIT` (so that a claim or a late writer holding
//!    the table is never waited for, and nothing queues behind the lock), then, under the
//!    lock, check once more that the slot is empty (a writer that read the old current slot
//!    may have committed a job into it) and put it back to `draining` if not.
//!
//! Invariants: a job is never lost (a slot is truncated only while it is locked against
//! every writer and claim and seen empty under that lock), and a slot that cannot be
//! truncated (a transaction that wrote into it is still open, or `pg_dump` holds it) only
//! stays out of the rotation; the others keep rotating.

use std::time::Duration;

use sqlx::{PgPool, Row};

use super::backend::{SLOTS, on_slot};
use crate::db;

/// What one tick did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Whether this replica held the rotation lock (another one did otherwise).
    pub ran: bool,
    /// Jobs moved from `notify.queue_later` into the current slot.
    pub moved: u64,
    /// The slot that became current, if one did.
    pub rotated_to: Option<i16>,
    /// Slots truncated.
    pub truncated: u32,
    /// Drained slots that could not be locked (held by a transaction) this time.
    pub busy: u32,
}

/// The advisory lock key of the rotation (any constant both sides agree on).
const ROTATION_LOCK: i64 = 0x6e6f_7469_6679_0001;

/// Most jobs moved out of `notify.queue_later` per tick.
const MOVE_PER_TICK: i64 = 10_000;

/// One rotation step; see the module doc.
pub async fn tick(pool: &PgPool) -> Result<Tick, sqlx::Error> {
    let mut done = Tick::default();
    let mut tx = db::begin(pool).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .persistent(db::persistent())
        .bind(ROTATION_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        tx.rollback().await?;
        return Ok(done);
    }
    done.ran = true;
    let rows = sqlx::query(
        "SELECT q.slot, q.state, q.changed_at < now() - make_interval(secs => s.slot_secs),
                s.slot_secs
         FROM notify.queue_slots AS q, notify.queue_settings AS s ORDER BY q.slot",
    )
    .persistent(db::persistent())
    .fetch_all(&mut *tx)
    .await?;
    let mut current = None;
    let mut current_expired = false;
    let mut clean = Vec::new();
    let mut draining = Vec::new();
    let mut drained = Vec::new();
    let mut slot_secs = 10;
    for row in rows {
        let slot: i16 = row.try_get(0)?;
        let state: String = row.try_get(1)?;
        slot_secs = row.try_get(3)?;
        match state.as_str() {
            "current" => {
                current = Some(slot);
                current_expired = row.try_get(2)?;
            }
            "clean" => clean.push(slot),
            "draining" => draining.push(slot),
            _ => drained.push(slot),
        }
    }
    let Some(mut current) = current else {
        // Someone edited notify.queue_slots by hand: make slot 0 current again rather than
        // stop (the enqueue trigger sends jobs to queue_later meanwhile).
        tracing::error!("notify.queue_slots has no current slot; making slot 0 current");
        sqlx::query(
            "UPDATE notify.queue_slots SET state = 'current', changed_at = now() WHERE slot = 0",
        )
        .persistent(db::persistent())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(done);
    };

    for &slot in &draining {
        if slot_is_empty(&mut tx, slot).await? {
            set_state(&mut tx, slot, "drained").await?;
            drained.push(slot);
        }
    }
    // A clean slot holding jobs: an enqueue in a REPEATABLE READ or SERIALIZABLE
    // transaction reads `notify.queue_slots` as of its snapshot, so it may write into a
    // slot truncated since. Drain it (claims take it again) rather than leave its jobs
    // until its turn as current comes, which may be never.
    for slot in clean.clone() {
        if !slot_is_empty(&mut tx, slot).await? {
            tracing::warn!(
                slot,
                "a clean queue slot holds jobs (an enqueue from an old snapshot); draining it"
            );
            set_state(&mut tx, slot, "draining").await?;
            clean.retain(|&s| s != slot);
        }
    }
    if current_expired && let Some(&next) = clean.first() {
        set_state(&mut tx, current, "draining").await?;
        set_state(&mut tx, next, "current").await?;
        done.rotated_to = Some(next);
        current = next;
    }
    done.moved = sqlx::query(on_slot(
        "WITH due AS (
             DELETE FROM notify.queue_later
             WHERE event_id = ANY(ARRAY(
                 SELECT event_id FROM notify.queue_later
                 WHERE run_at <= now() + make_interval(secs => $1)
                 ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING event_id, priority, run_at, attempts
         )
         INSERT INTO notify.queue_{slot} (event_id, priority, run_at, attempts)
         SELECT event_id, priority, run_at, attempts FROM due",
        current,
    ))
    .persistent(db::persistent())
    .bind(slot_secs)
    .bind(MOVE_PER_TICK)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;

    for slot in drained {
        match truncate_if_empty(pool, slot).await? {
            Some(true) => done.truncated += 1,
            Some(false) => {}
            None => done.busy += 1,
        }
    }
    Ok(done)
}

/// Whether a slot table holds no job that this transaction can see. By the claim's index
/// (the first entry in its order; not `NOT EXISTS`, from which the planner drops the order
/// and scans the table): a sequential scan reads every finished job's dead row before the
/// first live one, and a draining slot is checked every tick.
async fn slot_is_empty(tx: &mut sqlx::PgConnection, slot: i16) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(on_slot(
        "SELECT (SELECT event_id FROM notify.queue_{slot}
                 ORDER BY priority DESC, run_at, event_id LIMIT 1) IS NULL",
        slot,
    ))
    .persistent(db::persistent())
    .fetch_one(&mut *tx)
    .await
}

async fn set_state(tx: &mut sqlx::PgConnection, slot: i16, state: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE notify.queue_slots SET state = $2, changed_at = now() WHERE slot = $1")
        .persistent(db::persistent())
        .bind(slot)
        .bind(state)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Truncate a drained slot if nobody holds it and it is still empty under the lock:
/// `Some(true)` truncated, `Some(false)` it had jobs after all (back to `draining`), `None`
/// busy (a transaction holds it; the next tick tries again).
async fn truncate_if_empty(pool: &PgPool, slot: i16) -> Result<Option<bool>, sqlx::Error> {
    debug_assert!(SLOTS.contains(&slot));
    let mut tx = db::begin(pool).await?;
    let locked = sqlx::query(on_slot(
        "LOCK TABLE notify.queue_{slot} IN ACCESS EXCLUSIVE MODE NOWAIT",
        slot,
    ))
    .persistent(false)
    .execute(&mut *tx)
    .await;
    match locked {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            tx.rollback().await?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let state: String =
        sqlx::query_scalar("SELECT state FROM notify.queue_slots WHERE slot = $1 FOR UPDATE")
            .persistent(db::persistent())
            .bind(slot)
            .fetch_one(&mut *tx)
            .await?;
    if state != "drained" {
        tx.rollback().await?;
        return Ok(Some(false));
    }
    let empty = slot_is_empty(&mut tx, slot).await?;
    if empty {
        sqlx::query(on_slot("TRUNCATE notify.queue_{slot}", slot))
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        set_state(&mut tx, slot, "clean").await?;
    } else {
        set_state(&mut tx, slot, "draining").await?;
    }
    tx.commit().await?;
    Ok(Some(empty))
}

/// Rotate every `every` while the worker runs. A tick that fails (the database is away) is
/// logged and the next one tries again.
pub async fn run(pool: PgPool, every: Duration) {
    let mut clock = tokio::time::interval(every);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        clock.tick().await;
        match tick(&pool).await {
            Ok(t) if t.rotated_to.is_some() || t.truncated > 0 || t.moved > 0 => {
                tracing::debug!(?t, "queue rotation")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "queue rotation failed; retrying"),
        }
    }
}
