//! The one HTTP error type of the read service.
//!
//! Every failure a handler or extractor can produce is an [`ApiError`]. Its
//! `IntoResponse` writes `{"error": {"code": "...", "message": "..."}}` with a stable,
//! machine-readable `code` and a message meant for the client developer. Invariant: no
//! internal detail (SQL, driver error, token contents, key material) ever reaches a
//! response body; a 500 only says "internal error" and its cause is logged here instead.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Why a request was not authenticated. Each maps to 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header.
    Missing,
    /// A header that is not `Bearer <jwt>`, or a token that does not parse or verify
    /// (bad signature, disallowed algorithm, wrong issuer or audience, missing claim).
    Invalid,
    /// A well-formed, correctly signed token whose `exp` has passed.
    Expired,
    /// A verified token whose user claim (named here) is missing or not a user id.
    UserClaim(Arc<str>),
    /// A verified token whose `claim` does not have the required `value`
    /// (`NOTIFYD_JWT_REQUIRE`): typically a refresh token.
    ClaimMismatch { claim: Arc<str>, value: Arc<str> },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication failed: {0:?}")]
    Unauthorized(AuthFailure),
    #[error("bad request ({code}): {message}")]
    BadRequest { code: &'static str, message: String },
    #[error("cursor expired")]
    CursorExpired,
    #[error("too many requests")]
    RateLimited { retry_after: Duration },
    #[error("too many streams for this user")]
    TooManyStreams,
    #[error("too many streams in this process")]
    StreamsFull,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("request URI too long")]
    UriTooLong,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request timed out")]
    Timeout,
    #[error("database unavailable")]
    Unavailable,
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // No connection in time, or none at all: the database is down, unreachable or
            // saturated. That is a 503 (retry later), not a bug.
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                ApiError::Unavailable
            }
            other => ApiError::Internal(anyhow::Error::new(other).context("database query failed")),
        }
    }
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// HTTP status, error code and client-facing message.
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::Unauthorized(AuthFailure::Missing) => (
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "send the JWT as `Authorization: Bearer <token>`".into(),
            ),
            ApiError::Unauthorized(AuthFailure::Invalid) => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the bearer token is malformed or does not verify".into(),
            ),
            ApiError::Unauthorized(AuthFailure::Expired) => (
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "the bearer token has expired; get a new one".into(),
            ),
            ApiError::Unauthorized(AuthFailure::UserClaim(claim)) => (
                StatusCode::UNAUTHORIZED,
                "invalid_user_claim",
                format!(
                    "the token's `{claim}` claim, which names the user, is missing or is not a \
                     user id (a string of 1 to 128 characters without whitespace, or an integer)"
                ),
            ),
            ApiError::Unauthorized(AuthFailure::ClaimMismatch { claim, value }) => (
                StatusCode::UNAUTHORIZED,
                "token_claim_mismatch",
                format!(
                    "the token's `{claim}` claim must be `{value}`: this service accepts access \
                     tokens only (is this a refresh token?)"
                ),
            ),
            ApiError::BadRequest { code, message } => {
                (StatusCode::BAD_REQUEST, code, message.clone())
            }
            ApiError::CursorExpired => (
                StatusCode::GONE,
                "cursor_expired",
                "notifications after this cursor were deleted by retention before you \
                 fetched them; restart without `after` (or with after=0)"
                    .into(),
            ),
            ApiError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this user; retry after the Retry-After delay".into(),
            ),
            ApiError::TooManyStreams => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "this user has too many notification streams open; close one (another tab?) \
                 or retry after the Retry-After delay"
                    .into(),
            ),
            ApiError::StreamsFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "streams_full",
                "this server holds as many notification streams as it may; retry after the \
                 Retry-After delay (or poll meanwhile)"
                    .into(),
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".into(),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint only accepts GET".into(),
            ),
            ApiError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "the request headers are too large".into(),
            ),
            ApiError::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                "the request URI is too long".into(),
            ),
            ApiError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "requests to this API carry no body".into(),
            ),
            ApiError::Timeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took too long; retry later".into(),
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the service cannot reach its database; retry later".into(),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            ),
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code: `missing_token`, `invalid_token`, `token_expired`,
    /// `invalid_user_claim`, `token_claim_mismatch`, `invalid_parameter`,
    /// `unknown_parameter`, `invalid_cursor`, `cursor_expired`, `rate_limited`,
    /// `too_many_streams`, `streams_full`, `not_found`, `method_not_allowed`,
    /// `headers_too_large`, `uri_too_long`, `body_too_large`, `timeout`, `unavailable`,
    /// `internal`.
    #[schema(example = "invalid_parameter")]
    pub code: String,
    /// Human-readable explanation, for developers (not for end users).
    #[schema(example = "`limit` must be an integer from 1 to 200")]
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "internal error")
            }
            ApiError::Unavailable | ApiError::Timeout | ApiError::StreamsFull => {
                tracing::warn!(code, "request failed")
            }
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(failure) => {
                // RFC 6750 §3. The description never echoes the token.
                let value = match failure {
                    AuthFailure::Missing => r#"Bearer realm="notifyd""#,
                    AuthFailure::Invalid
                    | AuthFailure::UserClaim(_)
                    | AuthFailure::ClaimMismatch { .. } => {
                        r#"Bearer realm="notifyd", error="invalid_token""#
                    }
                    AuthFailure::Expired => {
                        r#"Bearer realm="notifyd", error="invalid_token", error_description="token expired""#
                    }
                };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
            }
            ApiError::RateLimited { retry_after } => {
                headers.insert(header::RETRY_AFTER, retry_after_secs(*retry_after).into());
            }
            ApiError::Unavailable | ApiError::Timeout => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // Stream slots free up when clients leave, not on a schedule: a few seconds
            // keeps reconnect loops slow without stranding a client for long.
            ApiError::TooManyStreams | ApiError::StreamsFull => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(STREAM_RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        response
    }
}

/// `Retry-After` of a refused stream, in seconds.
pub const STREAM_RETRY_AFTER_SECS: &str = "5";

/// Whole seconds for `Retry-After`, rounded up, at least 1 (0 would invite a retry storm).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
