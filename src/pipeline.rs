//! The pipeline for one claimed batch, inside the claim's transaction:
//! load event → validate and sanitize → preferences, rate limit and store
//! ([`crate::store`]).
//!
//! Invariants:
//! * every job gets exactly one answer: an [`Outcome`] (the job is done) or a [`BadJob`]
//!   (the job is refused for good with the reason, never retried). A database error is
//!   not an answer: it fails the whole batch, whose transaction then rolls back, so that
//!   every job is claimed again and nothing was half done;
//! * nothing here panics on input: rows are validated, not trusted;
//! * sanitizing runs on the blocking pool, off the async runtime's worker threads.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use metrics::{counter, histogram};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use tracing::Instrument;

use crate::store::{self, Content, Decision, Prepared, RateLimit, Verdict};
use crate::telemetry::series;
use crate::validate::{BadJob, EventRow, validate_event};

/// What happened to one event. Except `duplicate`, this is the event's `outcome` in
/// `notify.event_outcomes`: for `stored`, the notification; for the others, the
/// `outcome` written on its `notify.events` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A notification was written. `critical`: of a critical type (its own budget).
    Stored {
        notification_id: Option<i64>,
        #[serde(default)]
        critical: bool,
    },
    /// The user switched this event type off.
    OptedOut,
    /// The user reached the rate limit, or the type its cap; the event is kept with this
    /// outcome and counted for the user's next digest.
    RateLimited { event_type: String },
    /// The event already had an outcome: this job is a second run of it.
    Duplicate,
    /// The event failed validation; the reason is stored with it.
    Invalid { reason: String },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Stored { .. } => "stored",
            Outcome::OptedOut => "opted_out",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::Duplicate => "duplicate",
            Outcome::Invalid { .. } => "invalid",
        }
    }
}

/// One job's answer: an outcome, or why the job was refused.
pub type Answer = Result<Outcome, BadJob>;

/// Settings of the pipeline.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    pub rate: RateLimit,
    /// Fixed clock for tests; `None` uses the database clock.
    pub now: Option<DateTime<Utc>>,
}

impl Pipeline {
    pub fn new(rate: RateLimit) -> Self {
        Self { rate, now: None }
    }

    /// Process a batch of jobs, given by their event ids, inside the caller's open
    /// transaction, once: a failed statement leaves the transaction unusable, so the caller
    /// rolls back and the jobs stay in the queue. On `Ok`, the answers are in the same order
    /// as `events`, and nothing is committed until the caller commits. The queue rows are
    /// the caller's to settle.
    pub async fn process_in(
        &self,
        tx: &mut PgConnection,
        events: &[i64],
    ) -> Result<Vec<Answer>, sqlx::Error> {
        let mut ids: Vec<i64> = events.to_vec();
        ids.sort_unstable();
        ids.dedup();
        histogram!(series::BATCH_JOBS).record(events.len() as f64);
        let span = tracing::info_span!(
            "batch",
            jobs = events.len(),
            first_event = ids.first().copied(),
            last_event = ids.last().copied(),
        );
        let decided = if ids.is_empty() {
            HashMap::new()
        } else {
            self.decide_in(tx, &ids).instrument(span).await?
        };
        Ok(answer_all(events, &decided))
    }

    /// Load, sanitize and store `ids` in the open transaction `tx`.
    async fn decide_in(
        &self,
        tx: &mut PgConnection,
        ids: &[i64],
    ) -> Result<HashMap<i64, Outcome>, sqlx::Error> {
        let t0 = std::time::Instant::now();
        let rows = store::fetch_events(&mut *tx, ids).await?;
        let t1 = std::time::Instant::now();
        let (mut answers, prepared) = tokio::task::spawn_blocking(move || prepare(rows))
            .await
            .map_err(|e| sqlx::Error::Protocol(format!("sanitizer task failed: {e}")))?;
        let t2 = std::time::Instant::now();
        let decisions = store::apply_in(tx, &prepared, self.rate, self.now).await?;
        histogram!(series::STORE_SECONDS).record(t2.elapsed().as_secs_f64());
        tracing::debug!(
            batch = ids.len(),
            load_ms = (t1 - t0).as_secs_f64() * 1e3,
            sanitize_ms = (t2 - t1).as_secs_f64() * 1e3,
            store_ms = t2.elapsed().as_secs_f64() * 1e3,
            "batch processed"
        );
        let mut by_id: HashMap<i64, Decision> =
            decisions.into_iter().map(|d| (d.event_id, d)).collect();
        for p in prepared {
            let outcome = match by_id.remove(&p.event_id) {
                None => Outcome::Duplicate,
                Some(d) => match d.verdict {
                    Verdict::Stored => Outcome::Stored {
                        notification_id: d.notification_id,
                        critical: d.critical,
                    },
                    Verdict::OptedOut => Outcome::OptedOut,
                    Verdict::RateLimited => Outcome::RateLimited {
                        event_type: p.event_type.clone(),
                    },
                    Verdict::Invalid => Outcome::Invalid {
                        reason: match p.content {
                            Content::Invalid { reason } => reason,
                            Content::Valid { .. } => String::new(),
                        },
                    },
                },
            };
            answers.insert(p.event_id, outcome);
        }
        Ok(answers)
    }
}

/// One answer per job, in order. Two jobs for one event in the same batch: the first
/// gets the outcome, the others `duplicate`.
fn answer_all(events: &[i64], decided: &HashMap<i64, Outcome>) -> Vec<Answer> {
    let mut seen = HashSet::new();
    events
        .iter()
        .map(|&id| {
            let outcome = decided.get(&id).cloned().ok_or(BadJob::NoSuchEvent(id))?;
            if !seen.insert(id) {
                return Ok(Outcome::Duplicate);
            }
            Ok(outcome)
        })
        .collect()
}

/// Validate and sanitize loaded rows. Rows already processed are answered at once.
fn prepare(rows: Vec<EventRow>) -> (HashMap<i64, Outcome>, Vec<Prepared>) {
    let mut answers = HashMap::new();
    let mut prepared = Vec::with_capacity(rows.len());
    for row in rows {
        if row.outcome.is_some() {
            answers.insert(row.id, Outcome::Duplicate);
            continue;
        }
        prepared.push(match validate_event(&row) {
            Ok(valid) => Prepared {
                event_id: valid.id,
                user_id: valid.user_id,
                event_type: valid.event_type,
                content: Content::Valid {
                    body: valid.body,
                    link: valid.link,
                },
            },
            Err(reason) => Prepared {
                event_id: row.id,
                user_id: row.user_id,
                event_type: row.event_type,
                content: Content::Invalid {
                    reason: reason.to_string(),
                },
            },
        });
    }
    (answers, prepared)
}

/// The answers of committed batches, counted for `/metrics` with one increment per label.
/// Every [`Outcome`] has its own count (a match, so a new outcome cannot go uncounted).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub stored: u64,
    /// Of `stored`, the events of critical types.
    pub critical: u64,
    pub opted_out: u64,
    pub rate_limited: u64,
    /// `rate_limited` by event type.
    pub suppressed_by_type: std::collections::BTreeMap<String, u64>,
    pub duplicate: u64,
    pub invalid: u64,
    /// Jobs refused for good (their event does not exist).
    pub refused: u64,
    /// Jobs of batches that rolled back (they are claimed again).
    pub retried: u64,
}

impl Tally {
    /// Count the answers of one committed batch.
    pub fn of(answers: &[Answer]) -> Tally {
        let mut t = Tally::default();
        for answer in answers {
            match answer {
                Ok(Outcome::Stored { critical, .. }) => {
                    t.stored += 1;
                    t.critical += u64::from(*critical);
                }
                Ok(Outcome::OptedOut) => t.opted_out += 1,
                Ok(Outcome::RateLimited { event_type }) => {
                    t.rate_limited += 1;
                    *t.suppressed_by_type.entry(event_type.clone()).or_default() += 1;
                }
                Ok(Outcome::Duplicate) => t.duplicate += 1,
                Ok(Outcome::Invalid { .. }) => t.invalid += 1,
                Err(_) => t.refused += 1,
            }
        }
        t
    }

    /// Jobs answered with an outcome.
    pub fn outcomes(&self) -> u64 {
        self.stored + self.opted_out + self.rate_limited + self.duplicate + self.invalid
    }

    /// Add the counts to `/metrics`.
    pub fn record(&self) {
        for (label, n) in [
            ("stored", self.stored),
            ("opted_out", self.opted_out),
            ("rate_limited", self.rate_limited),
            ("duplicate", self.duplicate),
            ("invalid", self.invalid),
            ("failed", self.refused + self.retried),
        ] {
            if n > 0 {
                counter!(series::EVENTS, "outcome" => label).increment(n);
            }
        }
        if self.critical > 0 {
            counter!(series::CRITICAL_DELIVERIES).increment(self.critical);
        }
        for (event_type, n) in &self.suppressed_by_type {
            counter!(series::SUPPRESSED, "event_type" => event_type.clone()).increment(*n);
        }
        for (kind, n) in [("permanent", self.refused), ("transient", self.retried)] {
            if n > 0 {
                counter!(series::JOB_FAILURES, "kind" => kind).increment(n);
            }
        }
    }
}
