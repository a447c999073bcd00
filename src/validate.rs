//! Validate: turn untrusted input into typed values, or into a reason for refusing it.
//!
//! Two kinds of input reach the worker:
//! * the job payload in `apalis.jobs.job`, which should be `{"event_id": N}` as written by
//!   the `notify.enqueue_events` trigger, but can be anything if someone writes the queue
//!   table by hand. [`parse_job`] never panics; a payload it refuses marks the job failed
//!   (status `Killed`, not retried) with the reason;
//! * the event row in `notify.events`, already guarded by constraints. [`validate_event`]
//!   checks the same rules again (defence in depth) and sanitizes body and link, so the
//!   store step only ever receives [`ValidEvent`]s.

use serde::Deserialize;

use crate::sanitize::{PlainText, Rejected, SafeLink, sanitize_body, sanitize_link};

/// Longest user id accepted (the same limit as the `events_user_id_valid` constraint).
pub const MAX_USER_ID_CHARS: usize = 128;

/// Bytes of a job payload read at most; a valid payload is about 30 bytes.
const MAX_PAYLOAD_BYTES: usize = 4096;

/// Why a job payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadJob {
    #[error("payload is larger than {MAX_PAYLOAD_BYTES} bytes")]
    TooLarge,
    #[error("payload is not JSON of the form {{\"event_id\": <positive integer>}}: {0}")]
    Malformed(String),
    #[error(
        "event {0} does not exist (never enqueued through notify.events, or already deleted by retention)"
    )]
    NoSuchEvent(i64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    event_id: i64,
}

/// Read the event id out of a job payload (the raw bytes of `apalis.jobs.job`: they are
/// never decoded by apalis, so no payload can make its worker exit with a codec error).
pub fn parse_job(job: &[u8]) -> Result<i64, BadJob> {
    if job.len() > MAX_PAYLOAD_BYTES {
        return Err(BadJob::TooLarge);
    }
    let payload: Payload =
        serde_json::from_slice(job).map_err(|e| BadJob::Malformed(e.to_string()))?;
    if payload.event_id <= 0 {
        return Err(BadJob::Malformed(format!(
            "event_id {} is not positive",
            payload.event_id
        )));
    }
    Ok(payload.event_id)
}

/// An event row as stored in `notify.events`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub user_id: String,
    pub event_type: String,
    pub body: String,
    pub link: Option<String>,
    /// Set once the event has been processed; a job for such an event is a duplicate run.
    pub outcome: Option<String>,
}

/// An event that passed every check, with its text sanitized.
#[derive(Debug, Clone)]
pub struct ValidEvent {
    pub id: i64,
    pub user_id: String,
    pub event_type: String,
    pub body: PlainText,
    pub link: Option<SafeLink>,
}

/// Why an event was refused. Stored as `notify.events.outcome_reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error(
        "user_id must be 1 to {MAX_USER_ID_CHARS} characters without spaces or control characters"
    )]
    UserId,
    #[error("event_type {0:?} is not a valid type name")]
    EventType(String),
    #[error(transparent)]
    Content(#[from] Rejected),
}

/// Check an event row and sanitize its body and link.
pub fn validate_event(row: &EventRow) -> Result<ValidEvent, InvalidEvent> {
    let user_ok = !row.user_id.is_empty()
        && row.user_id.chars().count() <= MAX_USER_ID_CHARS
        && !row
            .user_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace());
    if !user_ok {
        return Err(InvalidEvent::UserId);
    }
    if !is_type_name(&row.event_type) {
        return Err(InvalidEvent::EventType(row.event_type.clone()));
    }
    let body = sanitize_body(&row.body)?;
    let link = row.link.as_deref().map(sanitize_link).transpose()?;
    Ok(ValidEvent {
        id: row.id,
        user_id: row.user_id.clone(),
        event_type: row.event_type.clone(),
        body,
        link,
    })
}

/// The `event_types_name_format` rule: lowercase snake case, at most 63 characters.
fn is_type_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && s.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_documented_payload() {
        assert_eq!(parse_job(br#"{"event_id":7}"#), Ok(7));
        for bad in [
            &b"\xff\xfe"[..],
            b"",
            b"null",
            b"[]",
            b"{}",
            br#"{"event_id":"7"}"#,
            br#"{"event_id":-1}"#,
            br#"{"event_id":1e400}"#,
            br#"{"event_id":7,"x":1}"#,
        ] {
            assert!(
                parse_job(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse_job(&[b' '; 5000]), Err(BadJob::TooLarge));
    }

    fn row(user: &str, ty: &str, body: &str, link: Option<&str>) -> EventRow {
        EventRow {
            id: 1,
            user_id: user.into(),
            event_type: ty.into(),
            body: body.into(),
            link: link.map(Into::into),
            outcome: None,
        }
    }

    #[test]
    fn validates_rows() {
        let ok = validate_event(&row("42", "new_message", "<i>hi</i>", Some("/m/1"))).unwrap();
        assert_eq!(ok.body.as_str(), "hi");
        assert_eq!(ok.link.unwrap().as_str(), "/m/1");
        assert_eq!(
            validate_event(&row("4 2", "new_message", "hi", None)).unwrap_err(),
            InvalidEvent::UserId
        );
        assert!(matches!(
            validate_event(&row("42", "New", "hi", None)).unwrap_err(),
            InvalidEvent::EventType(_)
        ));
        assert_eq!(
            validate_event(&row("42", "new_message", "hi", Some("javascript:x"))).unwrap_err(),
            InvalidEvent::Content(Rejected::LinkNotAllowed)
        );
    }
}
