//! Preferences, rate limit and store: every SQL statement of the pipeline, applied to a
//! whole batch of events in one transaction (the claim's).
//!
//! The transaction does, in order:
//! 1. lock every user of the batch: one statement that, in ascending byte order of
//!    `user_id` (sorted in Rust, so every replica uses the same order whatever the collation),
//!    inserts the user's `notify.rate_windows` row or, when it exists, locks it (so two
//!    replicas can never deadlock on each other). Row locks live in the rows, not in the
//!    server's shared lock table: advisory locks (the first design, one per user) ran out
//!    of it ("out of shared memory") with 4 replicas x 4 batches of 1,000 users, and an
//!    exhausted lock table fails every other session of the database too;
//! 2. in one set-based statement:
//!    * skip events already decided (a job that ran twice: "duplicate"): a suppressed
//!      event has an outcome on its row, a stored one has a notification;
//!    * **preferences**: an event whose `(user_id, event_type)` switch is off is `opted_out`
//!      (a missing row means on);
//!    * **per-type cap**: for a type with `notify.event_types.max_per_window`, count that
//!      type's deliveries within the window (the row's per-type entries), plus one while a
//!      pending digest holds back this type (the digest waits for the type's room; this
//!      keeps the next event of the type from taking it), and admit its events in event-id
//!      order while they stay at or below the cap; the rest are `rate_limited`, and they do
//!      not use the user's total;
//!    * **rate limit**: per user, count the non-critical deliveries stamped within the
//!      window (from the user's `notify.rate_windows` row: one entry per earlier store
//!      transaction, with its stamp and count), plus one while a digest is pending (its
//!      slot: the digest sweep, [`crate::digest`], fills it, so new events cannot starve
//!      it), and admit events in event-id order while the count stays at or below `limit`;
//!      the rest are `rate_limited`. Events of a **critical** type skip this step and the
//!      preference: their own cap is their only bound (a backend loop stays bounded, a
//!      flood of chat cannot keep them out);
//!    * **digest counts**: add every `rate_limited` event of the batch to the user's
//!      `notify.digest_pending` row for its type (decided once, so counted once);
//!    * **store**: insert the admitted notifications (`ON CONFLICT (event_id) DO NOTHING`),
//!      and add their stamp to the user's `rate_windows` row (trimmed to the entries that
//!      can still matter: the last 7 days, the longest window accepted, and no more than the
//!      newest `limit`), with one per-type entry per capped type delivered (up to the
//!      larger of `limit` and the largest cap per type). Exact across restarts with a longer
//!      window or a higher limit; after a limit was lowered and raised again within one
//!      window, the entries the lower limit trimmed are not counted;
//!    * write the outcome of every event that was not stored on its `notify.events` row.
//!      A stored event's record is its notification alone (the view
//!      `notify.event_outcomes` reads `stored` from it): writing `stored` on the wide event
//!      row as well was one more row version per delivered event, and the drain ran 1.2x
//!      faster without it (BENCHMARKS.md, "The outcome of a stored event"). Deleting a
//!      notification writes `stored` on its event row (a trigger), so the check above
//!      still finds the event decided.
//!
//! Invariants this gives, even with many replicas racing and jobs running twice:
//! * one notification per event (unique `event_id`, and the decided check under the lock);
//! * in any window of `window` length, a user has at most `limit` non-critical
//!   notifications (digests included), at most `max_per_window` of a capped type, and at
//!   most its cap of each critical type (counted apart from `limit`). The
//!   stamp is `statement_timestamp()` of the statement that runs after the user's lock is
//!   held, so per user, stamps grow in lock order, and each insert counts everything stamped
//!   after its own stamp minus the window. The count comes from `rate_windows`, which is
//!   written in the same transaction as the notifications, so it holds exactly their stamps
//!   (one row per user instead of a read of the user's newest `limit` notifications per
//!   event: the drain ran 1.5x faster with it, see BENCHMARKS.md);
//! * per user, notification ids grow in commit order (ids are drawn under the lock), so a
//!   reader paging with `id > cursor` never skips a row;
//! * every `rate_limited` event is counted once in `notify.digest_pending`, in the
//!   transaction that decides it.
//!
//! Changing the settings moves the bounds at the edges only, documented in migration
//! `20261207000100`: a type made critical keeps its earlier deliveries in the total until
//! they leave the window; a type made non-critical adds up to its cap to the total in the
//! window of the change; a cap set on a type counts its deliveries from then on, so in the
//! window of the change the type may get up to the cap on top of what it had. (Entries
//! for every type, so that a new cap would count the deliveries before it, made every
//! store rewrite three more lists per user: a fifth of the store statement, measured.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::sanitize::{PlainText, SafeLink};
use crate::validate::EventRow;

/// The per-user limit: at most `limit` notifications in any rolling `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            limit: 100,
            window: Duration::from_secs(3600),
        }
    }
}

/// One event of a batch, ready for the store transaction.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub event_id: i64,
    pub user_id: String,
    pub event_type: String,
    pub content: Content,
}

/// What a prepared event would show: only the sanitizer makes [`PlainText`] and
/// [`SafeLink`], so the store cannot be handed unsanitized text.
#[derive(Debug, Clone)]
pub enum Content {
    Valid {
        body: PlainText,
        link: Option<SafeLink>,
    },
    /// The event failed validation; the reason is recorded on its row.
    Invalid { reason: String },
}

/// What the store statement decided for one event that was not decided before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Stored,
    OptedOut,
    RateLimited,
    Invalid,
}

impl Verdict {
    /// The name the store statement and `notify.events.outcome` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Stored => "stored",
            Verdict::OptedOut => "opted_out",
            Verdict::RateLimited => "rate_limited",
            Verdict::Invalid => "invalid",
        }
    }

    /// Read the store statement's answer; anything else is a decode error (the batch
    /// rolls back and counts a failed attempt), never a silent fall-through.
    fn parse(s: &str) -> Result<Verdict, sqlx::Error> {
        [
            Verdict::Stored,
            Verdict::OptedOut,
            Verdict::RateLimited,
            Verdict::Invalid,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| sqlx::Error::Decode(format!("the store statement answered {s:?}").into()))
    }
}

/// What the store transaction decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub event_id: i64,
    pub user_id: String,
    pub verdict: Verdict,
    pub notification_id: Option<i64>,
    /// The event's type is critical (`notify.event_types.critical`): counted apart from
    /// the user's total, bounded by its own cap.
    pub critical: bool,
}

/// Load the events named by a batch of jobs. Missing ids are simply absent. `outcome` is
/// the one written on the event's row (a suppressed or invalid event): a job run twice
/// for it is answered without the store. A stored event has none there (its record is the
/// notification); the store statement finds it decided, under the user's lock, as it must
/// anyway, so the load does not probe the notifications too (1,000 index probes a batch
/// for the rare second run).
pub async fn fetch_events<'e>(
    db: impl PgExecutor<'e>,
    ids: &[i64],
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as::<_, EventRow>(
        "SELECT e.id, e.user_id, e.event_type, e.body, e.link, e.outcome
         FROM notify.events AS e WHERE e.id = ANY($1)",
    )
    .persistent(crate::db::persistent())
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Apply a batch inside the caller's open transaction: per-user locks, the decisions, the
/// notifications and the announcement; the caller commits (or rolls back, and then nothing
/// happened) and settles the queue rows. Events already decided are not in the result (they
/// are duplicates of an earlier run). `now` is for tests; `None` means the database clock.
/// The announcement on [`crate::contract::ANNOUNCE_CHANNEL`] sizes its payloads for the
/// worst case, counting every byte of a user id as if JSON had to escape it.
pub async fn apply_in(
    tx: &mut PgConnection,
    batch: &[Prepared],
    rate: RateLimit,
    now: Option<DateTime<Utc>>,
) -> Result<Vec<Decision>, sqlx::Error> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    plan_by_keys(tx).await?;
    lock_users(tx, batch.iter().map(|p| p.user_id.as_str())).await?;
    decide_and_store(tx, batch, rate, now).await
}

/// For the rest of the transaction, plan every table access by its key. Each lookup of
/// the store statement (and of the digest sweep) reads a few rows by key, so an index scan
/// is always the plan that fits, but a table whose statistics say it is empty or tiny (a
/// first backfill, `notify.digest_pending` before any ANALYZE) gets a sequential scan per
/// event, which then stays in the cached plan as the table grows. A sequential scan is
/// still used where no index fits.
pub async fn plan_by_keys(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Take the per-user locks of a batch: see the module doc. `ON CONFLICT DO UPDATE … WHERE
/// false` locks an existing row without writing a new version of it, and waits for a
/// concurrent transaction that is inserting the same user, so every user ends up either
/// inserted or locked by this transaction, in key order.
pub(crate) async fn lock_users<'a>(
    tx: &mut PgConnection,
    users: impl Iterator<Item = &'a str>,
) -> Result<(), sqlx::Error> {
    let mut users: Vec<&str> = users.collect();
    users.sort_unstable();
    users.dedup();
    sqlx::query(
        "INSERT INTO notify.rate_windows AS w (user_id, stamps, counts)
         SELECT u, '{}', '{}' FROM unnest($1::text[]) WITH ORDINALITY AS x(u, n) ORDER BY n
         ON CONFLICT (user_id) DO UPDATE SET stamps = w.stamps WHERE false",
    )
    .persistent(crate::db::persistent())
    .bind(&users)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

const DECIDE_AND_STORE_TEMPLATE: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
         AS i(event_id, user_id, event_type, body, link, invalid_reason)
),
clock AS (
    SELECT COALESCE($7::timestamptz, statement_timestamp()) AS now
),
types AS MATERIALIZED (
    -- The type settings, read once per statement (a handful of rows) and joined: one
    -- hash or nested-loop join over a few rows whatever the statistics say, instead of
    -- an index probe per event and setting. In key order, so that the read is an index
    -- scan: sequential scans are off in this transaction, and a disabled node costs
    -- 10^10, which makes a server with JIT on compile the whole statement (seconds).
    SELECT t.name, t.critical, t.max_per_window FROM notify.event_types AS t ORDER BY t.name
),
decided AS MATERIALIZED (
    -- Every other lookup is a scalar subquery, one index probe per event, and no table is
    -- joined: the plan is then the same whatever the statistics say. With joins, a burst
    -- drained before any ANALYZE got a hash join over a sequential scan of all of
    -- notify.events per batch, and a nested loop over the batch squared (BENCHMARKS.md,
    -- "A real database's bad day"). Materialized, so that each lookup runs once per event:
    -- inlined, the CTEs after it would repeat every expression that names `early_outcome`
    -- or `critical`.
    -- An event already decided is left out (a suppressed one: its row has an outcome) or
    -- marked `duplicate` (a stored one: its record is its notification, and its events row
    -- keeps no outcome). A critical type ignores the user's switch (a row left from before
    -- it was critical).
    SELECT i.*,
           COALESCE(t.critical, false) AS critical,
           t.max_per_window AS type_cap,
           CASE
               WHEN (SELECT n.event_id FROM notify.notifications AS n
                     WHERE n.event_id = i.event_id) IS NOT NULL THEN 'duplicate'
               WHEN i.invalid_reason IS NOT NULL THEN 'invalid'
               WHEN t.critical IS NOT TRUE
                    AND (SELECT pref.enabled FROM notify.preferences AS pref
                         WHERE pref.user_id = i.user_id AND pref.event_type = i.event_type)
                        IS FALSE THEN 'opted_out'
           END AS early_outcome
    FROM input AS i
    LEFT JOIN types AS t ON t.name = i.event_type
    WHERE (SELECT e.outcome IS NULL FROM notify.events AS e WHERE e.id = i.event_id)
),
typed AS (
    -- For an event of a capped type: that type's deliveries to the user inside the window,
    -- from the per-type entries of the user's rate_windows row, plus one while a digest
    -- holding back this type is pending (the digest waits for the type to have room, so
    -- this keeps that room from being taken by the next event of the type).
    SELECT d.*,
           CASE WHEN d.early_outcome IS NULL AND d.type_cap IS NOT NULL THEN
               (SELECT COALESCE(sum(x.c), 0)
                FROM notify.rate_windows AS w,
                     unnest(w.type_stamps, w.type_names, w.type_counts) AS x(s, n, c), clock
                WHERE w.user_id = d.user_id AND x.n = d.event_type
                  AND x.s > clock.now - $9::interval)
               + CASE WHEN (SELECT p.user_id FROM notify.digest_pending AS p
                            WHERE p.user_id = d.user_id AND p.event_type = d.event_type)
                           IS NOT NULL THEN 1 ELSE 0 END
           END AS type_recent
    FROM decided AS d
),
capped AS (
    -- The per-type cap first, in event-id order per user and type: an event it holds
    -- back does not use the user's total.
    SELECT t.*,
           CASE
               WHEN t.early_outcome IS NOT NULL THEN t.early_outcome
               WHEN t.type_cap IS NOT NULL
                    AND row_number() OVER (PARTITION BY t.user_id, t.event_type,
                                                        t.early_outcome IS NULL
                                           ORDER BY t.event_id) + t.type_recent > t.type_cap
                   THEN 'rate_limited'
           END AS type_outcome
    FROM typed AS t
),
ranked AS (
    -- Per user: the non-critical notifications stamped inside the window (from the user's
    -- rate_windows row), plus one while a digest is pending: its place, which the digest
    -- sweep fills, so that a steady stream of new events cannot starve it.
    SELECT c.*,
           row_number() OVER (PARTITION BY c.user_id, c.type_outcome IS NULL AND NOT c.critical
                              ORDER BY c.event_id) AS rank,
           CASE WHEN c.type_outcome IS NULL AND NOT c.critical THEN
               (SELECT COALESCE(sum(x.c), 0)
                FROM notify.rate_windows AS w, unnest(w.stamps, w.counts) AS x(s, c), clock
                WHERE w.user_id = c.user_id AND x.s > clock.now - $9::interval)
               + CASE WHEN (SELECT p.user_id FROM notify.digest_pending AS p
                            WHERE p.user_id = c.user_id LIMIT 1) IS NOT NULL THEN 1 ELSE 0 END
           END AS recent
    FROM capped AS c
),
judged AS (
    SELECT r.event_id, r.user_id, r.event_type, r.body, r.link, r.invalid_reason, r.critical,
           CASE
               WHEN r.type_outcome IS NOT NULL THEN r.type_outcome
               WHEN r.critical THEN 'stored'
               WHEN r.rank + r.recent <= $8 THEN 'stored'
               ELSE 'rate_limited'
           END AS outcome
    FROM ranked AS r
),
inserted AS (
    INSERT INTO notify.notifications (user_id, event_id, event_type, body, link, created_at)
    SELECT j.user_id, j.event_id, j.event_type, j.body, j.link, clock.now
    FROM judged AS j, clock
    WHERE j.outcome = 'stored'
    ORDER BY j.user_id, j.event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, id, user_id, event_type
),
delivered AS (
    -- Per user: the non-critical total of this transaction's deliveries, and one entry per
    -- delivery of a capped type (a type with `max_per_window`, every critical type among
    -- them). One hash aggregate by user: a count per type would take a second grouping
    -- and a sort, measured 2 ms per batch, for entries that mean the same.
    SELECT i.user_id,
           count(*) FILTER (WHERE t.critical IS NOT TRUE)::integer AS total,
           COALESCE(array_agg(i.event_type) FILTER (WHERE t.max_per_window IS NOT NULL),
                    '{}'::text[]) AS names
    FROM inserted AS i
    LEFT JOIN types AS t ON t.name = i.event_type
    GROUP BY i.user_id
),
windowed AS (
    -- Put this transaction's stamp first (newest first); keep the older entries of the
    -- last 7 days (the longest window the worker accepts: a window made longer later still
    -- finds them), and no more than `limit` entries in all: each entry stands for at least
    -- one notification, so entries after the newest `limit` cannot change a decision. The
    -- stamps grow per user (they are taken under the user's lock), so what is kept is a
    -- prefix of the list, cut by position, not rebuilt.
    -- Per-type entries likewise, per type no more than the largest of `limit` and every
    -- type's cap; they are rewritten only when this transaction adds one (an uncapped
    -- delivery leaves them as they are: rewriting them cost a fifth of this statement).
    INSERT INTO notify.rate_windows AS w
           (user_id, stamps, counts, type_stamps, type_names, type_counts)
    SELECT p.user_id,
           CASE WHEN p.total > 0 THEN ARRAY[clock.now] ELSE '{}'::timestamptz[] END,
           CASE WHEN p.total > 0 THEN ARRAY[p.total] ELSE '{}'::integer[] END,
           array_fill(clock.now, ARRAY[cardinality(p.names)]), p.names,
           array_fill(1, ARRAY[cardinality(p.names)])
    FROM delivered AS p, clock
    ON CONFLICT (user_id) DO UPDATE
    SET (stamps, counts) = (
            SELECT (EXCLUDED.stamps || w.stamps)[1:LEAST($8::integer, cardinality(EXCLUDED.stamps) + f.kept)],
                   (EXCLUDED.counts || w.counts)[1:LEAST($8::integer, cardinality(EXCLUDED.stamps) + f.kept)]
            FROM (SELECT count(*)::integer AS kept FROM unnest(w.stamps) AS x(s)
                  WHERE x.s > COALESCE(EXCLUDED.stamps[1], EXCLUDED.type_stamps[1])
                              - interval '7 days') AS f),
        -- Each list by a CASE, so that the sub-selects run only when there is an entry to add.
        type_stamps = CASE WHEN cardinality(EXCLUDED.type_names) = 0 THEN w.type_stamps ELSE
            EXCLUDED.type_stamps || ARRAY(SELECT k.s {kept_type_entries}) END,
        type_names = CASE WHEN cardinality(EXCLUDED.type_names) = 0 THEN w.type_names ELSE
            EXCLUDED.type_names || ARRAY(SELECT k.n {kept_type_entries}) END,
        type_counts = CASE WHEN cardinality(EXCLUDED.type_names) = 0 THEN w.type_counts ELSE
            EXCLUDED.type_counts || ARRAY(SELECT k.c {kept_type_entries}) END
    RETURNING 1
),
suppressed AS (
    -- Count what the limit held back for the user's next digest, in this transaction:
    -- exactly once per event (a second run of a job finds it decided above).
    INSERT INTO notify.digest_pending AS p
           (user_id, event_type, suppressed, first_at, last_at, due_at)
    SELECT j.user_id, j.event_type, count(*)::integer, clock.now, clock.now, clock.now
    FROM judged AS j, clock
    WHERE j.outcome = 'rate_limited'
    GROUP BY j.user_id, j.event_type, clock.now
    ORDER BY j.user_id, j.event_type
    ON CONFLICT (user_id, event_type) DO UPDATE
    SET suppressed = p.suppressed + EXCLUDED.suppressed,
        last_at = GREATEST(p.last_at, EXCLUDED.last_at)
),
announced AS MATERIALIZED (
    -- One NOTIFY per chunk of users: a chunk's entries, sized for the worst case (every
    -- byte escaped, plus the id), stay under 6,000 bytes plus one entry (at most 1,054).
    SELECT pg_notify('notifyd_notifications',
                     json_agg(json_build_array(n.user_id, n.max_id) ORDER BY n.user_id)::text)
    FROM (SELECT m.user_id, m.max_id,
                 sum(octet_length(m.user_id) * 2 + 30) OVER (ORDER BY m.user_id) / 6000 AS chunk
          FROM (SELECT user_id, max(id) AS max_id FROM inserted GROUP BY user_id) AS m) AS n
    GROUP BY n.chunk
),
recorded AS (
    UPDATE notify.events AS e
    SET outcome = (SELECT j.outcome FROM judged AS j WHERE j.event_id = e.id),
        outcome_reason = (SELECT j.invalid_reason FROM judged AS j
                          WHERE j.event_id = e.id AND j.outcome = 'invalid'),
        processed_at = (SELECT clock.now FROM clock)
    WHERE e.id = ANY(ARRAY(SELECT j.event_id FROM judged AS j
                           WHERE j.outcome NOT IN ('stored', 'duplicate')))
)
SELECT event_id, user_id, outcome, NULL::bigint AS notification_id, critical FROM judged
WHERE outcome <> 'duplicate'
UNION ALL
SELECT event_id, NULL, NULL, id, NULL FROM inserted
UNION ALL
SELECT -1, NULL, NULL, count(*), NULL FROM announced  -- makes the announcement run; ignored
"#;

/// The older per-type entries of a user's row that stay, in their order (newest first),
/// as the `FROM` … of a sub-select over `k` inside the rate-window upsert: of the last 7
/// days, and per type no more than the largest of `limit` and every cap, counting the
/// entries this transaction adds. Written once, used for each of the three lists.
const KEPT_TYPE_ENTRIES: &str =
    "FROM (SELECT x.*, row_number() OVER (PARTITION BY x.n ORDER BY x.o) AS r
                  FROM unnest(w.type_stamps, w.type_names, w.type_counts)
                       WITH ORDINALITY AS x(s, n, c, o)) AS k
            WHERE k.s > EXCLUDED.type_stamps[1] - interval '7 days'
              AND k.r + cardinality(array_positions(EXCLUDED.type_names, k.n))
                  <= GREATEST($8::integer, (SELECT max(t.max_per_window) FROM types AS t))
            ORDER BY k.o";

/// The store statement: [`DECIDE_AND_STORE_TEMPLATE`] with [`KEPT_TYPE_ENTRIES`] in place.
static DECIDE_AND_STORE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    DECIDE_AND_STORE_TEMPLATE.replace("{kept_type_entries}", KEPT_TYPE_ENTRIES)
});

/// `(event_id, user_id, outcome, notification_id, critical)`: see [`DECIDE_AND_STORE_TEMPLATE`]'s
/// final SELECT.
type StoreRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<bool>,
);

async fn decide_and_store(
    tx: &mut PgConnection,
    batch: &[Prepared],
    rate: RateLimit,
    now: Option<DateTime<Utc>>,
) -> Result<Vec<Decision>, sqlx::Error> {
    let n = batch.len();
    let mut ids = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut links = Vec::with_capacity(n);
    let mut invalid = Vec::with_capacity(n);
    for p in batch {
        ids.push(p.event_id);
        users.push(p.user_id.as_str());
        types.push(p.event_type.as_str());
        match &p.content {
            Content::Valid { body, link } => {
                bodies.push(Some(body.as_str()));
                links.push(link.as_ref().map(SafeLink::as_str));
                invalid.push(None);
            }
            Content::Invalid { reason } => {
                bodies.push(None);
                links.push(None);
                invalid.push(Some(reason.as_str()));
            }
        }
    }
    let window = sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(rate.window.as_micros()).unwrap_or(i64::MAX),
    };
    let rows: Vec<StoreRow> = sqlx::query_as(sqlx::AssertSqlSafe(DECIDE_AND_STORE.as_str()))
        .persistent(crate::db::persistent())
        .bind(&ids)
        .bind(&users)
        .bind(&types)
        .bind(&bodies)
        .bind(&links)
        .bind(&invalid)
        .bind(now)
        .bind(i64::from(rate.limit))
        .bind(window)
        .fetch_all(&mut *tx)
        .await?;
    // Two kinds of rows come back: one per recorded outcome, one per inserted
    // notification. Join them here, where the sizes are known, not in SQL, where the
    // planner cannot estimate `unnest` and would join the two with nested loops.
    let mut ids_by_event = std::collections::HashMap::new();
    let mut decisions = Vec::with_capacity(rows.len());
    for (event_id, user_id, outcome, notification_id, critical) in rows {
        match (user_id, outcome, notification_id) {
            (_, _, Some(id)) => {
                ids_by_event.insert(event_id, id);
            }
            (Some(user_id), Some(outcome), None) => decisions.push(Decision {
                event_id,
                user_id,
                verdict: Verdict::parse(&outcome)?,
                notification_id: None,
                critical: critical.unwrap_or(false),
            }),
            _ => {}
        }
    }
    for d in &mut decisions {
        d.notification_id = ids_by_event.get(&d.event_id).copied();
    }
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ANNOUNCE_CHANNEL;

    #[test]
    fn the_store_statement_announces_on_the_published_channel() {
        assert!(DECIDE_AND_STORE.contains(&format!("pg_notify('{ANNOUNCE_CHANNEL}'")));
    }

    #[test]
    fn verdicts_round_trip_and_unknown_answers_are_errors() {
        for v in [
            Verdict::Stored,
            Verdict::OptedOut,
            Verdict::RateLimited,
            Verdict::Invalid,
        ] {
            assert_eq!(Verdict::parse(v.as_str()).unwrap(), v);
        }
        assert!(Verdict::parse("duplicate").is_err());
        assert!(Verdict::parse("").is_err());
    }
}
