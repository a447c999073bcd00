//! HTTP hygiene around every route: request logs, security headers, CORS, size limits
//! and a request timeout.
//!
//! Invariants:
//! * every response, errors and CORS preflights included, carries `Cache-Control:
//!   no-store`, `X-Content-Type-Options: nosniff`, `Content-Security-Policy: default-src
//!   'none'; frame-ancestors 'none'`, `X-Frame-Options: DENY` and `Referrer-Policy:
//!   no-referrer`; only the demo page and its assets (demo mode) get the page policy of
//!   [`super::demo::PAGE_CSP`] instead;
//! * CORS is off unless origins are configured; when on, only those origins, only GET
//!   and HEAD, only the `Authorization` and `Last-Event-ID` headers; credentials (the
//!   cookie) are allowed only when a token cookie is configured (`NOTIFYD_JWT_COOKIE`),
//!   and then only for those listed origins, never a wildcard;
//! * request logs carry method, path, status, latency and the authenticated user id,
//!   never a header value and never the query string; the token cannot reach a log, not
//!   even the stream's `?access_token=`;
//! * a request with more than [`MAX_HEADER_BYTES`] of headers, a URI longer than
//!   [`MAX_URI_BYTES`] or a body is refused before any handler runs, with the usual JSON
//!   error; one that takes longer than the request timeout (plus a long-poll's `wait`)
//!   to produce its response head is answered 503. A streamed body (SSE) is not under
//!   the timeout.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::LatencyUnit;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use super::AppState;
use super::api::wait_allowance;
use super::demo::{DemoPage, PAGE_CSP};
use super::error::ApiError;

/// Sum of header names and values accepted in one request.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 2048;
/// Largest request body accepted. No endpoint reads one.
pub const MAX_BODY_BYTES: u64 = 0;

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

const SECURITY_HEADERS: [(HeaderName, &str); 5] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
];

pub async fn security_headers(mut response: Response) -> Response {
    let page = response.extensions().get::<DemoPage>().is_some();
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if page {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_CSP),
        );
    }
    response
}

pub async fn limits(request: Request, next: Next) -> Response {
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return ApiError::UriTooLong.into_response();
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge.into_response();
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = request.headers().contains_key(header::TRANSFER_ENCODING);
    if chunked || declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return ApiError::BodyTooLarge.into_response();
    }
    next.run(request).await
}

pub async fn timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // A long-poll may hold its answer for `wait`; the timeout runs on top of that.
    let limit = state.request_timeout() + wait_allowance(request.uri());
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// `None` when no origin is configured: no CORS headers at all, so browsers refuse
/// cross-origin reads. `credentials`: a token cookie is configured, so the listed
/// origins (only they: the list is explicit, never `*`) may send it with
/// `credentials: "include"` / `withCredentials` and read the answer.
pub fn cors(origins: &[HeaderValue], credentials: bool) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([Method::GET, Method::HEAD])
            .allow_headers([header::AUTHORIZATION, LAST_EVENT_ID])
            .expose_headers([header::RETRY_AFTER])
            .allow_credentials(credentials)
            .max_age(Duration::from_secs(600)),
    )
}

/// Check and normalise the configured CORS origins (`scheme://host[:port]`).
pub fn parse_origins(raw: &[String]) -> anyhow::Result<Vec<HeaderValue>> {
    let mut out = Vec::new();
    for origin in raw.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let bad = |why: &str| {
            anyhow::anyhow!(
                "NOTIFYD_CORS_ORIGINS: `{origin}` {why}; list origins as scheme://host[:port], \
                 comma-separated, e.g. https://app.example.com"
            )
        };
        if origin == "*" {
            return Err(bad("is a wildcard, which is not allowed"));
        }
        let url = url::Url::parse(origin).map_err(|_| bad("is not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("is not http or https"));
        }
        if url.host_str().is_none()
            || !url.username().is_empty()
            || url.password().is_some()
            || url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
            || origin.ends_with('/')
        {
            return Err(bad("is not an origin (no path, query or user info)"));
        }
        let normalised = url.origin().ascii_serialization();
        out.push(HeaderValue::from_str(&normalised).map_err(|_| bad("is not a valid header"))?);
    }
    Ok(out)
}

/// Structured request logs: one span per request, a line per response at INFO.
pub fn trace() -> TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    impl Fn(&Request) -> tracing::Span + Clone,
    (),
    DefaultOnResponse,
    (),
    (),
    (),
> {
    TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            tracing::info_span!(
                "request",
                method = %request.method(),
                path = %request.uri().path(),
                user = tracing::field::Empty,
            )
        })
        .on_request(())
        .on_response(
            DefaultOnResponse::new()
                .level(Level::INFO)
                .latency_unit(LatencyUnit::Micros),
        )
        .on_body_chunk(())
        .on_eos(())
        // Server errors are logged where they happen, with their cause (error.rs).
        .on_failure(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let ok = parse_origins(&[
            "https://app.example.com".into(),
            " http://localhost:3000 ".into(),
            "".into(),
        ])
        .unwrap();
        assert_eq!(ok, ["https://app.example.com", "http://localhost:3000"]);
        for bad in [
            "*",
            "app.example.com",
            "ftp://x.example",
            "https://x.example/path",
            "https://x.example/",
            "https://u@x.example",
        ] {
            let e = parse_origins(&[bad.into()]).unwrap_err();
            assert!(e.to_string().contains("NOTIFYD_CORS_ORIGINS"), "{bad}: {e}");
        }
    }
}
