//! The read service, `notifyd serve`: each user's notifications over HTTP, read-only,
//! authenticated with the backend's JWTs, by polling, long-polling or Server-Sent Events.
//! Also `notifyd token`, a development helper, and an opt-in demo inbox ([`demo`]).
//!
//! A request goes through, in order: request log span → security headers → CORS (when
//! configured) → size limits → timeout → router → [`auth::CurrentUser`] (token, then the
//! per-user request limit) → handler ([`api`], [`stream`]) → cache ([`watermark`]) or SQL
//! ([`reads`], one round trip on a [`connections::ReadPool`] connection). Long-polls and
//! streams then wait in memory on the [`hub`], which the same LISTEN connection feeds.
//!
//! Invariants:
//! * the only user a handler can read is the token's user claim ([`auth::CurrentUser`]);
//! * the service never writes: read state and preferences belong to the backend;
//! * an empty poll (nothing newer than the cursor) is answered from memory while the
//!   LISTEN connection is up, and from the database otherwise; both give the same answer;
//! * every error is a JSON `{"error": {"code", "message"}}` ([`error::ApiError`]);
//! * an idle stream or long-poll costs no database work; one LISTEN connection per
//!   process serves them all ([`hub`]);
//! * shutdown: on the signal the server stops accepting, ends every stream and answers
//!   every long-poll at once ([`hub::Hub::close`]), finishes in-flight requests for at
//!   most the shutdown timeout, and returns.
//!
//! The rooms: [`settings`] (flags, checked at startup), [`state`] (what handlers share),
//! [`app`] here (the router and its layers; tests use it), [`service`] (background
//! tasks, serving, shutdown, `notifyd token`). The service imports nothing of the
//! worker's modules: the names both sides share are in [`crate::contract`].

pub mod api;
pub mod auth;
pub mod connections;
pub mod demo;
pub mod error;
pub mod hub;
pub mod limit;
pub mod middleware;
pub mod openapi;
pub mod reads;
pub mod rfc3339;
pub mod service;
pub mod session;
pub mod settings;
pub mod state;
pub mod stream;
pub mod watermark;

use std::time::Duration;

use axum::Router;
use axum::routing::get;

pub use service::{Service, print_token, run};
pub use settings::{DemoArgs, ServeArgs, Settings, StreamArgs, TokenArgs};
pub use state::{AppState, Metrics};

/// How long `/readyz` waits for `SELECT 1`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The router with every layer. Without a [`Service`] the cache stays off (every read
/// queries the database), which is correct, only slower.
pub fn app(state: AppState) -> Router {
    let cors = middleware::cors(&state.0.cors_origins, state.verifier().cookie().is_some());
    let mut router = Router::new()
        .route("/api/notifications", get(api::list))
        .route("/api/notifications/unread", get(api::unread))
        .route("/api/notifications/stream", get(stream::stream))
        .route("/api/openapi.json", get(api::openapi))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz));
    if state.demo().is_some() {
        router = router
            .route("/", get(demo::root))
            .route("/demo", get(demo::root))
            .route("/demo/", get(demo::index))
            .route("/demo/inbox.js", get(demo::script))
            .route("/demo/inbox.css", get(demo::style))
            .route("/demo/notifyd-client.js", get(demo::client))
            .route("/demo/token", get(demo::token));
    }
    let router = router
        // Counts and latencies by route pattern and status on /metrics; a route layer, so
        // that the matched pattern (never the raw path) is known.
        .route_layer(axum::middleware::from_fn(
            crate::telemetry::series::track_http,
        ))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::timeout,
        ))
        .layer(axum::middleware::from_fn(middleware::limits))
        .with_state(state);
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(axum::middleware::map_response(middleware::security_headers))
        .layer(middleware::trace())
}
