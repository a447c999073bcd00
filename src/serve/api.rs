//! The HTTP endpoints: what a request may ask, and how each answer is decided.
//!
//! Polling protocol (also in docs/API.md and the OpenAPI description):
//! * `after` absent: the newest `limit` notifications, returned oldest first.
//! * `after=N`: notifications with `id > N`, oldest first, at most `limit`.
//! * `next_after` is always the cursor to send next: the last id returned, or the
//!   request's `after` when nothing is new. Without `after` and with nothing to return,
//!   it is the user's newest known id (so the next poll is cheap). Clients just echo it.
//! * `after=0` means "everything still retained" and never expires.
//! * `after=N>0` when a notification with an id above N was deleted (retention, or by
//!   the backend) before the client saw it: 410 `cursor_expired`. The rule is exact:
//!   the database keeps, per user, the highest id ever deleted (the horizon); the
//!   cursor has expired iff `0 < after < horizon`.
//! * `after` above anything this user ever had (newest id and horizon): 400
//!   `invalid_cursor` (for example a cursor kept across a change of user).
//!
//! Long-poll: `wait=S` (with `after`, at most [`MAX_WAIT`]) holds an empty answer until a
//! newer notification exists or `S` seconds pass, then answers as above. The waiter
//! subscribes to the user's announcements ([`super::hub`]) *before* its first read, so a
//! notification committed after that read always wakes it. The request timeout runs on
//! top of the wait ([`wait_allowance`]).
//!
//! How an answer is decided (see `watermark.rs` for why the cache can be trusted):
//! 1. cached snapshot, `after ≥` the feed's newest id: answer from memory, no query;
//! 2. cached snapshot, something newer: one page query; unread count from the cache,
//!    which is exact only up to the snapshot's newest id, so when the page holds rows
//!    above it (committed, not yet announced to this process) the answer is path 3's;
//! 3. no snapshot (or no `after`): one statement for page and snapshot, which refills
//!    the cache.

use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{CurrentUser, UserId};
use super::error::{ApiError, ErrorBody};
use super::hub::Wake;
use super::reads::{self, Feed, PageRows};
use super::rfc3339;

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest `limit` accepted.
pub const MAX_LIMIT: i64 = 200;
/// Longest long-poll `wait` accepted, in seconds.
pub const MAX_WAIT: u64 = 30;

/// One notification. The text is plain text (markup was removed when it was stored):
/// render it as text, never as HTML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Notification {
    /// Unique, and per user increasing in the order notifications become visible.
    #[schema(example = 1042)]
    pub id: i64,
    /// `new_message`, `status_change`, `system_alert`, `security_alert`, `digest`, or a
    /// type added later.
    #[schema(example = "new_message")]
    pub event_type: String,
    /// Plain text, at most 1,000 characters.
    #[schema(example = "You have a new message from Alice", max_length = 1000)]
    pub body: String,
    /// A relative path (`/inbox/7`) or an absolute http(s) URL, or null.
    #[schema(example = "/messages/7")]
    pub link: Option<String>,
    /// When the notification was stored (RFC 3339, UTC, microseconds).
    #[serde(serialize_with = "rfc3339::serialize")]
    #[schema(example = "2026-11-22T08:00:00.123456Z")]
    pub created_at: DateTime<Utc>,
    /// When it was marked read (RFC 3339, UTC, microseconds), or null while unread.
    #[serde(serialize_with = "rfc3339::serialize_option")]
    #[schema(example = json!(null))]
    pub read_at: Option<DateTime<Utc>>,
    /// For a `digest` notification, what it sums up; null for every other notification.
    #[schema(example = json!(null))]
    pub digest: Option<Digest>,
}

/// What a digest notification sums up: the events the rate limit (or a type's cap) held
/// back since the user's previous digest. Its `body` says the same in words ("12 more
/// notifications while you were away: 9 new messages, 3 status changes").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Digest {
    /// How many events were held back.
    #[schema(example = 12)]
    pub total: i64,
    /// Held back events per event type.
    #[schema(example = json!({"new_message": 9, "status_change": 3}))]
    pub counts: std::collections::BTreeMap<String, i64>,
    /// When the first of them was held back (RFC 3339, UTC, microseconds).
    #[serde(serialize_with = "rfc3339::serialize")]
    #[schema(example = "2026-11-22T08:00:00.123456Z")]
    pub first_at: DateTime<Utc>,
    /// When the last of them was held back (RFC 3339, UTC, microseconds).
    #[serde(serialize_with = "rfc3339::serialize")]
    #[schema(example = "2026-11-22T08:40:00.123456Z")]
    pub last_at: DateTime<Utc>,
}

/// The answer of both notification endpoints.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationPage {
    /// Oldest first.
    #[schema(value_type = Vec<Notification>)]
    pub notifications: PageRows,
    /// The `after` to send on the next request: the last id returned, or the request's
    /// `after` when nothing is new. Always echo it.
    #[schema(example = 1042)]
    pub next_after: i64,
    /// This user's unread notifications (all of them, not only this page).
    #[schema(example = 3)]
    pub unread_count: i64,
}

impl IntoResponse for NotificationPage {
    fn into_response(self) -> Response {
        // Sized for a typical row, so that a full page is written without regrowing.
        let mut body = Vec::with_capacity(64 + 320 * self.notifications.len());
        match serde_json::to_writer(&mut body, &self) {
            Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => ApiError::Internal(anyhow::Error::new(e).context("cannot encode a page"))
                .into_response(),
        }
    }
}

/// Query parameters of both notification endpoints, as documented. Nothing else is
/// accepted; [`PageQuery::parse`] is the parser.
#[derive(Debug, Clone, Copy, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Cursor: return notifications with `id > after`, oldest first. Absent: the newest
    /// page (still oldest first). `0`: everything still retained, never expired. Send
    /// the previous response's `next_after`.
    #[param(minimum = 0, example = 1000)]
    pub after: Option<i64>,
    /// Page size, 1 to 200.
    #[param(minimum = 1, maximum = 200, default = 50)]
    pub limit: Option<i64>,
    /// Long-poll: when nothing is newer than `after`, hold the request up to this many
    /// seconds (0 to 30) until something is, then answer as usual (an empty page when
    /// the wait runs out). Requires `after`.
    #[param(minimum = 0, maximum = 30, example = 25)]
    pub wait: Option<u64>,
}

/// Parsed query parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    pub after: Option<i64>,
    pub limit: i64,
    /// A long-poll wait (never zero: `wait=0` is no wait).
    pub wait: Option<Duration>,
}

impl PageQuery {
    /// Parse a raw query string strictly: only `after`, `limit` and `wait`, each at most
    /// once, each a plain decimal integer in range, and `wait` only with `after`.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let [after, limit, wait] = strict_query(query, ["after", "limit", "wait"])?;
        let after = parse_after(after)?;
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(v) => decimal(&v)
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_parameter",
                        format!("`limit` must be an integer from 1 to {MAX_LIMIT}"),
                    )
                })?,
        };
        let wait = match wait {
            None => None,
            Some(v) => {
                let secs = decimal(&v)
                    .and_then(|n| u64::try_from(n).ok())
                    .filter(|n| *n <= MAX_WAIT)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_parameter",
                            format!("`wait` must be a number of seconds from 0 to {MAX_WAIT}"),
                        )
                    })?;
                if after.is_none() {
                    return Err(ApiError::bad_request(
                        "invalid_parameter",
                        "`wait` needs `after`: a long-poll waits for notifications newer \
                         than a cursor",
                    ));
                }
                (secs > 0).then(|| Duration::from_secs(secs))
            }
        };
        Ok(PageQuery { after, limit, wait })
    }
}

/// How long a request may wait on top of the request timeout: the `wait` of a valid
/// long-poll, else nothing. Lenient on purpose (the handler rejects a bad `wait` at
/// once, so a bad one needs no allowance); it runs before routing, on every request.
pub fn wait_allowance(uri: &Uri) -> Duration {
    if !matches!(
        uri.path(),
        "/api/notifications" | "/api/notifications/unread"
    ) {
        return Duration::ZERO;
    }
    let Some(query) = uri.query().filter(|q| q.contains("wait=")) else {
        return Duration::ZERO;
    };
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "wait")
        .and_then(|(_, v)| decimal(&v))
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n <= MAX_WAIT)
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// Split a query string strictly: every key must be one of `allowed`, each at most once.
/// The values come back in the order of `allowed` (`None`: absent).
pub(super) fn strict_query<const N: usize>(
    query: Option<&str>,
    allowed: [&str; N],
) -> Result<[Option<String>; N], ApiError> {
    let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let Some(slot) = allowed.iter().position(|k| *k == key) else {
            let shown: String = key.chars().take(40).collect();
            let names: Vec<String> = allowed.iter().map(|k| format!("`{k}`")).collect();
            let list = match names.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                None => String::new(),
            };
            return Err(ApiError::bad_request(
                "unknown_parameter",
                format!("unknown query parameter `{shown}`: only {list} are accepted"),
            ));
        };
        if values[slot].is_some() {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("`{key}` is given more than once"),
            ));
        }
        values[slot] = Some(value.into_owned());
    }
    Ok(values)
}

/// The `after` cursor of a query: absent, or a notification id.
pub(super) fn parse_after(value: Option<String>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            decimal(&v).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_parameter",
                    "`after` must be a notification id: an integer from 0 to 9223372036854775807",
                )
            })
        })
        .transpose()
}

/// A non-negative decimal integer without sign, spaces or exponent.
pub(super) fn decimal(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// List this user's notifications.
#[utoipa::path(
    get,
    path = "/api/notifications",
    tag = "notifications",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page, oldest first", body = NotificationPage),
        (status = 400, description = "Invalid or unknown parameter, or a cursor never issued to this user (`invalid_cursor`)", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or unverifiable token, no user in its user claim (`invalid_user_claim`), or not an access token (`token_claim_mismatch`)", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "Bearer challenge (RFC 6750)"))),
        (status = 410, description = "`cursor_expired`: notifications after the cursor were deleted before the client saw them; restart without `after`", body = ErrorBody),
        (status = 429, description = "Per-user request limit reached", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Database unreachable or request timed out", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    RawQuery(query): RawQuery,
) -> Result<NotificationPage, ApiError> {
    let query = PageQuery::parse(query.as_deref())?;
    answer(&state, &user, Feed::All, query).await
}

/// List this user's unread notifications (same shape and cursor rules).
#[utoipa::path(
    get,
    path = "/api/notifications/unread",
    tag = "notifications",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of unread notifications, oldest first", body = NotificationPage),
        (status = 400, description = "Invalid or unknown parameter, or a cursor never issued to this user (`invalid_cursor`)", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or unverifiable token, no user in its user claim (`invalid_user_claim`), or not an access token (`token_claim_mismatch`)", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "Bearer challenge (RFC 6750)"))),
        (status = 410, description = "`cursor_expired`: restart without `after`", body = ErrorBody),
        (status = 429, description = "Per-user request limit reached", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Database unreachable or request timed out", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn unread(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    RawQuery(query): RawQuery,
) -> Result<NotificationPage, ApiError> {
    let query = PageQuery::parse(query.as_deref())?;
    answer(&state, &user, Feed::Unread, query).await
}

/// A page now, or, for a long-poll, as soon as it is not empty (or the wait is over).
async fn answer(
    state: &AppState,
    user: &UserId,
    feed: Feed,
    query: PageQuery,
) -> Result<NotificationPage, ApiError> {
    let (Some(wait), Some(after)) = (query.wait, query.after) else {
        return read(state, user, feed, query).await;
    };
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribe before the first read: whatever commits after it wakes us.
    // Long-polls are not capped: the only refusal is shutdown, which answers at once.
    let Ok(mut subscription) = state.hub().subscribe(user.as_str(), false) else {
        return read(state, user, feed, query).await;
    };
    loop {
        let page = read(state, user, feed, query).await?;
        if !page.notifications.is_empty() {
            return Ok(page);
        }
        match tokio::time::timeout_at(deadline, subscription.changed(after)).await {
            Ok(Wake::Check) => {}
            Ok(Wake::Closing) => return Ok(page),
            // The wait is over: answer with a fresh read (the unread count may have
            // changed meanwhile; usually it comes from memory).
            Err(_) => return read(state, user, feed, query).await,
        }
    }
}

/// The cursor a client that holds none starts a stream from: everything this user has
/// now counts as seen (the ceiling of its snapshot, so never an expired cursor).
pub async fn newest(state: &AppState, user: &UserId) -> Result<i64, ApiError> {
    let uid = user.as_str();
    let cache = state.cache();
    if let Some(snapshot) = cache.lookup(uid) {
        return Ok(snapshot.ceiling());
    }
    let ticket = cache.begin_fill(uid);
    state.metrics().count_query();
    // No row is above i64::MAX: the statement reads the snapshot only.
    let (_, snapshot) =
        reads::page_with_snapshot(state.pool(), uid, Feed::All, Some(i64::MAX), 1).await?;
    if let Some(ticket) = ticket {
        cache.complete_fill(uid, ticket, snapshot);
    }
    Ok(snapshot.ceiling())
}

/// Decide one page (see the module docs for the three paths).
pub async fn read(
    state: &AppState,
    user: &UserId,
    feed: Feed,
    query: PageQuery,
) -> Result<NotificationPage, ApiError> {
    let uid = user.as_str();
    let cache = state.cache();
    if let Some(after) = query.after
        && let Some(snapshot) = cache.lookup(uid)
        // A cursor above everything we know may be a cache that lags: ask the database.
        && after <= snapshot.ceiling()
    {
        if after > 0 && after < snapshot.horizon {
            return Err(ApiError::CursorExpired);
        }
        let newest = match feed {
            Feed::All => snapshot.newest,
            Feed::Unread => snapshot.newest_unread,
        };
        if newest <= after {
            state.metrics().count_cache_answer();
            return Ok(NotificationPage {
                notifications: PageRows::default(),
                next_after: after,
                unread_count: snapshot.unread,
            });
        }
        state.metrics().count_query();
        let rows = reads::page(state.pool(), uid, feed, Some(after), query.limit).await?;
        // The snapshot's count is exact up to its ceiling only. Rows above it committed
        // after the snapshot, and their announcement has not reached the cache yet: a
        // client takes `unread_count` as exact up to `next_after`, so answer those from
        // one statement instead (it refills the cache too).
        if rows.last_id().is_none_or(|id| id <= snapshot.ceiling()) {
            let next_after = rows.last_id().unwrap_or(after);
            return Ok(NotificationPage {
                notifications: rows,
                next_after,
                unread_count: snapshot.unread,
            });
        }
    }

    let ticket = cache.begin_fill(uid);
    state.metrics().count_query();
    let (rows, snapshot) =
        reads::page_with_snapshot(state.pool(), uid, feed, query.after, query.limit).await?;
    if let Some(ticket) = ticket {
        cache.complete_fill(uid, ticket, snapshot);
    }
    if let Some(after) = query.after {
        if after > 0 && after < snapshot.horizon {
            return Err(ApiError::CursorExpired);
        }
        if after > snapshot.ceiling() {
            return Err(ApiError::bad_request(
                "invalid_cursor",
                "`after` is above every notification this user ever had: it was not issued \
                 to this user; restart without `after`",
            ));
        }
    }
    let next_after = rows
        .last_id()
        .or(query.after)
        .unwrap_or_else(|| snapshot.ceiling());
    Ok(NotificationPage {
        notifications: rows,
        next_after,
        unread_count: snapshot.unread,
    })
}

/// Status of the health endpoints.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Readiness, with the state of the notification cache.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    #[schema(example = "ok")]
    pub status: &'static str,
    /// `live` while the LISTEN connection is up (empty polls are answered from memory),
    /// `off` otherwise (every poll queries the database; still correct).
    #[schema(example = "live")]
    pub cache: &'static str,
}

/// Liveness: the process is up. Never touches the database.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process is up", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the database answers `SELECT 1` within a short timeout.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The database is reachable", body = Readiness),
        (status = 503, description = "The database is not reachable", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    match tokio::time::timeout(super::READY_TIMEOUT, reads::ping(state.pool())).await {
        Ok(Ok(())) => Ok(Json(Readiness {
            status: "ok",
            cache: if state.cache().is_live() {
                "live"
            } else {
                "off"
            },
        })),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(ApiError::Unavailable)
        }
        Err(_) => {
            tracing::warn!("readiness check timed out");
            Err(ApiError::Unavailable)
        }
    }
}

/// This API's OpenAPI description.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses((status = 200, description = "OpenAPI 3.1 description of this API", content_type = "application/json"))
)]
pub async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_json(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(q: &str) -> PageQuery {
        PageQuery::parse(Some(q)).unwrap_or_else(|e| panic!("{q}: {e}"))
    }

    fn code(q: &str) -> String {
        match PageQuery::parse(Some(q)) {
            Err(ApiError::BadRequest { code, .. }) => code.to_owned(),
            other => panic!("{q}: {other:?}"),
        }
    }

    #[test]
    fn timestamps_are_fixed_width_rfc3339() {
        use chrono::TimeZone;
        let page = |t: DateTime<Utc>| {
            let n = Notification {
                id: 1,
                event_type: "x".into(),
                body: "y".into(),
                link: None,
                created_at: t,
                read_at: Some(t),
                digest: None,
            };
            serde_json::to_value(&n).unwrap()
        };
        let t =
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap() + chrono::Duration::microseconds(67);
        let v = page(t);
        assert_eq!(v["created_at"], "2026-01-02T03:04:05.000067Z");
        assert_eq!(v["read_at"], "2026-01-02T03:04:05.000067Z");
        let parsed: DateTime<Utc> = v["created_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(parsed, t);
        let far = Utc.with_ymd_and_hms(12345, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            page(far)["created_at"],
            far.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
    }

    #[test]
    fn accepts() {
        assert_eq!(
            ok(""),
            PageQuery {
                after: None,
                limit: 50,
                wait: None,
            }
        );
        assert_eq!(
            ok("after=0&limit=200"),
            PageQuery {
                after: Some(0),
                limit: 200,
                wait: None,
            }
        );
        assert_eq!(
            ok("limit=1&after=9223372036854775807").after,
            Some(i64::MAX)
        );
    }

    #[test]
    fn long_poll_waits() {
        assert_eq!(ok("after=5&wait=30").wait, Some(Duration::from_secs(30)));
        assert_eq!(ok("wait=1&after=0").wait, Some(Duration::from_secs(1)));
        assert_eq!(ok("after=5&wait=0").wait, None);
        let allowance = |uri: &str| wait_allowance(&uri.parse().unwrap());
        assert_eq!(
            allowance("/api/notifications?after=1&wait=25"),
            Duration::from_secs(25)
        );
        assert_eq!(
            allowance("/api/notifications/unread?wait=3&after=1"),
            Duration::from_secs(3)
        );
        assert_eq!(
            allowance("/api/notifications?after=1&wait=31"),
            Duration::ZERO
        );
        assert_eq!(allowance("/api/notifications?after=1"), Duration::ZERO);
        assert_eq!(allowance("/healthz?wait=30"), Duration::ZERO);
    }

    #[test]
    fn rejects() {
        for q in [
            "after=-1",
            "after=+1",
            "after=1.0",
            "after=abc",
            "after=",
            "after",
            "after=9223372036854775808",
            "after=1&after=2",
            "limit=0",
            "limit=201",
            "limit=-5",
            "limit=x",
            "limit=1e2",
            "after=%201",
            "after=1&wait=31",
            "after=1&wait=-1",
            "after=1&wait=1.5",
            "after=1&wait=",
            "after=1&wait=1&wait=2",
            "wait=5",
        ] {
            assert_eq!(code(q), "invalid_parameter", "{q}");
        }
        assert_eq!(code("user_id=7"), "unknown_parameter");
        assert_eq!(code("after=1&Wait=5"), "unknown_parameter");
        assert_eq!(code("after=1&foo"), "unknown_parameter");
    }
}
