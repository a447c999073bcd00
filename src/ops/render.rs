//! The operator commands' text output: aligned tables for a human. (`--json` prints the
//! query rows with serde instead.)

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::queries::{
    DigestStats, EventView, HorizonHolder, IntakeRow, JobView, QueueStats, RetrySettings, SlotRow,
    Status, WorkerRow,
};
use crate::contract::QUEUE;

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Seconds as a short human duration: 850 ms, 4.2 s, 3 min 20 s, 2 h 05 min.
pub fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1e3)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{} min {:02} s", (secs / 60.0) as u64, secs as u64 % 60)
    } else {
        format!(
            "{} h {:02} min",
            (secs / 3600.0) as u64,
            (secs as u64 % 3600) / 60
        )
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn opt_ts(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map_or_else(|| "-".to_owned(), ts)
}

/// Columns padded to their widest cell; `right[i]` right-aligns column `i`.
fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if right.get(i).copied().unwrap_or(false) {
                s.push_str(&pad);
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if i + 1 < cells.len() {
                    s.push_str(&pad);
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

pub(super) fn render_queue(s: &QueueStats) -> String {
    let mut out = format!("Queue {QUEUE}\n");
    let rows = vec![
        vec![
            "depth".into(),
            s.depth().to_string(),
            "jobs not finished (the rows below, without failed)".into(),
        ],
        vec![
            "  pending".into(),
            s.pending.to_string(),
            "due, waiting to be claimed (or in a batch in flight)".into(),
        ],
        vec![
            "  scheduled".into(),
            s.scheduled.to_string(),
            "not due yet".into(),
        ],
        vec![
            "  retry wait".into(),
            s.retrying.to_string(),
            "failed, attempts left, waiting out the backoff".into(),
        ],
        vec![
            "lag".into(),
            human_secs(s.lag_secs),
            "age of the oldest due job nobody has finished".into(),
        ],
        vec![
            "failed".into(),
            s.failed.to_string(),
            "final: see `notifyd jobs failed`".into(),
        ],
    ];
    out.push_str(&table(
        &["STATE", "JOBS", "MEANING"],
        &[false, true, false],
        &rows,
    ));
    out
}

pub(super) fn render_intake(i: &IntakeRow) -> String {
    if i.mode == "intake" {
        let oldest = if i.waiting > 0 {
            format!(", the oldest created {} ago", human_secs(i.oldest_secs))
        } else {
            String::new()
        };
        format!(
            "Fed by the workers' intake: {} committed event{} not yet taken in{oldest}\n",
            i.waiting,
            plural(i.waiting as usize)
        )
    } else {
        "Fed by the enqueue trigger (`notifyd jobs enqueue-by intake` switches)\n".to_owned()
    }
}

pub(super) fn render_slots(slots: &[SlotRow]) -> String {
    let mut out = String::from(
        "Queue slots (rotated every slot_secs; drained slots are truncated, dead rows and all)\n",
    );
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|s| {
            vec![
                s.slot.to_string(),
                s.state.clone(),
                format!("{} ago", human_secs(s.for_secs)),
            ]
        })
        .collect();
    out.push_str(&table(
        &["SLOT", "STATE", "SINCE"],
        &[true, false, true],
        &rows,
    ));
    out
}

pub(super) fn render_horizon(h: Option<&HorizonHolder>) -> String {
    let Some(h) = h else {
        return "Oldest open transaction: none holds back vacuum\n".to_owned();
    };
    let mut out = format!(
        "Oldest open transaction holding back vacuum: {} pid {}, open {}, {} transactions behind",
        h.kind,
        h.pid,
        h.age_secs
            .map_or_else(|| "(age not visible to this role)".to_owned(), human_secs),
        h.xmin_age
    );
    if let Some(u) = &h.user_name {
        let _ = write!(out, ", user {u}");
    }
    if let Some(a) = h.application_name.as_deref().filter(|a| !a.is_empty()) {
        let _ = write!(out, ", application {a}");
    }
    if let Some(st) = &h.state {
        let _ = write!(out, ", {st}");
    }
    out.push('\n');
    if let Some(q) = &h.query {
        let _ = writeln!(out, "  last statement: {}", shorten(q, 120));
    }
    if h.age_secs.unwrap_or(0.0) >= 60.0 || h.xmin_age >= 100_000 {
        out.push_str(
            "  While it is open, dead rows of events, notifications and rate windows stay; see \
             docs/OPERATIONS.md (\"A transaction left open\")\n",
        );
    }
    out
}

pub(super) fn render_outcomes(outcomes: &BTreeMap<String, i64>) -> String {
    let mut out = String::from("Events enqueued in the last hour, by outcome\n");
    if outcomes.is_empty() {
        out.push_str("  (none)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    out.push_str(&table(&["OUTCOME", "EVENTS"], &[false, true], &rows));
    out
}

pub(super) fn render_digests(d: &DigestStats) -> String {
    let mut out = String::from(
        "Rate limit and critical types, last hour (held back events go into one digest per user)\n",
    );
    let mut rows: Vec<Vec<String>> = d
        .suppressed_last_hour
        .iter()
        .map(|(t, n)| vec!["held back".into(), t.clone(), n.to_string()])
        .collect();
    rows.push(vec![
        "digests sent".into(),
        crate::digest::DIGEST_TYPE.into(),
        d.digests_last_hour.to_string(),
    ]);
    rows.extend(
        d.critical_last_hour
            .iter()
            .map(|(t, n)| vec!["critical delivered".into(), t.clone(), n.to_string()]),
    );
    out.push_str(&table(
        &["WHAT", "EVENT TYPE", "COUNT"],
        &[false, false, true],
        &rows,
    ));
    let _ = writeln!(
        out,
        "  waiting for room: {} digest{} summing up {} event{}",
        d.pending_users,
        plural(d.pending_users as usize),
        d.pending_events,
        plural(d.pending_events as usize)
    );
    out
}

pub(super) fn render_workers(workers: &[WorkerRow], silent_after: u64) -> String {
    let mut out = format!(
        "Workers (gone after {silent_after} s without a heartbeat; a batch in flight is a row \
         lock, and a gone worker's locks end with its sessions)\n"
    );
    if workers.is_empty() {
        out.push_str("  (none seen in the last hour)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                format!("{} ago", human_secs(w.silent_secs)),
                if w.alive { "alive" } else { "gone" }.to_owned(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["WORKER", "LAST HEARTBEAT", "STATE"],
        &[false, true, false],
        &rows,
    ));
    out
}

pub(super) fn render_settings(s: &RetrySettings) -> String {
    format!(
        "Retry policy (notify.queue_settings, changed {})\n  max attempts  {}\n  backoff       {} s, doubling per attempt, at most {} s, jitter ±50%\n",
        ts(&s.updated_at),
        s.max_attempts,
        s.retry_base_secs,
        s.retry_max_secs
    )
}

pub fn render_status(s: &Status) -> String {
    let mut out = render_queue(&s.jobs);
    out.push('\n');
    out.push_str(&render_slots(&s.slots));
    out.push_str(&render_intake(&s.intake));
    out.push('\n');
    out.push_str(&render_horizon(s.horizon.as_ref()));
    out.push('\n');
    out.push_str(&render_outcomes(&s.events_last_hour));
    out.push('\n');
    out.push_str(&render_digests(&s.digests));
    out.push('\n');
    out.push_str(&render_workers(&s.workers, s.silent_after_secs));
    if let Some(r) = &s.retry {
        out.push('\n');
        out.push_str(&render_settings(r));
    }
    out
}

fn shorten(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

pub(super) fn render_failed(jobs: &[JobView], total: i64) -> String {
    if total == 0 {
        return format!("No failed jobs in {QUEUE}.\n");
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.event_id.to_string(),
                if j.attempts >= j.max_attempts {
                    "exhausted".into()
                } else {
                    "refused".into()
                },
                format!("{}/{}", j.attempts, j.max_attempts),
                ts(&j.run_at),
                shorten(j.reason.as_deref().unwrap_or("-"), 100),
            ]
        })
        .collect();
    let mut out = format!(
        "{total} failed job{} in {QUEUE}{}\n",
        plural(total as usize),
        if (jobs.len() as i64) < total {
            format!(" (newest {} shown; --limit for more)", jobs.len())
        } else {
            String::new()
        }
    );
    out.push_str(&table(
        &["EVENT", "KIND", "ATTEMPTS", "FAILED AT (UTC)", "REASON"],
        &[true, false, true, false, false],
        &rows,
    ));
    out.push_str("Inspect: notifyd jobs show <EVENT> · retry: notifyd jobs retry <EVENT>|--all · delete: notifyd jobs discard <EVENT>|--all\n");
    out
}

pub(super) fn render_job(j: &JobView, e: Option<&EventView>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Job of event {}", j.event_id);
    let _ = writeln!(out, "  status        {}", j.status);
    let _ = writeln!(out, "  waits in      {}", j.place);
    let _ = writeln!(out, "  attempts      {}/{}", j.attempts, j.max_attempts);
    let _ = writeln!(
        out,
        "  {}        {}",
        if j.status == "failed" {
            "failed"
        } else {
            "due   "
        },
        ts(&j.run_at)
    );
    let _ = writeln!(
        out,
        "  worker        {}",
        j.worker.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "  last error    {}",
        j.reason.as_deref().unwrap_or("-")
    );
    match e {
        None => {
            let _ = writeln!(
                out,
                "Event {}: not found (deleted by retention, or by hand)",
                j.event_id
            );
        }
        Some(e) => {
            let _ = writeln!(out, "Event {}", e.id);
            let _ = writeln!(out, "  user          {}", e.user_id);
            let _ = writeln!(out, "  type          {}", e.event_type);
            let _ = writeln!(out, "  created at    {}", ts(&e.created_at));
            let _ = writeln!(
                out,
                "  outcome       {}",
                e.outcome.as_deref().unwrap_or("(none yet)")
            );
            if let Some(r) = &e.outcome_reason {
                let _ = writeln!(out, "  reason        {r}");
            }
            let _ = writeln!(out, "  processed at  {}", opt_ts(&e.processed_at));
            let _ = writeln!(
                out,
                "  notification  {}",
                e.notification_id
                    .map_or_else(|| "-".to_owned(), |n| n.to_string())
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(0.25), "250 ms");
        assert_eq!(human_secs(4.21), "4.2 s");
        assert_eq!(human_secs(200.0), "3 min 20 s");
        assert_eq!(human_secs(7500.0), "2 h 05 min");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "NUM"],
            &[false, true],
            &[
                vec!["long name".into(), "7".into()],
                vec!["x".into(), "1234".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], format!("  A{}NUM", " ".repeat(11)));
        assert_eq!(lines[1], format!("  long name{}7", " ".repeat(5)));
        assert_eq!(lines[2], format!("  x{}1234", " ".repeat(10)));
    }
}
