//! Validate: turn untrusted input into typed values, or into a reason for refusing it.
//!
//! The input that reaches the worker is the event row in `notify.events`, already guarded
//! by constraints. [`validate_event`] checks the same rules again (defence in depth) and
//! sanitizes body and link, so the store step only ever receives [`ValidEvent`]s. A queue
//! job is an event id in a typed column: the only way it can be bad is that its event does
//! not exist ([`BadJob::NoSuchEvent`]); it is then refused for good, with the reason.

use crate::sanitize::{PlainText, Rejected, SafeLink, sanitize_body, sanitize_link};

/// Longest user id accepted (the same limit as the `events_user_id_valid` constraint).
pub const MAX_USER_ID_CHARS: usize = 128;

/// Why a job was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadJob {
    #[error(
        "event {0} does not exist (never enqueued through notify.events, or already deleted by retention)"
    )]
    NoSuchEvent(i64),
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
