//! The pipeline for one batch of claimed jobs:
//! parse payload → load event → validate and sanitize → preferences, rate limit and store
//! (one transaction, see [`crate::store`]).
//!
//! Invariants:
//! * every job gets exactly one answer: an [`Outcome`] (the job is done), a [`JobError::Bad`]
//!   (the job is failed for good with the reason, never retried), or a
//!   [`JobError::Transient`] (the database failed even after retries with backoff; apalis
//!   retries the job later);
//! * nothing here panics on input: payloads and rows are validated, not trusted;
//! * sanitizing runs on the blocking pool, off the async runtime's worker threads.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;

use crate::metrics;
use crate::store::{self, Decision, Prepared, RateLimit};
use crate::validate::{BadJob, EventRow, RawJob, parse_job, validate_event};

/// What happened to one event. This is the job's result in `apalis.jobs.last_result`, and
/// (except `duplicate`) the event's `outcome` in `notify.event_outcomes`: for `stored`, the
/// notification; for the others, the `outcome` written on its `notify.events` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A notification was written.
    Stored { notification_id: Option<i64> },
    /// The user switched this event type off.
    OptedOut,
    /// The user reached the rate limit; the event is kept with this outcome.
    RateLimited,
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
            Outcome::RateLimited => "rate_limited",
            Outcome::Duplicate => "duplicate",
            Outcome::Invalid { .. } => "invalid",
        }
    }
}

/// Why a job did not get an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The job itself is bad; retrying cannot help.
    #[error(transparent)]
    Bad(#[from] BadJob),
    /// The database failed; retrying later may help.
    #[error("database unavailable: {0}")]
    Transient(String),
}

/// How the pipeline retries database failures before giving a job back to apalis.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Give up (and report [`JobError::Transient`]) once this much time has passed.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            give_up_after: Duration::from_secs(30),
        }
    }
}

/// Settings and connections the pipeline needs.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub pool: PgPool,
    pub rate: RateLimit,
    pub retry: RetryPolicy,
    /// Fixed clock for tests; `None` uses the database clock.
    pub now: Option<DateTime<Utc>>,
}

impl Pipeline {
    pub fn new(pool: PgPool, rate: RateLimit) -> Self {
        Self {
            pool,
            rate,
            retry: RetryPolicy::default(),
            now: None,
        }
    }

    /// Process a batch; the answers are in the same order as `jobs`. Database failures are
    /// retried with backoff (see [`RetryPolicy`]); if they persist, every job whose event
    /// was loadable gets [`JobError::Transient`].
    pub async fn process(&self, jobs: &[RawJob]) -> Vec<Result<Outcome, JobError>> {
        let (parsed, ids) = parse_all(jobs);
        let decided = self.decide(ids).instrument(batch_span(jobs, &parsed)).await;
        answer_all(parsed, &decided)
    }

    /// Process a batch inside the caller's open transaction, once (no retry: a failed
    /// statement leaves the transaction unusable, so the caller rolls back and the jobs
    /// stay in the queue). On `Ok`, every answer is an [`Outcome`] or a [`JobError::Bad`],
    /// in the same order as `jobs`, and nothing is committed until the caller commits.
    ///
    /// `job_ids` are the queue rows of `jobs` (same order): the ones whose event exists
    /// are deleted in the store statement, since they get an outcome (see
    /// [`store::apply_in`]); the others get [`JobError::Bad`] and are the caller's to settle.
    pub async fn process_in(
        &self,
        tx: &mut PgConnection,
        jobs: &[RawJob],
        job_ids: &[&str],
    ) -> Result<Vec<Result<Outcome, JobError>>, sqlx::Error> {
        let (parsed, ids) = parse_all(jobs);
        let span = batch_span(jobs, &parsed);
        let by_event: Vec<(i64, &str)> = parsed
            .iter()
            .zip(job_ids)
            .filter_map(|(p, job)| p.as_ref().ok().map(|&event| (event, *job)))
            .collect();
        let decided = if ids.is_empty() {
            HashMap::new()
        } else {
            self.decide_in(tx, &ids, &by_event).instrument(span).await?
        };
        Ok(answer_all(parsed, &Ok(decided)))
    }

    /// Decide every event in `ids`, retrying database failures with backoff.
    async fn decide(
        &self,
        ids: Vec<i64>,
    ) -> Result<HashMap<i64, Result<Outcome, JobError>>, JobError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let started = std::time::Instant::now();
        let mut delay = self.retry.first_delay;
        loop {
            match self.decide_once(&ids).await {
                Ok(map) => return Ok(map),
                Err(e) if is_transient(&e) && started.elapsed() < self.retry.give_up_after => {
                    let jittered = delay.mul_f64(0.5 + fastrand::f64());
                    tracing::warn!(error = %e, retry_in_ms = jittered.as_millis() as u64, "store failed; retrying");
                    tokio::time::sleep(jittered).await;
                    delay = (delay * 2).min(self.retry.max_delay);
                }
                Err(e) => {
                    tracing::error!(error = %e, "store failed; giving the jobs back to the queue");
                    return Err(JobError::Transient(e.to_string()));
                }
            }
        }
    }

    async fn decide_once(
        &self,
        ids: &[i64],
    ) -> Result<HashMap<i64, Result<Outcome, JobError>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let answers = self.decide_in(&mut tx, ids, &[]).await?;
        tx.commit().await?;
        Ok(answers)
    }

    /// Load, sanitize and store `ids` in the open transaction `tx`. Of `jobs` (event id,
    /// queue row), the rows whose event exists are deleted in the same statement.
    async fn decide_in(
        &self,
        tx: &mut PgConnection,
        ids: &[i64],
        jobs: &[(i64, &str)],
    ) -> Result<HashMap<i64, Result<Outcome, JobError>>, sqlx::Error> {
        let t0 = std::time::Instant::now();
        let rows = store::fetch_events(&mut *tx, ids).await?;
        let found: HashSet<i64> = rows.iter().map(|r| r.id).collect();
        let finished: Vec<&str> = jobs
            .iter()
            .filter(|(event, _)| found.contains(event))
            .map(|(_, job)| *job)
            .collect();
        let t1 = std::time::Instant::now();
        let (mut answers, prepared) = tokio::task::spawn_blocking(move || prepare(rows))
            .await
            .map_err(|e| sqlx::Error::Protocol(format!("sanitizer task failed: {e}")))?;
        let t2 = std::time::Instant::now();
        let decisions = store::apply_in(tx, &prepared, &finished, self.rate, self.now).await?;
        ::metrics::histogram!(metrics::STORE_SECONDS).record(t2.elapsed().as_secs_f64());
        tracing::debug!(
            batch = ids.len(),
            load_ms = (t1 - t0).as_secs_f64() * 1e3,
            sanitize_ms = (t2 - t1).as_secs_f64() * 1e3,
            store_ms = t2.elapsed().as_secs_f64() * 1e3,
            "batch processed"
        );
        let mut by_id: HashMap<i64, Decision> =
            decisions.into_iter().map(|d| (d.event_id, d)).collect();
        for p in &prepared {
            let outcome = match by_id.remove(&p.event_id) {
                None => Outcome::Duplicate,
                Some(d) => match d.outcome.as_str() {
                    "stored" => Outcome::Stored {
                        notification_id: d.notification_id,
                    },
                    "opted_out" => Outcome::OptedOut,
                    "rate_limited" => Outcome::RateLimited,
                    _ => Outcome::Invalid {
                        reason: p.invalid.clone().unwrap_or_default(),
                    },
                },
            };
            answers.insert(p.event_id, Ok(outcome));
        }
        Ok(answers)
    }
}

type Decided = Result<HashMap<i64, Result<Outcome, JobError>>, JobError>;

/// Parse every payload; also the distinct event ids, sorted.
fn parse_all(jobs: &[RawJob]) -> (Vec<Result<i64, BadJob>>, Vec<i64>) {
    let parsed: Vec<Result<i64, BadJob>> = jobs.iter().map(parse_job).collect();
    let mut ids: Vec<i64> = parsed
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ::metrics::histogram!(metrics::BATCH_JOBS).record(jobs.len() as f64);
    (parsed, ids)
}

fn batch_span(jobs: &[RawJob], parsed: &[Result<i64, BadJob>]) -> tracing::Span {
    let ids = parsed.iter().filter_map(|r| r.as_ref().ok());
    tracing::info_span!(
        "batch",
        jobs = jobs.len(),
        first_event = ids.clone().min().copied(),
        last_event = ids.max().copied(),
    )
}

/// One answer per parsed job, in order. Two jobs for one event in the same batch: the
/// first gets the outcome, the others `duplicate`.
fn answer_all(
    parsed: Vec<Result<i64, BadJob>>,
    decided: &Decided,
) -> Vec<Result<Outcome, JobError>> {
    let mut seen = HashSet::new();
    parsed
        .into_iter()
        .map(|p| {
            let id = p?;
            let answer = match decided {
                Ok(map) => map
                    .get(&id)
                    .cloned()
                    .unwrap_or(Err(JobError::Bad(BadJob::NoSuchEvent(id)))),
                Err(e) => Err(e.clone()),
            };
            if !seen.insert(id) && answer.is_ok() {
                return Ok(Outcome::Duplicate);
            }
            answer
        })
        .collect()
}

/// Validate and sanitize loaded rows. Rows already processed are answered at once.
fn prepare(rows: Vec<EventRow>) -> (HashMap<i64, Result<Outcome, JobError>>, Vec<Prepared>) {
    let mut answers = HashMap::new();
    let mut prepared = Vec::with_capacity(rows.len());
    for row in rows {
        if row.outcome.is_some() {
            answers.insert(row.id, Ok(Outcome::Duplicate));
            continue;
        }
        prepared.push(match validate_event(&row) {
            Ok(valid) => Prepared {
                event_id: valid.id,
                user_id: valid.user_id,
                event_type: valid.event_type,
                body: Some(valid.body.into_string()),
                link: valid.link.map(|l| l.into_string()),
                invalid: None,
            },
            Err(reason) => Prepared {
                event_id: row.id,
                user_id: row.user_id,
                event_type: row.event_type,
                body: None,
                link: None,
                invalid: Some(reason.to_string()),
            },
        });
    }
    (answers, prepared)
}

/// Errors worth retrying: lost or refused connections, and conflicts that a retry resolves.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                || code.starts_with("53") // insufficient resources
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
                || code == "55P03" // lock not available (lock_timeout)
                || code == "25P03" // idle_in_transaction_session_timeout ended the session
        }),
        _ => false,
    }
}
