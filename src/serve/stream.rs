//! `GET /api/notifications/stream`: the user's new notifications as Server-Sent Events.
//!
//! Protocol (docs/API.md has the client's side):
//! * the stream opens with a `retry:` hint, then sends one event per notification in
//!   ascending id order: `id: <id>`, `event: notification`, `data: <the list endpoint's
//!   JSON item>`. After [`AppState::stream_heartbeat`] of silence it sends a comment
//!   (`: heartbeat`), so that proxies keep the connection and a vanished client is noticed;
//! * where it starts: after `Last-Event-ID` (what a reconnecting `EventSource` sends, so
//!   it wins over the URL), else after `?after=`, else after the user's newest
//!   notification (new ones only). A cursor is checked exactly as the list endpoint checks
//!   it (410 `cursor_expired`, 400 `invalid_cursor`), before the stream starts;
//! * no gap, no repeat: the stream subscribes to the hub before its first read, reads
//!   pages of `id > cursor` in ascending order with the list endpoint's own read (so the
//!   cache spares idle checks a query), moves the cursor to the last id it queued, and
//!   reads again whenever the hub says something may be new. Per-user ids grow in commit
//!   order, so `id > cursor` never skips a notification that commits later;
//! * the token comes from `Authorization: Bearer` or, for `EventSource`, from
//!   `?access_token=` (never both), else from the configured cookie; request logs never
//!   carry the query string
//!   ([`super::middleware::trace`]);
//! * caps: per user and per process ([`super::hub::StreamLimits`]), answered 429 / 503
//!   before the stream starts;
//! * the request timeout covers everything up to the response head (authentication and
//!   the first read), never the body. A stream ends on shutdown
//!   ([`super::hub::Hub::close`]), when the client goes away (noticed at the latest at the
//!   next heartbeat), or after a failed read (logged; the client reconnects with
//!   `Last-Event-ID` and resumes where it was).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::api::{self, PageQuery};
use super::auth::{self, UserId};
use super::error::{ApiError, AuthFailure, ErrorBody};
use super::hub::{Refused, Subscription, Wake};
use super::reads::Feed;

/// The reconnect delay suggested to clients (`retry:`).
pub const RETRY_HINT: Duration = Duration::from_secs(3);
/// Notifications read per query while catching up.
const PAGE: i64 = api::MAX_LIMIT;

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// One event of the stream, as an SSE client parses it (in OpenAPI 3.1 the schema of a
/// `text/event-stream` body describes one event). The first event carries only `retry`;
/// every other one `id`, `event` and `data`. Heartbeat comments are not events.
#[derive(Debug, ToSchema)]
pub struct StreamEvent {
    /// The notification id (send it back as `Last-Event-ID` to resume).
    #[schema(example = "1042")]
    pub id: Option<String>,
    /// Always `notification`.
    #[schema(example = "notification")]
    pub event: Option<String>,
    /// The notification as one line of JSON: exactly an item of a page's
    /// `notifications` (schema `Notification`).
    #[schema(
        example = r#"{"id":1042,"event_type":"new_message","body":"You have a new message from Alice","link":"/messages/7","created_at":"2026-11-22T08:00:00.123456Z","read_at":null}"#
    )]
    pub data: Option<String>,
    /// Suggested reconnect delay in milliseconds (first event only).
    #[schema(example = 3000)]
    pub retry: Option<u64>,
}

/// Query parameters of the stream, as documented; [`StreamQuery::parse`] is the parser.
#[derive(Debug, Clone, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Cursor: start after this notification id (replaying what came after it). The
    /// `Last-Event-ID` header, when present, wins. Absent both: only notifications newer
    /// than the user's newest one now.
    #[param(minimum = 0, example = 1000)]
    pub after: Option<i64>,
    /// The JWT, for clients that cannot set `Authorization` (browsers' `EventSource`).
    /// Only on this endpoint; never together with the header. Prefer the header where
    /// you can: URLs end up in browser history and in proxies' logs.
    pub access_token: Option<String>,
}

/// Parsed query parameters of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamQuery {
    pub after: Option<i64>,
    pub access_token: Option<String>,
}

impl StreamQuery {
    /// Parse strictly: only `after` and `access_token`, each at most once.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let [after, access_token] = api::strict_query(query, ["after", "access_token"])?;
        let after = api::parse_after(after)?;
        Ok(StreamQuery {
            after,
            access_token,
        })
    }
}

/// The `Last-Event-ID` header: absent or empty is `None`.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let mut values = headers.get_all(LAST_EVENT_ID).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_parameter",
            "`Last-Event-ID` must be one notification id (an event's `id`)",
        )
    };
    if values.next().is_some() {
        return Err(bad());
    }
    let value = value.to_str().map_err(|_| bad())?.trim();
    if value.is_empty() {
        return Ok(None);
    }
    api::decimal(value).map(Some).ok_or_else(bad)
}

/// Stream this user's notifications.
#[utoipa::path(
    get,
    path = "/api/notifications/stream",
    tag = "notifications",
    params(
        StreamParams,
        ("Last-Event-ID" = Option<i64>, Header, minimum = 0, nullable = false,
         description = "Resume after this notification id (browsers send it when they reconnect); wins over `after`"),
    ),
    security(("bearer" = []), ("access_token" = [])),
    responses(
        (status = 200, description = "A Server-Sent Events stream. It opens with `retry: 3000`; each notification is an event with `id: <id>`, `event: notification` and `data: <a Notification as JSON>`, in ascending id order; `: heartbeat` comments keep it alive. It ends on server shutdown: reconnect with `Last-Event-ID`.",
         content_type = "text/event-stream", body = StreamEvent),
        (status = 400, description = "Invalid or unknown parameter, both a header and a query token, or a cursor never issued to this user (`invalid_cursor`)", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or unverifiable token, no user in its user claim (`invalid_user_claim`), or not an access token (`token_claim_mismatch`)", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "Bearer challenge (RFC 6750)"))),
        (status = 410, description = "`cursor_expired`: notifications after the cursor were deleted before the client saw them; reconnect without a cursor", body = ErrorBody),
        (status = 429, description = "Per-user request limit (`rate_limited`) or per-user stream cap (`too_many_streams`) reached", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Database unreachable, request timed out, or the server's stream cap reached (`streams_full`)", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = StreamQuery::parse(query.as_deref())?;
    let token = match (auth::header_token(&headers)?, query.access_token.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "send the token once: in the Authorization header or as `access_token`, \
                 not both",
            ));
        }
        (Some(token), None) | (None, Some(token)) => Cow::Borrowed(token),
        // Neither: the configured cookie, if any (an explicit token wins over it).
        (None, None) => auth::cookie_token(&state, &headers)?
            .ok_or(ApiError::Unauthorized(AuthFailure::Missing))?,
    };
    let (user, valid_until) = auth::admit_until(&state, &token)?;
    let resume = match last_event_id(&headers)? {
        Some(id) => Some(id),
        None => query.after,
    };

    // Subscribe before the first read: whatever commits after it wakes the stream.
    let subscription =
        state
            .hub()
            .subscribe(user.as_str(), true)
            .map_err(|refused| match refused {
                Refused::UserFull => ApiError::TooManyStreams,
                Refused::ProcessFull => ApiError::StreamsFull,
                Refused::Closing => ApiError::Unavailable,
            })?;
    let mut live = Live {
        state: state.clone(),
        user,
        subscription,
        cursor: 0,
        queue: VecDeque::new(),
        more: false,
    };
    match resume {
        // The first page is read now, so that an expired or foreign cursor is an HTTP
        // error, not a stream that ends at once.
        Some(after) => {
            live.cursor = after;
            let page = api::read(&state, &live.user, Feed::All, live.page_query()).await?;
            live.take(page.notifications)?;
        }
        None => live.cursor = api::newest(&state, &live.user).await?,
    }

    let retry = futures::stream::once(async { Ok(Event::default().retry(RETRY_HINT)) });
    let events = futures::stream::unfold(live, |mut live| async move {
        let event = live.next().await?;
        Some((Ok::<_, Infallible>(event), live))
    });
    let keep_alive = KeepAlive::new()
        .interval(state.stream_heartbeat())
        .text("heartbeat");
    // A stream lives no longer than its token: at expiry it ends, and the client
    // reconnects with a fresh token and `Last-Event-ID`, losing nothing.
    let expires_in = Duration::from_secs(valid_until.saturating_sub(unix_now()));
    let events = events.take_until(tokio::time::sleep(expires_in));
    let mut response = Sse::new(retry.chain(events))
        .keep_alive(keep_alive)
        .into_response();
    // nginx buffers proxied responses by default, which would hold events back.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// One open stream: its cursor, and the events read but not yet sent.
struct Live {
    state: AppState,
    user: UserId,
    subscription: Subscription,
    /// The last id queued; every notification up to it has been read.
    cursor: i64,
    queue: VecDeque<(i64, String)>,
    /// The last read filled a page: read again without waiting.
    more: bool,
}

impl Live {
    fn page_query(&self) -> PageQuery {
        PageQuery {
            after: Some(self.cursor),
            limit: PAGE,
            wait: None,
        }
    }

    fn take(&mut self, rows: super::reads::PageRows) -> Result<(), ApiError> {
        self.more = rows.len() as i64 >= PAGE;
        let items = rows.items()?;
        if let Some(&(last, _)) = items.last() {
            self.cursor = last;
        }
        self.queue.extend(items);
        Ok(())
    }

    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some((id, json)) = self.queue.pop_front() {
                return Some(
                    Event::default()
                        .id(id.to_string())
                        .event("notification")
                        .data(json),
                );
            }
            if self.subscription.is_closing() {
                return None;
            }
            if !self.more && self.subscription.changed(self.cursor).await == Wake::Closing {
                return None;
            }
            // Boxed: the read's state machine is large, and an idle stream would carry
            // it inline all the time it waits (a few KiB per stream).
            let read = Box::pin(api::read(
                &self.state,
                &self.user,
                Feed::All,
                self.page_query(),
            ))
            .await;
            if let Err(e) = read.and_then(|page| self.take(page.notifications)) {
                tracing::warn!(
                    user = self.user.as_str(),
                    cursor = self.cursor,
                    error = %e,
                    "notification stream ended by a failed read; the client resumes on reconnect"
                );
                return None;
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        let q = StreamQuery::parse(Some("after=7&access_token=a.b.c")).unwrap();
        assert_eq!(q.after, Some(7));
        assert_eq!(q.access_token.as_deref(), Some("a.b.c"));
        assert_eq!(StreamQuery::parse(None).unwrap().after, None);
        for bad in [
            "after=-1",
            "after=x",
            "after=1&after=2",
            "access_token=a&access_token=b",
        ] {
            assert!(StreamQuery::parse(Some(bad)).is_err(), "{bad}");
        }
        match StreamQuery::parse(Some("limit=5")) {
            Err(ApiError::BadRequest { code, .. }) => assert_eq!(code, "unknown_parameter"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_event_ids() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(LAST_EVENT_ID, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        assert_eq!(last_event_id(&headers(&[])).unwrap(), None);
        assert_eq!(last_event_id(&headers(&[""])).unwrap(), None);
        assert_eq!(last_event_id(&headers(&["42"])).unwrap(), Some(42));
        assert!(last_event_id(&headers(&["4 2"])).is_err());
        assert!(last_event_id(&headers(&["1", "2"])).is_err());
    }
}
