//! Operator commands: `notifyd status` and `notifyd jobs stats|failed|show|retry|discard|settings|enqueue-by`.
//!
//! Every command reads or changes the queue of `notifyd.events` only, prints aligned text
//! for a human (or JSON with `--json`), and exits non-zero when it could not do all it was
//! asked. This module holds the arguments and the commands; the statements are in
//! [`queries`] (the worker's metrics loop reads the same counts), the text in [`render`].
//!
//! Vocabulary (what operators see; a job is named by its event's id):
//! * **pending**: due, waiting to be claimed in a slot of the queue (`notify.queue_0..3`).
//!   A batch in flight is invisible as a state (its claim is a row lock), so its jobs count
//!   as pending until it commits;
//! * **scheduled**: not due yet (a later `run_at`);
//! * **retry wait**: failed with attempts left, due again after a backoff
//!   (`notify.queue_later`);
//! * **failed**: final, kept with the reason until retention deletes it
//!   (`notify.queue_dead`): refused (its event does not exist) or exhausted (at the attempt
//!   limit). `jobs retry` puts them back; `jobs discard` deletes them;
//! * **depth** = pending + scheduled + retry wait; **lag** = age of the oldest due job;
//! * **intake**: how the queue is fed (the enqueue trigger, or the workers' intake), and
//!   in intake mode the committed events not yet taken in;
//! * **slots**: the rotation of the queue's tables, and the **oldest open transaction**
//!   that holds back vacuum (its pid, age and last statement).

pub mod queries;
pub mod render;

use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use sqlx::PgPool;

use crate::contract::QUEUE;
use queries::{
    discard_failed, event, failed_jobs, job, queue_stats, recent_outcomes, retry_failed,
    retry_settings, set_retry_settings, status,
};
pub use render::render_status;
use render::{plural, render_failed, render_job, render_outcomes, render_queue, render_settings};

/// Worker liveness: the worker's heartbeat settings, and how the status command tells
/// live workers from dead ones. One definition for both, so that they agree when they
/// share an environment.
#[derive(Debug, Clone, Args)]
pub struct LivenessArgs {
    /// Seconds between worker heartbeats.
    #[arg(long, env = "NOTIFYD_HEARTBEAT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub heartbeat_secs: u64,

    /// Heartbeats a worker may miss before `notifyd status` shows it gone (heartbeat × this).
    #[arg(long, env = "NOTIFYD_MISSED_HEARTBEATS", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(2..=100))]
    pub missed_heartbeats: u64,
}

impl LivenessArgs {
    pub fn silent_after(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs * self.missed_heartbeats)
    }
}

/// `notifyd status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub liveness: LivenessArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `notifyd jobs ...`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// Queue counts by state, depth, lag, and event outcomes over the last hour.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List failed jobs (refused, or out of attempts), newest first, with their reason.
    Failed {
        /// Most jobs listed.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one job (any state) and its event.
    Show {
        /// The job's event id (as listed by `jobs failed`).
        id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put failed jobs back in the queue, with their attempts reset.
    Retry(Selection),
    /// Delete failed jobs for good (their events keep no outcome).
    Discard(Selection),
    /// Switch how the queue is fed: `intake` (workers take committed events in; the
    /// backend's INSERT writes the event row alone) or `trigger` (the enqueue trigger
    /// writes each job in the backend's transaction). Run as the owner of the schema, once
    /// every worker runs this release; switch back to `trigger` before rolling back to a
    /// release older than migration 20261208000001 (docs/OPERATIONS.md, "Intake").
    EnqueueBy {
        #[arg(value_parser = ["trigger", "intake"])]
        mode: String,
    },
    /// Show the retry policy, or change it (applies to events enqueued and failures recorded
    /// from now on; no restart needed).
    Settings(SettingsArgs),
}

/// Which failed jobs a bulk command acts on.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
pub struct Selection {
    /// Event ids of the jobs, as listed by `jobs failed`.
    pub ids: Vec<i64>,
    /// Every failed job.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SettingsArgs {
    /// Attempts per job before it is failed for good (1-100).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub max_attempts: Option<i32>,
    /// Delay before the first retry, in seconds; it doubles with each attempt.
    #[arg(long)]
    pub retry_base_secs: Option<f64>,
    /// Longest delay between retries, in seconds.
    #[arg(long)]
    pub retry_max_secs: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `notifyd status`.
pub async fn run_status(pool: &PgPool, args: &StatusArgs) -> anyhow::Result<()> {
    let status = status(pool, args.liveness.silent_after()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

/// `notifyd jobs ...`.
pub async fn run_jobs(pool: &PgPool, args: &JobsArgs) -> anyhow::Result<()> {
    match &args.command {
        JobsCommand::Stats { json } => {
            let stats = queue_stats(pool).await?;
            let outcomes = recent_outcomes(pool).await?;
            if *json {
                let value = serde_json::json!({
                    "queue": QUEUE, "depth": stats.depth(), "jobs": stats,
                    "events_last_hour": outcomes,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let mut out = render_queue(&stats);
                out.push('\n');
                out.push_str(&render_outcomes(&outcomes));
                print!("{out}");
            }
        }
        JobsCommand::Failed { limit, json } => {
            let (jobs, total) = failed_jobs(pool, *limit).await?;
            if *json {
                let value = serde_json::json!({ "total": total, "jobs": jobs });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_failed(&jobs, total));
            }
        }
        JobsCommand::Show { id, json } => {
            let job = job(pool, *id).await?.with_context(|| {
                format!(
                    "no job for event {id} in queue {QUEUE} (a finished job is deleted with \
                     its outcome recorded: see notify.event_outcomes for its event)"
                )
            })?;
            let event = event(pool, job.event_id).await?;
            if *json {
                let value = serde_json::json!({ "job": job, "event": event });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_job(&job, event.as_ref()));
            }
        }
        JobsCommand::Retry(sel) | JobsCommand::Discard(sel) => {
            let retry = matches!(args.command, JobsCommand::Retry(_));
            let ids = (!sel.all).then_some(sel.ids.as_slice());
            let changed = if retry {
                retry_failed(pool, ids).await?
            } else {
                discard_failed(pool, ids).await?
            };
            let verb = if retry { "retried" } else { "discarded" };
            println!(
                "{verb} {} failed job{}",
                changed.len(),
                plural(changed.len())
            );
            for id in &changed {
                println!("  {id}");
            }
            if let Some(ids) = ids {
                let missing: Vec<&i64> = ids.iter().filter(|id| !changed.contains(id)).collect();
                if !missing.is_empty() {
                    for id in &missing {
                        eprintln!(
                            "  {id}: no failed job of {QUEUE} for this event (see `notifyd jobs failed`)"
                        );
                    }
                    anyhow::bail!(
                        "{} of the {} jobs named were not failed jobs",
                        missing.len(),
                        ids.len()
                    );
                }
            }
        }
        JobsCommand::EnqueueBy { mode } => {
            let was = crate::claim::intake::mode(pool).await?;
            let now = crate::claim::intake::switch(pool, mode).await.context(
                "cannot switch how the queue is fed (run as the owner of notify.events)",
            )?;
            if was == now {
                println!("the queue was already fed by {now}");
            } else {
                println!("the queue is now fed by {now} (was {was})");
            }
        }
        JobsCommand::Settings(s) => {
            if s.max_attempts.is_some() || s.retry_base_secs.is_some() || s.retry_max_secs.is_some()
            {
                set_retry_settings(pool, s.max_attempts, s.retry_base_secs, s.retry_max_secs)
                    .await
                    .context("cannot change the retry policy (base must be in (0, 3600] s, max in [base, 86400] s)")?;
            }
            let settings = retry_settings(pool).await?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                print!("{}", render_settings(&settings));
            }
        }
    }
    Ok(())
}
