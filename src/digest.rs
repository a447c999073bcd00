//! Digests: what the rate limit held back, summed up in one notification per user once
//! the user's window has room again. The worker runs [`sweep_loop`] next to cleanup.
//!
//! The store step ([`crate::store`]) counts each suppressed event (`rate_limited`, by the
//! total or by its type's cap) in `notify.digest_pending`, per user and type, in the
//! transaction that decides it; while a user has a pending digest, the store keeps one
//! slot of the total free for it, so a steady stream of new events cannot starve it. A
//! sweep ([`run_once`]) then, per chunk of users whose window may have room (`due_at`: the
//! store writes now, a sweep that finds no room writes when the oldest delivery in the
//! window leaves it, so a user at the limit costs no sweep until then), in one transaction:
//! 1. takes the users' locks exactly as the store does ([`crate::store::lock_users`]:
//!    their `notify.rate_windows` rows, in ascending byte order), so it never races a
//!    store batch for the same user and cannot deadlock with one;
//! 2. for each user whose window has room for one more (the non-critical deliveries in
//!    the window, from the same row the store reads, plus one, is at most the limit) and
//!    whose held back capped types have room again (so a type held back by its cap while
//!    the total has room gets one digest for its run, not one per event), deletes the
//!    user's pending rows and stores one `digest` notification with a
//!    plain-text body ("12 more notifications while you were away: 9 new messages, 3
//!    status changes") and the counts as `digest` jsonb; the digest counts one against the
//!    limit (a stamp in the same row);
//! 3. announces it to the read service like any stored notification.
//!
//! Invariants: every suppressed event is in exactly one digest or still pending (the
//! count and its deletion are in the transactions that decide and that send; a job run
//! twice is a duplicate and counts nothing); the limit holds with digests counted, with any
//! number of replicas sweeping and storing at once. Types the user has switched off since
//! are dropped from the digest (opted-out events are never counted in the first place).
//! Critical types are counted apart from the total: a digest never uses their budget.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use metrics::counter;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::sanitize::sanitize_body;
use crate::store::{self, RateLimit};
use crate::telemetry::series;

/// The event type of digest notifications (seeded by migration 20261207000100).
pub const DIGEST_TYPE: &str = "digest";

/// Users per sweep transaction.
const CHUNK: i64 = 500;

/// Most transactions of one sweep: each takes its users out of the due set (sent, or
/// `due_at` moved past now), so this only bounds a pathological run.
const MAX_CHUNKS: usize = 1000;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Users with pending counts looked at.
    pub users: u64,
    /// Digest notifications stored.
    pub digests: u64,
    /// Suppressed events those digests sum up.
    pub events: u64,
}

/// One user's suppressed events, per type, as a digest shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `(event_type, label, count)`, largest count first.
    pub counts: Vec<(String, String, i64)>,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

impl Summary {
    pub fn total(&self) -> i64 {
        self.counts.iter().map(|(_, _, n)| n).sum()
    }

    /// "12 more notifications while you were away: 9 new messages, 3 status changes". A
    /// label is a plural; for a count of 1 its final "s" is dropped.
    pub fn body(&self) -> String {
        let total = self.total();
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(_, label, n)| {
                let label = if *n == 1 {
                    label.strip_suffix('s').unwrap_or(label)
                } else {
                    label
                };
                format!("{n} {label}")
            })
            .collect();
        let noun = if total == 1 {
            "notification"
        } else {
            "notifications"
        };
        format!(
            "{total} more {noun} while you were away: {}",
            parts.join(", ")
        )
    }

    /// The `digest` column and API field.
    pub fn json(&self) -> serde_json::Value {
        let counts: BTreeMap<&str, i64> = self
            .counts
            .iter()
            .map(|(t, _, n)| (t.as_str(), *n))
            .collect();
        serde_json::json!({
            "total": self.total(),
            "counts": counts,
            "first_at": self.first_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            "last_at": self.last_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        })
    }
}

/// How a digest names a type without a `digest_label`.
fn default_label(event_type: &str) -> String {
    let mut label = event_type.replace('_', " ");
    if !label.ends_with('s') {
        label.push('s');
    }
    label
}

/// Send every digest that has room now. `now` is for tests; `None` is the database clock.
pub async fn run_once(
    pool: &PgPool,
    rate: RateLimit,
    now: Option<DateTime<Utc>>,
) -> Result<Report, sqlx::Error> {
    let mut report = Report::default();
    for _ in 0..MAX_CHUNKS {
        // Users that may have room: `due_at` (index `digest_pending_due`) is the earliest
        // time their window can have room, so a user at the limit costs nothing until then.
        // Through `db::fetch_all`: outside a transaction, a transaction pooler may run an
        // unnamed statement's parse and its execution on two server connections.
        let users: Vec<String> = crate::db::fetch_all(
            pool,
            sqlx::query_as::<_, (String,)>(
                "SELECT DISTINCT user_id FROM notify.digest_pending
                 WHERE due_at <= COALESCE($1::timestamptz, statement_timestamp())
                 ORDER BY user_id LIMIT $2",
            )
            .bind(now)
            .bind(CHUNK),
        )
        .await?
        .into_iter()
        .map(|(u,)| u)
        .collect();
        if users.is_empty() {
            break;
        }
        let chunk = sweep_users(pool, &users, rate, now).await?;
        report.users += users.len() as u64;
        report.digests += chunk.digests;
        report.events += chunk.events;
        if (users.len() as i64) < CHUNK {
            break;
        }
    }
    Ok(report)
}

const TAKE: &str = r#"
WITH clock AS (
    SELECT COALESCE($4::timestamptz, statement_timestamp()) AS now
),
windows AS MATERIALIZED (
    -- Per user: the non-critical deliveries in the window, and when the oldest of them
    -- leaves it (one index probe per user: an aggregate subquery is never turned into a
    -- join).
    SELECT u.user_id, x.recent, x.oldest
    FROM unnest($1::text[]) AS u(user_id)
    CROSS JOIN LATERAL (
        SELECT COALESCE(sum(x.c), 0) AS recent, min(x.s) AS oldest
        FROM notify.rate_windows AS w, unnest(w.stamps, w.counts) AS x(s, c), clock
        WHERE w.user_id = u.user_id AND x.s > clock.now - $3::interval) AS x
),
blocked AS MATERIALIZED (
    -- Pending types whose own cap is still full: the run they belong to is not over (a
    -- digest per held back event would spam the user while the total has room). A cap of
    -- 0 never has room, so it never blocks.
    SELECT p.user_id, x.oldest
    FROM notify.digest_pending AS p
    CROSS JOIN LATERAL (
        SELECT COALESCE(sum(x.c), 0) AS recent, min(x.s) AS oldest
        FROM notify.rate_windows AS w,
             unnest(w.type_stamps, w.type_names, w.type_counts) AS x(s, n, c), clock
        WHERE w.user_id = p.user_id AND x.n = p.event_type
          AND x.s > clock.now - $3::interval) AS x
    WHERE p.user_id = ANY($1::text[])
      AND x.recent >= (SELECT t.max_per_window FROM notify.event_types AS t
                       WHERE t.name = p.event_type AND t.max_per_window > 0)
),
verdict AS MATERIALIZED (
    -- Ready: room for one more non-critical notification, and no held back type still at
    -- its cap. Otherwise not due before every constraint that blocks can have cleared.
    SELECT w.user_id,
           w.recent + 1 <= $2
           AND (SELECT count(*) FROM blocked AS b WHERE b.user_id = w.user_id) = 0 AS ready,
           GREATEST(CASE WHEN w.recent + 1 > $2 THEN w.oldest END,
                    (SELECT max(b.oldest) FROM blocked AS b WHERE b.user_id = w.user_id))
           + $3::interval AS due
    FROM windows AS w
),
waiting AS (
    UPDATE notify.digest_pending AS p
    SET due_at = (SELECT COALESCE(v.due, clock.now + $3::interval)
                  FROM verdict AS v, clock WHERE v.user_id = p.user_id)
    WHERE p.user_id = ANY(ARRAY(SELECT user_id FROM verdict WHERE NOT ready))
),
taken AS (
    DELETE FROM notify.digest_pending AS p
    WHERE p.user_id = ANY(ARRAY(SELECT user_id FROM verdict WHERE ready))
    RETURNING p.user_id, p.event_type, p.suppressed, p.first_at, p.last_at
)
SELECT t.user_id, t.event_type, t.suppressed::bigint, t.first_at, t.last_at,
       (SELECT pref.enabled FROM notify.preferences AS pref
        WHERE pref.user_id = t.user_id AND pref.event_type = t.event_type) IS NOT FALSE
       OR COALESCE((SELECT ty.critical FROM notify.event_types AS ty
                    WHERE ty.name = t.event_type), false) AS wanted,
       (SELECT ty.digest_label FROM notify.event_types AS ty WHERE ty.name = t.event_type),
       clock.now
FROM taken AS t, clock
ORDER BY t.user_id, t.suppressed DESC, t.event_type
"#;

const SEND: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS i(user_id, body, digest)
),
inserted AS (
    INSERT INTO notify.notifications (user_id, event_id, event_type, body, link, created_at, digest)
    SELECT i.user_id, NULL, 'digest', i.body, NULL, $4::timestamptz, i.digest::jsonb
    FROM input AS i
    ORDER BY i.user_id
    RETURNING id, user_id
),
windowed AS (
    -- One against the limit: a stamp in the user's row, trimmed as the store trims.
    UPDATE notify.rate_windows AS w
    SET stamps = (ARRAY[$4::timestamptz]
                  || ARRAY(SELECT x.s FROM unnest(w.stamps, w.counts) AS x(s, c)
                           WHERE x.s > $4::timestamptz - interval '7 days'))[1:$5::integer],
        counts = (ARRAY[1]
                  || ARRAY(SELECT x.c FROM unnest(w.stamps, w.counts) AS x(s, c)
                           WHERE x.s > $4::timestamptz - interval '7 days'))[1:$5::integer]
    WHERE w.user_id = ANY($1::text[])
    RETURNING 1
),
announced AS MATERIALIZED (
    SELECT pg_notify('notifyd_notifications',
                     json_agg(json_build_array(n.user_id, n.max_id) ORDER BY n.user_id)::text)
    FROM (SELECT m.user_id, m.max_id,
                 sum(octet_length(m.user_id) * 2 + 30) OVER (ORDER BY m.user_id) / 6000 AS chunk
          FROM (SELECT user_id, max(id) AS max_id FROM inserted GROUP BY user_id) AS m) AS n
    GROUP BY n.chunk
)
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM windowed),
       (SELECT count(*) FROM announced)
"#;

type TakenRow = (
    String,
    String,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
    bool,
    Option<String>,
    DateTime<Utc>,
);

/// One chunk of users in one transaction: see the module doc.
async fn sweep_users(
    pool: &PgPool,
    users: &[String],
    rate: RateLimit,
    now: Option<DateTime<Utc>>,
) -> Result<Report, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    store::plan_by_keys(&mut tx).await?;
    store::lock_users(&mut tx, users.iter().map(String::as_str)).await?;
    let window = sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(rate.window.as_micros()).unwrap_or(i64::MAX),
    };
    let rows: Vec<TakenRow> = sqlx::query_as(TAKE)
        .persistent(crate::db::persistent())
        .bind(users)
        .bind(i64::from(rate.limit))
        .bind(window)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    let mut stamp = None;
    let mut summaries: BTreeMap<String, Summary> = BTreeMap::new();
    for (user, event_type, n, first_at, last_at, wanted, label, clock) in rows {
        stamp = Some(clock);
        if !wanted {
            continue;
        }
        let label = label.unwrap_or_else(|| default_label(&event_type));
        let s = summaries.entry(user).or_insert_with(|| Summary {
            counts: Vec::new(),
            first_at,
            last_at,
        });
        s.first_at = s.first_at.min(first_at);
        s.last_at = s.last_at.max(last_at);
        s.counts.push((event_type, label, n));
    }
    let mut report = Report::default();
    if let Some(stamp) = stamp.filter(|_| !summaries.is_empty()) {
        let mut ids = Vec::with_capacity(summaries.len());
        let mut bodies = Vec::with_capacity(summaries.len());
        let mut digests = Vec::with_capacity(summaries.len());
        for (user, s) in &summaries {
            // Labels are checked by a constraint; the sanitizer is the only maker of
            // plain text all the same.
            let body = sanitize_body(&s.body())
                .map(|t| t.into_string())
                .unwrap_or_else(|_| {
                    format!("{} more notifications while you were away", s.total())
                });
            ids.push(user.as_str());
            bodies.push(body);
            digests.push(s.json().to_string());
            report.digests += 1;
            report.events += s.total() as u64;
        }
        sqlx::query(SEND)
            .persistent(crate::db::persistent())
            .bind(&ids)
            .bind(&bodies)
            .bind(&digests)
            .bind(stamp)
            .bind(i64::from(rate.limit))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if report.digests > 0 {
        counter!(series::DIGESTS_SENT).increment(report.digests);
        counter!(series::DIGEST_EVENTS).increment(report.events);
    }
    Ok(report)
}

/// The worker's sweep: [`run_once`] every `every` (at most 60 s, so that a digest arrives
/// within a minute of its user's window having room), until shutdown.
pub async fn sweep_loop(
    pool: PgPool,
    rate: RateLimit,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match run_once(&pool, rate, None).await {
            Ok(r) if r.digests > 0 => tracing::info!(?r, "digests sent"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "digest sweep failed; will try again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(counts: &[(&str, &str, i64)]) -> Summary {
        let t = Utc::now();
        Summary {
            counts: counts
                .iter()
                .map(|(a, b, n)| (a.to_string(), b.to_string(), *n))
                .collect(),
            first_at: t,
            last_at: t,
        }
    }

    #[test]
    fn the_body_names_the_counts_per_type() {
        let s = summary(&[
            ("new_message", "new messages", 9),
            ("status_change", "status changes", 3),
        ]);
        assert_eq!(
            s.body(),
            "12 more notifications while you were away: 9 new messages, 3 status changes"
        );
        assert_eq!(s.json()["total"], 12);
        assert_eq!(s.json()["counts"]["new_message"], 9);
        let one = summary(&[("system_alert", "system alerts", 1)]);
        assert_eq!(
            one.body(),
            "1 more notification while you were away: 1 system alert"
        );
        assert_eq!(default_label("weekly_report"), "weekly reports");
    }
}
